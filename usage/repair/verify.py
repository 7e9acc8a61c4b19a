"""Proof that the hourly rollup is right: compare it with a from-scratch recompute.

The recompute follows the documented rollup semantics (sums over all ``task_usage`` rows of
a key, rows of tasks without a runtime excluded), so a mismatch means a key the rollup
missed or a stale hourly row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connection

from usage.eligibility import compose

# ``{scope}`` limits the comparison to some keys (a run's journal), or is empty for all.
MISMATCHES_SQL = """
WITH scoped AS (
    SELECT DISTINCT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id,
           q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id
    LEFT JOIN {issue} i ON i.id = q.issue_id
    WHERE q.runtime_id IS NOT NULL {scope}
),
expected AS (
    SELECT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id, q.runtime_id,
           q.agent_id, i.project_id, tu.provider, tu.model,
           sum(tu.input_tokens)::bigint AS input_tokens,
           sum(tu.output_tokens)::bigint AS output_tokens,
           sum(tu.cache_read_tokens)::bigint AS cache_read_tokens,
           sum(tu.cache_write_tokens)::bigint AS cache_write_tokens,
           coalesce(sum(tu.cost_usd_ticks), 0)::bigint AS cost_usd_ticks,
           count(DISTINCT tu.task_id) AS task_count,
           count(*) AS event_count
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id
    LEFT JOIN {issue} i ON i.id = q.issue_id
    WHERE q.runtime_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
),
actual AS (
    SELECT h.* FROM {task_usage_hourly} h
    {actual_scope}
)
SELECT coalesce(e.bucket_hour, h.bucket_hour), coalesce(e.workspace_id, h.workspace_id),
       coalesce(e.runtime_id, h.runtime_id), coalesce(e.agent_id, h.agent_id),
       coalesce(e.project_id, h.project_id), coalesce(e.provider, h.provider),
       coalesce(e.model, h.model),
       e.input_tokens, h.input_tokens, e.cache_read_tokens, h.cache_read_tokens,
       e.event_count, h.event_count,
       count(*) OVER () AS mismatched_keys
FROM (SELECT e.* FROM expected e JOIN scoped s USING (bucket_hour, workspace_id, agent_id,
                                                     provider, model)
      WHERE s.runtime_id IS NOT DISTINCT FROM e.runtime_id
        AND s.project_id IS NOT DISTINCT FROM e.project_id) e
FULL JOIN actual h
  ON h.bucket_hour = e.bucket_hour AND h.workspace_id = e.workspace_id
 AND h.runtime_id = e.runtime_id AND h.agent_id = e.agent_id
 AND h.project_id IS NOT DISTINCT FROM e.project_id
 AND h.provider = e.provider AND h.model = e.model
WHERE e.event_count IS NULL OR h.event_count IS NULL
   OR (e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens,
       e.cost_usd_ticks, e.task_count, e.event_count)
      IS DISTINCT FROM
      (h.input_tokens, h.output_tokens, h.cache_read_tokens, h.cache_write_tokens,
       h.cost_usd_ticks, h.task_count, h.event_count)
ORDER BY 1, 2, 4, 6, 7
LIMIT %(limit)s"""

# The scope of a check, as the parts of MISMATCHES_SQL that differ: every key, or the keys
# of the rows some runs changed.
ALL_KEYS = {"scope": "", "actual_scope": ""}
RUN_KEYS = {
    "scope": "AND tu.id IN (SELECT usage_id FROM {journal} WHERE run_id = ANY(%(run_ids)s))",
    "actual_scope": "WHERE EXISTS (SELECT 1 FROM scoped s WHERE s.bucket_hour = h.bucket_hour"
    " AND s.workspace_id = h.workspace_id AND s.runtime_id = h.runtime_id"
    " AND s.agent_id = h.agent_id AND s.project_id IS NOT DISTINCT FROM h.project_id"
    " AND s.provider = h.provider AND s.model = h.model)",
}


@dataclass(frozen=True)
class Mismatch:
    key: tuple[Any, ...]
    expected_input: int | None
    actual_input: int | None
    expected_cached: int | None
    actual_cached: int | None
    expected_events: int | None
    actual_events: int | None


def find_mismatches(
    run_ids: list[int] | None = None, limit: int = 1000
) -> tuple[int, list[Mismatch]]:
    """How many hourly keys differ from the recompute, and the first ``limit`` of them.

    The count covers every differing key (all keys, or those of some runs); only the list
    is capped.
    """
    scope = ALL_KEYS if run_ids is None else RUN_KEYS
    with connection.cursor() as cursor:
        cursor.execute(
            compose(MISMATCHES_SQL, **scope), {"run_ids": run_ids or [], "limit": limit}
        )
        rows = cursor.fetchall()
    count = rows[0][13] if rows else 0
    return count, [Mismatch(tuple(row[:7]), *row[7:13]) for row in rows]


def rollup_mismatches(run_ids: list[int] | None = None, limit: int = 1000) -> list[Mismatch]:
    """Hourly keys whose row differs from the recompute (all keys, or those of some runs)."""
    return find_mismatches(run_ids, limit)[1]


@dataclass(frozen=True)
class VerifyResult:
    run_id: int
    eligible_rows_left: int
    mismatches: list[Mismatch]
    mismatched_keys: int = 0

    @property
    def ok(self) -> bool:
        return self.eligible_rows_left == 0 and not self.mismatched_keys and not self.mismatches


def verify_run(run_id: int, limit: int = 100) -> VerifyResult:
    """After a run: nothing eligible is left, and every hourly key it touched is right.

    All differing keys are counted; at most ``limit`` of them are listed.

    Read-only: it runs in a READ ONLY transaction, so it is safe at any time.
    """
    from django.db import transaction

    from usage.eligibility import COUNT_ELIGIBLE_SQL, eligible_params
    from usage.models import BackfillRun

    run = BackfillRun.objects.get(pk=run_id)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(compose(COUNT_ELIGIBLE_SQL), eligible_params(run.cutoff, run.workspace_id))
        left = cursor.fetchone()[0]
        count, mismatches = find_mismatches(run_ids=[run.pk], limit=limit)
    return VerifyResult(
        run_id=run.pk, eligible_rows_left=left, mismatches=mismatches, mismatched_keys=count
    )
