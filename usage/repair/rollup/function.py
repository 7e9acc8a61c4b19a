"""The function path: slices of the runs' stamps (or of the revert's queue times), then the keys
of rows rewritten since, queued and drained, each a call of ``rollup_task_usage_hourly_window``
planned (nested loops or hashed) by a measured cost model (``SlicePlanner``; docs/design.md)."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings

from usage.cron import MICROSECOND
from usage.db import drop_temp_table
from usage.eligibility import compose, key_columns, same_key
from usage.repair.rollup.slices import (
    NEXT_SPAN_SQL,
    SLICE_GAP_SECONDS,
    Bound,
    Rate,
    RollupError,
    RollupSlice,
    SliceCancelled,
    SliceLimits,
    Slicer,
    Span,
    log_slice,
    one,
    run_locked,
    unbounded,
)

logger = logging.getLogger("usage.rollup")

# The cost model's measured constants and priors (docs/design.md): keys of a plan's first
# slice, a key's cost in tasks beside its agent's, task units a second, a page's scan.
FIRST_SLICE_KEYS = 50
KEY_BASE_COST = {"nestloop": 60, "hash": 5000}
PRIOR_RATE = {"nestloop": 150_000.0, "hash": 20_000_000.0}
PRIOR_SCAN_SECONDS_PER_PAGE = 40e-6


class Plan(enum.StrEnum):
    NESTLOOP = "nestloop"
    HASH = "hash"


# A plan's settings; force_custom_plan, or the function reuses its cached plan (docs/design.md).
SET_PLAN_SQL = (
    "SELECT set_config('enable_nestloop', %s, true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
ENABLE_NESTLOOP = {Plan.NESTLOOP: "on", Plan.HASH: "off"}
# The transaction's scans of task_usage so far: a hash plan scans it whole.
SCANS_SQL = """
SELECT coalesce(sum(seq_scan), 0), coalesce(sum(idx_scan), 0)
FROM pg_stat_xact_user_tables WHERE schemaname = %s AND relname = 'task_usage'"""
# The 8 kB pages a whole-scan plan reads.
SCANNED_PAGES_SQL = "SELECT (pg_relation_size(%s::regclass) + pg_relation_size(%s::regclass))/8192"
ROLLUP_CALL_SQL = "SELECT {rollup_task_usage_hourly_window}(%(from)s, %(to)s)"


@dataclass
class SlicePlanner:
    """Each slice's plan and size, to hold the lock ``target`` seconds: a ``Rate`` a plan."""

    target: float
    scan_seconds: float
    gap: float = SLICE_GAP_SECONDS
    usable: set[Plan] = field(default_factory=lambda: {Plan.NESTLOOP, Plan.HASH})
    rates: dict[Plan, Rate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = {
            Plan.NESTLOOP: Rate(self.target, PRIOR_RATE[Plan.NESTLOOP]),
            Plan.HASH: Rate(self.target, PRIOR_RATE[Plan.HASH], self.scan_seconds, scans=True),
        }
        if self.scan_seconds > self.target:
            self.usable.discard(Plan.HASH)

    def seconds(self, plan: Plan, units: float) -> float:
        return self.rates[plan].seconds(units)

    def limit(
        self, plan: Plan, probe_units: float, backlog_units: float, *, grow: bool = True
    ) -> float:
        return self.rates[plan].limit(probe_units, backlog_units, grow=grow)

    def next_to_probe(self) -> Plan | None:
        todo = [plan for plan in (Plan.NESTLOOP, Plan.HASH) if not self.rates[plan].measured]
        return next((plan for plan in todo if plan in self.usable), None)

    def measured(self, plan: Plan, units: float, held: float) -> None:
        self.rates[plan].add(units, held)

    def cancelled(self, plan: Plan, units: float, keys: int, *, smallest: bool = False) -> None:
        """Drop the plan when the slice could not be smaller or was a hash plan's first."""
        if smallest or keys <= 1 or (plan == Plan.HASH and not self.rates[plan].measured):
            self.usable.discard(plan)
            return
        self.rates[plan].cancelled(units)

    def best(self, speed: Callable[[Plan], float]) -> Plan:
        return self.next_to_probe() or max(sorted(self.usable), key=speed, default=Plan.NESTLOOP)


def probe_units(plan: Plan, mean_tasks: float) -> float:
    """The cost of the first slice of ``plan``, the one that measures it."""
    return FIRST_SLICE_KEYS * (mean_tasks + KEY_BASE_COST[plan])


def slice_units(plan: Plan, keys: int, tasks: int, backlog: int = 0, mean: float = 0.0) -> float:
    """A slice's cost in task units: its keys, and the queued keys its call drains too."""
    base = KEY_BASE_COST[plan]
    return tasks + base * keys + backlog * (mean + base)


def call_function(
    cursor: Any, bound: Bound, plan: Plan, window: tuple[datetime, datetime]
) -> tuple[int, dict[str, int]]:
    """One call in the caller's slice: the hourly rows it wrote, its scans of task_usage."""
    cursor.execute(SET_PLAN_SQL, [ENABLE_NESTLOOP[plan]])
    cursor.execute(SCANS_SQL, [settings.CODEX_TARGET_SCHEMA])
    seq_before, idx_before = cursor.fetchone()
    bound()
    cursor.execute(compose(ROLLUP_CALL_SQL), {"from": window[0], "to": window[1]})
    rollup_rows = cursor.fetchone()[0] or 0
    cursor.execute(SCANS_SQL, [settings.CODEX_TARGET_SCHEMA])
    seq_after, idx_after = cursor.fetchone()
    scans = {"seq_scans": int(seq_after - seq_before), "index_scans": int(idx_after - idx_before)}
    return rollup_rows, scans


def run_slice(
    plan: Plan, limits: SliceLimits, window_from: datetime, window_to: datetime, **more: int
) -> RollupSlice:
    """One slice around one call over ``[from, to)`` (``more``: its keys, tasks, backlog)."""
    window = (window_from, window_to)
    done = run_locked(limits, lambda cursor, bound: call_function(cursor, bound, plan, window))
    rollup_rows, scans = done.value
    return done.piece(window_from, window_to, rollup_rows, plan=plan, **scans, **more)


def plan_applied(piece: RollupSlice) -> bool:
    """Whether the slice ran the plan it asked for: a hash plan scans task_usage whole."""
    return piece.plan != Plan.HASH or piece.seq_scans > 0


def checked(piece: RollupSlice, planner: SlicePlanner) -> RollupSlice:
    """The slice as it ran: a hash plan with no whole scan was nested loops (a ``SET`` clause
    on the function keeps the settings out), and the planner drops it."""
    if plan_applied(piece):
        return piece
    planner.usable.discard(Plan(piece.plan))
    logger.warning(
        "enable_nestloop = off did not reach the rollup function's statements (no whole "
        "scan of task_usage); using its default plan from now on"
    )
    return dataclasses.replace(piece, plan=Plan.NESTLOOP)


STAMPS_TABLE = "pg_temp.codex_rollup_stamps"
# A window never spans a gap wider than this between two stamps (other writers' rows fill it).
MAX_WINDOW_GAP = timedelta(seconds=1)
DROP_STAMPS_TABLE_SQL = f"DROP TABLE IF EXISTS {STAMPS_TABLE}"
# Fresh statistics of the journal the run just wrote (docs/design.md).
ANALYZE_JOURNAL_SQL = "ANALYZE {journal}"

# The runs' rows (not reverted) with their keys: those ``{match}`` keeps, of ``{only_hour}``.
RUN_ROWS = """{journal} j
JOIN {task_usage} tu ON tu.id = j.usage_id {match}
{key_joins}
WHERE j.run_id = ANY(%(run_ids)s) AND j.reverted_at IS NULL AND {has_key} {only_hour}"""
STAMPED = "AND tu.updated_at = j.new_updated_at"
REWRITTEN = "AND tu.updated_at IS DISTINCT FROM j.new_updated_at"
STAMP = "j.new_updated_at AS stamp, "
ONLY_HOUR = "AND {bucket_hour} AT TIME ZONE 'UTC' = %(hour)s"

# The runs' distinct keys (per stamp for the stamps), analyzed before joined (docs/design.md).
RUN_KEYS_TABLE = "pg_temp.codex_rollup_run_keys"
CREATE_RUN_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_run_keys ON COMMIT DROP AS
SELECT DISTINCT {stamp}{row_key} FROM {run_rows}"""
ANALYZE_RUN_KEYS_SQL = f"ANALYZE {RUN_KEYS_TABLE}"
# The distinct keys the revert's batches restored (and queued).
REVERT_KEYS_TABLE = "pg_temp.codex_revert_keys"
# The revert's keys (of ``hour`` when given), their time in the queue as their stamp.
CREATE_QUEUED_KEYS_SQL = f"""
CREATE TEMP TABLE codex_rollup_run_keys ON COMMIT DROP AS
SELECT d.enqueued_at AS stamp, {key_columns("d").as_string()}
FROM {REVERT_KEYS_TABLE} k JOIN {{task_usage_hourly_dirty}} d ON {same_key("k", "d").as_string()}
WHERE %(hour)s::timestamptz IS NULL OR k.bucket_hour = %(hour)s"""
# The task count of each agent of the keys: a key's cost grows with it.
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
STAMPS_TOTAL_SQL = f"""
SELECT count(*), coalesce(max(keys_to), 0), coalesce(max(tasks_to), 0) FROM {STAMPS_TABLE}"""
# Keys others queued before the window from stamp ``seq`` ends: its call drains them too.
BACKLOG_COUNT_CAP = 100_000
BACKLOG_SQL = f"""
SELECT count(*) FROM (
    SELECT 1 FROM {{task_usage_hourly_dirty}}
    WHERE enqueued_at < (SELECT stamp FROM {STAMPS_TABLE} WHERE seq = %(seq)s) + %(gap)s
    LIMIT %(cap)s
) queued"""
# The next slice: one segment's stamps whose keys cost at most ``limit`` (tasks, ``base`` a key).
NEXT_SLICE_SQL = NEXT_SPAN_SQL.format(
    table=STAMPS_TABLE,
    columns="s.keys_to, s.tasks_to, f.stamp, s.stamp",
    over="n.tasks_to - %(done_tasks)s + %(base)s * (n.keys_to - %(done_keys)s) > %(limit)s "
    "OR n.segment <> f.segment",
)

# Keys of the runs' rows rewritten since (no window of stamps finds them).
REWRITTEN_TABLE = "pg_temp.codex_rollup_rewritten"
CREATE_REWRITTEN_TABLE_SQL = f"""
CREATE TEMP TABLE codex_rollup_rewritten ON COMMIT PRESERVE ROWS AS
WITH {AGENT_TASKS}
SELECT row_number() OVER (ORDER BY k.agent_id) AS seq, k.*, t.tasks
FROM {RUN_KEYS_TABLE} k JOIN agent_tasks t USING (agent_id)"""
DROP_REWRITTEN_TABLE_SQL = f"DROP TABLE IF EXISTS {REWRITTEN_TABLE}"
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
    only_hour = "" if hour is None else ONLY_HOUR
    return compose(template, stamp=stamp, match=match, only_hour=only_hour, run_rows=RUN_ROWS)


class FunctionPath(Slicer):
    """The function path: the repair's rebuild, and the revert's (its queued keys)."""

    def __post_init__(self) -> None:
        """Its planner, with a hash slice's whole scans predicted from the tables' size."""
        super().__post_init__()
        schema = settings.CODEX_TARGET_SCHEMA
        pages = one(SCANNED_PAGES_SQL, [f"{schema}.task_usage", f"{schema}.agent_task_queue"])[0]
        scans = float(pages or 0) * PRIOR_SCAN_SECONDS_PER_PAGE
        self.planner = SlicePlanner(self.limits.target, scans, self.limits.gap)

    def rebuild(
        self, run_ids: Sequence[int], hour: datetime | None = None, queued: bool = False
    ) -> None:
        """Every key of the runs' rows (of ``hour``), or the revert's ``queued`` keys."""
        params = {"run_ids": list(run_ids), "hour": hour, "max_gap": MAX_WINDOW_GAP}
        keys_sql = from_run_rows(CREATE_RUN_KEYS_SQL, STAMPED, hour, STAMP)
        stamps, keys, tasks = unbounded(
            self.limits,
            DROP_STAMPS_TABLE_SQL,
            compose(ANALYZE_JOURNAL_SQL),
            (compose(CREATE_QUEUED_KEYS_SQL) if queued else keys_sql, params),
            ANALYZE_RUN_KEYS_SQL,
            (compose(CREATE_STAMPS_TABLE_SQL), params),
            f"ALTER TABLE {STAMPS_TABLE} ADD PRIMARY KEY (seq)",
            STAMPS_TOTAL_SQL,
        )
        self.result.keys_total += keys
        try:
            if stamps:
                self._stamp_slices(stamps, tasks / keys)
            if not self.result.stopped and not queued:
                self._rewritten(params)
        finally:
            drop_temp_table(DROP_STAMPS_TABLE_SQL, "stamps table", logger)
            drop_temp_table(DROP_REWRITTEN_TABLE_SQL, "rewritten keys table", logger)

    def _stamp_slices(self, total: int, mean: float) -> None:
        after = keys_done = tasks_done = 0
        while after < total:
            if not self.may_start():
                return
            params = {"seq": after + 1, "gap": MAX_WINDOW_GAP, "cap": BACKLOG_COUNT_CAP}
            backlog = int(one(compose(BACKLOG_SQL), params)[0])
            plan, span = self._choose((after, keys_done, tasks_done), total, mean, backlog)
            try:
                more = {"keys": span.keys, "tasks": span.cost, "backlog": backlog}
                piece = run_slice(plan, self.limits, span.start, span.end, **more)
            except SliceCancelled as exc:
                drained = f", {backlog} queued keys drained with it" if backlog else ""
                what = f"slice of {span.keys} keys on {span.count} stamps ({plan} plan{drained})"
                units = slice_units(plan, span.keys, span.cost, backlog, mean)
                self.planner.cancelled(plan, units, span.keys, smallest=span.count == 1)
                self.cancelled(exc, what, last=not self.planner.usable)
                continue
            piece = self._settled(piece, mean)
            after, keys_done, tasks_done = span.upto, keys_done + span.keys, tasks_done + span.cost
            what = f"rollup slice: {span.keys} keys ({keys_done}/{self.result.keys_total})"
            self.report(piece, what, keys_done, last=after >= total)

    def _choose(
        self, done: tuple[int, int, int], total: int, mean: float, backlog: int
    ) -> tuple[Plan, Span]:
        """The next slice's plan (each judged at the size its rate allows) and stamps."""
        after, keys_done, tasks_done = done

        def span(plan: Plan, grow: bool) -> Span:
            backlog_units = slice_units(plan, 0, 0, backlog, mean)
            limit = self.planner.limit(plan, probe_units(plan, mean), backlog_units, grow=grow)
            params = {"after": after, "done_keys": keys_done, "done_tasks": tasks_done}
            params.update(base=KEY_BASE_COST[plan], limit=int(limit), total=total)
            upto, keys_to, tasks_to, first, last = one(NEXT_SLICE_SQL, params)
            keys, tasks = int(keys_to) - keys_done, int(tasks_to) - tasks_done
            return Span(after, int(upto), keys, tasks, first, last + MICROSECOND)

        def speed(plan: Plan) -> float:
            judged = span(plan, False)
            units = slice_units(plan, judged.keys, judged.cost, backlog, mean)
            return judged.keys / (self.planner.seconds(plan, units) + self.planner.gap)

        plan = self.planner.best(speed)
        return plan, span(plan, True)

    def _rewritten(self, params: dict[str, Any]) -> None:
        """The keys of rows rewritten since the run: queued and drained in planned chunks."""
        total, tasks = unbounded(
            self.limits,
            DROP_REWRITTEN_TABLE_SQL,
            (from_run_rows(CREATE_RUN_KEYS_SQL, REWRITTEN, params["hour"]), params),
            ANALYZE_RUN_KEYS_SQL,
            compose(CREATE_REWRITTEN_TABLE_SQL),
            f"SELECT count(*), coalesce(sum(tasks), 0)::bigint FROM {REWRITTEN_TABLE}",
        )
        self.result.keys_total += total
        done = 0
        while done < total:
            if not self.may_start(wait=False):  # its drain waits for the tick
                return
            mean_tasks = tasks / total  # as many keys as the best plan's next drain may take
            plan = self._best_plan(mean_tasks)
            units = self.planner.limit(plan, probe_units(plan, mean_tasks), 0.0)
            upto = min(total, done + max(1, int(units / (mean_tasks + KEY_BASE_COST[plan]))))
            queued = one(compose(ENQUEUE_REWRITTEN_SQL), {"after": done, "upto": upto})
            self._drain(queued[0], upto - done, int(queued[1]))
            done = upto

    def _best_plan(self, mean_tasks: float) -> Plan:
        def speed(plan: Plan) -> float:
            per_key = mean_tasks + KEY_BASE_COST[plan]
            units = self.planner.limit(plan, probe_units(plan, mean_tasks), 0.0, grow=False)
            return units / per_key / (self.planner.seconds(plan, units) + self.planner.gap)

        return self.planner.best(speed)

    def _drain(self, enqueued_until: datetime, keys: int, tasks: int) -> None:
        """Everything queued up to ``enqueued_until`` in one slice, tried once with each plan."""
        self.ticks.wait_if_due(self.should_stop, self.paused)
        plans = [self._best_plan(tasks / keys if keys else 0.0)]
        plans += [p for p in sorted(self.planner.usable) if p not in plans]
        for plan in plans:
            try:
                window = (enqueued_until, enqueued_until + MICROSECOND)
                piece = run_slice(plan, self.limits, *window, keys=keys, tasks=tasks)
            except SliceCancelled as exc:
                self.planner.cancelled(plan, slice_units(plan, keys, tasks), keys)
                self.cancelled(exc, f"rewritten keys drain of {keys} keys ({plan} plan)")
                continue
            log_slice(self._settled(piece), f"rewritten keys drain: {keys} keys", keys, keys)
            self.leave_a_gap()
            return
        raise RollupError(
            f"the hourly keys of one rewritten keys drain ({keys} keys) could not be rebuilt "
            f"within the lock budget ({self.limits.cap:g}s); they stay queued in "
            "task_usage_hourly_dirty (the platform's cron tick drains them too): run the same "
            "command again with a smaller --batch-size or a larger --max-rollup-lock-seconds"
        )

    def _settled(self, piece: RollupSlice, mean: float = 0.0) -> RollupSlice:
        piece = checked(piece, self.planner)
        units = slice_units(Plan(piece.plan), piece.keys, piece.tasks, piece.backlog, mean)
        self.planner.measured(Plan(piece.plan), units, piece.lock_held_seconds)
        self.settled(piece)
        return piece
