"""Rebuilding the hourly rollup for rows the repair changed, in short lock slices.

Two ways to cut the work, both through ``rollup_task_usage_hourly_window`` and its documented
contract, each slice its own transaction holding lock 4246 (transaction-level, so it can never
leak) only around the call, so the cron tick and workspace deletion run between slices:

* ``rebuild_keys`` (the repair's way): the distinct hourly keys of the journaled rows are
  listed once, in key order, and each slice queues a range of them in
  ``task_usage_hourly_dirty`` and calls the function over a one-microsecond window, which
  drains the queue. Every key is rebuilt exactly once and a slice can be as small as one key,
  so no slice holds the lock longer than the budget, whatever the batch size was. Slices are
  sized in estimated cost (the key's agent's task count), not in keys.
* ``rebuild_window`` (the revert's way): one call over a short window in one transaction.
  The revert restores rows to their old ``updated_at`` and queues their keys itself, then
  drains them with a call over the microsecond after the enqueue; it sizes its batches so
  that call holds the lock about half the budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import DatabaseError, connection, transaction

from usage.db import (
    SQLSTATE_LOCK_NOT_AVAILABLE,
    SQLSTATE_QUERY_CANCELED,
    set_local_timeouts,
    sqlstate,
)
from usage.eligibility import compose
from usage.events import log_event

logger = logging.getLogger("usage.rollup")

ROLLUP_LOCK_ID = 4246
# Every window is widened by this much on each side of the rows it must cover.
WINDOW_PAD = timedelta(seconds=1)
DEFAULT_MAX_ROLLUP_LOCK_SECONDS = 2.0
# Slack the server allows a slice of more than one key before cancelling it.
LOCK_CAP_SLACK_SECONDS = 0.5
# Of that cap, this much is kept for what follows the rollup call under the lock: the
# commit (a WAL flush) and the round trips. The call gets the rest.
COMMIT_ALLOWANCE_SECONDS = 0.3
# A call is never given less than this; if even that is cancelled the slice is split.
MIN_CALL_SECONDS = 0.05
# A slice aims at this fraction of the lock budget, leaving room for variance.
TARGET_LOCK_FRACTION = 0.5
MAX_SLICE_GROWTH = 4.0
LOCK_WAIT_ATTEMPTS = 5

ROLLUP_CALL_SQL = "SELECT {rollup_task_usage_hourly_window}(%s, %s)"
TAKE_ROLLUP_LOCK_SQL = "SELECT pg_advisory_xact_lock(%s)"
SET_CALL_TIMEOUT_SQL = "SELECT set_config('statement_timeout', %s, true)"


class RollupError(Exception):
    """The rollup could not be rebuilt; the run's rollup stays pending for the next run."""


@dataclass(frozen=True)
class RollupSlice:
    window_from: datetime
    window_to: datetime
    rollup_rows: int
    lock_wait_seconds: float
    lock_held_seconds: float
    keys: int = 0


@dataclass
class RollupResult:
    window_from: datetime | None = None
    window_to: datetime | None = None
    slices: list[RollupSlice] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rollup_rows(self) -> int:
        return sum(s.rollup_rows for s in self.slices)

    @property
    def max_lock_held_seconds(self) -> float:
        return max((s.lock_held_seconds for s in self.slices), default=0.0)

    def extend(self, other: RollupResult) -> None:
        self.slices.extend(other.slices)
        self.seconds += other.seconds
        if other.window_from is not None:
            self.window_from = min(filter(None, [self.window_from, other.window_from]))
            self.window_to = max(filter(None, [self.window_to, other.window_to]))


def rebuild_window(
    lower: datetime,
    upper: datetime,
    *,
    lock_timeout: float = 5.0,
    statement_timeout: float = 600.0,
    keys: int = 0,
) -> RollupResult:
    """Rebuild, in one lock-4246 transaction, every key the call over ``[lower, upper)`` finds.

    ``keys`` is what the caller queued, for the record.
    """
    started = time.monotonic()

    def call(cursor: Any, limit_next_statement: Callable[[], None]) -> int:
        cursor.execute(compose(ROLLUP_CALL_SQL), [lower, upper])
        return cursor.fetchone()[0] or 0

    rollup_rows, waited, held = _under_rollup_lock(call, lock_timeout, statement_timeout)
    piece = RollupSlice(lower, upper, rollup_rows, waited, held, keys)
    _log_slice(
        piece,
        f"rollup window {lower.isoformat()}..{upper.isoformat()}",
        window_from=lower,
        window_to=upper,
        keys=keys,
    )
    return RollupResult(
        window_from=lower, window_to=upper, slices=[piece], seconds=time.monotonic() - started
    )


def _log_slice(piece: RollupSlice, what: str, **fields: Any) -> None:
    """One ``rollup_slice`` event: what was rebuilt, and how long lock 4246 was held."""
    log_event(
        logger,
        logging.DEBUG,
        "rollup_slice",
        f"{what}: {piece.rollup_rows} hourly rows, lock {ROLLUP_LOCK_ID} held "
        f"{piece.lock_held_seconds:.3f}s",
        **fields,
        rollup_rows=piece.rollup_rows,
        lock_wait_seconds=round(piece.lock_wait_seconds, 6),
        lock_held_seconds=round(piece.lock_held_seconds, 6),
    )


def _under_rollup_lock(
    work: Callable[[Any, Callable[[], None]], int],
    lock_timeout: float,
    statement_timeout: float,
    hold_limit: float | None = None,
) -> tuple[int, float, float]:
    """Run ``work`` in its own transaction holding lock 4246; retry a busy lock a few times.

    ``work`` gets the cursor and a function to call just before its long statement: with a
    ``hold_limit``, that function shortens the statement's timeout to what is left of the
    limit since the lock was taken, minus room for the commit (it is applied once as soon as
    the lock is taken, too). ``statement_timeout`` caps each statement alone, so without this
    a slice could hold the lock for the enqueue's time plus the call's plus the commit's.

    Returns what ``work`` returned, the seconds spent waiting for the lock and the seconds
    it was held (until the commit).
    """
    for attempt in range(1, LOCK_WAIT_ATTEMPTS + 1):
        try:
            waited_from = time.monotonic()
            with transaction.atomic(), connection.cursor() as cursor:
                set_local_timeouts(cursor, lock_timeout, statement_timeout)
                cursor.execute(TAKE_ROLLUP_LOCK_SQL, [ROLLUP_LOCK_ID])
                locked_at = time.monotonic()

                limit_next_statement = partial(
                    _shorten_statement_timeout, cursor, hold_limit, locked_at
                )
                limit_next_statement()  # whatever ``work`` runs first is bounded too
                value = work(cursor, limit_next_statement)
            released_at = time.monotonic()
            return value, locked_at - waited_from, released_at - locked_at
        except DatabaseError as exc:
            if sqlstate(exc) != SQLSTATE_LOCK_NOT_AVAILABLE:
                raise
            logger.warning(
                "lock %d busy for %.1fs (attempt %d of %d)",
                ROLLUP_LOCK_ID,
                lock_timeout,
                attempt,
                LOCK_WAIT_ATTEMPTS,
            )
    raise RollupError(
        f"could not take rollup lock {ROLLUP_LOCK_ID} in {LOCK_WAIT_ATTEMPTS} tries of "
        f"{lock_timeout:g}s: another writer holds it; re-run the same command later to "
        "finish the rollup"
    )


def _shorten_statement_timeout(cursor: Any, hold_limit: float | None, locked_at: float) -> None:
    """Let the next statement run only for what is left of ``hold_limit`` (see above)."""
    if hold_limit is None:
        return
    left = hold_limit - COMMIT_ALLOWANCE_SECONDS - (time.monotonic() - locked_at)
    cursor.execute(SET_CALL_TIMEOUT_SQL, [f"{max(left, MIN_CALL_SECONDS) * 1000:.0f}ms"])


# -- key slices ------------------------------------------------------------------------------

KEYS_TABLE = "pg_temp.codex_rollup_keys"
KEY_COLUMNS = "bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model"
# The first slice is small; later ones are sized from the measured cost of the ones before.
FIRST_SLICE_KEYS = 50
# The estimated cost of a key, in "tasks": the rollup's cost per key grows with the task count
# of the key's agent (documented for the target), plus a fixed part for the key itself.
KEY_BASE_COST = 20
# How fast a lower cost rate (a slower slice) is believed, and how fast a higher one: a
# slowdown takes effect at once, a speed-up only gradually.
RATE_SLOWER_WEIGHT = 1.0
RATE_FASTER_WEIGHT = 0.3

CREATE_KEYS_TABLE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS codex_rollup_keys (
    seq bigint PRIMARY KEY,
    bucket_hour timestamptz NOT NULL,
    workspace_id uuid NOT NULL,
    runtime_id uuid NOT NULL,
    agent_id uuid NOT NULL,
    project_id uuid,
    provider text NOT NULL,
    model text NOT NULL,
    cost_to bigint NOT NULL
) ON COMMIT PRESERVE ROWS"""
TRUNCATE_KEYS_TABLE_SQL = f"TRUNCATE {KEYS_TABLE}"
DROP_KEYS_TABLE_SQL = f"DROP TABLE IF EXISTS {KEYS_TABLE}"

# The run just added its rows to the journal: fresh statistics keep the plan below from
# taking them for a handful (nested loops over every entry).
ANALYZE_JOURNAL_SQL = "ANALYZE {journal}"

# The hourly keys of the rows some runs changed (rows of tasks without a runtime have none),
# numbered, each with the running total of their estimated cost (``cost_to``).
FILL_KEYS_TABLE_SQL = f"""
WITH keys AS MATERIALIZED (
    SELECT DISTINCT {{bucket_hour}} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id,
           q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model
    FROM {{journal}} j
    JOIN {{task_usage}} tu ON tu.id = j.usage_id
    JOIN {{agent_task_queue}} q ON q.id = tu.task_id
    JOIN {{agent}} a ON a.id = q.agent_id
    LEFT JOIN {{issue}} i ON i.id = q.issue_id
    WHERE j.run_id = ANY(%(run_ids)s) AND j.reverted_at IS NULL AND q.runtime_id IS NOT NULL
),
agent_tasks AS (
    SELECT t.agent_id, count(*) AS tasks
    FROM {{agent_task_queue}} t
    WHERE t.agent_id IN (SELECT agent_id FROM keys)
    GROUP BY t.agent_id
)
INSERT INTO {KEYS_TABLE} (seq, {KEY_COLUMNS}, cost_to)
SELECT row_number() OVER w, {KEY_COLUMNS},
       sum(t.tasks + %(base_cost)s) OVER (w ROWS UNBOUNDED PRECEDING)
FROM keys JOIN agent_tasks t USING (agent_id)
WINDOW w AS (ORDER BY {KEY_COLUMNS})"""

# The running cost up to a key: what the first slice's keys are estimated to cost.
KEY_COST_TO_SQL = f"SELECT cost_to FROM {KEYS_TABLE} WHERE seq = %s"

# The end of the next slice: the last key whose running cost stays within ``limit`` (at least
# one key), with its running cost. The keyset stops at the first key over the limit.
NEXT_SLICE_SQL = f"""
SELECT seq, cost_to FROM {KEYS_TABLE}
WHERE seq = greatest(
    %(after)s + 1,
    coalesce(
        (SELECT seq - 1 FROM {KEYS_TABLE}
         WHERE seq > %(after)s AND cost_to > %(limit)s ORDER BY seq LIMIT 1),
        %(total)s
    )
)"""

ENQUEUE_KEYS_SQL = f"""
INSERT INTO {{task_usage_hourly_dirty}} ({KEY_COLUMNS}, enqueued_at)
SELECT {KEY_COLUMNS}, %(stamp)s FROM {KEYS_TABLE}
WHERE seq > %(after)s AND seq <= %(upto)s"""

# The window is one microsecond after the queued keys' stamp: the call rebuilds them (and
# drains whatever else was queued before), plus any row written in that microsecond.
ROLLUP_QUEUED_SQL = (
    "SELECT {rollup_task_usage_hourly_window}(%(stamp)s, %(stamp)s + interval '1 microsecond')"
)


@dataclass
class _SlicePlanner:
    """Sizes key slices so each holds the lock about ``target`` seconds.

    Slices are measured in estimated cost (``cost_to``), not in keys: a key of an agent with
    thousands of tasks costs a hundred times one of an agent with a few, and slices cut by
    key count overshoot when heavy keys cluster. The cost rate (estimated cost per second of
    lock held) is learned from each slice, believing a slowdown at once and a speed-up
    gradually, and a slice never grows more than ``MAX_SLICE_GROWTH``-fold.
    """

    target: float
    rate: float | None = None
    last_cost: int = 0

    def limit(self, done_cost: int, first_slice_cost: int) -> int:
        if self.rate is None:
            return done_cost + max(1, first_slice_cost)
        wanted = self.rate * self.target
        if self.last_cost:
            wanted = min(wanted, self.last_cost * MAX_SLICE_GROWTH)
        return done_cost + max(1, int(wanted))

    def measured(self, cost: int, held: float) -> None:
        rate = cost / max(held, 0.001)
        if self.rate is None:
            self.rate = rate
        else:
            weight = RATE_SLOWER_WEIGHT if rate < self.rate else RATE_FASTER_WEIGHT
            self.rate += weight * (rate - self.rate)
        self.last_cost = cost

    def cancelled(self, cost: int) -> int:
        """A slice of ``cost`` hit the cap: believe half its cost fits, and return that."""
        self.last_cost = max(1, cost // 2)
        if self.rate is not None:
            self.rate = min(self.rate, self.last_cost / self.target)
        return self.last_cost


def rebuild_keys(
    run_ids: Sequence[int],
    *,
    max_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    lock_timeout: float = 5.0,
    statement_timeout: float = 600.0,
    on_slice: Callable[[RollupSlice, int, int], None] | None = None,
) -> RollupResult:
    """Rebuild every hourly key of the rows the given runs changed, each key once."""
    started = time.monotonic()
    result = RollupResult()
    with connection.cursor() as cursor:
        cursor.execute(CREATE_KEYS_TABLE_SQL)
        cursor.execute(TRUNCATE_KEYS_TABLE_SQL)
        cursor.execute(compose(ANALYZE_JOURNAL_SQL))
        cursor.execute(
            compose(FILL_KEYS_TABLE_SQL), {"run_ids": list(run_ids), "base_cost": KEY_BASE_COST}
        )
        total = cursor.rowcount
        first_cost = 0
        if total:
            cursor.execute(KEY_COST_TO_SQL, [min(FIRST_SLICE_KEYS, total)])
            first_cost = cursor.fetchone()[0]
    try:
        cap = max_lock_seconds + LOCK_CAP_SLACK_SECONDS
        planner = _SlicePlanner(target=max_lock_seconds * TARGET_LOCK_FRACTION)
        done = done_cost = 0
        limit = planner.limit(done_cost, first_cost)
        while done < total:
            with connection.cursor() as cursor:
                cursor.execute(NEXT_SLICE_SQL, {"after": done, "limit": limit, "total": total})
                upto, upto_cost = cursor.fetchone()
            size, cost = upto - done, upto_cost - done_cost
            try:
                piece = _queued_slice(
                    done, upto, lock_timeout, statement_timeout, cap if size > 1 else None
                )
            except DatabaseError as exc:
                if size > 1 and sqlstate(exc) == SQLSTATE_QUERY_CANCELED:
                    limit = done_cost + planner.cancelled(cost)
                    logger.info(
                        "rollup slice of %d keys over its lock budget; retrying smaller", size
                    )
                    continue
                raise
            done, done_cost = upto, upto_cost
            result.slices.append(piece)
            result.window_from = result.window_from or piece.window_from
            result.window_to = piece.window_to
            if on_slice is not None:
                on_slice(piece, done, total)
            _log_slice(
                piece,
                f"rollup slice: {size} keys ({done}/{total})",
                keys=size,
                keys_done=done,
                keys_total=total,
            )
            if piece.lock_held_seconds > cap:
                logger.warning(
                    "one hourly key's rollup held lock %d for %.1fs (budget %.1fs)",
                    ROLLUP_LOCK_ID,
                    piece.lock_held_seconds,
                    max_lock_seconds,
                )
            planner.measured(cost, piece.lock_held_seconds)
            limit = planner.limit(done_cost, first_cost)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(DROP_KEYS_TABLE_SQL)
    result.seconds = time.monotonic() - started
    return result


def _queued_slice(
    after: int,
    upto: int,
    lock_timeout: float,
    statement_timeout: float,
    hold_limit: float | None,
) -> RollupSlice:
    """One transaction: take 4246, queue keys ``(after, upto]``, drain them through the call."""
    stamps: list[datetime] = []

    def queue_and_call(cursor: Any, limit_next_statement: Callable[[], None]) -> int:
        cursor.execute("SELECT clock_timestamp()")
        stamps.append(cursor.fetchone()[0])
        params = {"stamp": stamps[0], "after": after, "upto": upto}
        cursor.execute(compose(ENQUEUE_KEYS_SQL), params)
        limit_next_statement()
        cursor.execute(compose(ROLLUP_QUEUED_SQL), params)
        return cursor.fetchone()[0] or 0

    rollup_rows, waited, held = _under_rollup_lock(
        queue_and_call, lock_timeout, statement_timeout, hold_limit
    )
    return RollupSlice(
        window_from=stamps[0],
        window_to=stamps[0] + timedelta(microseconds=1),
        rollup_rows=rollup_rows,
        lock_wait_seconds=waited,
        lock_held_seconds=held,
        keys=upto - after,
    )
