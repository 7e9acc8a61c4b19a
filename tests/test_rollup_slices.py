"""The rollup rebuild holds lock 4246 only in short slices, each key once, none missed."""

from __future__ import annotations

import pytest
from django.db import connection

from tests.factories import CUTOFF, make_agent, make_task, make_usage, populate_rollup
from usage.backfill import ExecuteOptions, execute_backfill
from usage.summary import load_summary
from usage.verify import rollup_mismatches

pytestmark = pytest.mark.django_db(transaction=True)

# Makes every rollup call cost 20 ms per queued key, like a slow production rollup.
SLOW_ROLLUP = """
ALTER FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz)
    RENAME TO rollup_task_usage_hourly_window_fast;
CREATE FUNCTION public.rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.02 * (SELECT count(*) FROM task_usage_hourly_dirty
                             WHERE enqueued_at < p_to));
    RETURN public.rollup_task_usage_hourly_window_fast(p_from, p_to);
END $$;
"""
FAST_ROLLUP = """
DROP FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz);
ALTER FUNCTION public.rollup_task_usage_hourly_window_fast(timestamptz, timestamptz)
    RENAME TO rollup_task_usage_hourly_window;
"""


@pytest.fixture
def slow_rollup() -> None:
    with connection.cursor() as cursor:
        cursor.execute(SLOW_ROLLUP)
    yield
    with connection.cursor() as cursor:
        cursor.execute(FAST_ROLLUP)


def test_slices_stay_within_the_lock_budget_and_cover_every_key(slow_rollup: None) -> None:
    for _ in range(3):
        task = make_task(make_agent())
        for model in range(40):
            make_usage(task, model=f"m{model}")
    populate_rollup()
    keys = load_summary(CUTOFF, None).totals.rollup_keys
    assert keys == 120
    budget = 0.3
    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, batch_size=1000, max_rollup_lock_seconds=budget)
    )
    assert result.rows_updated == 120  # one batch: a window per batch could not be split
    slices = result.rollup.slices
    assert len(slices) > 3
    assert sum(piece.keys for piece in slices) == keys  # each key once
    assert max(piece.lock_held_seconds for piece in slices) <= budget + 0.5
    assert rollup_mismatches() == []
