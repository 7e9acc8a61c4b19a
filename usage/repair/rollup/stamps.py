"""The repair's rebuild through the platform's function: slices of the runs' stamps, then the
keys of rows rewritten since, queued and drained (docs/design.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction

from usage.db import drop_temp_table
from usage.eligibility import compose, key_columns, same_key
from usage.repair.rollup.function import (
    KEY_BASE_COST,
    MICROSECOND,
    Plan,
    QueueDrainer,
    probe_units,
    run_slice,
    slice_units,
)
from usage.repair.rollup.slices import (
    NEXT_SPAN_SQL,
    OnSlice,
    OnWait,
    RollupError,
    ShouldStop,
    SliceCancelled,
    Span,
    unbounded,
)

logger = logging.getLogger("usage.rollup")


# A call over the window of a slice's stamps rebuilds exactly their keys (docs/design.md).
STAMPS_TABLE = "pg_temp.codex_rollup_stamps"
# A window never spans a gap wider than this between two stamps (other writers' rows fill it).
MAX_WINDOW_GAP = timedelta(seconds=1)
DROP_STAMPS_TABLE_SQL = f"DROP TABLE IF EXISTS {STAMPS_TABLE}"
# Fresh statistics of the journal the run just wrote (docs/design.md).
ANALYZE_JOURNAL_SQL = "ANALYZE {journal}"

# The runs' rows (not reverted) with their hourly keys: those ``{match}`` keeps (stamped or
# rewritten since), of one bucket hour with ``{only_hour}`` (the own path's fallback).
RUN_ROWS = """{journal} j
JOIN {task_usage} tu ON tu.id = j.usage_id {match}
{key_joins}
WHERE j.run_id = ANY(%(run_ids)s) AND j.reverted_at IS NULL AND {has_key} {only_hour}"""
STAMPED = "AND tu.updated_at = j.new_updated_at"
REWRITTEN = "AND tu.updated_at IS DISTINCT FROM j.new_updated_at"
STAMP = "j.new_updated_at AS stamp, "
ONLY_HOUR = {False: "", True: "AND {bucket_hour} AT TIME ZONE 'UTC' = %(hour)s"}

# The runs' distinct keys (one row per stamp and key for the stamps), analyzed before they
# are joined (docs/design.md).
RUN_KEYS_TABLE = "pg_temp.codex_rollup_run_keys"
CREATE_RUN_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_run_keys ON COMMIT DROP AS
SELECT DISTINCT {stamp}{row_key} FROM {run_rows}"""
ANALYZE_RUN_KEYS_SQL = f"ANALYZE {RUN_KEYS_TABLE}"
# The keys the revert's batches restored (and queued), distinct.
REVERT_KEYS_TABLE = "pg_temp.codex_revert_keys"
# The revert's keys (of ``hour`` when given) as its batches queued them: their time in the
# queue is their stamp, a window of which drains them.
CREATE_QUEUED_KEYS_SQL = f"""
CREATE TEMP TABLE codex_rollup_run_keys ON COMMIT DROP AS
SELECT d.enqueued_at AS stamp, {key_columns("d").as_string()}
FROM {REVERT_KEYS_TABLE} k JOIN {{task_usage_hourly_dirty}} d ON {same_key("k", "d").as_string()}
WHERE %(hour)s::timestamptz IS NULL OR k.bucket_hour = %(hour)s"""
# The task count of each agent of the keys: a key's rollup cost grows with it.
AGENT_TASKS = f"""agent_tasks AS MATERIALIZED (
    SELECT t.agent_id, count(*) AS tasks FROM {{agent_task_queue}} t
    WHERE t.agent_id IN (SELECT DISTINCT agent_id FROM {RUN_KEYS_TABLE}) GROUP BY t.agent_id
)"""
# The stamps with running totals of keys and tasks, a new segment at every gap > MAX_WINDOW_GAP.
CREATE_STAMPS_TABLE_SQL = f"""
CREATE TEMP TABLE codex_rollup_stamps ON COMMIT PRESERVE ROWS AS
WITH {AGENT_TASKS},
stamps AS (
    SELECT k.stamp, count(*) AS keys, sum(t.tasks) AS tasks,
           k.stamp - lag(k.stamp) OVER (ORDER BY k.stamp) AS gap
    FROM {RUN_KEYS_TABLE} k JOIN agent_tasks t USING (agent_id)
    GROUP BY k.stamp
)
SELECT row_number() OVER w AS seq, stamp,
       count(*) FILTER (WHERE gap > %(max_gap)s) OVER (w ROWS UNBOUNDED PRECEDING) AS segment,
       sum(keys) OVER (w ROWS UNBOUNDED PRECEDING)::bigint AS keys_to,
       sum(tasks) OVER (w ROWS UNBOUNDED PRECEDING)::bigint AS tasks_to
FROM stamps
WINDOW w AS (ORDER BY stamp)"""
INDEX_STAMPS_TABLE_SQL = f"ALTER TABLE {STAMPS_TABLE} ADD PRIMARY KEY (seq)"
STAMPS_TOTAL_SQL = (
    f"SELECT count(*), coalesce(max(keys_to), 0), coalesce(max(tasks_to), 0) FROM {STAMPS_TABLE}"
)
# Keys others queued before the window from stamp ``seq`` ends: its call drains them too.
BACKLOG_COUNT_CAP = 100_000
BACKLOG_SQL = f"""
SELECT count(*) FROM (
    SELECT 1 FROM {{task_usage_hourly_dirty}}
    WHERE enqueued_at < (SELECT stamp FROM {STAMPS_TABLE} WHERE seq = %(seq)s) + %(gap)s
    LIMIT %(cap)s
) queued"""
# The next slice: the stamps after ``after`` of one segment whose keys cost at most ``limit``
# (tasks plus ``base`` a key; at least one stamp).
NEXT_SLICE_SQL = NEXT_SPAN_SQL.format(
    table=STAMPS_TABLE,
    columns="s.keys_to, s.tasks_to, f.stamp, s.stamp",
    over="n.tasks_to - %(done_tasks)s + %(base)s * (n.keys_to - %(done_keys)s) > %(limit)s "
    "OR n.segment <> f.segment",
)

# Keys of the runs' rows rewritten since (no window of stamps finds them): queued and drained.
REWRITTEN_TABLE = "pg_temp.codex_rollup_rewritten"
CREATE_REWRITTEN_TABLE_SQL = f"""
CREATE TEMP TABLE codex_rollup_rewritten ON COMMIT PRESERVE ROWS AS
WITH {AGENT_TASKS}
SELECT row_number() OVER (ORDER BY k.agent_id) AS seq, k.*, t.tasks
FROM {RUN_KEYS_TABLE} k JOIN agent_tasks t USING (agent_id)"""
DROP_REWRITTEN_TABLE_SQL = f"DROP TABLE IF EXISTS {REWRITTEN_TABLE}"
REWRITTEN_TOTAL_SQL = f"SELECT count(*), coalesce(sum(tasks), 0)::bigint FROM {REWRITTEN_TABLE}"
# Queue keys (after, upto] as the platform does; the latest enqueued_at and their tasks.
ENQUEUE_REWRITTEN_SQL = f"""
WITH queued AS (
    INSERT INTO {{task_usage_hourly_dirty}} AS d ({{key_columns}}, enqueued_at)
    SELECT {{key_columns}}, clock_timestamp() FROM {REWRITTEN_TABLE}
    WHERE seq > %(after)s AND seq <= %(upto)s
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)
    RETURNING d.enqueued_at
)
SELECT (SELECT max(enqueued_at) FROM queued),
       (SELECT coalesce(sum(tasks), 0) FROM {REWRITTEN_TABLE}
        WHERE seq > %(after)s AND seq <= %(upto)s)"""


def from_run_rows(template: str, match: str, hour: datetime | None = None, stamp: str = "") -> str:
    """``template`` over ``{run_rows}``: those ``match`` keeps, of ``hour`` when given."""
    only_hour = ONLY_HOUR[hour is not None]
    return compose(template, stamp=stamp, match=match, only_hour=only_hour, run_rows=RUN_ROWS)


class FunctionPath(QueueDrainer):
    """The function path: the repair's rebuild, and the revert's (its queued keys)."""

    def rebuild(
        self,
        run_ids: Sequence[int],
        should_stop: ShouldStop,
        on_slice: OnSlice,
        on_wait: OnWait,
        hour: datetime | None = None,
        queued: bool = False,
    ) -> bool:
        """Every hourly key of the runs' rows (of ``hour`` when given): slices of stamps, then
        the rewritten keys; or the revert's ``queued`` keys, by the windows of their queue
        times. Stops between slices on ``should_stop()``. Always True."""
        params = {"run_ids": list(run_ids), "hour": hour, "max_gap": MAX_WINDOW_GAP}
        keys_sql = from_run_rows(CREATE_RUN_KEYS_SQL, STAMPED, hour, STAMP)
        stamps, keys, tasks = unbounded(
            self.limits,
            DROP_STAMPS_TABLE_SQL,
            compose(ANALYZE_JOURNAL_SQL),
            (compose(CREATE_QUEUED_KEYS_SQL) if queued else keys_sql, params),
            ANALYZE_RUN_KEYS_SQL,
            (compose(CREATE_STAMPS_TABLE_SQL), params),
            INDEX_STAMPS_TABLE_SQL,
            STAMPS_TOTAL_SQL,
        )
        self.result.keys_total += keys
        try:
            if stamps:
                self._stamp_slices(stamps, tasks / keys, should_stop, on_slice, on_wait)
            if not self.result.stopped and not queued:
                self._rewritten(params, should_stop, on_wait)
        finally:
            drop_temp_table(DROP_STAMPS_TABLE_SQL, "stamps table", logger)
            drop_temp_table(DROP_REWRITTEN_TABLE_SQL, "rewritten keys table", logger)
        return True

    def _stamp_slices(
        self, total: int, mean: float, stop: ShouldStop, on_slice: OnSlice, on_wait: OnWait
    ) -> None:
        """Slices of stamps: plan, wait, run, learn."""
        after = keys_done = tasks_done = 0
        while after < total:
            if not self.may_start(stop, on_wait):
                return
            backlog = self._backlog(after + 1)
            plan, span = self._choose((after, keys_done, tasks_done), total, mean, backlog)
            try:
                piece = run_slice(plan, self.limits, span.start, span.end)
            except SliceCancelled as exc:
                drained = f", {backlog} queued keys drained with it" if backlog else ""
                what = f"slice of {span.keys} keys on {span.count} stamps ({plan} plan{drained})"
                units = slice_units(plan, span.keys, span.cost, backlog, mean)
                self.planner.cancelled(plan, units, span.keys, smallest=span.count == 1)
                if not self.planner.usable:
                    self.result.cancelled_holds.append(exc.held)
                    raise RollupError(
                        f"{what} could not be rebuilt within the lock budget "
                        f"({self.limits.cap:g}s) with either plan; the run's rollup stays "
                        "pending: re-run the same command with a larger "
                        "--max-rollup-lock-seconds to rebuild the rest"
                    ) from exc
                self.cancelled(exc, what)
                continue
            piece = self._settled(piece, span.keys, span.cost, backlog, mean)
            after = span.upto
            keys_done += span.keys
            tasks_done += span.cost
            what = f"rollup slice: {span.keys} keys ({keys_done}/{self.result.keys_total})"
            self.report(piece, what, keys_done, on_slice)
            if after < total:
                self.leave_a_gap()

    def _backlog(self, seq: int) -> int:
        """Keys others queued before the window from stamp ``seq`` ends (normally none)."""
        with connection.cursor() as cursor:
            params = {"seq": seq, "gap": MAX_WINDOW_GAP, "cap": BACKLOG_COUNT_CAP}
            cursor.execute(compose(BACKLOG_SQL), params)
            return int(cursor.fetchone()[0])

    def _choose(
        self, done: tuple[int, int, int], total: int, mean: float, backlog: int
    ) -> tuple[Plan, Span]:
        """The next slice's plan and stamps after ``done`` (stamps, keys, tasks): each plan
        judged at the size its rate allows, run at the size growth allows."""
        after, keys_done, tasks_done = done

        def limit(plan: Plan, grow: bool) -> float:
            backlog_units = slice_units(plan, 0, 0, backlog, mean)
            return self.planner.limit(plan, probe_units(plan, mean), backlog_units, grow=grow)

        def span(plan: Plan, limit: float) -> Span:
            with connection.cursor() as cursor:
                params = {"after": after, "done_keys": keys_done, "done_tasks": tasks_done}
                params.update(base=KEY_BASE_COST[plan], limit=int(limit), total=total)
                cursor.execute(NEXT_SLICE_SQL, params)
                upto, keys_to, tasks_to, first, last = cursor.fetchone()
            keys, tasks = int(keys_to) - keys_done, int(tasks_to) - tasks_done
            return Span(after, int(upto), keys, tasks, first, last + MICROSECOND)

        def speed(plan: Plan) -> float:
            judged = span(plan, limit(plan, False))
            units = slice_units(plan, judged.keys, judged.cost, backlog, mean)
            return judged.keys / (self.planner.seconds(plan, units) + self.planner.gap)

        plan = self.planner.best(speed)
        return plan, span(plan, limit(plan, True))

    def _rewritten(self, params: dict[str, Any], should_stop: ShouldStop, on_wait: OnWait) -> None:
        """The keys of rows rewritten since the run: queued and drained in planned chunks."""
        total, tasks = unbounded(
            self.limits,
            DROP_REWRITTEN_TABLE_SQL,
            (from_run_rows(CREATE_RUN_KEYS_SQL, REWRITTEN, params["hour"]), params),
            ANALYZE_RUN_KEYS_SQL,
            compose(CREATE_REWRITTEN_TABLE_SQL),
            REWRITTEN_TOTAL_SQL,
        )
        self.result.keys_total += total
        done = 0
        while done < total:
            if should_stop():
                self.result.stopped = True
                return
            upto = min(total, done + self.next_keys(tasks / total))
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(compose(ENQUEUE_REWRITTEN_SQL), {"after": done, "upto": upto})
                latest, chunk_tasks = cursor.fetchone()
            self.drain(latest, upto - done, int(chunk_tasks), should_stop, on_wait)
            done = upto
