"""A plan held against the database: the same database, young enough, and the execute's
snapshot within the plan's groups (never more rows or tokens, nor a group not reviewed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from usage import render
from usage.db import database_now, set_local_timeouts
from usage.eligibility import compose
from usage.events import log_event
from usage.output.outcome import count
from usage.plan.document import (
    CHECKED_FIGURES,
    NEW_PLAN_ADVICE,
    DatabaseIdentity,
    GroupFigures,
    Plan,
    PlanError,
    digest_hex,
    fingerprint,
)
from usage.repair.backfill import WORK_TABLE

logger = logging.getLogger("usage.plan")

FIGURE_WORDS = {
    "rows": "candidate rows",
    "input_before": "input tokens before the repair",
    "input_tokens_removed": "input tokens to remove",
    "clamped_rows": "rows clamped to 0",
}

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
            f"{plan.name} is too old: made {duration(age)} ago "
            f"({render.timestamp(plan.created_at)} by the database's clock), more than "
            f"--plan-max-age {duration(max_age_seconds)}; {NEW_PLAN_ADVICE}, or give a larger "
            "--plan-max-age"
        )
    return age


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
        plan=plan,
        age_seconds=age_seconds,
        rows_now=sum(group.rows for group in now),
        input_tokens_removed_now=sum(group.input_tokens_removed for group in now),
        identical=fingerprint(plan.cutoff, plan.workspace_id, now) == plan.fingerprint,
    )


def _beyond(group: GroupFigures, planned: GroupFigures | None) -> str:
    """How ``group`` goes beyond its planned figures, or "" when it does not."""
    where = f"workspace {group.workspace_id} on {group.date_utc}"
    rows = count(group.rows, "candidate row")
    if planned is None:
        return (
            f"{where} has {rows} ({render.number(group.input_tokens_removed)} input tokens to "
            "remove) and the plan has none there"
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
        age = check_database(self.plan, self.max_age_seconds)
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.lock_timeout, 0)
            cursor.execute(compose(SNAPSHOT_FIGURES_SQL), {"cutoff": self.plan.cutoff})
            now = [
                GroupFigures(str(workspace), day.isoformat(), *figures, digest_hex(digest))
                for workspace, day, *figures, digest in cursor.fetchall()
            ]
        outcome = compare(self.plan, now, age)
        self.outcome = outcome
        details = {k: v for k, v in outcome.document().items() if k != "file"}
        log_event(logger, logging.INFO, "plan", outcome.summary(), **details)
        return {
            "plan_fingerprint": self.plan.fingerprint,
            "plan_created_at": self.plan.created_at,
            "plan_rows": self.plan.rows,
        }


def duration(seconds: float) -> str:
    """An age as people read it: ``1d 2h 5m``, ``26m 3s``, ``45s``."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")] + ([] if days else [(secs, "s")])
    return " ".join(f"{n}{unit}" for n, unit in parts if n) or f"{seconds:.1f}s"
