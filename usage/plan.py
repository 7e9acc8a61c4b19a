"""Saved plans: the dry run writes what it found; the execute repairs that, or nothing.

A reviewer approves a dry run for one cutoff and workspace on one database. The dry run with
``--plan-out`` saves it as a plan: the cutoff, the workspace, the database's identity, the
database time it was made, the totals and the per workspace/day groups, a fingerprint of the
candidate set and a checksum over the whole document. ``--execute --plan`` takes its cutoff
and workspace from the plan and refuses, in one line and before anything is written, when:

* the file is not such a plan, or was edited (its checksum no longer matches);
* it was made on another database (host, port, name, the database's oid, and the server's
  system identifier when both sides can read it);
* it is older than ``--plan-max-age`` by the database's clock;
* the candidates now are not covered by it: a workspace/day group it does not have, or a
  group with more rows or more tokens than planned, or with as many rows but other ones.

Fewer rows than planned is allowed (ingestion rewrote some since, which makes them no longer
eligible) and reported.

The fingerprint is cheap on both sides. Each group carries an ids digest: the XOR of a 64-bit
hash of every row id in it, computed in the dry run's own aggregate (``usage.repair.summary``) at
no extra pass. The execute computes the same figures over the snapshot its batches will
walk, under the run lock and before the run record exists (``ExecuteOptions.check_snapshot``
in ``usage.repair.backfill``): one aggregate over the snapshot's rows. The batches only ever drop
rows from that snapshot, so what is repaired is within what was checked. The guarantee is
per group: never more rows, more input tokens, more tokens removed or more clamped rows than
reviewed in any workspace/day, never a workspace/day that was not reviewed, and, where a
group has as many rows as planned, exactly the planned rows.

The checksum is a SHA-256 over the document's canonical JSON (sorted keys, no spaces), so
re-indenting the file is fine and changing any value is not. It detects editing, not a
forger who recomputes it; the checks against the database are what keep the repair within
the plan.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from django.db import connection, transaction

from usage import render
from usage.db import database_now, set_local_timeouts
from usage.eligibility import compose
from usage.events import json_default, log_event
from usage.options import duration_seconds, shown
from usage.output.document import GROUP_FIELDS, TOTAL_FIELDS
from usage.repair.backfill import WORK_TABLE
from usage.repair.summary import DryRunSummary, SummaryGroup

logger = logging.getLogger("usage.plan")

PLAN_KIND = "codex_usage_backfill_plan"
PLAN_VERSION = 1
# How old a plan may be, by the database's clock, when it is executed.
DEFAULT_MAX_AGE_SECONDS = 24 * 3600.0
DEFAULT_MAX_AGE = "24h"
MAX_AGE_LIMIT_SECONDS = 30 * 24 * 3600.0
# A plan file larger than this is not one this tool wrote (or not one worth reading).
MAX_PLAN_BYTES = 1 << 30
# The group figures a plan's fingerprint covers; "more than planned" is judged on these.
CHECKED_FIGURES = ("rows", "input_before", "input_tokens_removed", "clamped_rows")
FIGURE_WORDS = {
    "rows": "candidate rows",
    "input_before": "input tokens before the repair",
    "input_tokens_removed": "input tokens to remove",
    "clamped_rows": "rows clamped to 0",
}
DIGEST_MASK = (1 << 64) - 1
# A plan's string fields (host, names, times, ids) are at most this long.
MAX_TEXT_FIELD = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX16 = re.compile(r"[0-9a-f]{16}")

IDENTITY_SQL = """
SELECT current_database(),
       d.oid::bigint,
       coalesce(has_function_privilege(
           to_regprocedure('pg_catalog.pg_control_system()'), 'EXECUTE'), false)
FROM pg_catalog.pg_database d
WHERE d.datname = current_database()"""

SYSTEM_IDENTIFIER_SQL = "SELECT system_identifier::text FROM pg_catalog.pg_control_system()"

# The plan's group figures over the execute's snapshot: the same definitions as the dry
# run's summary (``usage.repair.summary.SUMMARY_SQL``), for the snapshot's rows that are still
# eligible (the batches re-check the same condition under the row lock).
SNAPSHOT_FIGURES_SQL = f"""
SELECT a.workspace_id,
       {{bucket_hour}}::date,
       count(*),
       sum(tu.input_tokens)::bigint,
       sum({{removed_input}})::bigint,
       count(*) FILTER (WHERE {{is_clamped}}),
       bit_xor(uuid_hash_extended(tu.id, 0))
FROM {WORK_TABLE} w
JOIN {{task_usage}} tu ON tu.id = w.id
JOIN {{agent_task_queue}} q ON q.id = tu.task_id
JOIN {{agent}} a ON a.id = q.agent_id
WHERE {{row_eligible_where}}
GROUP BY 1, 2"""

NEW_PLAN_ADVICE = "make a new plan with --plan-out and have it reviewed again"


class PlanError(ValueError):
    """A plan cannot be written, read or executed here; the message is one line."""


# -- the pieces of a plan ------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseIdentity:
    """Which database this is: where the tool connects, and what the server says it is."""

    host: str
    port: int | None
    name: str
    oid: int
    # None when the role may not call pg_control_system() (see ``read_identity``).
    system_identifier: str | None

    def describe(self) -> str:
        system = self.system_identifier or "unknown"
        return f"{self.host}:{self.port}/{self.name} (oid {self.oid}, system {system})"

    def document(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "name": self.name,
            "oid": self.oid,
            "system_identifier": self.system_identifier,
        }

    def differences(self, other: DatabaseIdentity) -> list[str]:
        """What tells ``other`` apart from this one; the system identifier if both know it."""
        named = [
            ("host", self.host, other.host),
            ("port", self.port, other.port),
            ("database name", self.name, other.name),
            ("database oid", self.oid, other.oid),
        ]
        if self.system_identifier is not None and other.system_identifier is not None:
            named.append(("system identifier", self.system_identifier, other.system_identifier))
        return [name for name, mine, theirs in named if mine != theirs]


@dataclass(frozen=True)
class GroupFigures:
    """What the fingerprint says about one workspace/day group of candidates."""

    workspace_id: str
    date_utc: str
    rows: int
    input_before: int
    input_tokens_removed: int
    clamped_rows: int
    ids_digest: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.workspace_id, self.date_utc)

    def line(self) -> str:
        return "|".join(
            [self.workspace_id, self.date_utc, *(str(getattr(self, f)) for f in CHECKED_FIGURES)]
            + [self.ids_digest]
        )


@dataclass(frozen=True)
class Plan:
    """A plan read back from its file, checked and ready to be compared with the database."""

    given: str
    created_at: datetime
    cutoff: datetime
    workspace_id: uuid.UUID | None
    database: DatabaseIdentity
    groups: tuple[GroupFigures, ...]
    rows: int
    input_tokens_removed: int
    fingerprint: str

    @property
    def name(self) -> str:
        return f"--plan {shown(self.given)}"


@dataclass(frozen=True)
class PlanOutcome:
    """How the candidates at the execute compare with the plan (they are within it)."""

    given: str
    fingerprint: str
    created_at: datetime
    age_seconds: float
    rows: int
    rows_now: int
    input_tokens_removed: int
    input_tokens_removed_now: int
    identical: bool

    @property
    def rows_gone(self) -> int:
        return self.rows - self.rows_now

    def document(self) -> dict[str, Any]:
        return {
            "file": self.given,
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
            "age_seconds": round(self.age_seconds, 3),
            "rows": self.rows,
            "rows_now": self.rows_now,
            "rows_gone": self.rows_gone,
            "input_tokens_removed": self.input_tokens_removed,
            "input_tokens_removed_now": self.input_tokens_removed_now,
            "identical": self.identical,
        }

    def summary(self) -> str:
        """One line for the operator: exactly the plan, or what is no longer there."""
        if self.identical:
            return (
                f"Plan check: the candidates are exactly the planned "
                f"{render.number(self.rows)} rows (fingerprint {short(self.fingerprint)})."
            )
        return (
            f"Plan check: {render.number(self.rows_now)} of the {render.number(self.rows)} "
            f"planned rows are candidates now ({render.number(self.input_tokens_removed_now)} "
            f"of {render.number(self.input_tokens_removed)} input tokens to remove); "
            f"{render.number(self.rows_gone)} planned "
            + (
                "row is no longer eligible (rewritten by ingestion or repaired since the "
                "plan) and is left alone."
                if self.rows_gone == 1
                else "rows are no longer eligible (rewritten by ingestion or repaired since "
                "the plan) and are left alone."
            )
        )


# A fingerprint as a line shows it.
short = render.short_hash

# -- writing a plan ------------------------------------------------------------------------


def read_identity() -> DatabaseIdentity:
    """This connection's database, as a plan names it.

    ``pg_control_system()`` gives the server's system identifier, which tells a copy made
    with ``initdb`` or ``pg_upgrade`` from the original. Hosted services may withhold it
    from ordinary roles: the privilege is asked first (never an error inside the caller's
    transaction), and without it the identifier is left out on that side and the other
    parts of the identity decide.
    """
    connection.ensure_connection()
    info = connection.connection.info
    with connection.cursor() as cursor:
        cursor.execute(IDENTITY_SQL)
        name, oid, may_read = cursor.fetchone()
        system_identifier = None
        if may_read:
            cursor.execute(SYSTEM_IDENTIFIER_SQL)
            system_identifier = cursor.fetchone()[0]
    return DatabaseIdentity(
        host=str(info.host or ""),
        port=int(info.port) if info.port else None,
        name=name,
        oid=int(oid),
        system_identifier=system_identifier,
    )


def group_figures(group: SummaryGroup) -> GroupFigures:
    return GroupFigures(
        workspace_id=str(group.workspace_id),
        date_utc=group.date_utc.isoformat(),
        rows=group.rows,
        input_before=group.input_before,
        input_tokens_removed=group.input_tokens_removed,
        clamped_rows=group.clamped_rows,
        ids_digest=digest_hex(group.ids_digest),
    )


def digest_hex(value: int | None) -> str:
    """A signed 64-bit digest as 16 hex digits (a JSON number would lose digits in JS)."""
    return f"{(value or 0) & DIGEST_MASK:016x}"


def fingerprint(
    cutoff: datetime, workspace_id: uuid.UUID | None, groups: Iterable[GroupFigures]
) -> str:
    """SHA-256 over the candidate set's description: scope, then each group's figures."""
    digest = hashlib.sha256(
        f"{PLAN_KIND}/{PLAN_VERSION}|{timestamp(cutoff)}|{workspace_id or ''}\n".encode()
    )
    for group in sorted(groups, key=lambda g: g.key):
        digest.update(f"{group.line()}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def checksum(document: dict[str, Any]) -> str:
    """SHA-256 over the document's canonical JSON, without its own checksum field."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def timestamp(value: datetime) -> str:
    """A time as the plan writes it: RFC 3339 in UTC, to the microsecond."""
    return json_default(value.astimezone(UTC))


def plan_document(summary: DryRunSummary, identity: DatabaseIdentity) -> dict[str, Any]:
    """The plan of a dry run that kept every group (``load_summary(max_groups=None)``)."""
    if summary.group_count != len(summary.groups):
        raise ValueError("a plan needs every group of the summary")
    totals = vars(summary.totals)
    groups = [
        {
            **{key: _plain(getattr(group, key)) for key in GROUP_FIELDS},
            "ids_digest": digest_hex(group.ids_digest),
        }
        for group in summary.groups
    ]
    document: dict[str, Any] = {
        "kind": PLAN_KIND,
        "plan_version": PLAN_VERSION,
        "created_at": timestamp(summary.database_now),
        "cutoff": timestamp(summary.cutoff),
        "workspace_id": str(summary.workspace_id) if summary.workspace_id else None,
        "database": identity.document(),
        "totals": {key: totals[key] for key in TOTAL_FIELDS},
        "expected_rollup_keys": summary.totals.rollup_keys,
        "group_count": summary.group_count,
        "groups": groups,
        "fingerprint": fingerprint(
            summary.cutoff, summary.workspace_id, (group_figures(g) for g in summary.groups)
        ),
    }
    document["checksum"] = checksum(document)
    return document


def _plain(value: Any) -> Any:
    """A value as JSON holds it, so that the checksum is computed on what the file says."""
    return value if isinstance(value, int | str) else json_default(value)


def plan_text(document: dict[str, Any]) -> str:
    """The file's text: indented for the reviewer, one line per group (a table to read, and
    less than half the size of an indented list). The checksum ignores the layout.
    """
    placeholder = f"groups-{uuid.uuid4().hex}"
    text = json.dumps({**document, "groups": placeholder}, indent=2, ensure_ascii=False)
    lines = ",\n".join(
        f"    {json.dumps(group, ensure_ascii=False)}" for group in document["groups"]
    )
    return text.replace(json.dumps(placeholder), f"[\n{lines}\n  ]" if lines else "[]", 1)


# -- reading a plan ------------------------------------------------------------------------


def read_plan(given: str | None, *, flag: str = "--plan") -> Plan:
    """Read, check and parse a plan file; every problem is a one-line ``PlanError``."""
    value = "" if given is None else str(given)
    name = f"{flag} {shown(value)}"
    document = _load_json(_read_bytes(value, flag), name)
    if not isinstance(document, dict) or document.get("kind") != PLAN_KIND:
        if isinstance(document, dict) and document.get("mode") in ("dry_run", "execute"):
            raise PlanError(
                f"{name} is a result of --format json, not a plan: write the plan with "
                "--plan-out plan.json in the dry run"
            )
        raise PlanError(
            f'{name} is not a plan written by --plan-out (no "kind": "{PLAN_KIND}"); '
            "give the file the dry run wrote"
        )
    version = document.get("plan_version")
    if type(version) is not int or version != PLAN_VERSION:
        found = version if type(version) is int else shown(version)
        raise PlanError(
            f"{name} is plan version {found}; this tool reads version {PLAN_VERSION}: "
            f"{NEW_PLAN_ADVICE}"
        )
    if "checksum" not in document:
        raise PlanError(
            f"{name} has no checksum (--plan-out always writes one); {NEW_PLAN_ADVICE}"
        )
    if document["checksum"] != checksum(document):
        raise PlanError(
            f"{name} was changed since --plan-out wrote it (its checksum does not match its "
            f"content); {NEW_PLAN_ADVICE}"
        )
    try:
        plan = _parse_plan(document, value)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise PlanError(
            f"{name} is not a valid plan ({_field_problem(exc)}); {NEW_PLAN_ADVICE}"
        ) from None
    if fingerprint(plan.cutoff, plan.workspace_id, plan.groups) != plan.fingerprint:
        raise PlanError(
            f"{name} is not a valid plan (its fingerprint does not match its "
            f"groups); {NEW_PLAN_ADVICE}"
        )
    return plan


def _read_bytes(value: str, flag: str) -> bytes:
    """The file's bytes: a regular file or a pipe (``--plan <(...)``), never a device."""

    def refuse(why: str) -> PlanError:
        return PlanError(f"{flag} {shown(value)} {why}")

    if not value.strip():
        raise PlanError(f"{flag} needs a file name, e.g. {flag} plan.json")
    if "\x00" in value:
        raise refuse("contains a NUL byte; give the plan's file name")
    if value == "-":
        raise refuse("is not a file; give the file the dry run wrote with --plan-out")
    path = Path(os.path.abspath(value))
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        handle = os.open(path, flags)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise refuse("is a symbolic link to a file that does not exist") from None
        raise refuse("does not exist; give the file the dry run wrote with --plan-out") from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(handle).st_mode
        if stat.S_ISDIR(mode):
            raise refuse("is a directory; give the plan's file, e.g. plan.json")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
            raise refuse(f"is {kind}; give the plan's file, e.g. plan.json")
        # Non-blocking only to open a pipe without a writer (then it reads as empty).
        os.set_blocking(handle, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(handle, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_PLAN_BYTES:
                raise refuse(f"is larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise refuse("is a directory; give the plan's file, e.g. plan.json") from None
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(handle)
    if size == 0:
        raise refuse("is empty; give the file the dry run wrote with --plan-out")
    return b"".join(chunks)


def _load_json(data: bytes, name: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(
            f"{name} is not UTF-8 text; give the file the dry run wrote with --plan-out"
        ) from None

    def no_constants(word: str) -> Any:
        raise ValueError(f"{word} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"{name} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); give "
            "the file the dry run wrote with --plan-out"
        ) from None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        reason = reason.split(";")[0]
        raise PlanError(
            f"{name} is not JSON ({shown(reason)}); give the file the dry run wrote with "
            "--plan-out"
        ) from None


def _parse_plan(document: dict[str, Any], given: str) -> Plan:
    database = _object(document, "database")
    groups = tuple(_group(entry) for entry in _list(document, "groups"))
    if _integer(document, "group_count") != len(groups):
        raise ValueError("group_count is not the number of groups")
    if len({group.key for group in groups}) != len(groups):
        raise ValueError("a workspace and day appears twice in groups")
    totals = _object(document, "totals")
    rows = _integer(totals, "rows")
    if rows != sum(group.rows for group in groups):
        raise ValueError("totals.rows is not the sum of the groups' rows")
    workspace = document["workspace_id"]
    return Plan(
        given=given,
        created_at=_time(document, "created_at"),
        cutoff=_time(document, "cutoff"),
        workspace_id=None if workspace is None else uuid.UUID(_text(document, "workspace_id")),
        database=DatabaseIdentity(
            host=_text(database, "host"),
            port=None if database["port"] is None else _integer(database, "port"),
            name=_text(database, "name"),
            oid=_integer(database, "oid"),
            system_identifier=(
                None
                if database["system_identifier"] is None
                else _text(database, "system_identifier")
            ),
        ),
        groups=groups,
        rows=rows,
        input_tokens_removed=_integer(totals, "input_tokens_removed"),
        fingerprint=_text(document, "fingerprint"),
    )


def _group(entry: Any) -> GroupFigures:
    if not isinstance(entry, dict):
        raise TypeError("groups[] holds something that is not an object")
    workspace = str(uuid.UUID(_text(entry, "workspace_id")))
    day = date.fromisoformat(_text(entry, "date_utc")).isoformat()
    digest = _text(entry, "ids_digest")
    if not _HEX16.fullmatch(digest):
        raise ValueError("groups[].ids_digest is not 16 hex digits")
    return GroupFigures(
        workspace_id=workspace,
        date_utc=day,
        rows=_integer(entry, "rows"),
        input_before=_integer(entry, "input_before"),
        input_tokens_removed=_integer(entry, "input_tokens_removed"),
        clamped_rows=_integer(entry, "clamped_rows"),
        ids_digest=digest,
    )


def _object(document: dict[str, Any], key: str) -> dict[str, Any]:
    value = document[key]
    if not isinstance(value, dict):
        raise TypeError(f"{key} is not an object")
    return value


def _list(document: dict[str, Any], key: str) -> list[Any]:
    value = document[key]
    if not isinstance(value, list):
        raise TypeError(f"{key} is not a list")
    return value


def _integer(document: dict[str, Any], key: str) -> int:
    value = document[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{key} is not a whole number")
    return value


def _text(document: dict[str, Any], key: str) -> str:
    """A string field: short and printable, since messages quote it on one line."""
    value = document[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    if len(value) > MAX_TEXT_FIELD or _CONTROL.search(value):
        raise ValueError(f"{key} is not a short printable string")
    return value


def _time(document: dict[str, Any], key: str) -> datetime:
    value = datetime.fromisoformat(_text(document, key))
    if value.tzinfo is None:
        raise ValueError(f"{key} has no UTC offset")
    return value.astimezone(UTC)


def _field_problem(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"it has no field {exc.args[0]}"
    return shown(str(exc)).strip("'\"")


# -- executing a plan ----------------------------------------------------------------------


def bind_options(plan: Plan, cutoff: datetime | None, workspace_id: uuid.UUID | None) -> None:
    """A cutoff or workspace given besides the plan must be the plan's own."""
    if cutoff is not None and cutoff != plan.cutoff:
        raise PlanError(
            f"--cutoff {timestamp(cutoff)} is not the cutoff of {plan.name} "
            f"({timestamp(plan.cutoff)}): leave --cutoff out (the plan gives it), or make a "
            "new plan for the other cutoff and have it reviewed"
        )
    if workspace_id is not None and workspace_id != plan.workspace_id:
        planned = plan.workspace_id or "every workspace"
        raise PlanError(
            f"--workspace-id {workspace_id} is not the workspace of {plan.name} ({planned}): "
            "leave --workspace-id out (the plan gives it), or make a new plan for that "
            "workspace and have it reviewed"
        )


def parse_max_age(value: str | None) -> float:
    """``--plan-max-age``: a duration from 1 second to 30 days (720h)."""
    text = DEFAULT_MAX_AGE if value is None else value
    seconds = duration_seconds(text, flag="--plan-max-age")
    if not 1 <= seconds <= MAX_AGE_LIMIT_SECONDS:
        raise PlanError("--plan-max-age must be between 1s and 720h (30 days)")
    return seconds


def check_database(plan: Plan, max_age_seconds: float) -> float:
    """Refuse a plan of another database, or one too old; return its age in seconds."""
    here = read_identity()
    differences = plan.database.differences(here)
    if differences:
        raise PlanError(
            f"{plan.name} is for another database: it was made on "
            f"{plan.database.describe()}, this is {here.describe()} (different "
            f"{_and(differences)}); execute it where it was made, or make a plan of this "
            "database"
        )
    now = database_now()
    age = (now - plan.created_at).total_seconds()
    if age < 0:
        raise PlanError(
            f"{plan.name} was made at {render.timestamp(plan.created_at)}, after the "
            f"database's clock ({render.timestamp(now)}); {NEW_PLAN_ADVICE}"
        )
    if age > max_age_seconds:
        raise PlanError(
            f"{plan.name} is too old: made {duration(age)} ago "
            f"({render.timestamp(plan.created_at)} by the database's clock), more than "
            f"--plan-max-age {duration(max_age_seconds)}; {NEW_PLAN_ADVICE}, or give a larger "
            "--plan-max-age"
        )
    return age


def snapshot_figures(cutoff: datetime, lock_timeout: float) -> list[GroupFigures]:
    """The execute's snapshot, still-eligible rows only, as the plan's group figures."""
    with transaction.atomic(), connection.cursor() as cursor:
        set_local_timeouts(cursor, lock_timeout, 0)
        cursor.execute(compose(SNAPSHOT_FIGURES_SQL), {"cutoff": cutoff})
        return [
            GroupFigures(
                workspace_id=str(workspace),
                date_utc=day.isoformat(),
                rows=rows,
                input_before=before,
                input_tokens_removed=removed,
                clamped_rows=clamped,
                ids_digest=digest_hex(digest),
            )
            for workspace, day, rows, before, removed, clamped, digest in cursor.fetchall()
        ]


def compare(plan: Plan, now: list[GroupFigures], age_seconds: float) -> PlanOutcome:
    """Refuse unless every group now is within the plan's; say what changed otherwise."""
    planned = {group.key: group for group in plan.groups}
    problems = [
        problem
        for group in sorted(now, key=lambda g: g.key)
        if (problem := _beyond(group, planned.get(group.key)))
    ]
    if problems:
        others = len(problems) - 1
        more = f" (and {others} more group{'s' if others > 1 else ''})" if others else ""
        raise PlanError(
            f"{plan.name} does not cover the candidates now: {problems[0]}{more}; nothing "
            f"was changed: {NEW_PLAN_ADVICE}"
        )
    return PlanOutcome(
        given=plan.given,
        fingerprint=plan.fingerprint,
        created_at=plan.created_at,
        age_seconds=age_seconds,
        rows=plan.rows,
        rows_now=sum(group.rows for group in now),
        input_tokens_removed=plan.input_tokens_removed,
        input_tokens_removed_now=sum(group.input_tokens_removed for group in now),
        identical=fingerprint(plan.cutoff, plan.workspace_id, now) == plan.fingerprint,
    )


def _beyond(group: GroupFigures, planned: GroupFigures | None) -> str:
    """How ``group`` goes beyond its planned figures, or "" when it does not."""
    where = f"workspace {group.workspace_id} on {group.date_utc}"
    if planned is None:
        return (
            f"{where} has {candidate_rows(group.rows)} "
            f"({render.number(group.input_tokens_removed)} input tokens to remove) and the "
            "plan has none there"
        )
    for figure in CHECKED_FIGURES:
        mine, theirs = getattr(group, figure), getattr(planned, figure)
        if mine > theirs:
            return (
                f"{where} has {render.number(mine)} {FIGURE_WORDS[figure]}, the plan "
                f"{render.number(theirs)}"
            )
    if group.rows == planned.rows and group.ids_digest != planned.ids_digest:
        return (
            f"{where} has {candidate_rows(group.rows)} as planned, but not the planned rows "
            "(some left and others came)"
        )
    return ""


class SnapshotCheck:
    """``ExecuteOptions.check_snapshot`` for a plan: judge the snapshot, keep the outcome."""

    def __init__(self, plan: Plan, *, max_age_seconds: float, lock_timeout: float) -> None:
        self.plan = plan
        self.max_age_seconds = max_age_seconds
        self.lock_timeout = lock_timeout
        self.outcome: PlanOutcome | None = None

    def __call__(self) -> dict[str, Any]:
        age = check_database(self.plan, self.max_age_seconds)
        outcome = compare(self.plan, snapshot_figures(self.plan.cutoff, self.lock_timeout), age)
        self.outcome = outcome
        log_event(
            logger,
            logging.INFO,
            "plan",
            outcome.summary(),
            **{k: v for k, v in outcome.document().items() if k != "file"},
        )
        return {
            "plan_fingerprint": self.plan.fingerprint,
            "plan_created_at": self.plan.created_at,
            "plan_rows": self.plan.rows,
        }


def candidate_rows(count: int) -> str:
    return f"{render.number(count)} candidate row{'' if count == 1 else 's'}"


def duration(seconds: float) -> str:
    """An age as people read it: ``1d 2h 5m``, ``26m 3s``, ``45s``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")] + ([] if days else [(secs, "s")])
    text = " ".join(f"{n}{unit}" for n, unit in parts if n)
    return text or f"{seconds:.1f}s"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
