"""The function path: hourly keys rebuilt by the platform's ``rollup_task_usage_hourly_window``,
in slices of the repair's stamps or as drains of queued keys, each call planned (nested loops
or hashed) by a cost model measured as it goes (``SlicePlanner``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from usage.db import drop_temp_table, set_local_timeouts
from usage.eligibility import compose
from usage.repair.rollup.slices import (
    SLICE_GAP_SECONDS,
    Bound,
    NeighbourOptions,
    OnSlice,
    OnWait,
    Rate,
    RollupError,
    RollupResult,
    RollupSlice,
    ShouldStop,
    SliceCancelled,
    SliceLimits,
    Slicer,
    log_slice,
    run_locked,
)

logger = logging.getLogger("usage.rollup")

# The first slice of each plan takes this many keys' worth of cost, to measure it.
FIRST_SLICE_KEYS = 50
# Per-key cost beside the tasks of its agent, in "tasks", for each plan (measured at 400,000
# rows on PostgreSQL 15: a nested-loop key costs about 7 µs a task of its agent plus 0.4 ms;
# a hashed key about 0.3 ms whatever its agent, its share of the joins, the upsert and the
# drain, beside the slice's fixed whole scans).
KEY_BASE_COST = {"nestloop": 60, "hash": 5000}
# Priors, replaced by measurements as soon as a slice of that plan ran: task units per second
# of a nested-loop slice and beyond a hash slice's fixed part, and seconds of a hash slice's
# whole scan per 8 kB page of task_usage and agent_task_queue.
PRIOR_RATE = {"nestloop": 150_000.0, "hash": 20_000_000.0}
PRIOR_SCAN_SECONDS_PER_PAGE = 40e-6
# The planner's queue backlog is counted up to this many keys.
BACKLOG_COUNT_CAP = 100_000


class Plan(enum.StrEnum):
    NESTLOOP = "nestloop"
    HASH = "hash"


# The slice transaction's planner settings for each plan; force_custom_plan makes every call
# plan afresh, so the settings reach the function's statements whatever the session cached.
SET_PLAN_SQL = (
    "SELECT set_config('enable_nestloop', %s, true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
ENABLE_NESTLOOP = {Plan.NESTLOOP: "on", Plan.HASH: "off"}
# What the transaction has scanned of task_usage so far: a hash plan scans it whole.
SCANS_SQL = """
SELECT coalesce(sum(seq_scan), 0), coalesce(sum(idx_scan), 0)
FROM pg_stat_xact_user_tables WHERE schemaname = %s AND relname = 'task_usage'"""
# The 8 kB pages a whole-scan plan reads.
SCANNED_PAGES_SQL = """
SELECT (pg_relation_size(%(task_usage)s::regclass)
        + pg_relation_size(%(agent_task_queue)s::regclass)) / 8192"""

ROLLUP_CALL_SQL = "SELECT {rollup_task_usage_hourly_window}(%(from)s, %(to)s)"
# Keys queued by others before a moment: a call whose window ends then drains them too.
BACKLOG_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM {task_usage_hourly_dirty} WHERE enqueued_at < %(before)s LIMIT %(cap)s
) queued"""


# -- the cost model ----------------------------------------------------------------------


@dataclass
class SlicePlanner:
    """Chooses each slice's plan and size so it holds the lock about ``target`` seconds.

    Costs are in "task units": the task counts of a slice's keys' agents plus a per-key part
    (``KEY_BASE_COST``). A hash slice also pays its whole scans (``scan_seconds`` predicts
    them before one ran). A plan is dropped when it cannot work (a hash scan that alone passes
    the target, a cancelled slice that could not be smaller, settings that do not reach the
    function).
    """

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

    @property
    def nestloop_rate(self) -> float:
        return self.rates[Plan.NESTLOOP].rate

    def seconds(self, plan: Plan, units: float) -> float:
        return self.rates[plan].seconds(units)

    def limit(
        self, plan: Plan, probe_units: float, backlog_units: float, *, grow: bool = True
    ) -> float:
        """The task units of our keys the next slice of ``plan`` may take (at least 1)."""
        return self.rates[plan].limit(probe_units, backlog_units, grow=grow)

    def next_to_probe(self) -> Plan | None:
        """A usable plan not measured yet: each is tried once on a small slice first."""
        for plan in (Plan.NESTLOOP, Plan.HASH):
            if plan in self.usable and not self.rates[plan].measured:
                return plan
        return None

    def measured(self, plan: Plan, units: float, held: float) -> None:
        self.rates[plan].add(units, held)

    def cancelled(self, plan: Plan, units: float, keys: int, *, smallest: bool = False) -> None:
        """A slice of ``plan`` hit the cap: believe half of it fits, or drop the plan when the
        slice could not have been smaller, or was a hash plan's first (its scans alone do not
        fit)."""
        if smallest or keys <= 1 or (plan == Plan.HASH and not self.rates[plan].measured):
            self.usable.discard(plan)
            return
        self.rates[plan].cancelled(units)

    def best(self, speed: Callable[[Plan], float]) -> Plan:
        """The plan to run next: one not measured yet, else the one of most keys per second
        of wall time (``speed(plan)``)."""
        probe = self.next_to_probe()
        return probe or max(sorted(self.usable), key=speed, default=Plan.NESTLOOP)


def slice_units(
    plan: Plan, keys: int, tasks: int, backlog: int = 0, mean_tasks: float = 0.0
) -> float:
    """A slice's cost in task units: its keys, and the queued keys its call drains too."""
    base = KEY_BASE_COST[plan]
    return tasks + base * keys + backlog * (mean_tasks + base)


def predict_scan_seconds() -> float:
    """A hash slice's whole scans, predicted from the size of the tables they read."""
    names = {
        "task_usage": f"{settings.CODEX_TARGET_SCHEMA}.task_usage",
        "agent_task_queue": f"{settings.CODEX_TARGET_SCHEMA}.agent_task_queue",
    }
    with connection.cursor() as cursor:
        cursor.execute(SCANNED_PAGES_SQL, names)
        pages = cursor.fetchone()[0] or 0
    return float(pages) * PRIOR_SCAN_SECONDS_PER_PAGE


# -- one call of the function ------------------------------------------------------------


def call_function(
    cursor: Any, bound: Bound, plan: Plan, window: tuple[datetime, datetime]
) -> tuple[int, dict[str, int]]:
    """One call over ``window`` ``[from, to)`` with ``plan``'s settings, in the caller's
    slice: the hourly rows it wrote, and the scans of ``task_usage`` it made."""
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
    plan: Plan, limits: SliceLimits, window_from: datetime, window_to: datetime
) -> RollupSlice:
    """One transaction holding lock 4246 around one rollup call over ``[from, to)``: it
    rebuilds the keys of the rows last written in the window, and every key queued before
    its end."""
    window = (window_from, window_to)
    done = run_locked(limits, lambda cursor, bound: call_function(cursor, bound, plan, window))
    rollup_rows, scans = done.value
    return done.piece(window_from, window_to, rollup_rows, plan=plan, **scans)


def plan_applied(piece: RollupSlice) -> bool:
    """Whether the slice ran the plan it asked for: a hash plan scans task_usage whole."""
    return piece.plan != Plan.HASH or piece.seq_scans > 0


def _checked(piece: RollupSlice, planner: SlicePlanner) -> RollupSlice:
    """The slice as it really ran: a hash plan that did not scan task_usage was nested loops.

    The planner then drops the hash plan (something, such as a ``SET`` clause on the
    function, keeps the slice's settings from its statements).
    """
    if plan_applied(piece):
        return piece
    planner.usable.discard(Plan(piece.plan))
    logger.warning(
        "enable_nestloop = off did not reach the rollup function's statements (no whole "
        "scan of task_usage); using its default plan from now on"
    )
    return dataclasses.replace(piece, plan=Plan.NESTLOOP)


# -- the repair's slices of stamps, the rewritten keys, the drains ---------------------------

# The repair stamps every row of one hourly key with the same updated_at, one microsecond per
# key (usage.repair.backfill): a call over the window from a slice's first stamp to just after
# its last rebuilds exactly those keys (plus any row someone else wrote in that window).
STAMPS_TABLE = "pg_temp.codex_rollup_stamps"
# A window never spans a gap wider than this between two stamps (other writers' rows fill it).
MAX_WINDOW_GAP = timedelta(seconds=1)
MICROSECOND = timedelta(microseconds=1)

CREATE_STAMPS_TABLE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS codex_rollup_stamps (
    seq bigint PRIMARY KEY,
    stamp timestamptz NOT NULL,
    segment bigint NOT NULL,
    keys_to bigint NOT NULL,
    tasks_to bigint NOT NULL
) ON COMMIT PRESERVE ROWS"""
TRUNCATE_STAMPS_TABLE_SQL = f"TRUNCATE {STAMPS_TABLE}"
DROP_STAMPS_TABLE_SQL = f"DROP TABLE IF EXISTS {STAMPS_TABLE}"
# The run just added its rows to the journal: fresh statistics keep the plans below from
# taking them for a handful (nested loops over every entry).
ANALYZE_JOURNAL_SQL = "ANALYZE {journal}"

# The rows some runs changed and did not revert, joined to their hourly key: ``{match}`` keeps
# those still carrying the run's stamp or those rewritten since; ``{only_hour}`` one bucket
# hour's (the own path's fallback for an hour too big for its slices).
RUN_ROWS = """{journal} j
JOIN {task_usage} tu ON tu.id = j.usage_id {match}
{key_joins}
WHERE j.run_id = ANY(%(run_ids)s) AND j.reverted_at IS NULL AND {has_key} {only_hour}"""
STAMPED = "AND tu.updated_at = j.new_updated_at"
REWRITTEN = "AND tu.updated_at IS DISTINCT FROM j.new_updated_at"
ONLY_HOUR = {False: "", True: "AND {bucket_hour} AT TIME ZONE 'UTC' = %(hour)s"}

# One row per (stamp, key), in a table analyzed before the next statement joins it: the
# estimate of the join on id and stamp (two correlated conditions) is a single row, and a plan
# built on that walks every task of every key's agent once per key.
CREATE_STAMPED_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_stamped_keys ON COMMIT DROP AS
SELECT DISTINCT j.new_updated_at AS stamp, {row_key} FROM {run_rows}"""
# The task count of each agent of some keys: a key's rollup cost grows with it.
AGENT_TASKS = """agent_tasks AS MATERIALIZED (
    SELECT t.agent_id, count(*) AS tasks FROM {{agent_task_queue}} t
    WHERE t.agent_id IN (SELECT DISTINCT agent_id FROM {keys}) GROUP BY t.agent_id
)"""
# The stamps in time order, with their keys and their agents' tasks as running totals, and a
# segment number that grows at every gap wider than MAX_WINDOW_GAP.
ANALYZE_STAMPED_KEYS_SQL = "ANALYZE pg_temp.codex_rollup_stamped_keys"
FILL_STAMPS_TABLE_SQL = f"""
WITH {AGENT_TASKS.format(keys="pg_temp.codex_rollup_stamped_keys")},
stamps AS (
    SELECT k.stamp, count(*) AS keys, sum(t.tasks) AS tasks,
           k.stamp - lag(k.stamp) OVER (ORDER BY k.stamp) AS gap
    FROM pg_temp.codex_rollup_stamped_keys k JOIN agent_tasks t USING (agent_id)
    GROUP BY k.stamp
)
INSERT INTO {STAMPS_TABLE} (seq, stamp, segment, keys_to, tasks_to)
SELECT row_number() OVER w, stamp,
       count(*) FILTER (WHERE gap > %(max_gap)s) OVER (w ROWS UNBOUNDED PRECEDING),
       sum(keys) OVER (w ROWS UNBOUNDED PRECEDING),
       sum(tasks) OVER (w ROWS UNBOUNDED PRECEDING)
FROM stamps
WINDOW w AS (ORDER BY stamp)"""
STAMPS_TOTAL_SQL = (
    f"SELECT count(*), coalesce(max(keys_to), 0), coalesce(max(tasks_to), 0) FROM {STAMPS_TABLE}"
)
NEXT_STAMP_SQL = f"SELECT stamp FROM {STAMPS_TABLE} WHERE seq = %s"
# The next slice: from the stamp after ``after`` to the last one whose keys cost no more than
# ``limit`` (their tasks plus ``base`` a key; at least one stamp) within the same segment.
NEXT_SLICE_SQL = f"""
WITH first AS (SELECT stamp, segment FROM {STAMPS_TABLE} WHERE seq = %(after)s + 1)
SELECT s.seq, s.keys_to, s.tasks_to, first.stamp, s.stamp
FROM {STAMPS_TABLE} s, first
WHERE s.seq = greatest(
    %(after)s + 1,
    coalesce(
        (SELECT n.seq - 1 FROM {STAMPS_TABLE} n
         WHERE n.seq > %(after)s
           AND (n.tasks_to - %(done_tasks)s + %(base)s * (n.keys_to - %(done_keys)s) > %(limit)s
                OR n.segment <> first.segment)
         ORDER BY n.seq LIMIT 1),
        %(total)s
    )
)"""

# Keys of rows the runs changed that someone rewrote since (ingestion's UPSERT stamps now()):
# no window of stamps finds them, so they are queued and drained like the revert's.
REWRITTEN_TABLE = "pg_temp.codex_rollup_rewritten"
CREATE_REWRITTEN_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_rewritten_keys ON COMMIT DROP AS
SELECT DISTINCT {row_key} FROM {run_rows}"""
ANALYZE_REWRITTEN_KEYS_SQL = "ANALYZE pg_temp.codex_rollup_rewritten_keys"
CREATE_REWRITTEN_TABLE_SQL = f"""
CREATE TEMP TABLE codex_rollup_rewritten ON COMMIT PRESERVE ROWS AS
WITH {AGENT_TASKS.format(keys="pg_temp.codex_rollup_rewritten_keys")}
SELECT row_number() OVER (ORDER BY k.agent_id) AS seq, k.*, t.tasks
FROM pg_temp.codex_rollup_rewritten_keys k JOIN agent_tasks t USING (agent_id)"""
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


def from_run_rows(template: str, match: str, hour: datetime | None = None) -> str:
    """``template`` over ``{run_rows}``: those ``match`` keeps, of ``hour`` when given."""
    only_hour = ONLY_HOUR[hour is not None]
    return compose(template, match=match, only_hour=only_hour, run_rows=RUN_ROWS)


@dataclass(frozen=True)
class _Span:
    """Stamps (after, upto] and the keys and tasks they cover, as one window."""

    after: int
    upto: int
    keys: int
    tasks: int
    window_from: datetime
    window_to: datetime


class QueueDrainer(Slicer):
    """The function path: keys another statement queued, one slice per ``drain``, or every
    key of some runs (``rebuild``), each call planned by one ``SlicePlanner``.

    ``label`` names the drains in the log ("revert drain", "rewritten keys drain").
    """

    def __init__(
        self,
        limits: SliceLimits,
        neighbours: NeighbourOptions | None = None,
        *,
        label: str = "revert drain",
        result: RollupResult | None = None,
    ) -> None:
        neighbours = neighbours or NeighbourOptions()
        super().__init__(limits, neighbours, result or RollupResult())
        self.label = label
        self.planner = SlicePlanner(limits.target, predict_scan_seconds(), neighbours.gap)

    # -- the revert's drains, and the rewritten keys' --------------------------------------

    def next_keys(self, mean_tasks: float) -> int:
        """How many keys (of agents with ``mean_tasks`` tasks) the next drain may rebuild."""
        plan = self._best_plan(mean_tasks)
        per_key = mean_tasks + KEY_BASE_COST[plan]
        return max(1, int(self.planner.limit(plan, FIRST_SLICE_KEYS * per_key, 0.0) / per_key))

    def batch_entries(self, entries: int, keys: int, tasks: int) -> float:
        """How many journal entries the revert's next batch may take (before its caps)."""
        return self.next_keys(tasks / keys) * entries / keys

    def _best_plan(self, mean_tasks: float) -> Plan:
        def speed(plan: Plan) -> float:
            per_key = mean_tasks + KEY_BASE_COST[plan]
            units = self.planner.limit(plan, FIRST_SLICE_KEYS * per_key, 0.0, grow=False)
            return units / per_key / (self.planner.seconds(plan, units) + self.planner.gap)

        return self.planner.best(speed)

    def drain(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: ShouldStop | None = None,
        on_wait: OnWait = None,
    ) -> RollupSlice:
        """Rebuild everything queued up to ``enqueued_until`` in one slice transaction.

        A drain the server cancels is tried once with each usable plan (the planner makes
        the next batches smaller); when none fits, the keys stay queued and ``RollupError``
        says what to do.
        """
        self.ticks.wait_if_due(should_stop or (lambda: False), on_wait)
        plans = [self._best_plan(tasks / keys if keys else 0.0)]
        plans += [p for p in sorted(self.planner.usable) if p not in plans]
        for plan in plans:
            try:
                piece = run_slice(plan, self.limits, enqueued_until, enqueued_until + MICROSECOND)
            except SliceCancelled as exc:
                self.planner.cancelled(plan, slice_units(plan, keys, tasks), keys)
                self.cancelled(exc, f"{self.label} of {keys} keys ({plan} plan)")
                continue
            piece = self._settled(piece, keys, tasks)
            log_slice(piece, f"{self.label}: {keys} keys", keys, keys)
            self.leave_a_gap()
            return piece
        raise RollupError(
            f"the hourly keys of one {self.label} ({keys} keys) could not be rebuilt within "
            f"the lock budget ({self.limits.cap:g}s); they stay queued in "
            "task_usage_hourly_dirty (the platform's cron tick drains them too): run the same "
            "command again with a smaller --batch-size or a larger --max-rollup-lock-seconds"
        )

    def _settled(
        self, piece: RollupSlice, keys: int, tasks: int, backlog: int = 0, mean: float = 0.0
    ) -> RollupSlice:
        """The slice as it ran, measured by the planner and added to the result."""
        piece = dataclasses.replace(piece, keys=keys, tasks=tasks, backlog=backlog)
        piece = _checked(piece, self.planner)
        units = slice_units(Plan(piece.plan), keys, tasks, backlog, mean)
        self.planner.measured(Plan(piece.plan), units, piece.lock_held_seconds)
        self.settled(piece)
        return piece

    # -- the repair's rebuild --------------------------------------------------------------

    def rebuild(
        self,
        run_ids: Sequence[int],
        should_stop: ShouldStop,
        on_slice: OnSlice,
        on_wait: OnWait,
        hour: datetime | None = None,
    ) -> bool:
        """Every hourly key of the rows the runs changed: slices of stamps, then the keys of
        rows rewritten since; stops between slices when ``should_stop()`` says so
        (``result.stopped``). With ``hour``, only that bucket hour's keys. Always True."""
        params = {"run_ids": list(run_ids), "hour": hour, "max_gap": MAX_WINDOW_GAP}
        # One pass over the runs' journal, as long as it takes (it holds no lock another
        # writer waits for): the session's statement_timeout would end it at scale.
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.limits.lock_timeout, 0)
            cursor.execute(CREATE_STAMPS_TABLE_SQL)
            cursor.execute(TRUNCATE_STAMPS_TABLE_SQL)
            cursor.execute(compose(ANALYZE_JOURNAL_SQL))
            cursor.execute(from_run_rows(CREATE_STAMPED_KEYS_SQL, STAMPED, hour), params)
            cursor.execute(ANALYZE_STAMPED_KEYS_SQL)
            cursor.execute(compose(FILL_STAMPS_TABLE_SQL), params)
            cursor.execute(STAMPS_TOTAL_SQL)
            stamps, keys, tasks = cursor.fetchone()
        self.result.keys_total += keys
        try:
            if stamps:
                self._stamp_slices(stamps, tasks / keys, should_stop, on_slice, on_wait)
            if not self.result.stopped:
                self._rewritten(params, should_stop, on_wait)
        finally:
            drop_temp_table(DROP_STAMPS_TABLE_SQL, "stamps table", logger)
            drop_temp_table(DROP_REWRITTEN_TABLE_SQL, "rewritten keys table", logger)
        return True

    def _stamp_slices(
        self,
        total: int,
        mean: float,
        should_stop: ShouldStop,
        on_slice: OnSlice,
        on_wait: OnWait,
    ) -> None:
        """Slices of stamps: plan, wait, run, learn."""
        keys_total = self.result.keys_total
        after = keys_done = tasks_done = 0
        while after < total:
            if not self.may_start(should_stop, on_wait):
                return
            backlog = self._backlog(after + 1)
            plan, span = self._choose((after, keys_done, tasks_done), total, mean, backlog)
            try:
                piece = run_slice(plan, self.limits, span.window_from, span.window_to)
            except SliceCancelled as exc:
                drained = f", {backlog} queued keys drained with it" if backlog else ""
                what = (
                    f"slice of {span.keys} keys on {span.upto - span.after} stamps "
                    f"({plan} plan{drained})"
                )
                units = slice_units(plan, span.keys, span.tasks, backlog, mean)
                smallest = span.upto == span.after + 1
                self.planner.cancelled(plan, units, span.keys, smallest=smallest)
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
            piece = self._settled(piece, span.keys, span.tasks, backlog, mean)
            after = span.upto
            keys_done += span.keys
            tasks_done += span.tasks
            if on_slice is not None:
                on_slice(piece, keys_done, keys_total)
            what = f"rollup slice: {span.keys} keys ({keys_done}/{keys_total})"
            log_slice(piece, what, keys_done, keys_total)
            if after < total:
                self.leave_a_gap()

    def _backlog(self, seq: int) -> int:
        """Keys others queued before the window from stamp ``seq`` ends: its call rebuilds
        them too. Normally none: the stamps are below the cron's watermark, and the cron tick
        drains what was queued before its own window's end."""
        with connection.cursor() as cursor:
            cursor.execute(NEXT_STAMP_SQL, [seq])
            before = cursor.fetchone()[0] + MAX_WINDOW_GAP
            cursor.execute(compose(BACKLOG_SQL), {"before": before, "cap": BACKLOG_COUNT_CAP})
            return int(cursor.fetchone()[0])

    def _choose(
        self, done: tuple[int, int, int], total: int, mean: float, backlog: int
    ) -> tuple[Plan, _Span]:
        """The plan and the stamps after ``done`` (stamps, keys, tasks) of the next slice:
        each plan judged at the size its measured rate allows, run at the size growth allows."""
        after, keys_done, tasks_done = done

        def limit(plan: Plan, grow: bool) -> float:
            probe_units = FIRST_SLICE_KEYS * (mean + KEY_BASE_COST[plan])
            backlog_units = slice_units(plan, 0, 0, backlog, mean)
            return self.planner.limit(plan, probe_units, backlog_units, grow=grow)

        def span(plan: Plan, limit: float) -> _Span:
            with connection.cursor() as cursor:
                params = {"after": after, "done_keys": keys_done, "done_tasks": tasks_done}
                params.update(base=KEY_BASE_COST[plan], limit=int(limit), total=total)
                cursor.execute(NEXT_SLICE_SQL, params)
                upto, keys_to, tasks_to, first, last = cursor.fetchone()
            keys, tasks = int(keys_to) - keys_done, int(tasks_to) - tasks_done
            return _Span(after, int(upto), keys, tasks, first, last + MICROSECOND)

        def speed(plan: Plan) -> float:
            judged = span(plan, limit(plan, False))
            units = slice_units(plan, judged.keys, judged.tasks, backlog, mean)
            return judged.keys / (self.planner.seconds(plan, units) + self.planner.gap)

        plan = self.planner.best(speed)
        return plan, span(plan, limit(plan, True))

    def _rewritten(
        self,
        params: dict[str, Any],
        should_stop: ShouldStop,
        on_wait: OnWait,
    ) -> None:
        """The keys of rows rewritten since the run: queued and drained, in chunks the
        planner sizes (usually few, but the run's keys are right when it ends)."""
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.limits.lock_timeout, 0)
            cursor.execute(DROP_REWRITTEN_TABLE_SQL)
            rewritten = from_run_rows(CREATE_REWRITTEN_KEYS_SQL, REWRITTEN, params["hour"])
            cursor.execute(rewritten, params)
            cursor.execute(ANALYZE_REWRITTEN_KEYS_SQL)
            cursor.execute(compose(CREATE_REWRITTEN_TABLE_SQL))
            cursor.execute(REWRITTEN_TOTAL_SQL)
            total, tasks = cursor.fetchone()
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
