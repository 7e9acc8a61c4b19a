"""Saved plans: the dry run writes what it found (``--plan-out``, the file in ``document``);
``--execute --plan`` repairs that only on the same database, young enough (``--plan-max-age``),
with its snapshot within the plan's groups (never more rows or tokens, nor a group not
reviewed), or refuses and changes nothing."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction

from usage import render
from usage.db import database_now, set_local_timeouts
from usage.eligibility import compose
from usage.events import log_event
from usage.options import duration_seconds, duration_text, parse_cutoff, parse_workspace_id, shown
from usage.output import outcome
from usage.output.files import OutputError, OutputFile, check_output
from usage.output.report import Reporter
from usage.plan.document import (
    FIGURE_WORDS,
    NEW_PLAN_ADVICE,
    DatabaseIdentity,
    GroupFigures,
    Plan,
    PlanError,
    digest_hex,
    fingerprint,
    plan_document,
    plan_text,
    read_plan,
    timestamp,
)
from usage.repair.backfill import WORK_TABLE
from usage.repair.summary import DryRunSummary

logger = logging.getLogger("usage.plan")

# How old a plan may be, by the database's clock, when it is executed.
DEFAULT_MAX_AGE = "24h"
MAX_AGE_LIMIT_SECONDS = 30 * 24 * 3600.0
# The plan's fields a run records (as plan_<field>) and the JSON log's context names.
RECORDED = ("created_at", "rows", "fingerprint")

IDENTITY_SQL = """
SELECT current_database(),
       d.oid::bigint,
       coalesce(has_function_privilege(
           to_regprocedure('pg_catalog.pg_control_system()'), 'EXECUTE'), false)
FROM pg_catalog.pg_database d
WHERE d.datname = current_database()"""

SYSTEM_IDENTIFIER_SQL = "SELECT system_identifier::text FROM pg_catalog.pg_control_system()"

# The plan's group figures over the execute's snapshot rows still eligible, as the dry run's
# summary (``usage.repair.summary.SUMMARY_SQL``) defines them.
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


@dataclass(frozen=True)
class PlanOutcome:
    """How the candidates at the execute compare with the plan (they are within it)."""

    plan: Plan
    age_seconds: float
    rows_now: int
    input_tokens_removed_now: int
    identical: bool

    def document(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "file": plan.given,
            "fingerprint": plan.fingerprint,
            "created_at": plan.created_at,
            "age_seconds": round(self.age_seconds, 3),
            "rows": plan.rows,
            "rows_now": self.rows_now,
            "rows_gone": plan.rows - self.rows_now,
            "input_tokens_removed": plan.input_tokens_removed,
            "input_tokens_removed_now": self.input_tokens_removed_now,
            "identical": self.identical,
        }

    def summary(self) -> str:
        rows, gone = self.plan.rows, self.plan.rows - self.rows_now
        if self.identical:
            return (
                f"Plan check: the candidates are exactly the planned {render.number(rows)} "
                f"rows (fingerprint {render.short_hash(self.plan.fingerprint)})."
            )
        row_is, left = ("row is", "is") if gone == 1 else ("rows are", "are")
        return (
            f"Plan check: {render.number(self.rows_now)} of the {render.number(rows)} "
            f"planned rows are candidates now ({render.number(self.input_tokens_removed_now)} "
            f"of {render.number(self.plan.input_tokens_removed)} input tokens to remove); "
            f"{render.number(gone)} planned {row_is} no longer eligible (rewritten by "
            f"ingestion or repaired since the plan) and {left} left alone."
        )


def read_identity() -> DatabaseIdentity:
    """This connection's database, as a plan names it; the system identifier (which tells a
    copy from its original) only if the role may call ``pg_control_system()``."""
    with connection.cursor() as cursor:
        cursor.execute(IDENTITY_SQL)
        name, oid, may_read = cursor.fetchone()
        if may_read:
            cursor.execute(SYSTEM_IDENTIFIER_SQL)
        system_identifier = cursor.fetchone()[0] if may_read else None
    info = connection.connection.info
    port = int(info.port) if info.port else None
    return DatabaseIdentity(str(info.host or ""), port, name, int(oid), system_identifier)


def check_database(plan: Plan, max_age_seconds: float) -> float:
    """Refuse a plan of another database, or one too old; return its age in seconds."""
    here = read_identity()
    differences = plan.database.differences(here)
    if differences:
        named = " and ".join(filter(None, [", ".join(differences[:-1]), differences[-1]]))
        raise PlanError(
            f"{plan.name} is for another database: it was made on "
            f"{plan.database.describe()}, this is {here.describe()} (different "
            f"{named}); execute it where it was made, or make a plan of this database"
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
            f"{plan.name} is too old: made {render.seconds(age)} ago "
            f"({render.timestamp(plan.created_at)} by the database's clock), more than "
            f"--plan-max-age {duration_text(max_age_seconds)}; {NEW_PLAN_ADVICE}, or give a "
            "larger --plan-max-age"
        )
    return age


def _beyond(group: GroupFigures, planned: GroupFigures | None) -> str:
    """How ``group`` goes beyond its planned figures, or "" when it does not."""
    where = f"workspace {group.workspace_id} on {group.date_utc}"
    rows = outcome.count(group.rows, "candidate row")
    if planned is None:
        return (
            f"{where} has {rows} ({render.number(group.input_tokens_removed)} input tokens to "
            "remove) and the plan has none there"
        )
    for figure, words in FIGURE_WORDS.items():
        mine, theirs = getattr(group, figure), getattr(planned, figure)
        if mine > theirs:
            return f"{where} has {render.number(mine)} {words}, the plan {render.number(theirs)}"
    if group.rows == planned.rows and group.ids_digest != planned.ids_digest:
        return (
            f"{where} has {rows} as planned, but not the planned rows (some left and others came)"
        )
    return ""


@dataclass(eq=False)
class SnapshotCheck:
    """``ExecuteOptions.check_snapshot`` for a plan: judges the snapshot, keeps the outcome."""

    plan: Plan
    max_age_seconds: float
    lock_timeout: float
    outcome: PlanOutcome | None = None

    def __call__(self) -> dict[str, Any]:
        """Refuse unless every group now is within the plan's; say what changed otherwise."""
        plan = self.plan
        age = check_database(plan, self.max_age_seconds)
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.lock_timeout, 0)
            cursor.execute(compose(SNAPSHOT_FIGURES_SQL), {"cutoff": plan.cutoff})
            now = [
                GroupFigures(str(workspace), day.isoformat(), *figures, digest_hex(digest))
                for workspace, day, *figures, digest in cursor.fetchall()
            ]
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
        self.outcome = compared = PlanOutcome(
            plan=plan,
            age_seconds=age,
            rows_now=sum(group.rows for group in now),
            input_tokens_removed_now=sum(group.input_tokens_removed for group in now),
            identical=fingerprint(plan.cutoff, plan.workspace_id, now) == plan.fingerprint,
        )
        details = {k: v for k, v in compared.document().items() if k != "file"}
        log_event(logger, logging.INFO, "plan", compared.summary(), **details)
        return {f"plan_{key}": getattr(plan, key) for key in RECORDED}


@dataclass(frozen=True)
class PlanOptions:
    """The plan to apply (``given``) or to write (``out``), checked before the database."""

    given: Plan | None = None
    max_age: float = 0.0  # seconds, with ``given``
    out: OutputFile | None = None

    @classmethod
    def read(cls, options: dict[str, Any], output: OutputFile | None) -> PlanOptions:
        """The plan options of a command line; ``ValueError`` (one line) when refused."""
        out = None
        if options["plan_out"] is not None:
            if options["execute"] or options["verify"]:
                raise ValueError(
                    "--plan-out goes with the dry run (without --execute or --verify): write "
                    "the plan, have it reviewed, then run --execute --plan FILE"
                )
            out = check_output(options["plan_out"], flag="--plan-out")
            if output is not None and not out.stream and output.path == out.path:
                raise ValueError(
                    f"--plan-out and --output both name {shown(options['plan_out'])}; give "
                    "each its own file"
                )
        if options["plan"] is None:
            if options["plan_max_age"] is not None:
                raise ValueError("--plan-max-age goes with --execute --plan FILE")
            return cls(out=out)
        if not options["execute"]:
            raise ValueError(
                "--plan goes with --execute (it applies a reviewed plan); a dry run writes "
                "one with --plan-out FILE"
            )
        age = options["plan_max_age"]
        max_age = duration_seconds(DEFAULT_MAX_AGE if age is None else age, flag="--plan-max-age")
        if not 1 <= max_age <= MAX_AGE_LIMIT_SECONDS:
            raise PlanError("--plan-max-age must be between 1s and 720h (30 days)")
        return cls(given=read_plan(str(options["plan"])), max_age=max_age, out=out)

    def scope(
        self, cutoff: str | None, workspace_id: str | None
    ) -> tuple[datetime, uuid.UUID | None]:
        """The plan's cutoff and workspace; given again, they must be equal."""
        assert self.given is not None
        if cutoff is not None and not str(cutoff).strip():
            raise ValueError("--cutoff is empty; leave it out, the plan gives the cutoff")
        plan = self.given
        given = None if cutoff is None else parse_cutoff(cutoff)
        workspace = parse_workspace_id(workspace_id, allow_empty=False)
        if given is not None and given != plan.cutoff:
            raise PlanError(
                f"--cutoff {timestamp(given)} is not the cutoff of {plan.name} "
                f"({timestamp(plan.cutoff)}): leave --cutoff out (the plan gives it), or make a "
                "new plan for the other cutoff and have it reviewed"
            )
        if workspace is not None and workspace != plan.workspace_id:
            raise PlanError(
                f"--workspace-id {workspace} is not the workspace of {plan.name} "
                f"({plan.workspace_id or 'every workspace'}): leave --workspace-id out (the "
                "plan gives it), or make a new plan for that workspace and have it reviewed"
            )
        return plan.cutoff, plan.workspace_id

    def snapshot_check(self, lock_timeout: float) -> SnapshotCheck | None:
        given = self.given
        return None if given is None else SnapshotCheck(given, self.max_age, lock_timeout)

    def context(self) -> dict[str, Any]:
        """The plan applied, as the JSON log's ``context`` event names it."""
        assert self.given is not None
        return {"file": self.given.given, **{key: getattr(self.given, key) for key in RECORDED}}

    def context_line(self) -> str:
        given = self.given
        assert given is not None
        return (
            f"Plan: {given.given}, made {render.timestamp(given.created_at)} by the "
            f"database's clock, {render.number(given.rows)} rows, fingerprint "
            f"{render.short_hash(given.fingerprint)}"
        )

    def check_database(self) -> None:
        """Another database or too old: refused before the summary's pass over the rows."""
        if self.given is not None:
            check_database(self.given, self.max_age)

    def document(
        self, summary: DryRunSummary | None, identity: DatabaseIdentity | None, report: Reporter
    ) -> dict[str, Any] | None:
        """The plan to write, from a summary that kept every group."""
        if identity is None or summary is None:
            return None
        if identity.system_identifier is None:
            report.warning(
                "The server's system identifier is not readable by this role (no EXECUTE on "
                "pg_control_system()): the plan names its database by host, port, name and oid."
            )
        return plan_document(summary, identity)

    def write(self, saved: dict[str, Any], report: Reporter) -> str | None:
        """Write the plan, then say the next command; returns the error of a failed write."""
        assert self.out is not None
        try:
            self.out.write(plan_text(saved))
        except OutputError as exc:
            return str(exc)
        given = self.out.given
        prose = (
            f"Plan written to {given}: {render.number(saved['totals']['rows'])} rows, "
            f"fingerprint {render.short_hash(saved['fingerprint'])}. Next: have it reviewed, "
            "then apply exactly it"
        )
        command = f"{outcome.REPAIR} --execute --plan {given}"
        if report.json_logs:
            report.event(
                "plan_written", f"{prose}: {command}", file=given, fingerprint=saved["fingerprint"]
            )
        else:
            report.lines(lambda width: outcome.next_step(prose, command, width))
        return None


def checked(check: SnapshotCheck | None) -> PlanOutcome | None:
    """How the execute's candidates compared with the plan, once its snapshot was checked."""
    return check.outcome if check is not None else None
