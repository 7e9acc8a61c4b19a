"""The batching core the repair and the revert share.

Both walk their rows in short batches, each one transaction with ``lock_timeout`` and
``statement_timeout`` set locally, on a database that keeps being written:

* A batch that times out rolls back whole and is retried with half the rows, at most
  ``MAX_TIMEOUT_RETRIES`` times in a row; then the run stops cleanly with
  ``BatchTimeoutError`` (``Halving``). The halved size stays for the batches after it.
* Rows a writer held (skipped with ``SKIP LOCKED``) are retried after the pass, once after
  each of the ``LOCK_RETRY_DELAYS_SECONDS`` (``retry_locked``); those still locked are counted.
* A failure is one line (``describe_failure``).
* What happens is reported through one callback (``usage.repair.progress.Progress``).

``RunLimits`` are the options both take (batch size, timeouts, the rollup's lock budget, the
platform's cron tick) and ``RunError`` the error both end with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.db import DatabaseError

from usage import cron
from usage.db import (
    SQLSTATE_LOCK_NOT_AVAILABLE,
    SQLSTATE_QUERY_CANCELED,
    error_text,
    scrub,
    sqlstate,
)
from usage.repair.rollup import DEFAULT_MAX_ROLLUP_LOCK_SECONDS

DEFAULT_BATCH_SIZE = 1000
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 60.0
# A batch that times out is retried with half the rows, at most this many times in a row.
MAX_TIMEOUT_RETRIES = 3
# Pauses before re-trying rows that were skipped because another writer held their lock
# (read when a run's options are made, so the tests can set them short).
LOCK_RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0, 4.0)

T = TypeVar("T")


def default_lock_retry_delays() -> tuple[float, ...]:
    """The pauses before each retry of rows a writer held: ``LOCK_RETRY_DELAYS_SECONDS``."""
    return LOCK_RETRY_DELAYS_SECONDS


@dataclass(frozen=True, kw_only=True)
class RunLimits:
    """How a run (the repair or the revert) may use the database: its batches, their
    server-side timeouts, the rollup's hold of lock 4246 and the platform's cron tick."""

    batch_size: int = DEFAULT_BATCH_SIZE
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS
    max_rollup_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS
    lock_retry_delays: tuple[float, ...] = field(default_factory=default_lock_retry_delays)
    cron_tick_interval: float = cron.DEFAULT_TICK_INTERVAL_SECONDS
    # How the rollup is rebuilt: "auto" (the own recompute for a function definition the tool
    # knows, proven by each run; the platform's function otherwise) or "function".
    rollup_path: str = "auto"


class RunError(Exception):
    """A run could not start, or stopped; the message says what to do. ``result`` is what
    the run did, when it did anything (its record says the same)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class BatchTimeoutError(Exception):
    """A batch timed out too often; the message says what was kept and what to do."""


@dataclass(frozen=True)
class BatchWords:
    """How a run names its batches in its messages: the repair's and the revert's differ."""

    batch: str  # "a batch"
    unit: str  # what a batch is made of: "rows"
    kept: str  # what a stop keeps, and what to do: "the work done so far is kept: re-run later"
    retrying: str  # the warning logged with %(kind)s (lock or statement) and %(size)d


@dataclass
class Halving:
    """The batch size of a run: halved on each timeout, up to ``MAX_TIMEOUT_RETRIES`` in a row."""

    size: int
    words: BatchWords
    logger: logging.Logger
    timeouts: int = 0

    def attempt(self, batch: Callable[[int], T]) -> T | None:
        """One try of ``batch(size)``: its result, or None when it timed out and the size was
        halved (the batch rolled back whole: try again). Raises ``BatchTimeoutError`` when
        it timed out once too often, or at one row."""
        size = self.size
        try:
            result = batch(size)
        except DatabaseError as exc:
            state = sqlstate(exc)
            if state not in (SQLSTATE_LOCK_NOT_AVAILABLE, SQLSTATE_QUERY_CANCELED):
                raise
            self.timeouts += 1
            if self.timeouts > MAX_TIMEOUT_RETRIES or size == 1:
                raise BatchTimeoutError(
                    f"{self.words.batch} timed out {self.timeouts} times, down to {size} "
                    f"{self.words.unit} ({error_text(exc)}); {self.words.kept}, or with a "
                    "larger --lock-timeout/--statement-timeout"
                ) from exc
            self.size = max(1, size // 2)
            kind = "lock" if state == SQLSTATE_LOCK_NOT_AVAILABLE else "statement"
            self.logger.warning(self.words.retrying, {"kind": kind, "size": self.size})
            return None
        self.timeouts = 0
        return result


def retry_locked(
    delays: Sequence[float],
    stop: threading.Event,
    count_locked: Callable[[], int],
    retry_pass: Callable[[], None],
    logger: logging.Logger,
) -> int:
    """Give rows a writer held a few more chances once it lets go; return how many stay locked.

    Before each pause the rows still locked are counted; none left, or a stop, ends it.
    """
    for delay in delays:
        locked = count_locked()
        if locked == 0 or stop.is_set():
            return locked
        logger.info("%d rows locked by other writers; retrying in %.1fs", locked, delay)
        if stop.wait(delay):
            return locked
        retry_pass()
    return count_locked()


def describe_failure(exc: BaseException) -> str:
    """A run's failure in one line, never with a password in it."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, DatabaseError):
        return f"database error: {error_text(exc)}"
    return scrub(f"{type(exc).__name__}: {exc}")
