"""The chunk engine the repair and the revert share (as Zulip's retention.py): ``Chunks`` walks
a keyset in short batches, one transaction each, moving rows forward (``backfill.Repair``) or
back (``revert.Revert``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from threading import Event
from typing import Any, ClassVar, Generic, TypeVar

from django.db import DatabaseError, connection, transaction

from usage import cron, privileges
from usage.db import (
    SQLSTATE_LOCK_NOT_AVAILABLE,
    SQLSTATE_QUERY_CANCELED,
    error_text,
    reconnect_if_dead,
    scrub,
    set_local_timeouts,
    sqlstate,
)
from usage.eligibility import compose
from usage.events import Progress, no_progress
from usage.models import BackfillRun
from usage.repair import rollup
from usage.repair.rollup.slices import SliceLimits

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 1000
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 60.0
# A batch that times out is retried with half the rows, at most this many times in a row.
MAX_TIMEOUT_RETRIES = 3
# Pauses before re-trying rows another writer held.
LOCK_RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True, kw_only=True)
class RunLimits:
    """How a run may use the database: batches, timeouts, the rollup's hold, the cron tick."""

    batch_size: int = DEFAULT_BATCH_SIZE
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS
    max_rollup_lock_seconds: float = rollup.DEFAULT_MAX_ROLLUP_LOCK_SECONDS
    # Read when the options are made: the tests set it short.
    lock_retry_delays: tuple[float, ...] = field(default_factory=lambda: LOCK_RETRY_DELAYS_SECONDS)
    cron_tick_interval: float = cron.DEFAULT_TICK_INTERVAL_SECONDS
    rollup_path: str = "auto"  # or "function"


class RunError(Exception):
    """A run could not start, or stopped; ``result`` is what it did, if anything."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class BatchTimeoutError(Exception):
    """A batch timed out too often; the message says what was kept and what to do."""


@dataclass(frozen=True, kw_only=True)
class Batch:
    """One batch, either way: its number and size, how long it took, what it moved."""

    number: int
    batch_size: int
    seconds: float
    retry: bool = False
    rows: int = 0  # repaired, or restored
    # The repair's figures, and the first and last updated_at it wrote.
    input_tokens_removed: int = 0
    clamped_rows: int = 0
    first_stamp: datetime | None = None
    last_stamp: datetime | None = None
    # The revert's: journal entries read, keys queued, entries held.
    entries: int = 0
    keys_enqueued: int = 0
    skipped: Sequence[int] = ()


@dataclass(kw_only=True)
class RunResult:
    """What a run did, either way; each direction's result adds a batch's figures (``add``)."""

    run: BackfillRun
    batches: int = 0
    rows_remaining: int = 0
    stopped: bool = False
    stale_runs: list[int] = field(default_factory=list)
    path: rollup.PathChoice | None = None


OptionsT = TypeVar("OptionsT", bound="RunLimits")
ResultT = TypeVar("ResultT", bound="RunResult")


class Chunks(Generic[OptionsT, ResultT]):
    """The keyset batch loop. A direction sets ``result`` and its batch statement (``sql``, with
    a range's or a retry's selector, and ``figures``: its columns, the journal's count first),
    and implements ``log_view`` (its events as its log has them), ``settle`` (after each batch,
    before it is reported), ``locked``, ``retry_pass``, ``ended`` and ``failed``."""

    # Its messages: giving up ({times}, {size}, {error}; what is kept and what to do), retrying
    # smaller (%(kind)s: lock or statement, %(size)d), journal entries (%d) not its rows (%d).
    timed_out: ClassVar[str]
    retrying: ClassVar[str]
    unequal: ClassVar[str]
    logger: ClassVar[logging.Logger]
    error: ClassVar[type[RunError]] = RunError
    # The events the progress callback is given (the others are the log view's alone).
    shown: ClassVar[Collection[str]]
    sql: ClassVar[str]
    range_batch: ClassVar[dict[str, str]]
    retry_batch: ClassVar[dict[str, str]]
    figures: ClassVar[tuple[str, ...]]
    options: OptionsT
    result: ResultT

    def __init__(self, options: OptionsT, stop: Event, progress: Progress) -> None:
        self.options, self.stop, self.progress = options, stop, progress
        self.size = options.batch_size
        self.timeouts = 0
        self.params: dict[str, Any] = {}

    @classmethod
    def execute(
        cls, options: OptionsT, *, stop: Event | None = None, progress: Progress = no_progress
    ) -> ResultT:
        """One run of this direction, stopped between batches by ``stop``."""
        return cls(options, stop or Event(), progress).run()

    def events(self, event: str, /, **details: Any) -> None:
        """One event to the log view, then to the progress callback when it is ``shown``."""
        self.log_view(event, **details)
        if event in self.shown:
            self.progress(event, **details)

    def pause(self) -> None:
        """Between two range batches."""

    def record(self, **fields: Any) -> None:
        BackfillRun.objects.filter(pk=self.result.run.pk).update(**fields)

    def quietly(self, action: Callable[[], Any], warning: str, *args: Any) -> None:
        """``action`` on the way out of a failed run: its failure must not mask the run's."""
        try:
            reconnect_if_dead()
            action()
        except Exception as exc:  # noqa: BLE001 - the run's own failure is what is reported
            self.logger.warning(warning, *args, error_text(exc))

    def checked_path(self, what: str, rebuild_rollup: bool = True) -> rollup.PathChoice | None:
        """The run's rollup path, once every privilege it needs to finish is checked: refused
        before it writes, a role that cannot rebuild the keys would leave them wrong."""
        path = rollup.choose_path(self.options.rollup_path) if rebuild_rollup else None
        needs = {"rebuild_rollup": rebuild_rollup, "own_path": bool(path and path.own)}
        with connection.cursor() as cursor:
            owner = privileges.function_runs_as_owner(cursor)
            needed = privileges.requirements(security_definer=owner, **needs)
            privileges.refuse_missing(cursor, needed, what)
        return path

    def rebuild_keys(
        self,
        run_ids: list[int],
        should_stop: Callable[[], bool],
        source: rollup.KeySource = rollup.RUN_KEYS,
    ) -> rollup.RollupResult:
        """Rebuild every hourly key of the runs' rows (or of ``source``) on the run's path."""
        options = self.options
        limits = SliceLimits(
            options.max_rollup_lock_seconds,
            options.lock_timeout,
            options.statement_timeout,
            options.cron_tick_interval,
        )
        return rollup.rebuild_keys(
            run_ids, self.result.path, limits, should_stop, self.progress, source
        )

    def rebuild_after_rows(self, rebuild: Callable[[], T], message: str) -> T:
        """``rebuild`` once the rows are done; its failure ends the run (``message``)."""
        try:
            return rebuild()
        except (rollup.RollupError, DatabaseError) as exc:
            message = message.format(describe_failure(exc))
            self.failed(message)
            raise self.error(message, self.result) from exc

    def walk(self, after: int, last: int) -> int:
        """Move the keyset range (``after``, ``last``], then give the rows a writer held a few
        more chances; return how many stay locked (0 after a stop, which the direction counts)."""
        while after < last and not self.stop.is_set():
            upto = min(after + self.size, last)
            if self.batch({"after": after, "upto": upto}) is None:
                continue  # timed out and rolled back: the same rows, fewer at a time
            after = upto
            if after < last:
                self.pause()
        if self.stop.is_set():
            return 0
        for delay in self.options.lock_retry_delays:
            locked = self.locked()
            if locked == 0 or self.stop.is_set():
                return locked
            self.logger.info("%d rows locked by other writers; retrying in %.1fs", locked, delay)
            if self.stop.wait(delay):
                return locked
            self.retry_pass()
        return self.locked()

    def batch(self, selector: dict[str, Any], retry: bool = False) -> Batch | None:
        """One batch in its own transaction; None when it timed out (the size halved)."""
        size, started = self.size, time.monotonic()
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                set_local_timeouts(
                    cursor, self.options.lock_timeout, self.options.statement_timeout
                )
                params = dict(self.params, run_id=self.result.run.pk, limit=size, **selector)
                kind = self.retry_batch if retry else self.range_batch
                cursor.execute(compose(self.sql, **kind), params)
                figures = dict(zip(self.figures, cursor.fetchone(), strict=True))
                journaled, rows = figures.pop(self.figures[0]), figures["rows"]
                if journaled != rows:
                    raise RuntimeError(f"{self.unequal % (journaled, rows)}; batch rolled back")
        except DatabaseError as exc:
            state = sqlstate(exc)
            if state not in (SQLSTATE_LOCK_NOT_AVAILABLE, SQLSTATE_QUERY_CANCELED):
                raise
            self.timeouts += 1
            if self.timeouts > MAX_TIMEOUT_RETRIES or size == 1:
                raise BatchTimeoutError(
                    self.timed_out.format(times=self.timeouts, size=size, error=error_text(exc))
                    + ", or with a larger --lock-timeout/--statement-timeout"
                ) from exc
            self.size = max(1, size // 2)
            kind = "lock" if state == SQLSTATE_LOCK_NOT_AVAILABLE else "statement"
            self.logger.warning(self.retrying, {"kind": kind, "size": self.size})
            return None
        self.timeouts = 0
        self.result.batches += 1
        figures.update(number=self.result.batches, batch_size=size, retry=retry)
        batch = Batch(seconds=time.monotonic() - started, **figures)
        self.result.add(batch)
        self.settle(batch, selector)
        self.events("batch", batch=batch, result=self.result)
        return batch

    def guard(self, phase: Callable[[], None]) -> None:
        """Run ``phase``; an error ends the run (``ended``) and is raised as the run's."""
        try:
            phase()
        except BaseException as exc:  # noqa: BLE001 - raised again as the run's error
            timed_out = isinstance(exc, BatchTimeoutError)
            salvage = not isinstance(exc, rollup.RollupError)
            failure = describe_failure(exc) if salvage and not timed_out else str(exc)
            message = self.ended(failure, salvage=salvage, timed_out=timed_out)
            raise self.error(message, self.result) from (None if timed_out else exc)


def describe_failure(exc: BaseException) -> str:
    """A run's failure in one line, never with a password in it."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, DatabaseError):
        return f"database error: {error_text(exc)}"
    return scrub(f"{type(exc).__name__}: {exc}")
