"""A saved plan's document: written by the dry run (``--plan-out``), read back checked. Its
fingerprint covers the scope and each group's figures; its checksum detects editing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from usage.events import utc_text as timestamp
from usage.options import shown
from usage.output.document import GROUP_FIELDS, TOTAL_FIELDS, plain
from usage.output.files import DANGLING_LINK, named_file
from usage.repair.summary import DryRunSummary

PLAN_KIND = "codex_usage_backfill_plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 1 << 30
# The group figures a plan's fingerprint covers, in words; "more than planned" is judged on these.
FIGURE_WORDS = {
    "rows": "candidate rows",
    "input_before": "input tokens before the repair",
    "input_tokens_removed": "input tokens to remove",
    "clamped_rows": "rows clamped to 0",
}
FIGURE_KEYS = ("workspace_id", "date_utc", *FIGURE_WORDS, "ids_digest")
MAX_TEXT_FIELD = 255
KIND_WORDS = {dict: "an object", list: "a list", int: "a whole number", str: "a string"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX16 = re.compile(r"[0-9a-f]{16}")

NEW_PLAN_ADVICE = "make a new plan with --plan-out and have it reviewed again"
GIVE_THE_DRY_RUNS = "give the file the dry run wrote with --plan-out"


class PlanError(ValueError):
    """A plan cannot be written, read or executed here; the message is one line."""


@dataclass(frozen=True)
class DatabaseIdentity:
    """Which database this is: where the tool connects, and what the server says it is."""

    host: str
    port: int | None
    name: str
    oid: int
    system_identifier: str | None  # None when the role may not read it

    def describe(self) -> str:
        system = self.system_identifier or "unknown"
        return f"{self.host}:{self.port}/{self.name} (oid {self.oid}, system {system})"

    def differences(self, other: DatabaseIdentity) -> list[str]:
        """What tells ``other`` apart from this one; the system identifier if both know it."""
        named = {"host": "host", "port": "port", "name": "database name", "oid": "database oid"}
        if self.system_identifier is not None and other.system_identifier is not None:
            named["system_identifier"] = "system identifier"
        return [words for key, words in named.items() if getattr(self, key) != getattr(other, key)]


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


def digest_hex(value: int | None) -> str:
    """A signed 64-bit digest as 16 hex digits (a JSON number would lose digits in JS)."""
    return f"{(value or 0) & ((1 << 64) - 1):016x}"


def fingerprint(
    cutoff: datetime, workspace_id: uuid.UUID | None, groups: Iterable[GroupFigures]
) -> str:
    """SHA-256 over the candidate set's description: scope, then each group's figures."""
    digest = hashlib.sha256(
        f"{PLAN_KIND}/{PLAN_VERSION}|{timestamp(cutoff)}|{workspace_id or ''}\n".encode()
    )
    for group in sorted(groups, key=lambda g: g.key):
        line = "|".join(str(getattr(group, key)) for key in FIGURE_KEYS)
        digest.update(f"{line}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def checksum(document: dict[str, Any]) -> str:
    """SHA-256 over the document's canonical JSON, without its own checksum field."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def plan_document(summary: DryRunSummary, identity: DatabaseIdentity) -> dict[str, Any]:
    """The plan of a dry run that kept every group (``load_summary(max_groups=None)``)."""
    if summary.group_count != len(summary.groups):
        raise ValueError("a plan needs every group of the summary")
    totals = vars(summary.totals)
    groups = [
        {
            # As JSON holds them, so that the checksum is computed on what the file says.
            **{key: plain(getattr(group, key)) for key in GROUP_FIELDS},
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
        "database": asdict(identity),
        "totals": {key: totals[key] for key in TOTAL_FIELDS},
        "expected_rollup_keys": summary.totals.rollup_keys,
        "group_count": summary.group_count,
        "groups": groups,
        "fingerprint": fingerprint(
            summary.cutoff,
            summary.workspace_id,
            (GroupFigures(**{key: g[key] for key in FIGURE_KEYS}) for g in groups),
        ),
    }
    document["checksum"] = checksum(document)
    return document


def plan_text(document: dict[str, Any]) -> str:
    """The file's text: indented for the reviewer, one line per group (a table to read)."""
    placeholder = f"groups-{uuid.uuid4().hex}"
    text = json.dumps({**document, "groups": placeholder}, indent=2, ensure_ascii=False)
    lines = ",\n".join(
        f"    {json.dumps(group, ensure_ascii=False)}" for group in document["groups"]
    )
    return text.replace(json.dumps(placeholder), f"[\n{lines}\n  ]" if lines else "[]", 1)


def read_plan(given: str) -> Plan:
    """Read, check and parse a plan file; every problem is a one-line ``ValueError``."""
    name = f"--plan {shown(given)}"

    def refuse(why: str) -> PlanError:
        return PlanError(f"{name} {why}; {NEW_PLAN_ADVICE}")

    document = _read_json(given)
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
        raise refuse("has no checksum (--plan-out always writes one)")
    if document["checksum"] != checksum(document):
        raise refuse(
            "was changed since --plan-out wrote it (its checksum does not match its content)"
        )
    try:
        plan = _parse_plan(document, given)
    except KeyError as exc:
        raise refuse(f"is not a valid plan (it has no field {exc.args[0]})") from None
    except (TypeError, ValueError, OverflowError) as exc:
        problem = shown(str(exc)).strip("'\"")
        raise refuse(f"is not a valid plan ({problem})") from None
    if fingerprint(plan.cutoff, plan.workspace_id, plan.groups) != plan.fingerprint:
        raise refuse("is not a valid plan (its fingerprint does not match its groups)")
    return plan


def _read_json(given: str) -> Any:
    """The file's JSON: a regular file or a pipe (``--plan <(...)``), never a device."""
    path, refuse = named_file(given, "--plan", GIVE_THE_DRY_RUNS)
    handle = -1
    try:
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        mode = os.fstat(handle).st_mode
        if stat.S_ISDIR(mode):
            raise refuse("is a directory; give the plan's file, e.g. plan.json")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
            raise refuse(f"is {kind}; give the plan's file, e.g. plan.json")
        # Non-blocking only to open a pipe without a writer (then it reads as empty).
        os.set_blocking(handle, True)
        data = bytearray()
        while chunk := os.read(handle, 1 << 20):
            data += chunk
            if len(data) > MAX_PLAN_BYTES:
                raise refuse(f"is larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
    except FileNotFoundError:
        missing = (
            DANGLING_LINK if os.path.lexists(path) else f"does not exist; {GIVE_THE_DRY_RUNS}"
        )
        raise refuse(missing) from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        if handle >= 0:
            os.close(handle)
    if not data:
        raise refuse(f"is empty; {GIVE_THE_DRY_RUNS}")

    def no_constants(word: str) -> Any:
        raise ValueError(f"{word} is not a JSON number")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        unread = "UTF-8 text"
    except json.JSONDecodeError as exc:
        unread = f"JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        unread = f"JSON ({shown(reason.split(';')[0])})"
    raise refuse(f"is not {unread}; {GIVE_THE_DRY_RUNS}")


def _parse_plan(document: dict[str, Any], given: str) -> Plan:
    database = _field(document, "database", dict)
    groups = tuple(_group(entry) for entry in _field(document, "groups", list))
    if _field(document, "group_count", int) != len(groups):
        raise ValueError("group_count is not the number of groups")
    if len({group.key for group in groups}) != len(groups):
        raise ValueError("a workspace and day appears twice in groups")
    totals = _field(document, "totals", dict)
    rows = _field(totals, "rows", int)
    if rows != sum(group.rows for group in groups):
        raise ValueError("totals.rows is not the sum of the groups' rows")
    workspace = document["workspace_id"]
    return Plan(
        given=given,
        created_at=_time(document, "created_at"),
        cutoff=_time(document, "cutoff"),
        workspace_id=None if workspace is None else uuid.UUID(_field(document, "workspace_id")),
        database=DatabaseIdentity(
            host=_field(database, "host"),
            port=_field(database, "port", int, nullable=True),
            name=_field(database, "name"),
            oid=_field(database, "oid", int),
            system_identifier=_field(database, "system_identifier", nullable=True),
        ),
        groups=groups,
        rows=rows,
        input_tokens_removed=_field(totals, "input_tokens_removed", int),
        fingerprint=_field(document, "fingerprint"),
    )


def _group(entry: Any) -> GroupFigures:
    if not isinstance(entry, dict):
        raise TypeError("groups[] holds something that is not an object")
    workspace = str(uuid.UUID(_field(entry, "workspace_id")))
    day = date.fromisoformat(_field(entry, "date_utc")).isoformat()
    digest = _field(entry, "ids_digest")
    if not _HEX16.fullmatch(digest):
        raise ValueError("groups[].ids_digest is not 16 hex digits")
    figures = {figure: _field(entry, figure, int) for figure in FIGURE_WORDS}
    return GroupFigures(workspace_id=workspace, date_utc=day, ids_digest=digest, **figures)


def _field(document: dict[str, Any], key: str, kind: type = str, nullable: bool = False) -> Any:
    """A field of ``kind``; strings short and printable (messages quote them on one line)."""
    value = document[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
        raise TypeError(f"{key} is not {KIND_WORDS[kind]}")
    if kind is str and (len(value) > MAX_TEXT_FIELD or _CONTROL.search(value)):
        raise ValueError(f"{key} is not a short printable string")
    return value


def _time(document: dict[str, Any], key: str) -> datetime:
    value = datetime.fromisoformat(_field(document, key))
    if value.tzinfo is None:
        raise ValueError(f"{key} has no UTC offset")
    return value.astimezone(UTC)
