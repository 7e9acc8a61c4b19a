"""The platform around the repair, for tests: slow stand-ins for its rollup function, and its
neighbours (cron tick, try-lock caller, next tick), shared with the benchmark.

Each neighbour runs on a connection of its own, in a thread, against the test database, and
records what it saw; the tests assert on those records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection

from bench.neighbours import CronScheduler, TryLockProbe, next_tick

__all__ = [
    "CALL_KEYS",
    "FAST_ROLLUP",
    "SLOW_ROLLUP",
    "CronScheduler",
    "TryLockProbe",
    "delayed_rollup",
    "installed",
    "next_tick",
]


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
