"""One rollup slice: a short transaction holding lock 4246, its budget, the room left to the
lock's other users, and the rate learner that sizes the next one (docs/design.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from django.db import DatabaseError, connection, transaction

from usage import cron, render
from usage.cron import ROLLUP_LOCK_ID
from usage.db import (
    SQLSTATE_LOCK_NOT_AVAILABLE,
    SQLSTATE_QUERY_CANCELED,
    SQLSTATE_SERIALIZATION_FAILURE,
    set_local_timeouts,
    sqlstate,
)
from usage.eligibility import names
from usage.events import log_event

logger = logging.getLogger("usage.rollup")

T = TypeVar("T")

# The lock budget and the server's slack past it (the cap); of the cap, what the commit and
# the round trips after the last statement keep; the least a statement is given.
DEFAULT_MAX_ROLLUP_LOCK_SECONDS = 5.0
LOCK_CAP_SLACK_SECONDS = 0.5
COMMIT_ALLOWANCE_SECONDS = 0.3
MIN_CALL_SECONDS = 0.05
# A slice aims at this fraction of the budget, and grows at most this fold.
TARGET_LOCK_FRACTION = 0.7
MAX_SLICE_GROWTH = 4.0
LOCK_WAIT_ATTEMPTS = 5
# The lock stays free this long after every slice, for try-lock callers (docs/design.md):
# 0.2 s at the default budget, less with a smaller one (this share of it), never under 0.1 s.
SLICE_GAP_SECONDS = 0.2
SLICE_GAP_SHARE = 0.04
MIN_SLICE_GAP_SECONDS = 0.1
# This many slices cancelled in a row stop the rebuild: the run's rollup stays pending.
MAX_CANCELLED_IN_A_ROW = 5

TAKE_ROLLUP_LOCK_SQL = "SELECT pg_advisory_xact_lock(%s)"
# Who holds what a slice waited for: lock 4246, or a lock on the rollup's tables (a writer's
# row locks show as its lock on the table), oldest transaction first.
HOLDERS_SQL = """
SELECT DISTINCT a.pid, a.application_name, a.xact_start, a.state
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid() AND (%(rows)s
    AND l.locktype = 'relation' AND l.mode <> 'AccessShareLock'
    AND l.relation IN (%(task_usage_hourly)s::regclass, %(task_usage_hourly_dirty)s::regclass)
    OR NOT %(rows)s AND l.locktype = 'advisory' AND l.classid = 0 AND l.objid = %(lock)s
    AND l.objsubid = 1)
ORDER BY a.xact_start NULLS LAST LIMIT 3"""
HOLDERS_TABLES = ("task_usage_hourly", "task_usage_hourly_dirty")
SET_STATEMENT_TIMEOUT_SQL = "SELECT set_config('statement_timeout', %s, true)"
REPEATABLE_READ_SQL = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"


class RollupError(Exception):
    """The rollup could not be rebuilt; the run's rollup stays pending for the next run.
    ``result`` is what the rebuild did before it stopped, when ``rebuild_keys`` knows it."""

    result: RollupResult | None = None


class SliceCancelled(Exception):
    """The server ended a slice at the lock budget; it held lock 4246 ``held`` seconds."""

    def __init__(self, held: float) -> None:
        super().__init__(f"rollup slice cancelled after holding lock {ROLLUP_LOCK_ID} {held:.3f}s")
        self.held = held


@dataclass(frozen=True)
class SliceLimits:
    """The server-side limits of slice transactions."""

    max_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS
    lock_timeout: float = 5.0
    statement_timeout: float = 600.0

    @property
    def cap(self) -> float:
        return self.max_lock_seconds + LOCK_CAP_SLACK_SECONDS

    @property
    def target(self) -> float:
        """How long a slice aims to hold the lock."""
        return self.max_lock_seconds * TARGET_LOCK_FRACTION


@dataclass(frozen=True)
class NeighbourOptions:
    """How the rebuild makes room for the platform's other users of lock 4246."""

    tick_interval: float = cron.DEFAULT_TICK_INTERVAL_SECONDS
    gap: float = SLICE_GAP_SECONDS


@dataclass(frozen=True)
class RollupSlice:
    """One slice transaction: what it rebuilt, how (``own`` or the function's plan), over
    which window, how long it held 4246; ``rows``: the usage rows it read."""

    window_from: datetime | None
    window_to: datetime | None
    rollup_rows: int
    lock_wait_seconds: float
    lock_held_seconds: float
    keys: int = 0
    plan: str = "nestloop"
    tasks: int = 0
    backlog: int = 0
    seq_scans: int = 0
    index_scans: int = 0
    rows: int = 0


@dataclass
class RollupResult:
    """What a rebuild did: its slices, its waits, and the path it ended on."""

    slices: list[RollupSlice] = field(default_factory=list)
    seconds: float = 0.0
    keys_total: int = 0
    stopped: bool = False
    cron_waits: int = 0
    cron_wait_seconds: float = 0.0
    cancelled_holds: list[float] = field(default_factory=list)  # of slices cancelled at the cap
    path: str = ""  # "own" or "function"; the reason when a failed proof changed it
    path_reason: str = ""
    # The distinct keys rebuilt, where the slices' keys may not count them (the revert's: a
    # key the cron tick drained first, a failed proof's keys drained by its call).
    distinct_keys: int | None = None

    @property
    def rollup_rows(self) -> int:
        return sum(s.rollup_rows for s in self.slices)

    @property
    def keys_done(self) -> int:
        if self.distinct_keys is not None:
            return self.distinct_keys
        return sum(s.keys for s in self.slices)

    @property
    def max_lock_held_seconds(self) -> float:
        """The longest hold of lock 4246, cancelled slices included."""
        holds = [s.lock_held_seconds for s in self.slices] + self.cancelled_holds
        return max(holds, default=0.0)

    @property
    def hash_slices(self) -> int:
        return sum(1 for s in self.slices if s.plan == "hash")


@dataclass(frozen=True)
class Span:
    """A slice's stamps or touched hours (after, upto] by number, their keys, their cost
    (tasks, or estimated usage rows) and the window ``[start, end)`` they cover."""

    after: int
    upto: int
    keys: int
    cost: int
    start: datetime
    end: datetime

    @property
    def count(self) -> int:
        return self.upto - self.after


# The next slice in a table of running totals (``seq``, from 1): from ``after + 1`` to the
# last row before one where ``{over}`` holds (at least one); ``{columns}`` of ``s``, the last,
# and ``f``, the first.
NEXT_SPAN_SQL = """
SELECT s.seq, {columns}
FROM {table} s, {table} f
WHERE f.seq = %(after)s + 1
  AND s.seq = greatest(
      %(after)s + 1,
      coalesce((SELECT n.seq - 1 FROM {table} n WHERE n.seq > %(after)s AND ({over})
                ORDER BY n.seq LIMIT 1), %(total)s))"""

# Sets the next statement's timeout to what is left of the cap since the lock was taken.
Bound = Callable[[], None]
# What a rebuild is told: whether to stop, each slice it made, each wait for the cron tick.
ShouldStop = Callable[[], bool]
OnSlice = Callable[[RollupSlice, int, int], None] | None
OnWait = Callable[[str, float], None] | None


@dataclass(frozen=True)
class Locked(Generic[T]):
    """What a slice's work returned, how long it waited for lock 4246 and held it."""

    value: T
    waited: float
    held: float

    def piece(
        self, window_from: datetime | None, window_to: datetime | None, written: int, **more: Any
    ) -> RollupSlice:
        """The slice as the result records it: ``written`` hourly rows, and ``more``."""
        return RollupSlice(window_from, window_to, int(written), self.waited, self.held, **more)


def _bound(cursor: Any, cap: float, locked_at: float) -> Bound:
    def bound() -> None:
        left = cap - COMMIT_ALLOWANCE_SECONDS - (time.monotonic() - locked_at)
        cursor.execute(SET_STATEMENT_TIMEOUT_SQL, [f"{max(left, MIN_CALL_SECONDS) * 1000:.0f}ms"])

    return bound


def run_locked(
    limits: SliceLimits, work: Callable[[Any, Bound], T], *, repeatable_read: bool = False
) -> Locked[T]:
    """Run ``work(cursor, bound)`` in one transaction holding lock 4246; ``work`` calls
    ``bound()`` before each long statement. ``repeatable_read``: one snapshot (unless in a
    caller's transaction); a serialization failure is retried like a busy lock."""
    rows_locked = False
    for attempt in range(1, LOCK_WAIT_ATTEMPTS + 1):
        waited_from = time.monotonic()
        locked_at: float | None = None
        own_transaction = not connection.in_atomic_block
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                if repeatable_read and own_transaction:
                    cursor.execute(REPEATABLE_READ_SQL)
                set_local_timeouts(cursor, limits.lock_timeout, limits.statement_timeout)
                cursor.execute(TAKE_ROLLUP_LOCK_SQL, [ROLLUP_LOCK_ID])
                locked_at = time.monotonic()
                value = work(cursor, _bound(cursor, limits.cap, locked_at))
            released_at = time.monotonic()
        except DatabaseError as exc:
            state = sqlstate(exc)
            if state == SQLSTATE_QUERY_CANCELED and locked_at is not None:
                raise SliceCancelled(time.monotonic() - locked_at) from exc
            if state == SQLSTATE_SERIALIZATION_FAILURE:
                logger.info("rollup slice met a concurrent writer (attempt %d); again", attempt)
                continue
            if state != SQLSTATE_LOCK_NOT_AVAILABLE:
                raise
            # With 4246 taken, what timed out was a lock on the rollup's tables.
            rows_locked = locked_at is not None
            logger.warning(
                "%s busy for %.1fs (attempt %d of %d)",
                "rows of the hourly rollup" if rows_locked else f"lock {ROLLUP_LOCK_ID}",
                limits.lock_timeout,
                attempt,
                LOCK_WAIT_ATTEMPTS,
            )
            continue
        return Locked(value, locked_at - waited_from, released_at - locked_at)
    tries = f"in {LOCK_WAIT_ATTEMPTS} tries of {limits.lock_timeout:g}s"
    if rows_locked:
        raise RollupError(
            f"rows of the hourly rollup stayed locked by another session {tries} (while this "
            f"run held lock {ROLLUP_LOCK_ID}): {holders(rows=True)}; have that session commit "
            "or end it, then re-run the same command to finish the rollup"
        )
    raise RollupError(
        f"could not take rollup lock {ROLLUP_LOCK_ID} {tries}: {holders(rows=False)}; re-run "
        "the same command later to finish the rollup (a session other than the platform's "
        "cron tick that keeps holding it is for you to end)"
    )


def holders(*, rows: bool) -> str:
    """Who holds the rollup's tables (``rows``) or lock 4246 now: pid, application, since."""
    tables = {name: names()[name].as_string() for name in HOLDERS_TABLES}
    with connection.cursor() as cursor:
        cursor.execute(HOLDERS_SQL, {"rows": rows, "lock": ROLLUP_LOCK_ID, **tables})
        found = cursor.fetchall()
    if not found:
        return "held by a session that has let go since"
    return "held by " + "; ".join(
        f"pid {pid} (application {application or 'not named'!r}, transaction open since "
        f"{render.timestamp(since)}, {state})"
        for pid, application, since, state in found
    )


def unbounded(limits: SliceLimits, *statements: str | tuple[str, dict[str, Any]]) -> Any:
    """Statements (with their parameters) in one transaction with no statement timeout: a
    pass over the runs' journal holds no lock another writer waits for. The last one's row
    (None when it returns none)."""
    with transaction.atomic(), connection.cursor() as cursor:
        set_local_timeouts(cursor, limits.lock_timeout, 0)
        for statement in statements:
            text, params = statement if isinstance(statement, tuple) else (statement, None)
            cursor.execute(text, params)
        return cursor.fetchone() if cursor.description else None


class Slicer:
    """What every rebuild loop shares: the neighbours' room, the stop, the cancellations."""

    def __init__(
        self, limits: SliceLimits, neighbours: NeighbourOptions, result: RollupResult
    ) -> None:
        self.limits = limits
        self.neighbours = neighbours
        self.result = result
        self.ticks = cron.TickWatcher(interval=neighbours.tick_interval, lead=limits.cap)
        self.cancelled_in_a_row = 0

    def may_start(self, should_stop: ShouldStop, on_wait: OnWait) -> bool:
        """Wait while the cron tick is due; False when a stop was asked for (noted)."""
        if not should_stop():
            self.ticks.wait_if_due(should_stop, on_wait)
        if should_stop():
            self.result.stopped = True
            return False
        return True

    @property
    def gap(self) -> float:
        """How long lock 4246 stays free after a slice."""
        share = max(MIN_SLICE_GAP_SECONDS, SLICE_GAP_SHARE * self.limits.max_lock_seconds)
        return min(self.neighbours.gap, share)

    def leave_a_gap(self) -> None:
        if self.gap > 0:
            time.sleep(self.gap)

    def cancelled(self, exc: SliceCancelled, what: str, *, counts: bool = True) -> None:
        """The server ended the slice ``what`` at the cap; too many in a row stop all (those
        that ``counts``: a slice the caller can still make smaller does not)."""
        self.result.cancelled_holds.append(exc.held)
        self.cancelled_in_a_row += counts
        logger.info("rollup %s over its lock budget (%.3fs held)", what, exc.held)
        if self.cancelled_in_a_row >= MAX_CANCELLED_IN_A_ROW:
            raise RollupError(
                f"{what} could not be rebuilt within the lock budget ({self.limits.cap:g}s) "
                f"in {self.cancelled_in_a_row} tries in a row; the run's rollup stays "
                "pending: re-run the same command with a larger --max-rollup-lock-seconds "
                "(or when the database is less busy) to rebuild the rest"
            ) from exc
        self.leave_a_gap()  # the cancelled slice held the lock up to the cap

    def report(self, piece: RollupSlice, what: str, done: int, on_slice: OnSlice) -> None:
        """A slice made, ``done`` keys of the result's so far: to the caller and the log."""
        if on_slice is not None:
            on_slice(piece, done, self.result.keys_total)
        log_slice(piece, what, done, self.result.keys_total)

    def settled(self, piece: RollupSlice) -> None:
        """A slice that ran: it counts, and the run of cancellations is over."""
        self.cancelled_in_a_row = 0
        self.result.slices.append(piece)

    def finish(self) -> None:
        self.result.cron_waits += self.ticks.waits
        self.result.cron_wait_seconds += self.ticks.waited_seconds


# How fast a slower rate is believed, and a faster one.
RATE_SLOWER_WEIGHT = 1.0
RATE_FASTER_WEIGHT = 0.3


@dataclass
class Rate:
    """One kind of slice's measured speed (units a second of hold), and the next's size.
    With ``scans`` a slice also pays a fixed part: the shortest slice seen, or ``fixed``."""

    target: float
    rate: float
    fixed: float = 0.0
    scans: bool = False
    measured: bool = False
    largest: float = 0.0
    ceiling: float | None = None

    def seconds(self, units: float) -> float:
        return self.fixed + units / self.rate

    def limit(self, first: float, less: float = 0.0, *, grow: bool = True) -> float:
        """The units the next slice may take (``first`` until one was measured), less
        ``less``; without ``grow`` (comparing kinds), what the rate allows."""
        wanted = (self.target - self.fixed) * self.rate if self.measured else first
        wanted -= less
        if grow and self.largest:
            wanted = min(wanted, self.largest * MAX_SLICE_GROWTH)
        if self.ceiling is not None:
            wanted = min(wanted, self.ceiling)
        return max(1.0, wanted)

    def add(self, units: float, held: float) -> None:
        """A slice of ``units`` held the lock ``held`` seconds (without ``scans`` the rate
        alone sizes the next: one cancelled slice does not cap the rest of the run)."""
        if not self.scans:
            self.ceiling = None
        first = not self.measured
        self.measured = True
        self.largest = max(self.largest, units)
        if self.scans:
            self.fixed = held if first else min(self.fixed, held)
            if held - self.fixed <= 0.1 * held:
                return  # nearly all fixed: says nothing of the rate
            held -= self.fixed
        rate = units / max(held, 1e-3)
        if first:
            self.rate = rate
        else:
            weight = RATE_SLOWER_WEIGHT if rate < self.rate else RATE_FASTER_WEIGHT
            self.rate += weight * (rate - self.rate)

    def cancelled(self, units: float) -> None:
        """A slice of ``units`` hit the cap: believe half of it fits."""
        self.ceiling = max(1.0, units / 2)
        if not self.scans:
            self.rate = min(self.rate, units / 2 / self.target)
            self.measured = True


def log_slice(piece: RollupSlice, what: str, done: int, total: int) -> None:
    """One ``rollup_slice`` event: what was rebuilt, how, and how long lock 4246 was held."""
    log_event(
        logger,
        logging.DEBUG,
        "rollup_slice",
        f"{what}, {piece.plan} plan: {piece.rollup_rows} hourly rows, lock {ROLLUP_LOCK_ID} "
        f"held {piece.lock_held_seconds:.3f}s",
        keys=piece.keys,
        keys_done=done,
        keys_total=total,
        plan=str(piece.plan),
        tasks=piece.tasks,
        backlog=piece.backlog,
        rows=piece.rows,
        rollup_rows=piece.rollup_rows,
        lock_wait_seconds=round(piece.lock_wait_seconds, 6),
        lock_held_seconds=round(piece.lock_held_seconds, 6),
    )
