"""Faults and concurrency on a real PostgreSQL: locks, signals, kills, timeouts, writers."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from tests.factories import CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.processes import PROJECT_DIR, error_lines, start_manage
from tests.support import COMMITS, CUTOFF_ARG, rollup_mismatches, wait_until
from usage.db import set_local_timeouts
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.repair.backfill import BackfillError, ExecuteOptions, execute_backfill

pytestmark = COMMITS


def make_rows(count: int, agents: int = 3) -> list[TaskUsage]:
    rows = []
    owners = [make_agent() for _ in range(agents)]
    for n in range(count):
        task = make_task(owners[n % agents])
        rows.append(make_usage(task, model=f"m{n % 4}", input_tokens=1000 + n))
    populate_rollup()
    return rows


def repaired_count() -> int:
    return TaskUsage.objects.filter(input_tokens__lt=1000).count()


def test_row_locked_by_a_writer_is_retried_once_released(other_connection) -> None:
    rows = make_rows(6)
    other_connection.execute("SELECT 1 FROM task_usage WHERE id = %s FOR UPDATE", [rows[0].pk])
    release = threading.Timer(0.4, other_connection.rollback)
    release.start()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, lock_retry_delays=(0.3, 0.5, 1.0)))
    release.join()
    assert (result.rows_updated, result.rows_remaining) == (6, 0)
    assert BackfillRun.objects.get().status == BackfillRun.Status.SUCCEEDED
    assert TaskUsage.objects.get(pk=rows[0].pk).input_tokens == 700
    assert rollup_mismatches() == []


def test_a_row_moved_since_the_snapshot_is_found_again_by_its_id(other_connection) -> None:
    """A batch finds its rows where the snapshot saw them; a row a writer moved meanwhile
    (here a new row version with the same eligible values) is repaired by the retry."""
    rows = make_rows(6)

    def move_one_row(event: str, /, **details: object) -> None:
        if event == "planned":  # the snapshot is taken, no batch has run yet
            other_connection.execute(
                "UPDATE task_usage SET output_tokens = output_tokens + 1 WHERE id = %s",
                [rows[2].pk],
            )
            other_connection.commit()

    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, lock_retry_delays=(0.05,)), progress=move_one_row
    )
    # The range batch found 5 rows where the snapshot saw them; a retry found the sixth by
    # its id, and the next retry found nothing left.
    assert (result.rows_updated, result.rows_remaining, result.batches) == (6, 0, 3)
    assert TaskUsage.objects.get(pk=rows[2].pk).input_tokens == 1002 - 300
    assert rollup_mismatches() == []


def test_row_locked_for_the_whole_run_is_reported_never_success(
    other_connection, quick_lock_retries: None
) -> None:
    rows = make_rows(6)
    other_connection.execute("SELECT 1 FROM task_usage WHERE id = %s FOR UPDATE", [rows[0].pk])
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 eligible rows were locked") as error:
        call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    assert error.value.returncode == 3
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.FAILED
    assert (run.rows_updated, run.rows_remaining) == (5, 1)
    assert "locked" in run.error
    assert rollup_mismatches() == []
    other_connection.rollback()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    assert repaired_count() == 6
    assert BackfillJournal.objects.count() == 6


def test_lock_timeout_rolls_back_and_retries_with_a_smaller_batch(other_connection) -> None:
    make_rows(4)
    other_connection.execute("LOCK TABLE task_usage IN SHARE MODE")
    release = threading.Timer(0.8, other_connection.rollback)
    release.start()
    sizes: list[int] = []
    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, batch_size=4, lock_timeout=0.5),
        progress=lambda event, **d: sizes.append(d["batch"].batch_size) if event == "batch" else 0,
    )
    release.join()
    assert result.rows_updated == 4
    assert sizes[0] == 2  # the first attempt (4 rows) timed out and was retried with 2
    assert sum(1 for _ in sizes) >= 2
    assert BackfillJournal.objects.count() == 4


@pytest.mark.parametrize(
    ("given", "expected"), [(1.001, "1001ms"), (0.0015, "2ms"), (0.0001, "1ms"), (2.5, "2500ms")]
)
def test_a_batch_gets_the_timeouts_asked_for_to_the_millisecond(given, expected) -> None:
    """``--lock-timeout 1001ms`` is 1001ms on the server (1.001 * 1000 is 1000.999...)."""
    with transaction.atomic(), connection.cursor() as cursor:
        set_local_timeouts(cursor, given, given)
        cursor.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
        )
        assert cursor.fetchone() == (expected, expected)


def test_statement_timeout_stops_cleanly_after_bounded_retries(other_connection) -> None:
    make_rows(4)
    other_connection.execute("LOCK TABLE task_usage IN SHARE MODE")
    with pytest.raises(BackfillError, match="timed out 4 times") as error:
        execute_backfill(
            ExecuteOptions(cutoff=CUTOFF, batch_size=8, lock_timeout=30, statement_timeout=0.1)
        )
    other_connection.rollback()
    assert error.value.result is not None and error.value.result.rows_updated == 0
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.FAILED
    assert "timed out" in run.error
    assert repaired_count() == 0
    assert BackfillJournal.objects.count() == 0


def _start_slow_run(env: dict[str, str]):
    return start_manage(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--batch-size",
        "2",
        "--sleep-between-batches",
        "250ms",
        env=env,
    )


def _journaled() -> int:
    return BackfillJournal.objects.count()


@pytest.mark.slow
def test_sigterm_stops_between_batches_rebuilds_rollup_and_rerun_resumes(subprocess_env) -> None:
    make_rows(24)
    process = _start_slow_run(subprocess_env)
    wait_until(lambda: _journaled() >= 4)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr
    assert "Traceback" not in stderr
    run = BackfillRun.objects.get()
    # What next is said once, in the outcome; the last line is the exit's reason alone.
    assert f"Next: re-run the same command; the new run continues run {run.pk}" in stdout
    assert error_lines(stderr)[-1] == (
        f"CommandError: stopped by SIGTERM: run {run.pk} interrupted after "
        f"{run.rows_updated} rows (see the outcome)"
    )
    assert run.status == BackfillRun.Status.INTERRUPTED
    assert 0 < run.rows_updated < 24
    assert run.rows_updated == _journaled() == repaired_count()
    assert run.rollup_state == BackfillRun.RollupState.DONE
    assert rollup_mismatches() == []

    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    assert repaired_count() == 24 == _journaled()
    assert rollup_mismatches() == []


@pytest.mark.slow
def test_kill_9_leaves_a_stale_run_that_the_next_run_recovers(subprocess_env) -> None:
    make_rows(24)
    process = _start_slow_run(subprocess_env)
    wait_until(lambda: _journaled() >= 4)
    process.kill()
    process.communicate(timeout=30)
    crashed = BackfillRun.objects.get()
    assert crashed.status == BackfillRun.Status.RUNNING
    assert crashed.rollup_state == BackfillRun.RollupState.PENDING
    assert rollup_mismatches() != []  # the crashed run's rows are not rolled up yet

    def backend_gone() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [crashed.backend_pid]
            )
            return cursor.fetchone()[0] == 0

    wait_until(backend_gone)
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        stdout=out,
        stderr=err,
    )
    assert f"Run {crashed.pk} had no live owner; marked interrupted." in out.getvalue()
    crashed.refresh_from_db()
    assert crashed.status == BackfillRun.Status.INTERRUPTED
    assert crashed.rollup_state == BackfillRun.RollupState.DONE
    assert f"including runs {crashed.pk}" in out.getvalue()
    assert repaired_count() == 24 == _journaled()
    assert rollup_mismatches() == []


@pytest.mark.slow
def test_dropped_connection_fails_the_run_cleanly_and_rerun_completes(subprocess_env) -> None:
    make_rows(24)
    process = _start_slow_run(subprocess_env)
    wait_until(lambda: _journaled() >= 4)
    run = BackfillRun.objects.get()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [run.backend_pid])
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Traceback" not in stderr
    assert "CommandError: database error" in stderr
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.FAILED
    assert run.rows_updated == _journaled() == repaired_count()
    # Counted on a fresh connection, not assumed: every row not repaired is still eligible.
    assert run.rows_remaining == 24 - run.rows_updated > 0
    assert (
        f"rows changed    {run.rows_updated} of {run.rows_planned} planned; "
        f"{run.rows_remaining} still eligible" in stdout
    )
    assert "\n" not in run.error and "CONTEXT" not in run.error
    call_command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=io.StringIO()
    )
    assert repaired_count() == 24 == _journaled()
    assert rollup_mismatches() == []


@pytest.mark.slow
def test_second_execute_fails_at_once_naming_the_running_run(subprocess_env) -> None:
    make_rows(24)
    process = _start_slow_run(subprocess_env)
    try:
        wait_until(lambda: _journaled() >= 2)
        running = BackfillRun.objects.get()
        started = time.monotonic()
        with pytest.raises(CommandError, match=f"run {running.pk} .* is still running"):
            call_command(
                "backfill_codex_usage_cache",
                "--cutoff",
                CUTOFF_ARG,
                "--execute",
                stdout=io.StringIO(),
            )
        assert time.monotonic() - started < 5
        assert BackfillRun.objects.count() == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


class Writer(threading.Thread):
    """Ingestion stand-in: upserts eligible, post-cutoff and new rows, holding row locks."""

    def __init__(self, url: str, rows: list[TaskUsage], seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.rows, self.seconds = url, rows, seconds
        self.written: dict[uuid.UUID, int] = {}
        self.new_rows = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        step = 0
        with psycopg.connect(self.url) as conn:
            while time.monotonic() < deadline:
                row = self.rows[(step * 7) % len(self.rows)]
                value = 5000 + step
                with conn.transaction():
                    # Re-ingest an existing row: the normalized value, updated_at = now().
                    conn.execute(
                        "INSERT INTO task_usage (task_id, provider, model, input_tokens,"
                        " cache_read_tokens, created_at) VALUES (%s, %s, %s, %s, 300, %s)"
                        " ON CONFLICT (task_id, provider, model) DO UPDATE SET"
                        " input_tokens = EXCLUDED.input_tokens,"
                        " cache_read_tokens = EXCLUDED.cache_read_tokens, updated_at = now()",
                        [row.task_id, row.provider, row.model, value, row.created_at],
                    )
                    self.written[row.pk] = value
                    # A brand-new row of the same task.
                    conn.execute(
                        "INSERT INTO task_usage (task_id, provider, model, input_tokens,"
                        " cache_read_tokens) VALUES (%s, 'codex', %s, 900, 100)",
                        [row.task_id, f"new-{step}"],
                    )
                    self.new_rows += 1
                    # Hold another eligible row's lock for a while, then let it go untouched.
                    held = self.rows[(step * 7 + 3) % len(self.rows)]
                    conn.execute("SELECT 1 FROM task_usage WHERE id = %s FOR UPDATE", [held.pk])
                    time.sleep(0.08)
                step += 1


@pytest.mark.slow
def test_concurrent_ingestion_loses_nothing_and_repairs_exactly_once(test_database_url) -> None:
    rows = make_rows(60, agents=4)
    original = {r.pk: r.input_tokens for r in rows}
    writer = Writer(test_database_url, rows, seconds=1.5)
    alive_at_rollup: list[bool] = []

    def progress(event: str, **details: object) -> None:
        if event == "started":
            writer.start()
        elif event == "rollup_slice":
            alive_at_rollup.append(writer.is_alive())

    result = execute_backfill(
        ExecuteOptions(
            cutoff=CUTOFF,
            batch_size=4,
            sleep_between_batches=0.15,
            lock_retry_delays=(0.2, 0.5, 1.0, 2.0),
        ),
        progress=progress,
    )
    writer.join(10)
    assert writer.error is None
    assert alive_at_rollup and not any(alive_at_rollup)
    assert writer.written, "the writer did not get to write"
    assert result.rows_remaining == 0

    journal = {e.usage_id: e for e in BackfillJournal.objects.all()}
    assert len(journal) == result.rows_updated
    for pk, before in original.items():
        now = TaskUsage.objects.get(pk=pk).input_tokens
        if pk in writer.written:
            assert now == writer.written[pk], "a writer's update was lost"
        else:
            assert pk in journal, "an eligible row was left unrepaired"
            assert now == before - 300
            assert journal[pk].old_input_tokens == before
    assert TaskUsage.objects.filter(model__startswith="new-").count() == writer.new_rows
    assert TaskUsage.objects.filter(model__startswith="new-", input_tokens=900).count() == (
        writer.new_rows
    )
    # Every hourly key the run touched is right at once; keys only the writer touched wait
    # for the platform's cron tick, which a window call over the writer's time stands in for.
    assert rollup_mismatches(run_ids=[result.run.pk]) == []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT rollup_task_usage_hourly_window(%s, now())", [result.run.started_at]
        )
    assert rollup_mismatches() == []


# The main thread, interrupted while it holds the stop event's lock (as Event.wait does as it
# returns): the handler must not wait for that lock. Found by the chaos soak (schedule 110: a
# SIGTERM during --sleep-between-batches hung the run for ever).
SIGNAL_WHILE_WAITING = """
import os, signal, threading, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")
django.setup()
from usage.management.commands.backfill_codex_usage_cache import Command

stop = threading.Event()
with Command().stopping_on_signals(stop, "stopping.") as received:
    with stop._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        received = list(received)  # the handler has run by now, in this thread
    print("stop set" if stop.wait(10) else "stop not set", received, flush=True)
"""


@pytest.mark.slow
def test_a_signal_that_lands_while_the_stop_event_is_locked_does_not_hang() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_WAITING],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stop set [{int(signal.SIGTERM)}]", done.stdout
    assert "SIGTERM received: stopping." in done.stderr


def _rollup_blocker(connection_: psycopg.Connection, application: str, statement: str) -> int:
    """Make ``connection_`` another writer named ``application`` that holds ``statement``'s
    locks in an open transaction; its backend pid."""
    connection_.execute(f"SET application_name = '{application}'")
    connection_.commit()
    connection_.execute(statement)
    return connection_.info.backend_pid


def test_row_locks_on_the_hourly_table_are_named_as_such_with_their_holder(
    other_connection,
) -> None:
    """Issue 26, fault 1: a writer's row locks on task_usage_hourly are not "lock 4246 busy";
    the error names the session that holds them, and once it lets go a re-run finishes."""
    make_rows(6)
    pid = _rollup_blocker(
        other_connection, "dashboard-job", "SELECT 1 FROM task_usage_hourly FOR UPDATE"
    )
    with pytest.raises(BackfillError) as error:
        execute_backfill(ExecuteOptions(cutoff=CUTOFF, lock_timeout=0.2))
    message = str(error.value)
    assert "rows of the hourly rollup stayed locked by another session in 5 tries of 0.2s" in (
        message
    )
    assert f"pid {pid} (application 'dashboard-job', transaction open since " in message
    assert "idle in transaction" in message and "commit or end it" in message
    assert "could not take rollup lock" not in message
    run = BackfillRun.objects.get()
    assert (run.status, run.rollup_state) == (BackfillRun.Status.FAILED, "pending")
    assert run.rows_updated == 6 and f"pid {pid}" in run.error

    other_connection.rollback()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.run.status == BackfillRun.Status.SUCCEEDED
    assert BackfillRun.objects.get(pk=run.pk).rollup_state == "done"
    assert repaired_count() == 6 and rollup_mismatches() == []


def test_lock_4246_held_elsewhere_is_named_with_its_holder(other_connection) -> None:
    make_rows(3)
    pid = _rollup_blocker(other_connection, "stuck-maintenance", "SELECT pg_advisory_lock(4246)")
    try:
        with pytest.raises(BackfillError) as error:
            execute_backfill(ExecuteOptions(cutoff=CUTOFF, lock_timeout=0.2))
    finally:
        other_connection.execute("SELECT pg_advisory_unlock(4246)")
        other_connection.rollback()
    message = str(error.value)
    assert "could not take rollup lock 4246 in 5 tries of 0.2s: held by " in message
    assert f"pid {pid} (application 'stuck-maintenance'" in message
    assert BackfillRun.objects.get().rollup_state == "pending"
    execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert rollup_mismatches() == []
