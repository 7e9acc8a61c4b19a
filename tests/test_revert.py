"""Reverting an execute run: both tables exactly as before, on a real PostgreSQL.

Every test here commits (the repair and the revert run in many short transactions), and some
hold locks from a second connection, so they are transactional.
"""

from __future__ import annotations

import io
import threading
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.models.functions import Now

from tests.factories import (
    AFTER,
    BEFORE,
    CUTOFF,
    make_agent,
    make_keys,
    make_task,
    make_usage,
    populate_rollup,
)
from tests.support import COMMITS, CUTOFF_ARG, rollup_mismatches, table_snapshot
from usage.eligibility import compose
from usage.models import AgentTaskQueue, BackfillJournal, BackfillRun, TaskUsage
from usage.repair import runs
from usage.repair.revert import RevertOptions, execute_revert, plan_revert
from usage.repair.summary import load_summary

pytestmark = COMMITS

# -- helpers ---------------------------------------------------------------------------------


def backfill() -> str:
    out = io.StringIO()
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        stdout=out,
        stderr=io.StringIO(),
    )
    return out.getvalue()


def revert(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("revert_codex_usage_backfill", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def revert_error(*args: str) -> CommandError:
    with pytest.raises(CommandError) as caught:
        revert(*args)
    message = str(caught.value)
    assert "\n" not in message, message
    return caught.value


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    return {
        "task_usage": table_snapshot("task_usage"),
        "task_usage_hourly": table_snapshot("task_usage_hourly", exclude=("updated_at",)),
    }


def dirty_queue_size() -> int:
    with connection.cursor() as cursor:
        cursor.execute(compose("SELECT count(*) FROM {task_usage_hourly_dirty}"))
        return cursor.fetchone()[0]


@pytest.fixture
def scenario() -> dict[str, TaskUsage]:
    """Eligible rows of every shape the revert must restore, among rows it must not touch."""
    workspace = uuid.uuid4()
    agent = make_agent(workspace)
    task = make_task(agent, project_id=uuid.uuid4())
    projectless = make_task(agent)
    no_runtime = make_task(agent, runtime=False)
    # A second task of the same agent and runtime: its rows share hourly keys with ``task``.
    sibling = make_task(agent, project_id=None)
    AgentTaskQueue.objects.filter(pk=sibling.pk).update(runtime_id=task.runtime_id)
    sibling_of_projectless = make_task(agent)
    AgentTaskQueue.objects.filter(pk=sibling_of_projectless.pk).update(
        runtime_id=projectless.runtime_id
    )
    other_workspace_task = make_task(make_agent())
    rows = {
        "plain": make_usage(task, model="gpt-5-codex", created_at=BEFORE),
        "clamped": make_usage(
            task, model="gpt-5-mini", input_tokens=100, cache_read_tokens=300, created_at=BEFORE
        ),
        "legacy": make_usage(
            task,
            model="gpt-5-legacy",
            created_at=BEFORE - timedelta(days=3, minutes=7),
            updated_at=None,
        ),
        "projectless": make_usage(projectless, model="gpt-5-codex", created_at=BEFORE),
        "projectless_same_key_untouched": make_usage(
            sibling_of_projectless,
            model="gpt-5-codex",
            created_at=BEFORE + timedelta(minutes=5),
            updated_at=AFTER,
        ),
        "no_runtime": make_usage(no_runtime, model="gpt-5-codex", created_at=BEFORE),
        "other_workspace": make_usage(other_workspace_task, model="gpt-5-codex"),
        "updated_late": make_usage(
            task, model="gpt-5-late", created_at=BEFORE - timedelta(hours=2), updated_at=AFTER
        ),
        "non_codex": make_usage(task, provider="claude", model="sonnet", created_at=BEFORE),
        "no_cache": make_usage(task, model="gpt-5-nocache", cache_read_tokens=0),
        "zero_input": make_usage(task, model="gpt-5-zero", input_tokens=0),
    }
    populate_rollup()
    return rows


ELIGIBLE = ("plain", "clamped", "legacy", "projectless", "no_runtime", "other_workspace")


# -- the round trip --------------------------------------------------------------------------


def test_revert_restores_task_usage_and_hourly_exactly(scenario: dict[str, TaskUsage]) -> None:
    original = snapshot()
    assert load_summary(CUTOFF, None).totals.rows == len(ELIGIBLE)

    assert "succeeded" in backfill()
    repaired = snapshot()
    assert repaired["task_usage"] != original["task_usage"]
    assert repaired["task_usage_hourly"] != original["task_usage_hourly"]
    assert TaskUsage.objects.get(pk=scenario["clamped"].pk).input_tokens == 0
    assert TaskUsage.objects.get(pk=scenario["legacy"].pk).updated_at is not None
    run = BackfillRun.objects.get()

    out, err = revert(str(run.pk), "--execute")

    assert snapshot() == original
    assert TaskUsage.objects.get(pk=scenario["legacy"].pk).updated_at is None
    assert f"Run {run.pk} reverted." in out
    assert f"rows restored  {len(ELIGIBLE)} of {len(ELIGIBLE)}; 0 still to restore" in out
    assert "changed since  0 (left alone)" in out
    assert out.count("rows restored") == 1  # the outcome is said once
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.REVERTED
    assert run.reverted_at is not None
    assert run.error == ""
    assert not BackfillJournal.objects.filter(run=run, reverted_at__isnull=True).exists()
    assert dirty_queue_size() == 0
    assert rollup_mismatches() == []


def test_revert_in_batches_of_one_with_a_tight_lock_budget(
    scenario: dict[str, TaskUsage],
) -> None:
    original = snapshot()
    backfill()
    run = BackfillRun.objects.get()
    result = execute_revert(
        RevertOptions(run_id=run.pk, batch_size=1, max_rollup_lock_seconds=0.05)
    )
    assert (result.rows_restored, result.rows_changed, result.rows_remaining) == (6, 0, 0)
    assert result.batches == len(ELIGIBLE)
    assert result.reverted
    # Five of the six rows have a rollup key (one task has no runtime): rebuilt once each,
    # after the batches, not one drain a batch.
    assert sum(piece.keys for piece in result.rollup.slices) == result.rollup.keys_done == 5
    assert len(result.rollup.slices) < result.batches
    assert snapshot() == original
    assert dirty_queue_size() == 0


def test_row_changed_or_deleted_after_the_run_is_left_alone_and_listed(
    scenario: dict[str, TaskUsage],
) -> None:
    original = snapshot()
    backfill()
    run = BackfillRun.objects.get()
    changed_id = scenario["plain"].pk
    deleted_id = scenario["projectless"].pk
    # Ingestion's UPSERT after the run: new counts, updated_at = now().
    TaskUsage.objects.filter(pk=changed_id).update(input_tokens=5555, updated_at=Now())
    TaskUsage.objects.filter(pk=deleted_id).delete()
    changed_row = TaskUsage.objects.get(pk=changed_id)

    out, err = revert(str(run.pk), "--execute")

    assert "2 rows were changed by someone else since the run" in out
    assert str(changed_id) in out and "5,555" in out
    assert str(deleted_id) in out and "deleted" in out
    assert f"rows restored  {len(ELIGIBLE) - 2} of {len(ELIGIBLE) - 2}; 0 still" in out
    assert "changed since  2 (left alone)" in out
    after = TaskUsage.objects.get(pk=changed_id)
    assert (after.input_tokens, after.updated_at) == (5555, changed_row.updated_at)
    # The others are back as they were.
    expected = {row[0]: row for row in original["task_usage"]}
    for row in table_snapshot("task_usage"):
        if row[0] != changed_id:
            assert row == expected[row[0]]
    # Their journal entries stay active: the repair never touches those rows again.
    active = set(
        BackfillJournal.objects.filter(run=run, reverted_at__isnull=True).values_list(
            "usage_id", flat=True
        )
    )
    assert active == {changed_id, deleted_id}
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.REVERTED
    assert "2 rows changed by others" in run.error
    # Left for the platform's cron tick: the key of the row ingestion rewrote (the tick finds
    # the row by its updated_at), and the deleted row's key, which the platform's delete
    # trigger queued: the own path never drains keys others queued (issue 26, fault 3).
    left = {scenario["plain"].task.runtime_id, scenario["projectless"].task.runtime_id}
    assert {m.key[2] for m in rollup_mismatches()} == left
    assert dirty_queue_size() == 1


def test_reverted_rows_are_eligible_again_and_a_new_execute_repairs_them(
    scenario: dict[str, TaskUsage],
) -> None:
    backfill()
    repaired = snapshot()["task_usage_hourly"]
    first = BackfillRun.objects.get()
    assert load_summary(CUTOFF, None).totals.rows == 0
    revert(str(first.pk), "--execute")
    assert load_summary(CUTOFF, None).totals.rows == len(ELIGIBLE)

    assert "succeeded" in backfill()
    second = BackfillRun.objects.exclude(pk=first.pk).get()
    assert second.rows_updated == len(ELIGIBLE)
    assert TaskUsage.objects.get(pk=scenario["plain"].pk).input_tokens == 700
    assert TaskUsage.objects.get(pk=scenario["clamped"].pk).input_tokens == 0
    assert BackfillJournal.objects.filter(run=second, reverted_at__isnull=True).count() == len(
        ELIGIBLE
    )
    assert snapshot()["task_usage_hourly"] == repaired
    assert rollup_mismatches() == []


def test_a_later_run_verifies_after_an_earlier_run_is_reverted(
    scenario: dict[str, TaskUsage],
) -> None:
    """Found by the chaos soak (schedule 1005): run 1 repaired, run 2 found nothing left,
    then run 1 was reverted. Its rows are eligible again by design, not rows run 2 missed."""
    backfill()
    backfill()
    first, second = BackfillRun.objects.order_by("pk")
    assert second.rows_updated == 0 and second.continues_id is None
    revert(str(first.pk), "--execute")
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--verify", "--run-id", str(second.pk), stdout=out)
    assert f"{len(ELIGIBLE)} eligible rows left (eligible again by design" in out.getvalue()
    # A row written before the cutoff since (never journaled) is still reported as left.
    TaskUsage.objects.filter(pk=scenario["plain"].pk).update(input_tokens=5000)
    make_usage(make_task(make_agent()), input_tokens=900, cache_read_tokens=100)
    with pytest.raises(CommandError) as failed:
        call_command(
            "backfill_codex_usage_cache", "--verify", "--run-id", str(second.pk), stdout=out
        )
    assert failed.value.returncode == 4


def test_dry_run_reports_and_writes_nothing(scenario: dict[str, TaskUsage]) -> None:
    backfill()
    run = BackfillRun.objects.get()
    TaskUsage.objects.filter(pk=scenario["clamped"].pk).update(input_tokens=42, updated_at=Now())
    before = snapshot()
    journal_before = list(BackfillJournal.objects.order_by("id").values())

    out, err = revert(str(run.pk))

    assert f"Mode: revert run {run.pk} (dry run)" in out
    assert f"rows to restore  {len(ELIGIBLE) - 1}\n" in out
    assert "rollup keys      4 hourly keys to rebuild" in out
    assert "changed since    1 (left alone)" in out
    assert str(scenario["clamped"].pk) in out
    assert "nothing was written" in out
    assert snapshot() == before
    assert list(BackfillJournal.objects.order_by("id").values()) == journal_before
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert dirty_queue_size() == 0


# -- rows locked by writers ------------------------------------------------------------------


def test_row_locked_by_a_writer_is_retried_reported_and_finished_by_a_rerun(
    scenario: dict[str, TaskUsage], other_connection: psycopg.Connection, quick_lock_retries: None
) -> None:
    original = snapshot()
    backfill()
    run = BackfillRun.objects.get()
    locked_id = scenario["legacy"].pk
    with other_connection.transaction():
        other_connection.execute(
            compose("SELECT 1 FROM {task_usage} WHERE id = %s FOR UPDATE"), [locked_id]
        )
        result = execute_revert(RevertOptions(run_id=run.pk, lock_retry_delays=(0.05, 0.05)))
        assert (result.rows_restored, result.rows_remaining) == (len(ELIGIBLE) - 1, 1)
        assert not result.reverted
        run.refresh_from_db()
        assert run.status == BackfillRun.Status.SUCCEEDED
        # The command says so with its own exit status.
        error = revert_error(str(run.pk), "--execute")
        assert error.returncode == 3
        assert "1 rows of run" in str(error) and "locked" in str(error)
    # The writer let go: the same revert finishes the job.
    result = execute_revert(RevertOptions(run_id=run.pk))
    assert (result.rows_restored, result.rows_remaining, result.rows_changed) == (1, 0, 0)
    assert result.reverted
    assert snapshot() == original
    assert dirty_queue_size() == 0


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [(), ("--execute",)])
def test_unknown_run(mode: tuple[str, ...]) -> None:
    error = revert_error("987654", *mode)
    assert "run 987654 not found" in str(error)


@pytest.mark.parametrize("mode", [(), ("--execute",)])
def test_run_already_reverted(scenario: dict[str, TaskUsage], mode: tuple[str, ...]) -> None:
    backfill()
    run = BackfillRun.objects.get()
    revert(str(run.pk), "--execute")
    after_first = snapshot()
    error = revert_error(str(run.pk), *mode)
    assert f"run {run.pk} was already reverted" in str(error)
    assert snapshot() == after_first


def make_running_run() -> BackfillRun:
    run = runs.start_run(
        arguments={}, cutoff=CUTOFF, workspace_id=None, batch_size=1000, rollup_state="pending"
    )
    assert run.status == BackfillRun.Status.RUNNING
    return run


def test_run_still_running(other_connection: psycopg.Connection) -> None:
    running = make_running_run()
    other_connection.execute("SELECT pg_advisory_lock(%s)", [runs.RUN_LOCK_ID])
    dry = revert_error(str(running.pk))
    assert f"run {running.pk} is still running" in str(dry)
    execute = revert_error(str(running.pk), "--execute")
    assert f"run {running.pk} (started" in str(execute)
    assert "still running" in str(execute)
    running.refresh_from_db()
    assert running.status == BackfillRun.Status.RUNNING


def test_run_left_running_by_a_dead_process_is_marked_interrupted_then_reverted(
    scenario: dict[str, TaskUsage],
) -> None:
    original = snapshot()
    backfill()
    run = BackfillRun.objects.get()
    BackfillRun.objects.filter(pk=run.pk).update(status=BackfillRun.Status.RUNNING)
    plan = plan_revert(run.pk)
    assert plan.owner_gone and plan.rows_restorable == len(ELIGIBLE)
    out, err = revert(str(run.pk), "--execute")
    assert f"Run {run.pk} had no live owner; marked interrupted." in out
    assert f"Run {run.pk} reverted." in out
    assert snapshot() == original


def test_revert_while_another_run_holds_the_run_lock_names_it(
    scenario: dict[str, TaskUsage], other_connection: psycopg.Connection
) -> None:
    backfill()
    done = BackfillRun.objects.get()
    repaired = snapshot()
    busy = make_running_run()
    other_connection.execute("SELECT pg_advisory_lock(%s)", [runs.RUN_LOCK_ID])

    error = revert_error(str(done.pk), "--execute")

    assert f"run {busy.pk} (started" in str(error)
    assert "still running on this database" in str(error)
    assert snapshot() == repaired
    done.refresh_from_db()
    assert done.status == BackfillRun.Status.SUCCEEDED
    # The dry run does not need the lock.
    out, _ = revert(str(done.pk))
    assert f"rows to restore  {len(ELIGIBLE)}\n" in out


def test_a_key_restored_by_several_batches_counts_once_in_the_outcome() -> None:
    """Issue 26: the revert's "hourly keys queued and rebuilt" and its bar count distinct
    keys, not one a batch: 3 keys, each with rows in four batches of 3."""
    agent = make_agent()
    tasks = [make_task(agent) for _ in range(4)]  # one runtime: their rows share 3 keys
    AgentTaskQueue.objects.filter(agent=agent).update(runtime_id=tasks[0].runtime_id)
    for task in tasks:
        for model in ("m0", "m1", "m2"):
            make_usage(task, model=model)
    populate_rollup()
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    run = BackfillRun.objects.get()
    seen: list[tuple[int, int]] = []

    def progress(event: str, /, **details: Any) -> None:
        if event == "rollup_slice":
            seen.append((details["done"], details["total"]))

    reverted = execute_revert(RevertOptions(run_id=run.pk, batch_size=3), progress=progress)
    assert reverted.reverted and reverted.batches >= 4
    assert reverted.rollup.keys_done == 3
    assert seen[-1] == (3, 3) and all(done <= total for done, total in seen)
    assert rollup_mismatches() == []


# -- the rebuild after the batches (issue 27) ----------------------------------------------


def shared_keys(tasks: int, models: int) -> None:
    """``tasks`` tasks of one agent and runtime, a row of each of ``models`` models each: the
    run's rows share ``models`` hourly keys, whatever batches they fall in."""
    agent = make_agent()
    made = [make_task(agent) for _ in range(tasks)]
    AgentTaskQueue.objects.filter(agent=agent).update(runtime_id=made[0].runtime_id)
    for task in made:
        for model in range(models):
            make_usage(task, model=f"m{model}")
    populate_rollup()


def test_keys_restored_by_three_batches_are_rebuilt_once_each() -> None:
    shared_keys(3, 4)  # 12 rows, 4 keys, each with a row in each batch of 4
    backfill()
    run = BackfillRun.objects.get()
    reverted = execute_revert(RevertOptions(run_id=run.pk, batch_size=4))
    assert reverted.reverted and reverted.batches == 3
    # Per batch, each key would be rebuilt 3 times: once each here.
    assert sum(piece.keys for piece in reverted.rollup.slices) == 4
    assert reverted.rollup.keys_done == 4
    assert dirty_queue_size() == 0
    assert rollup_mismatches() == []


def test_a_revert_stopped_before_its_rebuild_leaves_the_rollup_pending_and_a_rerun_ends_it(
    scenario: dict[str, TaskUsage],
) -> None:
    original = snapshot()
    backfill()
    run = BackfillRun.objects.get()
    stop = threading.Event()

    def stop_after_the_last_batch(event: str, /, **details: Any) -> None:
        if event == "batch" and details["result"].rows_restored == len(ELIGIBLE):
            stop.set()

    stopped = execute_revert(
        RevertOptions(run_id=run.pk, batch_size=2), stop=stop, progress=stop_after_the_last_batch
    )
    assert stopped.stopped and stopped.rows_restored == len(ELIGIBLE)
    assert stopped.rollup.slices == []
    run.refresh_from_db()
    assert (run.status, run.rollup_state) == (BackfillRun.Status.SUCCEEDED, "pending")
    assert snapshot()["task_usage"] == original["task_usage"]
    assert dirty_queue_size() == 5  # the restored rows' keys, for the platform's cron tick
    assert rollup_mismatches() != []

    again = execute_revert(RevertOptions(run_id=run.pk))
    assert again.reverted and again.rows_restored == 0 and again.rollup.keys_done == 5
    run.refresh_from_db()
    assert run.rollup_state == BackfillRun.RollupState.DONE
    assert snapshot() == original
    assert dirty_queue_size() == 0
    assert rollup_mismatches() == []


KEY_SQL = "SELECT {key_columns} FROM pg_temp.codex_rollup_keys WHERE NOT done LIMIT 1"
REQUEUE_SQL = """
UPDATE {task_usage_hourly_dirty} SET enqueued_at = clock_timestamp()
WHERE (bucket_hour, workspace_id, runtime_id, agent_id, provider, model) =
      (%s, %s, %s, %s, %s, %s) AND project_id IS NOT DISTINCT FROM %s"""


def test_a_key_queued_again_by_a_writer_during_a_slice_stays_queued(
    other_connection: psycopg.Connection,
) -> None:
    """A writer queues a key again while the own slice that rebuilds it runs: the slice
    removes only the queue row its snapshot saw, so the key stays queued for the tick."""
    make_keys(12, 6)  # 72 keys: the proof takes 50, the first own slice the rest
    backfill()
    run = BackfillRun.objects.get()
    requeued: list[tuple[Any, ...]] = []

    def requeue_during_the_next_slice(event: str, /, **details: Any) -> None:
        if event != "rollup_slice" or requeued:
            return
        with connection.cursor() as cursor:  # the revert's session, between two slices
            cursor.execute(compose(KEY_SQL))
            requeued.append(cursor.fetchone())
        key = requeued[0]
        # Queued again, committed once the slice waits for the row (its snapshot is older).
        other_connection.execute(compose(REQUEUE_SQL), [*key[:4], *key[5:], key[4]])
        threading.Timer(1.0, other_connection.commit).start()

    reverted = execute_revert(RevertOptions(run_id=run.pk), progress=requeue_during_the_next_slice)
    assert reverted.reverted and requeued
    assert [piece.plan for piece in reverted.rollup.slices] == ["nestloop", "own"]
    with connection.cursor() as cursor:
        cursor.execute(compose("SELECT {key_columns} FROM {task_usage_hourly_dirty}"))
        assert cursor.fetchall() == requeued
    assert rollup_mismatches() == []


def test_on_the_function_path_the_revert_drains_its_keys_by_the_windows_they_were_queued() -> None:
    shared_keys(3, 4)
    backfill()
    run = BackfillRun.objects.get()
    options = RevertOptions(run_id=run.pk, batch_size=4, rollup_path="function")
    reverted = execute_revert(options)
    assert reverted.reverted and reverted.batches == 3
    assert reverted.rollup.path == "function" and reverted.rollup.keys_done == 4
    assert {piece.plan for piece in reverted.rollup.slices} <= {"nestloop", "hash"}
    assert dirty_queue_size() == 0
    assert rollup_mismatches() == []
