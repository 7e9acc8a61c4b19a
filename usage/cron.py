"""The platform's cron tick: its state, the repair's ``updated_at`` stamp around it, and
``TickWatcher``; why: docs/design.md, "The platform's cron tick and lock 4246"."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection

from usage.db import database_now
from usage.eligibility import compose
from usage.models import BackfillRun
from usage.render import timestamp as _clock

logger = logging.getLogger("usage.cron")

# Serializes every writer of task_usage_hourly: the cron tick, workspace deletion, the repair.
ROLLUP_LOCK_ID = 4246
DEFAULT_TICK_INTERVAL_SECONDS = 300.0
# A tick last started more than this many intervals ago is taken for a stopped scheduler.
STALE_AFTER_INTERVALS = 3
# How long past its expected time a due tick is waited for (at most half an interval).
MAX_TICK_GRACE_SECONDS = 30.0
POLL_SECONDS = 0.2

STATE_SQL = """
SELECT watermark_at, last_run_started_at, clock_timestamp()
FROM {task_usage_hourly_rollup_state} WHERE id = 1"""


@dataclass(frozen=True)
class CronState:
    watermark_at: datetime | None
    last_run_started_at: datetime | None
    now: datetime

    def stopped(self, interval: float) -> bool:
        last = self.last_run_started_at
        return (
            last is not None
            and (self.now - last).total_seconds() > STALE_AFTER_INTERVALS * interval
        )


def read_state() -> CronState:
    with connection.cursor() as cursor:
        cursor.execute(compose(STATE_SQL))
        row = cursor.fetchone()
    return CronState(*row) if row is not None else CronState(None, None, database_now())


# Where the watermark leaves less than a microsecond a key, up to this many keys share one.
MAX_KEYS_PER_STAMP = 64
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class StampPolicy:
    """The key of rank r (of ``keys``) is stamped ``top - (r - 1) x slots / keys`` microseconds."""

    stamp: str  # a BackfillRun.Stamp value
    watermark_at: datetime | None
    top: datetime
    slots: int
    keys: int
    reason: str
    first: datetime  # the earliest stamp

    @property
    def below_watermark(self) -> bool:
        return self.stamp == BackfillRun.Stamp.BELOW_WATERMARK

    def params(self) -> dict[str, object]:
        return {"stamp_top": self.top, "stamp_slots": self.slots, "stamp_keys": max(self.keys, 1)}


def _policy(
    stamp: str, state: CronState, top: datetime, room: int, keys: int | None, reason: str
) -> StampPolicy:
    """Up to ``room`` stamps ending at ``top``; with the keys counted, the reason names them."""
    slots = room if keys is None else min(room, max(keys, 1))
    first = top - (slots - 1) * MICROSECOND
    if keys is not None:
        shared = f", {-(-keys // slots):,} hourly keys a stamp at most" if 0 < slots < keys else ""
        reason += (
            f": stamps from {_clock(first, microseconds=True)} to "
            f"{_clock(top, microseconds=True)}{shared}"
        )
    return StampPolicy(stamp, state.watermark_at, top, slots, keys or 0, reason, first)


def choose_stamp(cutoff: datetime, state: CronState, keys: int | None) -> StampPolicy:
    """Below the watermark when there is room after the cutoff; ``keys`` None: the pre-flight."""
    watermark = state.watermark_at
    if watermark is not None and watermark > cutoff:
        top = min(watermark, state.now) - MICROSECOND
        room = (top - cutoff) // MICROSECOND  # stamps strictly after the cutoff, up to top
        if room >= 1 and (keys is None or room * MAX_KEYS_PER_STAMP >= keys):
            below = (
                f"repaired rows are stamped just below the platform rollup's watermark "
                f"({_clock(watermark, microseconds=True)}), so its cron tick never re-rolls them"
            )
            return _policy(BackfillRun.Stamp.BELOW_WATERMARK, state, top, room, keys, below)
        why = (
            f"the platform rollup's watermark ({_clock(watermark, microseconds=True)}) is only "
            f"{max(room + 1, 0):,} microseconds after the cutoff, too close for "
            f"{keys or 0:,} hourly keys ({MAX_KEYS_PER_STAMP} a stamp at most)"
        )
    elif watermark is None:
        why = "task_usage_hourly_rollup_state has no row"
    elif state.last_run_started_at is None:
        why = f"the platform's cron tick never ran (watermark {_clock(watermark)})"
    else:
        why = (
            f"the platform rollup's watermark ({_clock(watermark)}) is not after the cutoff: "
            "its cron tick is that far behind"
        )
    why += (
        "; repaired rows are stamped with the time the repair started, and the platform's "
        "rollup will re-roll their hourly keys once its watermark passes that time"
    )
    return stamp_for_the_tick(cutoff, state, keys, why)


def stamp_for_the_tick(
    cutoff: datetime,
    state: CronState,
    keys: int | None,
    why: str = "--no-rebuild-rollup: repaired rows are stamped with the time the repair "
    "started, so the platform's cron tick rolls them up once its watermark passes that time",
) -> StampPolicy:
    """The time the repair started: stamps from the cutoff up to it."""
    room = max(1, (state.now - cutoff) // MICROSECOND)
    return _policy(BackfillRun.Stamp.REPAIR_TIME, state, state.now, room, keys, why)


@dataclass
class TickWatcher:
    """Keeps lock 4246 free from ``lead`` seconds before a tick is due until it starts."""

    interval: float
    lead: float
    waits: int = 0
    waited_seconds: float = 0.0
    _said_stale: bool = False

    @property
    def grace(self) -> float:
        return min(MAX_TICK_GRACE_SECONDS, self.interval / 2)

    def next_due(self, state: CronState) -> datetime | None:
        last = state.last_run_started_at
        if last is None or state.stopped(self.interval):
            return None
        since = (state.now - last).total_seconds()
        # The first expected moment that is not yet more than ``grace`` behind us.
        ticks = max(1, math.ceil((since - self.grace) / self.interval))
        return last + timedelta(seconds=ticks * self.interval)

    def wait_if_due(self, stop: Callable[[], bool], on_wait: Callable[[str, float], None]) -> None:
        state = read_state()
        due = self.next_due(state)
        if due is None and not self._said_stale:
            self._said_stale = True
            last = state.last_run_started_at
            logger.info(
                "the platform's cron tick %s: not waiting for it between slices",
                "never ran" if last is None else f"last ran at {_clock(last)}",
            )
        if due is None or (due - state.now).total_seconds() > self.lead:
            return
        give_up = due + timedelta(seconds=self.grace)
        limit = max((give_up - state.now).total_seconds(), 0.0)
        message = (
            f"waiting for the platform's cron tick due at {_clock(due)} "
            f"(lock {ROLLUP_LOCK_ID} left free, at most {limit:.1f}s)"
        )
        logger.info(message)
        on_wait(message, limit)
        current = state  # until the tick starts, the time is up or the run stops
        while current.last_run_started_at == state.last_run_started_at and not stop():
            if current.now >= give_up:
                logger.info("the cron tick due at %s did not start; continuing", _clock(due))
                break
            threading.Event().wait(POLL_SECONDS)
            current = read_state()
        self.waits += 1
        self.waited_seconds += (current.now - state.now).total_seconds()
