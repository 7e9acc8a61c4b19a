"""Proof that the hourly rollup is right: every column the platform's function writes against
a recompute written here on its own, so that a mistake in ``usage.repair.rollup`` cannot pass
both; and what ``--verify --run-id N`` judges: nothing eligible left and the hourly keys of the
run's whole chain (the runs that continue each other) equal to the recompute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from usage.eligibility import KEY_COLUMNS, compose, eligible_params
from usage.models import BackfillRun
from usage.repair.rollup.versions import hourly_columns, read_installed_function

# Every aggregate column the platform's function writes, as this module recomputes it.
TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
EXPECTED_SUMS = {
    **{name: f"sum(tu.{name})" for name in TOKENS},
    "cost_usd_ticks": "coalesce(sum(tu.cost_usd_ticks), 0)",
    # The tokens of rows without a cost (the dashboards price Codex input by them).
    **{
        f"uncosted_{name}": f"sum(CASE WHEN tu.cost_usd_ticks IS NULL THEN tu.{name} ELSE 0 END)"
        for name in TOKENS
    },
    "task_count": "count(DISTINCT tu.task_id)",
    "event_count": "count(*)",
}


def same_key(left: str, right: str) -> str:
    """SQL comparing two keys, given as formats of a key column's name (``"h.{}"``)."""
    return " AND ".join(
        f"{left.format(c)} {'IS NOT DISTINCT FROM' if c == 'project_id' else '='} "
        + right.format(c)
        for c in KEY_COLUMNS
    )


# ``{scope}`` limits the comparison to some keys (a run's journal), or is empty for all; a
# key's expected row is absent (``e.present`` NULL) when it has no rows left.
MISMATCHES_SQL = """
WITH watermark AS (
    SELECT coalesce(max(watermark_at), '-infinity') AS watermark_at
    FROM {task_usage_hourly_rollup_state}
),
scoped AS (
    SELECT DISTINCT {row_key}
    FROM {task_usage} tu {key_joins}
    WHERE {has_key} {scope}
),
expected AS (
    SELECT {row_key}, true AS present,
           bool_or((tu.updated_at >= w.watermark_at
                    OR (tu.updated_at IS NULL AND tu.created_at >= w.watermark_at))
                   AND NOT EXISTS (
                       SELECT 1 FROM {journal} j
                       WHERE j.usage_id = tu.id AND j.new_updated_at = tu.updated_at
                         AND j.run_id = ANY(%(run_ids)s)))
               AS written_since_watermark,
           {expected}
    FROM {task_usage} tu {key_joins}
    CROSS JOIN watermark w
    WHERE {has_key}
    GROUP BY 1, 2, 3, 4, 5, 6, 7
),
actual AS (
    SELECT h.* FROM {task_usage_hourly} h
    {actual_scope}
)
SELECT {either_key},
       e.present IS NOT NULL, h.bucket_hour IS NOT NULL, {pairs},
       m.awaiting_tick,
       count(*) OVER () AS mismatched_keys,
       count(*) FILTER (WHERE m.awaiting_tick) OVER () AS awaiting_tick_keys
FROM (SELECT e.* FROM expected e JOIN scoped s USING (bucket_hour, workspace_id, agent_id,
                                                     provider, model)
      WHERE s.runtime_id IS NOT DISTINCT FROM e.runtime_id
        AND s.project_id IS NOT DISTINCT FROM e.project_id) e
FULL JOIN actual h ON {actual_is_expected}
-- The platform's next cron tick rebuilds a key whose rows someone else (not the runs
-- verified: their own stamps do not count) wrote since its watermark, or that is queued:
-- such a key may differ now without the runs having done anything wrong.
CROSS JOIN LATERAL (
    SELECT coalesce(e.written_since_watermark, false) OR EXISTS (
        SELECT 1 FROM {task_usage_hourly_dirty} d WHERE {queued}
    ) AS awaiting_tick
) m
WHERE e.present IS NULL OR h.bucket_hour IS NULL
   OR ({e_columns}) IS DISTINCT FROM ({h_columns})
ORDER BY 1, 2, 4, 6, 7
LIMIT %(limit)s"""

# The scope of a check: every key, or the keys of the rows some runs changed.
ALL_KEYS = {"scope": "", "actual_scope": ""}
RUN_KEYS = {
    "scope": "AND tu.id IN (SELECT usage_id FROM {journal} WHERE run_id = ANY(%(run_ids)s))",
    "actual_scope": f"WHERE EXISTS (SELECT 1 FROM scoped s WHERE {same_key('s.{}', 'h.{}')})",
}


@dataclass(frozen=True)
class ColumnMismatch:
    """One column of one hourly key: what the recompute expects, what the rollup has."""

    column: str
    expected: int | None
    actual: int | None


@dataclass(frozen=True)
class Mismatch:
    """An hourly key that differs from the recompute: missing (no hourly row), stale (no rows
    left), or with the columns that differ."""

    key: tuple[Any, ...]
    missing: bool
    stale: bool
    columns: tuple[ColumnMismatch, ...]
    # Written since the cron tick's watermark, or queued: the next tick rebuilds it.
    awaiting_tick: bool = False


def mismatches_sql(cursor: Any, scope: dict[str, str]) -> tuple[list[str], str]:
    """The columns the platform's function writes that this database's hourly table has, and
    the query comparing them in ``scope``."""
    present = hourly_columns(cursor)
    columns = [name for name in EXPECTED_SUMS if name in present]
    return columns, compose(
        MISMATCHES_SQL,
        expected=", ".join(f"{EXPECTED_SUMS[name]}::bigint AS {name}" for name in columns),
        pairs=", ".join(f"e.{name}, h.{name}" for name in columns),
        e_columns=", ".join(f"e.{name}" for name in columns),
        h_columns=", ".join(f"h.{name}" for name in columns),
        either_key=", ".join(f"coalesce(e.{c}, h.{c})" for c in KEY_COLUMNS),
        actual_is_expected=same_key("h.{}", "e.{}"),
        queued=same_key("d.{}", "coalesce(e.{0}, h.{0})"),
        **scope,
    )


@dataclass(frozen=True)
class Mismatches:
    """The keys that differ: how many, how many the platform's next cron tick rebuilds, the
    first, and the hourly columns compared."""

    mismatched_keys: int
    awaiting_tick_keys: int
    mismatches: list[Mismatch]
    columns: tuple[str, ...]


def find_mismatches(run_ids: list[int] | None = None, limit: int = 1000) -> Mismatches:
    """The hourly keys that differ from the recompute (all keys, or those of some runs)."""
    scope = ALL_KEYS if run_ids is None else RUN_KEYS
    with connection.cursor() as cursor:
        columns, query = mismatches_sql(cursor, scope)
        cursor.execute(query, {"run_ids": run_ids or [], "limit": limit})
        rows = cursor.fetchall()
    count, awaiting = (rows[0][-2], rows[0][-1]) if rows else (0, 0)
    found = []
    width = len(KEY_COLUMNS)
    for row in rows:
        expected_row, actual_row, values = row[width], row[width + 1], row[width + 2 : -3]
        pairs = zip(columns, values[0::2], values[1::2], strict=True)
        differing = tuple(ColumnMismatch(*pair) for pair in pairs if pair[1] != pair[2])
        found.append(
            Mismatch(
                tuple(row[:width]),
                missing=expected_row and not actual_row,
                stale=actual_row and not expected_row,
                columns=differing if expected_row and actual_row else (),
                awaiting_tick=bool(row[-3]),
            )
        )
    return Mismatches(count, awaiting, found, tuple(columns))


# The eligible rows left, and how many of them a revert (of any run) restored exactly: those
# are eligible again by design, not rows the repair missed.
COUNT_LEFT_SQL = """
SELECT count(*), count(*) FILTER (WHERE EXISTS (
    SELECT 1 FROM {journal} r WHERE r.usage_id = tu.id AND r.reverted_at IS NOT NULL
      AND tu.updated_at IS NOT DISTINCT FROM r.old_updated_at))
FROM {eligible_from} WHERE {eligible_where}"""


@dataclass(frozen=True, kw_only=True)
class RunVerification(Mismatches):
    run_id: int
    run_status: str
    runs: list[int]
    last_status: str
    continues: int | None
    continued_by: int | None
    eligible_rows_left: int
    eligible_rows_expected: bool  # a run of the chain, or the rows left, reverted
    rollup_function: str = ""  # the installed function as recognised, or "unknown"

    @property
    def keys_ok(self) -> bool:
        """Every key equal to a recompute, or waiting for the tick that recomputes it."""
        return self.mismatched_keys == self.awaiting_tick_keys

    @property
    def ok(self) -> bool:
        rows_ok = self.eligible_rows_left == 0 or self.eligible_rows_expected
        return rows_ok and self.keys_ok


def verify_run_in_context(run_id: int, limit: int = 100) -> RunVerification:
    """Verify run ``run_id`` with its chain, read-only; at most ``limit`` keys are listed."""
    run = BackfillRun.objects.get(pk=run_id)
    # The run with the runs it continues and the runs that continue it, oldest first.
    members = [run]
    while members[0].continues_id is not None:
        members.insert(0, BackfillRun.objects.get(pk=members[0].continues_id))
    while (later := members[-1].continued_by.order_by("pk").first()) is not None:
        members.append(later)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(compose(COUNT_LEFT_SQL), eligible_params(run.cutoff, run.workspace_id))
        left, restored = cursor.fetchone()
        found = find_mismatches(run_ids=[r.pk for r in members], limit=limit)
        installed = read_installed_function(cursor)
    return RunVerification(
        **vars(found),
        run_id=run.pk,
        run_status=run.status,
        runs=[r.pk for r in members],
        last_status=members[-1].status,
        continues=run.continues_id,
        continued_by=next((r.pk for r in members if r.continues_id == run.pk), None),
        eligible_rows_left=left,
        eligible_rows_expected=any(r.status == BackfillRun.Status.REVERTED for r in members)
        or (left > 0 and left == restored),
        rollup_function=installed.described if installed is not None else "missing",
    )


def describe(mismatch: dict[str, Any]) -> str:
    """One line for a mismatch as the result document has it."""
    hour, workspace, runtime, agent, project, provider, model = mismatch["key"]
    when = hour.strftime("%Y-%m-%dT%H:%MZ") if hasattr(hour, "strftime") else str(hour)
    key = (
        f"{when} workspace {workspace} runtime {runtime} agent {agent} project "
        f"{project or '-'} {provider or '(no provider)'}/{model}"
    )
    waiting = " (waits for the platform's cron tick)" if mismatch.get("awaiting_tick") else ""
    if mismatch["missing"]:
        return f"{key}: no hourly row, but usage rows exist{waiting}"
    if mismatch["stale"]:
        return f"{key}: an hourly row, but no usage rows are left{waiting}"
    differing = "; ".join(
        f"{c['column']} expected {_number(c['expected'])} got {_number(c['actual'])}"
        for c in mismatch["columns"]
    )
    return f"{key}: {differing}{waiting}"


def _number(value: int | None) -> str:
    return "NULL" if value is None else f"{value:,}"
