"""One rollup slice: a short transaction holding lock 4246, its budget, the room left to the
lock's other users, and the rate learner that sizes the next one (docs/design.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
from usage.events import Progress, log_event, no_progress

logger = logging.getLogger("usage.rollup")

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
# The lock stays free this long after every slice (docs/design.md).
SLICE_GAP_SECONDS = 0.2
SLICE_GAP_SHARE = 0.04
MIN_SLICE_GAP_SECONDS = 0.1
MAX_CANCELLED_IN_A_ROW = 5

SET_STATEMENT_TIMEOUT_SQL = "SELECT set_config('statement_timeout', %s, true)"
# Who holds lock 4246, or a lock on the rollup's tables (a writer's row locks show as one).
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


class RollupError(Exception):
    """The rollup could not be rebuilt (it stays pending); ``result``: what it did till then."""

    result: RollupResult | None = None


class SliceCancelled(Exception):
    """The server ended a slice at the cap, after holding lock 4246 ``held`` seconds."""

    def __init__(self, held: float) -> None:
        super().__init__(f"rollup slice cancelled after holding lock {ROLLUP_LOCK_ID} {held:.3f}s")
        self.held = held


@dataclass(frozen=True)
class SliceLimits:
    """A slice's lock budget and timeouts, and the room it leaves the lock's other users."""

    max_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS
    lock_timeout: float = 5.0
    statement_timeout: float = 600.0
    tick_interval: float = cron.DEFAULT_TICK_INTERVAL_SECONDS
    gap: float = SLICE_GAP_SECONDS

    @property
    def cap(self) -> float:
        return self.max_lock_seconds + LOCK_CAP_SLACK_SECONDS

    @property
    def target(self) -> float:
        return self.max_lock_seconds * TARGET_LOCK_FRACTION


@dataclass(frozen=True)
class RollupSlice:
    """One slice transaction; ``plan``: ``own`` or the function's; ``rows``: usage rows read."""

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
    distinct_keys: int | None = None  # the revert's, which the slices' keys may not count

    @property
    def rollup_rows(self) -> int:
        return sum(s.rollup_rows for s in self.slices)

    @property
    def keys_done(self) -> int:
        distinct = self.distinct_keys
        return sum(s.keys for s in self.slices) if distinct is None else distinct

    @property
    def max_lock_held_seconds(self) -> float:
        return max([s.lock_held_seconds for s in self.slices] + self.cancelled_holds, default=0.0)

    @property
    def hash_slices(self) -> int:
        return sum(1 for s in self.slices if s.plan == "hash")

    def figures(self) -> dict[str, Any]:
        """The rebuild's figures as the run record and every document name them."""
        return {
            "rollup_rows": self.rollup_rows,
            "rollup_slices": len(self.slices),
            "rollup_max_lock_seconds": self.max_lock_held_seconds,
            "rollup_keys": self.keys_done,
            "rollup_seconds": self.seconds,
            "rollup_hash_slices": self.hash_slices,
            "rollup_cron_waits": self.cron_waits,
            "rollup_cron_wait_seconds": self.cron_wait_seconds,
        }


@dataclass(frozen=True)
class Span:
    """A slice's stamps or hours (after, upto] by number; ``cost``: tasks, or estimated rows."""

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
# last row (``s``; ``f`` the first) before one where ``{over}`` holds (at least one).
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
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class Locked:
    """What a slice's work returned, and how long it waited for lock 4246 and held it."""

    value: Any
    waited: float
    held: float

    def piece(self, start: datetime, end: datetime, written: int, **more: Any) -> RollupSlice:
        return RollupSlice(start, end, int(written), self.waited, self.held, **more)


def _bound(cursor: Any, cap: float, locked_at: float) -> Bound:
    def bound() -> None:
        left = cap - COMMIT_ALLOWANCE_SECONDS - (time.monotonic() - locked_at)
        cursor.execute(SET_STATEMENT_TIMEOUT_SQL, [f"{max(left, MIN_CALL_SECONDS) * 1000:.0f}ms"])

    return bound


def run_locked(
    limits: SliceLimits, work: Callable[[Any, Bound], Any], *, repeatable_read: bool = False
) -> Locked:
    """``work(cursor, bound)`` in one transaction holding lock 4246, calling ``bound()`` before
    each long statement; with ``repeatable_read`` a serialization failure is retried."""
    rows_locked = False
    for attempt in range(1, LOCK_WAIT_ATTEMPTS + 1):
        waited_from = time.monotonic()
        locked_at: float | None = None
        own_transaction = not connection.in_atomic_block
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                if repeatable_read and own_transaction:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                set_local_timeouts(cursor, limits.lock_timeout, limits.statement_timeout)
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ROLLUP_LOCK_ID])
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
    """Who holds the rollup's tables (``rows``) or lock 4246 now."""
    tables = {name: names()[name].as_string() for name in HOLDERS_TABLES}
    found = one(HOLDERS_SQL, {"rows": rows, "lock": ROLLUP_LOCK_ID, **tables}, every=True)
    if not found:
        return "held by a session that has let go since"
    return "held by " + "; ".join(
        f"pid {pid} (application {application or 'not named'!r}, transaction open since "
        f"{render.timestamp(since)}, {state})"
        for pid, application, since, state in found
    )


def one(statement: str, params: Any = None, *, every: bool = False) -> Any:
    """``statement`` on its own: its first row (None when it returns none), or ``every`` row."""
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        if every:
            return cursor.fetchall()
        return cursor.fetchone() if cursor.description else None


def unbounded(limits: SliceLimits, *statements: str | tuple[str, dict[str, Any]]) -> Any:
    """Statements in one transaction with no statement timeout (docs/design.md); the last one's
    row, or None."""
    with transaction.atomic(), connection.cursor() as cursor:
        set_local_timeouts(cursor, limits.lock_timeout, 0)
        for statement in statements:
            text, params = statement if isinstance(statement, tuple) else (statement, None)
            cursor.execute(text, params)
        return cursor.fetchone() if cursor.description else None


@dataclass(eq=False)
class Slicer:
    """What every rebuild loop shares: the neighbours' room, the stop, the cancellations, and
    the ``rollup_slice`` and ``paused`` events to ``progress``."""

    limits: SliceLimits
    result: RollupResult
    should_stop: ShouldStop = lambda: False
    progress: Progress = no_progress
    cancelled_in_a_row: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.ticks = cron.TickWatcher(interval=self.limits.tick_interval, lead=self.limits.cap)

    def paused(self, reason: str, seconds: float) -> None:
        self.progress("paused", reason=reason, seconds=seconds)

    def may_start(self, *, wait: bool = True) -> bool:
        """Wait while the cron tick is due (if ``wait``); False if a stop was asked for (noted)."""
        if wait and not self.should_stop():
            self.ticks.wait_if_due(self.should_stop, self.paused)
        if self.should_stop():
            self.result.stopped = True
            return False
        return True

    @property
    def gap(self) -> float:
        share = max(MIN_SLICE_GAP_SECONDS, SLICE_GAP_SHARE * self.limits.max_lock_seconds)
        return min(self.limits.gap, share)

    def leave_a_gap(self) -> None:
        if self.gap > 0:
            time.sleep(self.gap)

    def cancelled(
        self, exc: SliceCancelled, what: str, *, counts: bool = True, last: bool = False
    ) -> None:
        """The slice ``what`` hit the cap; too many in a row that ``counts``, or one with no
        ``last`` way left to try it (neither plan), stop the rebuild."""
        self.result.cancelled_holds.append(exc.held)
        if counts:
            self.cancelled_in_a_row += 1
        if not last:
            logger.info("rollup %s over its lock budget (%.3fs held)", what, exc.held)
        if last or self.cancelled_in_a_row >= MAX_CANCELLED_IN_A_ROW:
            tries = f"in {self.cancelled_in_a_row} tries in a row"
            raise RollupError(
                f"{what} could not be rebuilt within the lock budget ({self.limits.cap:g}s) "
                f"{'with either plan' if last else tries}; the run's rollup stays pending: "
                "re-run the same command with a larger --max-rollup-lock-seconds "
                f"{'' if last else '(or when the database is less busy) '}to rebuild the rest"
            ) from exc
        self.leave_a_gap()

    def report(self, piece: RollupSlice, what: str, done: int, *, last: bool = False) -> None:
        """The ``rollup_slice`` event and log line; a gap after it unless it was the ``last``."""
        self.progress("rollup_slice", piece=piece, done=done, total=self.result.keys_total)
        log_slice(piece, what, done, self.result.keys_total)
        if not last:
            self.leave_a_gap()

    def settled(self, piece: RollupSlice) -> None:
        self.cancelled_in_a_row = 0
        self.result.slices.append(piece)


# How much of a slower measured rate is believed at once, and of a faster one.
RATE_SLOWER_WEIGHT = 1.0
RATE_FASTER_WEIGHT = 0.3


@dataclass
class Rate:
    """One kind of slice's measured speed (units a second of hold), and the next's size; with
    ``scans`` a slice also pays a fixed part (the shortest slice seen)."""

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
        """The units the next slice may take (``first`` until one was measured), less ``less``."""
        wanted = ((self.target - self.fixed) * self.rate if self.measured else first) - less
        if grow and self.largest:
            wanted = min(wanted, self.largest * MAX_SLICE_GROWTH)
        if self.ceiling is not None:
            wanted = min(wanted, self.ceiling)
        return max(1.0, wanted)

    def add(self, units: float, held: float) -> None:
        if not self.scans:  # a stall does not cap the rest of the run
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
        self.ceiling = max(1.0, units / 2)
        if not self.scans:
            self.rate = min(self.rate, units / 2 / self.target)
            self.measured = True


def log_slice(piece: RollupSlice, what: str, done: int, total: int) -> None:
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
        **{name: getattr(piece, name) for name in ("tasks", "backlog", "rows", "rollup_rows")},
        lock_wait_seconds=round(piece.lock_wait_seconds, 6),
        lock_held_seconds=round(piece.lock_held_seconds, 6),
    )
