"""How each rollup slice is planned: the settings reach the platform's function, both plans
give the recompute, and a plan that cannot work is dropped.

The database tests use a "deep" dataset (4 agents of about 3,300 tasks each), on which the
platform function's default plan is a nested loop per key, as in production; the planner's
and the tick watcher's logic is tested on its own as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction

from sandbox import dataset
from tests.factories import CUTOFF, make_keys
from tests.platform import CALL_KEYS, FAST_ROLLUP, delayed_rollup, installed
from tests.support import COMMITS, rollup_mismatches
from usage.cron import CronState, TickWatcher
from usage.db import database_now
from usage.eligibility import compose
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.rollup import function
from usage.repair.rollup.function import Plan, SlicePlanner, plan_applied, run_slice
from usage.repair.rollup.slices import SliceLimits

# Queue ``%(keys)s`` hourly keys (every ``%(step)s``-th in key order, from ``%(offset)s``),
# as a platform writer would; the latest enqueued_at.
QUEUE_HOURLY_KEYS_SQL = """
WITH queued AS (
    INSERT INTO {task_usage_hourly_dirty} AS d (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
        enqueued_at)
    SELECT bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
           clock_timestamp()
    FROM (
        SELECT h.*, row_number() OVER (
            ORDER BY bucket_hour, workspace_id, runtime_id, agent_id, provider, model) AS n
        FROM {task_usage_hourly} h
    ) numbered
    WHERE (n - %(offset)s) %% %(step)s = 0
    ORDER BY n LIMIT %(keys)s
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)
    RETURNING d.enqueued_at
)
SELECT max(enqueued_at) FROM queued"""

SCANS_SQL = """
SELECT seq_scan FROM pg_stat_xact_user_tables
WHERE schemaname = 'public' AND relname = 'task_usage'"""


def queue_keys(cursor: Any, keys: int, offset: int = 0, step: int = 7) -> Any:
    cursor.execute(compose(QUEUE_HOURLY_KEYS_SQL), {"keys": keys, "offset": offset, "step": step})
    return cursor.fetchone()[0]


def queued_window(keys: int, offset: int = 0) -> tuple[datetime, datetime]:
    """Queue ``keys`` hourly keys (committed); the window whose rollup call drains them."""
    with transaction.atomic(), connection.cursor() as cursor:
        latest = queue_keys(cursor, keys, offset)
    return latest, latest + timedelta(microseconds=1)


def now_window() -> tuple[datetime, datetime]:
    """A window after everything queued so far: its call drains the whole queue."""
    now = database_now()
    return now, now + timedelta(microseconds=1)


@pytest.fixture
def deep_dataset(transactional_db: None) -> Iterator[None]:
    """20,000 usage rows of 4 agents with about 3,300 tasks each, rolled up and analyzed."""
    spec = dataset.DatasetSpec(rows=20_000, cutoff=CUTOFF, agents=4, heavy_agents=0, workspaces=2)
    with connection.cursor() as cursor:
        dataset.generate_dataset(cursor, spec)
        dataset.populate_hourly(cursor)
        cursor.execute("ANALYZE")
    yield


@COMMITS
def test_the_hash_plan_reaches_the_function_even_with_a_cached_generic_plan(
    deep_dataset: None,
) -> None:
    """A session that caches generic plans ignores ``SET LOCAL enable_nestloop = off``; the
    slice's own settings (with plan_cache_mode = force_custom_plan) still reach the function.
    """
    with connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        try:
            with transaction.atomic():  # the generic plan is made, with nested loops
                latest = queue_keys(cursor, 5)
                cursor.execute(
                    compose("SELECT {rollup_task_usage_hourly_window}(%s, %s)"),
                    [latest, latest + timedelta(microseconds=1)],
                )
            with transaction.atomic():
                cursor.execute("SET LOCAL enable_nestloop = off")
                latest = queue_keys(cursor, 100, offset=1)
                cursor.execute(SCANS_SQL)
                before = cursor.fetchone()[0]
                cursor.execute(
                    compose("SELECT {rollup_task_usage_hourly_window}(%s, %s)"),
                    [latest, latest + timedelta(microseconds=1)],
                )
                cursor.execute(SCANS_SQL)
                assert cursor.fetchone()[0] == before  # the cached nested loop ran
                transaction.set_rollback(True)

            limits = SliceLimits(max_lock_seconds=10)
            hashed = run_slice(Plan.HASH, limits, *queued_window(100, offset=2))
            nested = run_slice(Plan.NESTLOOP, limits, *queued_window(20, offset=3))
        finally:
            cursor.execute("RESET plan_cache_mode")
            cursor.execute("DISCARD PLANS")
    assert hashed.rollup_rows == 100 and hashed.seq_scans >= 1 and plan_applied(hashed)
    assert nested.rollup_rows == 20 and nested.seq_scans == 0 and nested.index_scans > 1000
    assert rollup_mismatches() == []


@COMMITS
def test_both_plans_rebuild_keys_equal_to_a_recompute(deep_dataset: None) -> None:
    with connection.cursor() as cursor:
        # Rows rewritten without their rollup: 600 hourly keys are now wrong.
        cursor.execute(
            compose(
                "UPDATE {task_usage} SET input_tokens = input_tokens + 7"
                " WHERE id IN (SELECT id FROM {task_usage} ORDER BY id LIMIT 600)"
            )
        )
    assert len(rollup_mismatches(limit=10_000)) > 500
    with connection.cursor() as cursor:
        cursor.execute(
            compose(
                """INSERT INTO {task_usage_hourly_dirty} (
                       bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider,
                       model)
                   SELECT DISTINCT date_trunc('hour', tu.created_at AT TIME ZONE 'UTC')
                              AT TIME ZONE 'UTC', a.workspace_id, q.runtime_id, q.agent_id,
                          i.project_id, tu.provider, tu.model
                   FROM {task_usage} tu JOIN {agent_task_queue} q ON q.id = tu.task_id
                   JOIN {agent} a ON a.id = q.agent_id LEFT JOIN {issue} i ON i.id = q.issue_id
                   WHERE tu.id IN (SELECT id FROM {task_usage} ORDER BY id LIMIT 300)
                     AND q.runtime_id IS NOT NULL"""
            )
        )
    limits = SliceLimits(max_lock_seconds=30)
    first = run_slice(Plan.NESTLOOP, limits, *now_window())  # the first 300 rows' keys
    assert first.seq_scans == 0
    with connection.cursor() as cursor:
        cursor.execute(
            compose(
                """INSERT INTO {task_usage_hourly_dirty} (
                       bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider,
                       model)
                   SELECT DISTINCT date_trunc('hour', tu.created_at AT TIME ZONE 'UTC')
                              AT TIME ZONE 'UTC', a.workspace_id, q.runtime_id, q.agent_id,
                          i.project_id, tu.provider, tu.model
                   FROM {task_usage} tu JOIN {agent_task_queue} q ON q.id = tu.task_id
                   JOIN {agent} a ON a.id = q.agent_id LEFT JOIN {issue} i ON i.id = q.issue_id
                   WHERE tu.id IN (SELECT id FROM {task_usage} ORDER BY id OFFSET 300 LIMIT 300)
                     AND q.runtime_id IS NOT NULL
                   ON CONFLICT DO NOTHING"""
            )
        )
    second = run_slice(Plan.HASH, limits, *now_window())  # the next 300 rows' keys, hashed
    assert second.seq_scans >= 1
    assert rollup_mismatches() == []


# Keeps the default plan inside the function, whatever the slice's transaction sets.
PINNED_NESTLOOP = """
ALTER FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz)
    SET enable_nestloop = on"""
UNPINNED = """
ALTER FUNCTION public.rollup_task_usage_hourly_window(timestamptz, timestamptz)
    RESET enable_nestloop"""


@COMMITS
def test_a_slice_whose_settings_do_not_reach_the_function_is_seen_as_nested_loops(
    deep_dataset: None,
) -> None:
    with installed(PINNED_NESTLOOP, UNPINNED):
        piece = run_slice(Plan.HASH, SliceLimits(max_lock_seconds=30), *queued_window(30))
    assert piece.rollup_rows == 30
    assert not plan_applied(piece)
    planner = SlicePlanner(target=1.0, scan_seconds=0.1)
    checked = function.checked(piece, planner)
    assert checked.plan == Plan.NESTLOOP
    assert Plan.HASH not in planner.usable


# A whole scan that no longer fits a slice (what a table of hundreds of millions of rows
# does): with nested loops off, the call sleeps 2 s; with them on, 5 ms a queued key.
SCAN_TOO_SLOW = delayed_rollup(
    f"CASE WHEN current_setting('enable_nestloop') = 'off' THEN 2 ELSE 0.005 * {CALL_KEYS} END"
)


@COMMITS
def test_a_hash_plan_that_does_not_fit_the_budget_is_dropped_for_nested_loops() -> None:
    make_keys(3, 30)
    budget = 0.3
    with installed(SCAN_TOO_SLOW, FAST_ROLLUP):
        result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=budget))
    slices = result.rollup.slices
    assert sum(piece.keys for piece in slices) == 90
    assert result.rollup.hash_slices == 0  # its probe was cancelled at the cap
    assert len(result.rollup.cancelled_holds) == 1  # and its hold is on the record
    assert result.rollup.max_lock_held_seconds == max(
        [piece.lock_held_seconds for piece in slices] + result.rollup.cancelled_holds
    )
    assert result.rollup.max_lock_held_seconds <= budget + 0.5
    assert rollup_mismatches() == []


# -- the planner and the tick watcher on their own -------------------------------------


def test_a_whole_scan_predicted_over_the_target_is_never_tried() -> None:
    planner = SlicePlanner(target=1.2, scan_seconds=80.0)  # 2 million pages
    assert planner.usable == {Plan.NESTLOOP}
    assert planner.next_to_probe() == Plan.NESTLOOP


def test_the_planner_probes_each_plan_then_sizes_slices_from_what_it_measured() -> None:
    planner = SlicePlanner(target=1.0, scan_seconds=0.2)
    assert planner.next_to_probe() == Plan.NESTLOOP
    assert planner.limit(Plan.NESTLOOP, probe_units=5000, backlog_units=0) == 5000
    planner.measured(Plan.NESTLOOP, 5000, 0.5)  # 10,000 units a second
    assert planner.next_to_probe() == Plan.HASH
    planner.measured(Plan.HASH, 40_000, 0.3)  # a small slice: taken for the fixed part
    planner.measured(Plan.HASH, 160_000, 0.5)  # 0.2 s beyond it: 800,000 units a second
    assert planner.next_to_probe() is None
    assert planner.limit(Plan.NESTLOOP, 5000, 0) == pytest.approx(10_000)
    assert planner.seconds(Plan.HASH, 160_000) == pytest.approx(0.5)
    assert planner.limit(Plan.HASH, 5000, 0) == pytest.approx(560_000)
    # Keys the platform queued are drained by the same call: they take their share.
    assert planner.limit(Plan.NESTLOOP, 5000, backlog_units=4000) == pytest.approx(6000)


def test_a_slowdown_is_believed_at_once_and_a_speed_up_gradually() -> None:
    planner = SlicePlanner(target=1.0, scan_seconds=10.0)
    planner.measured(Plan.NESTLOOP, 1000, 0.1)  # 10,000 a second
    planner.measured(Plan.NESTLOOP, 1000, 0.2)  # 5,000: believed
    assert planner.rates[Plan.NESTLOOP].rate == pytest.approx(5000)
    planner.measured(Plan.NESTLOOP, 1000, 0.05)  # 20,000: a step towards it
    assert planner.rates[Plan.NESTLOOP].rate == pytest.approx(5000 + 0.3 * 15_000)


def test_a_cancelled_slice_halves_the_next_and_one_key_that_does_not_fit_drops_the_plan() -> None:
    planner = SlicePlanner(target=1.0, scan_seconds=0.1)
    planner.measured(Plan.NESTLOOP, 1000, 0.5)
    planner.cancelled(Plan.NESTLOOP, 8000, keys=40)
    assert planner.limit(Plan.NESTLOOP, 1000, 0) <= 4000
    planner.cancelled(Plan.HASH, 5000, keys=50)  # its first slice: the scan does not fit
    assert Plan.HASH not in planner.usable
    planner.cancelled(Plan.NESTLOOP, 700, keys=1)
    assert planner.usable == set()


NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_the_next_tick_is_expected_an_interval_after_the_last_one() -> None:
    watcher = TickWatcher(interval=300, lead=2.5)
    last = NOW - timedelta(seconds=200)
    assert watcher.next_due(CronState(None, last, NOW)) == last + timedelta(seconds=300)
    # A tick that is 20 s late is still waited for (grace 30 s); one 40 s late was skipped.
    assert watcher.next_due(CronState(None, NOW - timedelta(seconds=320), NOW)) == NOW - (
        timedelta(seconds=20)
    )
    skipped = NOW - timedelta(seconds=340)
    assert watcher.next_due(CronState(None, skipped, NOW)) == skipped + timedelta(seconds=600)
    # A scheduler silent for three intervals, or one that never ran, is not waited for.
    assert watcher.next_due(CronState(None, NOW - timedelta(seconds=901), NOW)) is None
    assert watcher.next_due(CronState(None, None, NOW)) is None
