"""The repair's rollup as the platform's neighbours see it, on a real PostgreSQL.

The schema fixture is the platform's (its queue with a unique key, its queueing triggers, its
cron tick and the tick's state). These tests check the fixture holds those facts, then what the
repair leaves for the platform: no key queued by the platform breaks it, the next cron tick has
nothing of the repair's to re-roll, a try-lock caller gets lock 4246 between slices, scheduled
ticks are never skipped twice in a row, and a kill or a signal mid-rollup leaves a state the
next run finishes.
"""

from __future__ import annotations

import io
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction

from tests.factories import (
    CUTOFF,
    make_agent,
    make_keys,
    make_task,
    make_usage,
    set_rollup_state,
)
from tests.platform import (
    FAST_ROLLUP,
    SLOW_ROLLUP,
    CronScheduler,
    TryLockProbe,
    installed,
    next_tick,
)
from tests.processes import start_manage
from tests.support import COMMITS, CUTOFF_ARG, live_watermark, rollup_mismatches, sql, wait_until
from usage.db import database_now
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.revert import RevertOptions, execute_revert

pytestmark = COMMITS

QUEUE_KEY_SQL = """
INSERT INTO {task_usage_hourly_dirty} AS d (
    bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model, enqueued_at)
SELECT date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       a.workspace_id, q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model,
       now() - interval '1 minute'
FROM {task_usage} tu JOIN {agent_task_queue} q ON q.id = tu.task_id
JOIN {agent} a ON a.id = q.agent_id LEFT JOIN {issue} i ON i.id = q.issue_id
WHERE tu.id = %s
ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)"""
PLAIN_QUEUE_KEY_SQL = QUEUE_KEY_SQL.split("ON CONFLICT")[0]


def queued() -> list[tuple]:
    return sql(
        "SELECT agent_id, runtime_id, project_id, provider, model FROM {task_usage_hourly_dirty}"
    )


@pytest.fixture
def slow_rollup() -> Iterator[None]:
    with installed(SLOW_ROLLUP, FAST_ROLLUP):
        yield


# -- the fixture holds the platform's facts -----------------------------------------------


def test_a_key_is_queued_once_and_a_plain_insert_of_a_queued_key_fails() -> None:
    row = make_usage(make_task(make_agent()))  # no issue: project_id is NULL in its key
    sql(QUEUE_KEY_SQL, [row.pk])
    sql(QUEUE_KEY_SQL, [row.pk])
    assert len(queued()) == 1  # NULL project ids compare equal in the key
    with (
        pytest.raises(IntegrityError, match="uq_task_usage_hourly_dirty_key"),
        transaction.atomic(),
    ):
        sql(PLAIN_QUEUE_KEY_SQL, [row.pk])
    columns = sql(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'task_usage_hourly_dirty'"
    )
    assert "id" not in {c[0] for c in columns}


def test_platform_triggers_queue_the_keys_a_change_invalidates() -> None:
    agent = make_agent()
    task = make_task(agent, project_id=uuid.uuid4())
    row = make_usage(task, model="a")
    other = make_usage(task, model="b")

    TaskUsage.objects.filter(pk=row.pk).update(input_tokens=1)  # no trigger on UPDATE
    assert queued() == []

    TaskUsage.objects.filter(pk=row.pk).delete()
    assert [(q[0], q[4]) for q in queued()] == [(agent.pk, "a")]

    sql("DELETE FROM {task_usage_hourly_dirty}")
    new_runtime = uuid.uuid4()
    sql("UPDATE {agent_task_queue} SET runtime_id = %s WHERE id = %s", [new_runtime, task.pk])
    assert {q[1] for q in queued()} == {task.runtime_id, new_runtime}  # old and new key

    sql("DELETE FROM {task_usage_hourly_dirty}")
    new_project = uuid.uuid4()
    sql("UPDATE {issue} SET project_id = %s WHERE id = %s", [new_project, task.issue_id])
    assert {q[2] for q in queued()} == {task.issue.project_id, new_project}

    sql("DELETE FROM {task_usage_hourly_dirty}")
    with transaction.atomic():
        sql("SET LOCAL multica.workspace_teardown = 'on'")
        TaskUsage.objects.filter(pk=other.pk).delete()
    assert queued() == []


def test_the_cron_tick_rolls_its_window_and_skips_while_the_lock_is_taken(
    test_database_url: str,
) -> None:
    now = database_now()
    set_rollup_state(now - timedelta(minutes=20), None)
    task = make_task(make_agent())
    make_usage(task, created_at=now - timedelta(minutes=15))

    with psycopg.connect(test_database_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(4246)")
        assert sql("SELECT {rollup_task_usage_hourly}()") == [(0,)]
        assert sql("SELECT last_run_started_at FROM {task_usage_hourly_rollup_state}") == [(None,)]
    assert sql("SELECT {rollup_task_usage_hourly}()") == [(1,)]
    (watermark, started, rows), *_ = sql(
        "SELECT watermark_at, last_run_started_at, last_run_rows"
        " FROM {task_usage_hourly_rollup_state}"
    )
    assert rows == 1 and started is not None
    assert abs((watermark - (started - timedelta(minutes=5))).total_seconds()) < 1
    assert rollup_mismatches() == []


# -- what the repair leaves for the platform ------------------------------------------------


def test_a_key_the_platform_queued_before_the_run_is_no_conflict() -> None:
    rows = make_keys(2, 5)
    live_watermark()
    sql(QUEUE_KEY_SQL, [rows[0].pk])  # a minute ago, as a platform writer would
    platform_key = queued()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.run.status == BackfillRun.Status.SUCCEEDED
    assert rollup_mismatches() == []
    # The repair's windows end below the watermark: the key stays queued for the cron tick.
    assert queued() == platform_key

    sql(QUEUE_KEY_SQL, [rows[1].pk])
    reverted = execute_revert(RevertOptions(run_id=result.run.pk))
    assert reverted.reverted and reverted.rows_restored == 10
    # The revert queues its keys with the same upsert, and its drains rebuild both.
    assert queued() == [] and rollup_mismatches() == []


def test_the_next_cron_tick_re_rolls_none_of_the_repaired_rows(test_database_url: str) -> None:
    rows = make_keys(3, 10)
    live_watermark()
    watermark = sql("SELECT watermark_at FROM {task_usage_hourly_rollup_state}")[0][0]
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    assert "Stamp: repaired rows are stamped just below the platform rollup's watermark" in (
        out.getvalue()
    )
    run = BackfillRun.objects.get()
    assert (run.stamp, run.watermark_at_start) == (BackfillRun.Stamp.BELOW_WATERMARK, watermark)
    assert run.stamp_base == watermark - timedelta(microseconds=1)  # the top stamp
    # A microsecond per hourly key below the watermark, one stamp for each of the 30 keys.
    stamps = {r.updated_at for r in TaskUsage.objects.filter(pk__in=[r.pk for r in rows])}
    assert len(stamps) == 30
    assert min(stamps) == watermark - timedelta(microseconds=30)
    assert max(stamps) == watermark - timedelta(microseconds=1)
    assert min(stamps) > CUTOFF  # the rule coalesce(updated_at, created_at) < cutoff: no more
    assert (run.stamp_first, run.stamp_last) == (min(stamps), max(stamps))
    for entry in BackfillJournal.objects.filter(run=run):
        assert entry.new_updated_at in stamps
        assert entry.repaired_at > watermark  # the true time of the repair
    assert rollup_mismatches() == []
    assert next_tick(test_database_url).rows == 0

    call_command("revert_codex_usage_backfill", str(run.pk), "--execute", stdout=out)
    assert next_tick(test_database_url).rows == 0
    assert rollup_mismatches() == []


def test_without_a_usable_watermark_rows_carry_the_repair_time_and_the_command_says_so(
    test_database_url: str,
) -> None:
    make_keys(3, 10)  # the tick never ran: its watermark is 1970
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    assert "Stamp: the platform's cron tick never ran" in out.getvalue()
    assert "will re-roll their hourly keys" in out.getvalue()
    assert BackfillRun.objects.get().stamp == BackfillRun.Stamp.REPAIR_TIME
    # Its next tick finds the 30 repaired rows in its window, as with the original tool.
    assert next_tick(test_database_url).rows >= 30


def test_a_try_lock_caller_gets_the_lock_between_slices(
    slow_rollup: None, test_database_url: str
) -> None:
    make_keys(4, 20)
    live_watermark()
    probe = TryLockProbe(test_database_url)
    probe.start()
    try:
        result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.3))
    finally:
        tries = probe.stop()
    slices = result.rollup.slices
    assert sum(piece.keys for piece in slices) == 80 and len(slices) >= 6
    # The probe got the lock in the gaps between slices, not only before and after them.
    assert sum(1 for _, got in tries if got) >= len(slices) // 2
    assert rollup_mismatches() == []


def test_scheduled_cron_ticks_are_never_skipped_twice_in_a_row(
    slow_rollup: None, test_database_url: str
) -> None:
    make_keys(5, 20)
    now = database_now()
    set_rollup_state(now - timedelta(minutes=10), now)  # a tick just ran; one every 2 s
    scheduler = CronScheduler(test_database_url, interval=2.0)
    scheduler.start()
    try:
        result = execute_backfill(
            ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.3, cron_tick_interval=2.0)
        )
    finally:
        ticks = scheduler.stop()
    assert result.rollup.keys_done == 100
    assert result.rollup.cron_waits >= 1
    ran = [did for _, did, _ in ticks]
    assert len(ran) >= 2
    assert not any(a is False and b is False for a, b in zip(ran, ran[1:], strict=False))
    assert rollup_mismatches() == []


def _hourly_rows_rebuilt_since(moment: object) -> int:
    return sql("SELECT count(*) FROM {task_usage_hourly} WHERE updated_at > %s", [moment])[0][0]


@pytest.mark.slow
def test_kill_9_mid_rollup_leaves_nothing_for_the_tick_and_a_rerun_finishes(
    slow_rollup: None, subprocess_env: dict[str, str], test_database_url: str
) -> None:
    make_keys(4, 20)
    live_watermark()
    started = database_now()
    process = start_manage(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--max-rollup-lock-seconds",
        "0.3",
        env=subprocess_env,
    )
    wait_until(lambda: _hourly_rows_rebuilt_since(started) > 0, timeout=60)
    process.kill()
    process.communicate(timeout=30)
    crashed = BackfillRun.objects.get()
    assert crashed.rollup_state == BackfillRun.RollupState.PENDING
    assert rollup_mismatches() != []  # keys the killed rollup had not reached
    assert (
        next_tick(test_database_url).rows == 0
    )  # the repaired rows are below the watermark: nothing for the tick

    wait_until(
        lambda: not sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [crashed.backend_pid])
    )
    out = io.StringIO()
    call_command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", "--verify", stdout=out
    )
    assert f"including runs {crashed.pk}" in out.getvalue()
    assert "Verification passed." in out.getvalue()
    assert rollup_mismatches() == []


@pytest.mark.slow
def test_a_signal_during_the_rollup_stops_it_and_the_run_is_interrupted(
    slow_rollup: None, subprocess_env: dict[str, str]
) -> None:
    make_keys(4, 20)
    live_watermark()
    started = database_now()
    process = start_manage(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--max-rollup-lock-seconds",
        "0.3",
        env=subprocess_env,
    )
    wait_until(lambda: _hourly_rows_rebuilt_since(started) > 0, timeout=60)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stdout + stderr
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.INTERRUPTED
    assert run.rollup_state == BackfillRun.RollupState.PENDING
    assert "during the rollup rebuild" in run.error
    assert "succeeded" not in stdout
    assert f"Run {run.pk} interrupted by SIGTERM." in stdout
    # Said as it is: the rollup stops, it does not finish (issue 26).
    assert "SIGTERM received: stopping the rollup after its current slice" in stderr
    assert "finishing the current batch" not in stderr

    call_command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=io.StringIO()
    )
    run.refresh_from_db()
    assert run.rollup_state == BackfillRun.RollupState.DONE
    assert rollup_mismatches() == []


def test_without_its_own_rollup_the_repair_leaves_its_rows_to_the_cron_tick(
    test_database_url: str,
) -> None:
    make_keys(2, 10)
    live_watermark()
    out = io.StringIO()
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--no-rebuild-rollup",
        stdout=out,
    )
    assert "Stamp: --no-rebuild-rollup: repaired rows are stamped with the time" in out.getvalue()
    assert BackfillRun.objects.get().stamp == BackfillRun.Stamp.REPAIR_TIME
    assert len(rollup_mismatches()) == 20
    # Its rows are in the next tick's window: the platform's own rollup rebuilds their keys.
    assert next_tick(test_database_url).rows == 20
