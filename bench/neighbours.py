"""The platform's neighbours of the repair: its cron tick on a schedule, a try-lock caller, and
its next tick after a run, each on a connection of its own.

The benchmark measures what they see while the tool runs; the tests assert on the same
records. Nothing here is the tool: these stand in for the platform around it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from usage.eligibility import compose

# One tick of the platform's scheduler: whether it ran (its state row says it started in this
# transaction) or skipped because lock 4246 was taken.
CRON_TICK_SQL = "SELECT {rollup_task_usage_hourly}()"
CRON_TICK_RAN_SQL = (
    "SELECT last_run_started_at = now() FROM {task_usage_hourly_rollup_state} WHERE id = 1"
)
TRY_LOCK_SQL = "SELECT pg_try_advisory_xact_lock(4246)"

# What the platform's next cron tick will do once its time has come: its window runs from the
# watermark to now() - 5 minutes, so five minutes after a run it covers every moment of the
# run. Under lock 4246, as the tick.
TAKE_LOCK_SQL = "SELECT pg_advisory_xact_lock(4246)"
NEXT_TICK_SQL = """
SELECT {rollup_task_usage_hourly_window}(s.watermark_at, clock_timestamp())
FROM {task_usage_hourly_rollup_state} s WHERE s.id = 1"""


@dataclass(frozen=True)
class Tick:
    rows: int
    held_seconds: float


def next_tick(url: str, *, keep: bool = False) -> Tick:
    """Run the platform's next tick as it will run once its time has come.

    A rehearsal by default (rolled back: the state and the hourly rows stay as they were).
    """
    with psycopg.connect(url) as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(TAKE_LOCK_SQL)
        locked = time.monotonic()
        (rows,) = conn.execute(compose(NEXT_TICK_SQL)).fetchone()
        if keep:
            conn.commit()
        else:
            conn.rollback()
        return Tick(int(rows or 0), time.monotonic() - locked)


@dataclass
class CronScheduler:
    """Calls ``rollup_task_usage_hourly()`` every ``interval`` seconds, as the platform does."""

    url: str
    interval: float
    ticks: list[tuple[datetime, bool, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CronScheduler:
        self._thread = threading.Thread(target=self._run, name="cron-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[datetime, bool, float]]:
        """The ticks: when each started, whether it ran, how long it took."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)
        return self.ticks

    def _run(self) -> None:
        with psycopg.connect(self.url) as conn:
            due = time.monotonic() + self.interval
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                started = time.monotonic()
                conn.execute(compose(CRON_TICK_SQL))
                (ran,) = conn.execute(compose(CRON_TICK_RAN_SQL)).fetchone()
                (now,) = conn.execute("SELECT now()").fetchone()
                conn.commit()
                self.ticks.append((now, bool(ran), time.monotonic() - started))
                due += self.interval

    @property
    def skipped(self) -> int:
        return sum(1 for _, ran, _ in self.ticks if not ran)

    @property
    def skipped_in_a_row(self) -> int:
        """The most scheduled ticks skipped one after the other."""
        longest = current = 0
        for _, ran, _ in self.ticks:
            current = 0 if ran else current + 1
            longest = max(longest, current)
        return longest


@dataclass
class TryLockProbe:
    """Asks for lock 4246 with a try-lock every ``every`` seconds, as the cron tick does."""

    url: str
    every: float = 0.05
    tries: list[tuple[float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TryLockProbe:
        self._thread = threading.Thread(target=self._run, name="try-lock-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, bool]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)
        return self.tries

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                (got,) = conn.execute(TRY_LOCK_SQL).fetchone()
                self.tries.append((time.time(), bool(got)))

    @property
    def successes(self) -> int:
        return sum(1 for _, got in self.tries if got)

    def refusals(self) -> list[tuple[float, float]]:
        """Each run of refused tries: (first, last) refused try, in epoch seconds."""
        runs: list[tuple[float, float]] = []
        since = last = None
        for moment, got in self.tries:
            if got:
                if since is not None:
                    runs.append((since, last))
                since = None
            else:
                since = moment if since is None else since
                last = moment
        if since is not None:
            runs.append((since, last))
        return runs

    def longest_refusal(self) -> float:
        """The longest time the lock was refused at every try in a row."""
        return max((last - first for first, last in self.refusals()), default=0.0)
