"""The dry run: what the repair would change, per workspace and UTC day, in one ``READ
ONLY`` transaction that also judges the cutoff against the database's clock."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime

from django.db import connection, transaction

from usage.eligibility import compose, eligible_params
from usage.events import json_default

# Sums per hourly key (parallel workers can split them, unlike a DISTINCT), then per workspace
# and day, with the totals on each group. ``ids_digest``: the same rows, the same digest.
SUMMARY_SQL = """
WITH per_key AS (
    SELECT
        a.workspace_id, {bucket_hour} AS bucket_hour,
        q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model,
        count(*) AS rows,
        sum(tu.input_tokens) AS input_before,
        sum({corrected_input}) AS input_after,
        sum({removed_input}) AS input_tokens_removed,
        count(*) FILTER (WHERE {is_clamped}) AS clamped_rows,
        min(tu.created_at) AS first_created_at, max(tu.created_at) AS last_created_at,
        bit_xor(uuid_hash_extended(tu.id, 0)) AS ids_digest
    FROM {task_usage} tu {key_joins}
    WHERE {eligible_where}
    GROUP BY a.workspace_id, {bucket_hour}, q.runtime_id, q.agent_id, i.project_id,
             tu.provider, tu.model
),
per_day AS (
    SELECT
        workspace_id, bucket_hour::date AS date_utc,
        sum(rows)::bigint AS rows,
        sum(input_before)::bigint AS input_before,
        sum(input_after)::bigint AS input_after,
        sum(input_tokens_removed)::bigint AS input_tokens_removed,
        sum(clamped_rows)::bigint AS clamped_rows,
        count(*) FILTER (WHERE runtime_id IS NOT NULL) AS rollup_keys,
        min(first_created_at) AS first_created_at, max(last_created_at) AS last_created_at,
        bit_xor(ids_digest) AS ids_digest
    FROM per_key
    GROUP BY workspace_id, date_utc
)
SELECT
    workspace_id, date_utc, rows, input_before, input_after, input_tokens_removed,
    clamped_rows, rollup_keys, first_created_at, last_created_at, ids_digest,
    count(*) OVER () AS group_count,
    sum(rows) OVER ()::bigint, sum(input_before) OVER ()::bigint,
    sum(input_after) OVER ()::bigint, sum(input_tokens_removed) OVER ()::bigint,
    sum(clamped_rows) OVER ()::bigint, sum(rollup_keys) OVER ()::bigint
FROM per_day
ORDER BY workspace_id, date_utc
LIMIT %(max_groups)s"""

SUMMARY_FETCH_ROWS = 2000

WORKSPACE_HAS_AGENTS_SQL = "SELECT EXISTS (SELECT 1 FROM {agent} WHERE workspace_id = %s)"


class CutoffError(ValueError):
    """The cutoff is not in the database's past (``named`` says it in the admin's words)."""

    def __init__(self, cutoff: datetime, database_now: datetime) -> None:
        self.cutoff, self.database_now = cutoff, database_now
        super().__init__(self.named("--cutoff"))

    def named(self, name: str) -> str:
        return (
            f"{name} {json_default(self.cutoff)} is not before the database's clock "
            f"({json_default(self.database_now)}): use the actual deployment time of the fix"
        )


@dataclass(frozen=True)
class SummaryGroup:
    workspace_id: uuid.UUID
    date_utc: date
    rows: int
    input_before: int
    input_after: int
    input_tokens_removed: int
    clamped_rows: int
    rollup_keys: int
    first_created_at: datetime
    last_created_at: datetime
    ids_digest: int  # XOR of uuid_hash_extended(id, 0) over the group's rows


@dataclass(frozen=True)
class Totals:
    rows: int = 0
    input_before: int = 0
    input_after: int = 0
    input_tokens_removed: int = 0
    clamped_rows: int = 0
    rollup_keys: int = 0


@dataclass(frozen=True)
class DryRunSummary:
    cutoff: datetime
    workspace_id: uuid.UUID | None
    database_now: datetime
    groups: list[SummaryGroup] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    workspace_known: bool = True
    group_count: int = 0


def ensure_cutoff_in_past(cutoff: datetime, database_now: datetime) -> None:
    """Refuse a cutoff not before the database's now(): repaired rows would match again."""
    if cutoff >= database_now:
        raise CutoffError(cutoff, database_now)


def workspace_has_agents(workspace_id: uuid.UUID | None) -> bool:
    """Whether any agent belongs to the workspace (every workspace when None)."""
    if workspace_id is None:
        return True
    with connection.cursor() as cursor:
        cursor.execute(compose(WORKSPACE_HAS_AGENTS_SQL), [str(workspace_id)])
        return bool(cursor.fetchone()[0])


def load_summary(
    cutoff: datetime, workspace_id: uuid.UUID | None, max_groups: int | None = None
) -> DryRunSummary:
    """Aggregate the eligible rows in one read-only pass, keeping at most ``max_groups``
    groups (the totals cover all of them)."""
    groups: list[SummaryGroup] = []
    totals, count = Totals(), 0
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute("SELECT now()")
        database_now = cursor.fetchone()[0]
        ensure_cutoff_in_past(cutoff, database_now)
        workspace_known = workspace_has_agents(workspace_id)
        # A client-side cursor keeps parallel query; its rows become Python objects by chunks.
        params = dict(eligible_params(cutoff, workspace_id), max_groups=max_groups)
        cursor.execute(compose(SUMMARY_SQL), params)
        while chunk := cursor.fetchmany(SUMMARY_FETCH_ROWS):
            if not groups:
                count, totals = chunk[0][11], Totals(*chunk[0][12:])
            groups.extend(SummaryGroup(*row[:11]) for row in chunk)
    return DryRunSummary(
        cutoff, workspace_id, database_now, groups, totals, workspace_known, group_count=count
    )
