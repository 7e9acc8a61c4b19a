"""The platform's neighbours of the repair, for tests: its cron tick, a try-lock caller, and
slow stand-ins for its rollup function.

Each neighbour runs on a connection of its own, in a thread, against the test database, and
records what it saw; the tests assert on those records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from django.db import connection

from usage.eligibility import compose


def delayed_rollup(seconds_sql: str) -> str:
    """SQL that puts a wrapper in front of the rollup function: it sleeps, then calls it."""
    return f"""
ALTER FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz)
    RENAME TO rollup_task_usage_hourly_window_fast;
CREATE FUNCTION public.rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep({seconds_sql});
    RETURN public.rollup_task_usage_hourly_window_fast(p_from, p_to);
END $$;
"""


FAST_ROLLUP = """
DROP FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz);
ALTER FUNCTION public.rollup_task_usage_hourly_window_fast(timestamptz, timestamptz)
    RENAME TO rollup_task_usage_hourly_window;
"""

# The keys a rollup call rebuilds, near enough for the test data (a key per usage row): the
# rows last written in its window, and the keys queued before its end.
CALL_KEYS = """(
    (SELECT count(*) FROM task_usage WHERE updated_at >= p_from AND updated_at < p_to)
    + (SELECT count(*) FROM task_usage_hourly_dirty WHERE enqueued_at < p_to))"""

# Makes every rollup call cost 20 ms per key, like a slow production rollup.
SLOW_ROLLUP = delayed_rollup(f"0.02 * {CALL_KEYS}")


@contextmanager
def installed(setup: str, teardown: str) -> Iterator[None]:
    """Run the ``setup`` SQL, and the ``teardown`` SQL after the block, even if it fails."""
    with connection.cursor() as cursor:
        cursor.execute(setup)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(teardown)


# What the platform's next cron tick will do once its time has come: its window runs from the
# watermark to now() - 5 minutes, so five minutes after a run it covers every moment of the
# run. Under lock 4246, as the tick; the rows it re-rolled and how long it held the lock.
NEXT_TICK_SQL = """
SELECT pg_advisory_xact_lock(4246),
       {rollup_task_usage_hourly_window}(s.watermark_at, clock_timestamp())
FROM {task_usage_hourly_rollup_state} s WHERE s.id = 1"""

# One tick of the platform's scheduler: whether it ran (its state row says it started in this
# transaction) or skipped because lock 4246 was taken.
CRON_TICK_SQL = "SELECT {rollup_task_usage_hourly}()"
CRON_TICK_RAN_SQL = (
    "SELECT last_run_started_at = now() FROM {task_usage_hourly_rollup_state} WHERE id = 1"
)

TRY_LOCK_SQL = "SELECT pg_try_advisory_xact_lock(4246)"


def next_tick(url: str) -> tuple[int, float]:
    """Run the platform's next tick as it will run once its time has come; (rows, seconds)."""
    with psycopg.connect(url) as conn:
        started = time.monotonic()
        _, rows = conn.execute(compose(NEXT_TICK_SQL)).fetchone()
        conn.rollback()  # a rehearsal: the state and the hourly rows stay as they were
        return int(rows), time.monotonic() - started


@dataclass
class CronScheduler:
    """Calls ``rollup_task_usage_hourly()`` every ``interval`` seconds from ``first`` on."""

    url: str
    interval: float
    ticks: list[tuple[datetime, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[datetime, bool]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)
        return self.ticks

    def _run(self) -> None:
        with psycopg.connect(self.url) as conn:
            due = time.monotonic() + self.interval
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                conn.execute(compose(CRON_TICK_SQL))
                (ran,) = conn.execute(compose(CRON_TICK_RAN_SQL)).fetchone()
                (now,) = conn.execute("SELECT now()").fetchone()
                conn.commit()
                self.ticks.append((now, bool(ran)))
                due += self.interval


@dataclass
class TryLockProbe:
    """Asks for lock 4246 with a try-lock every ``every`` seconds, as the cron tick does."""

    url: str
    every: float = 0.05
    tries: list[tuple[float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, bool]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)
        return self.tries

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                (got,) = conn.execute(TRY_LOCK_SQL).fetchone()
                self.tries.append((time.monotonic(), bool(got)))

    def longest_refusal(self) -> float:
        """The longest time the lock was refused at every try in a row."""
        longest, since = 0.0, None
        for moment, got in self.tries:
            if got:
                since = None
            elif since is None:
                since = moment
            else:
                longest = max(longest, moment - since)
        return longest
