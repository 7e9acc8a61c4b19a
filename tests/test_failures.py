"""After a failure, the printed figures and the run record are true, and errors are one line.

On a real PostgreSQL: a table lock that makes every batch time out, a rollup function that
fails inside PL/pgSQL or is terminated mid-call, a revert stopped by SIGTERM, a verify that
finds more differing keys than it lists, a run lock held in another database.
"""

from __future__ import annotations

import io
import json
import signal
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from tests.factories import make_agent, make_task, make_usage, populate_rollup
from tests.processes import error_lines, start_manage
from tests.support import COMMITS, CUTOFF_ARG, command, wait_until
from usage.eligibility import COUNT_ELIGIBLE_SQL, compose, eligible_params
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.options import parse_cutoff
from usage.repair import runs
from usage.repair.revert import plan_revert

pytestmark = COMMITS

ROLLUP = "rollup_task_usage_hourly_window"


def make_rows(count: int) -> list[TaskUsage]:
    """``count`` eligible rows of one task, each its own hourly key (its own model)."""
    task = make_task(make_agent())
    rows = [make_usage(task, model=f"m{n}") for n in range(count)]
    populate_rollup()
    return rows


def still_eligible() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            compose(COUNT_ELIGIBLE_SQL), eligible_params(parse_cutoff(CUTOFF_ARG), None)
        )
        return cursor.fetchone()[0]


@pytest.fixture
def replace_rollup() -> Iterator:
    """Swap the rollup function for a PL/pgSQL body of the test's; put the real one back."""
    schema = settings.CODEX_TARGET_SCHEMA
    signature = "(timestamptz, timestamptz)"
    real = f"{ROLLUP}_real"

    def install(body: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER FUNCTION {schema}.{ROLLUP}{signature} RENAME TO {real}")
            cursor.execute(
                f"CREATE FUNCTION {schema}.{ROLLUP}(p_from timestamptz, p_to timestamptz) "
                f"RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN {body} "
                f"RETURN {schema}.{real}(p_from, p_to); END $$"
            )
        installed.append(True)

    installed: list[bool] = []
    yield install
    if installed:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP FUNCTION {schema}.{ROLLUP}{signature}")
            cursor.execute(f"ALTER FUNCTION {schema}.{real}{signature} RENAME TO {ROLLUP}")


# -- rows remaining are counted -------------------------------------------------------------


def test_a_run_whose_batches_time_out_counts_the_rows_left(other_connection) -> None:
    make_rows(5)
    other_connection.execute("LOCK TABLE task_usage IN SHARE MODE")
    out = io.StringIO()
    with pytest.raises(CommandError, match="a batch timed out 4 times") as failed:
        call_command(
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--execute",
            "--statement-timeout",
            "1ms",
            "--lock-timeout",
            "30s",
            stdout=out,
            stderr=io.StringIO(),
        )
    other_connection.rollback()
    assert "\n" not in str(failed.value)
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.FAILED
    assert (run.rows_planned, run.rows_updated, run.rows_remaining) == (5, 0, 5)
    assert still_eligible() == 5
    assert "rows changed    0 of 5 planned; 5 still eligible" in out.getvalue()
    assert f"Run {run.pk} failed." in out.getvalue()
    assert "canceling statement due to statement timeout" in run.error
    assert "\n" not in run.error


# -- errors are the server's primary message --------------------------------------------------


def test_a_rollup_error_inside_plpgsql_is_one_line_without_its_context(replace_rollup) -> None:
    make_rows(3)
    replace_rollup("PERFORM 1 / (SELECT count(*) - count(*) FROM task_usage);")
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command(
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--execute",
            stdout=out,
            stderr=io.StringIO(),
        )
    message = str(failed.value)
    assert (
        message == "rows repaired, but the rollup rebuild failed: database error: division by zero"
    )
    run = BackfillRun.objects.get()
    assert run.error == message
    assert (run.rows_updated, run.rows_remaining) == (3, 0)
    assert run.rollup_state == BackfillRun.RollupState.PENDING
    assert "rows changed    3 of 3 planned; 0 still eligible" in out.getvalue()
    # Its keys are pending, not absent (issue 26: it said "none to rebuild").
    assert "rollup keys     none rebuilt yet: pending (re-running the same command" in (
        out.getvalue()
    )


@pytest.mark.slow
def test_terminating_the_rollup_gives_one_line_and_a_short_record(
    replace_rollup, subprocess_env: dict[str, str]
) -> None:
    make_rows(4)
    replace_rollup("PERFORM pg_sleep(60);")
    process = start_manage(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", env=subprocess_env
    )

    wait_until(lambda: BackfillRun.objects.exists() or process.poll() is not None, timeout=60)
    backend = BackfillRun.objects.get().backend_pid

    def in_rollup() -> bool:
        """Only this run's own backend, and only while it is inside the rollup call."""
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                " AND datname = current_database() AND state = 'active' AND query LIKE %s",
                [backend, f"%{ROLLUP}%"],
            )
            return cursor.fetchone()[0] == 1

    wait_until(lambda: in_rollup() or process.poll() is not None, timeout=60)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid = %s AND datname = current_database()",
            [backend],
        )
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stdout + stderr
    lines = error_lines(stderr)
    assert lines[-1].startswith("CommandError: rows repaired, but the rollup rebuild failed:")
    assert "terminating connection due to administrator command" in lines[-1]
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.FAILED
    for text in (lines[-1], run.error):
        assert "CONTEXT" not in text and "PL/pgSQL" not in text and "pg_sleep" not in text
        assert len(text) < 300
    assert (run.rows_updated, run.rows_remaining) == (4, 0)
    assert "rows changed    4 of 4 planned; 0 still eligible" in stdout


# -- verify counts every differing key ------------------------------------------------------


def test_verify_counts_every_differing_key_and_lists_some() -> None:
    make_rows(130)
    command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    with connection.cursor() as cursor:
        cursor.execute(compose("UPDATE {task_usage_hourly} SET input_tokens = input_tokens + 1"))
    with pytest.raises(CommandError, match="130 hourly keys wrong") as failed:
        command("backfill_codex_usage_cache", "--verify", "--run-id", str(run.pk))
    assert failed.value.returncode == 4
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command(
            "backfill_codex_usage_cache",
            "--verify",
            "--run-id",
            str(run.pk),
            "--format",
            "json",
            stdout=out,
        )
    document = json.loads(out.getvalue())
    assert document["verify"]["mismatched_keys"] == 130
    assert len(document["verify"]["mismatches"]) == 100  # the list is capped, the count not
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("backfill_codex_usage_cache", "--verify", "--run-id", str(run.pk), stdout=out)
    assert "130 hourly keys differ from a recompute (the first 20 are listed)." in out.getvalue()


# -- a revert stopped by a signal says what the revert did ----------------------------------


@pytest.mark.slow
def test_a_revert_stopped_by_sigterm_prints_its_own_outcome(
    subprocess_env: dict[str, str], other_connection
) -> None:
    rows = make_rows(6)
    command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED
    # A writer holds one repaired row: the revert restores the others, then waits for it.
    other_connection.execute("SELECT 1 FROM task_usage WHERE id = %s FOR UPDATE", [rows[0].pk])
    process = start_manage(
        "revert_codex_usage_backfill", str(run.pk), "--execute", env=subprocess_env
    )
    wait_until(
        lambda: (
            BackfillJournal.objects.filter(reverted_at__isnull=False).count() == 5
            or process.poll() is not None
        ),
        timeout=60,
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    other_connection.rollback()
    assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert f"Revert of run {run.pk} stopped by SIGTERM.\n" in stdout
    assert "rows restored  5 of 6; 1 still to restore" in stdout
    assert f"Run {run.pk} succeeded." not in stdout
    assert error_lines(stderr)[-1] == (
        "CommandError: stopped by SIGTERM after 5 rows restored (see the outcome)"
    )
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.SUCCEEDED  # not reverted until every row is

    out, _ = command("revert_codex_usage_backfill", str(run.pk), "--execute")
    assert f"Run {run.pk} reverted." in out
    assert still_eligible() == 6


# -- a run lock held in another database is not this database's ------------------------------


def test_a_run_lock_held_in_another_database_does_not_make_a_dead_run_look_alive(
    test_database_url: str,
) -> None:
    """Two databases on one server: the other's repair must not block reverting ours."""
    make_rows(2)
    command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    BackfillRun.objects.filter(pk=run.pk).update(status=BackfillRun.Status.RUNNING)
    name = f"neighbour_{uuid.uuid4().hex[:8]}"
    server_url = test_database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(f"{server_url}/{name}", autocommit=True) as neighbour:
            neighbour.execute("SELECT pg_advisory_lock(%s)", [runs.RUN_LOCK_ID])
            plan = plan_revert(run.pk)
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert plan.owner_gone
    assert plan.rows_restorable == 2


# -- a revert that fails leaves its trace ---------------------------------------------------


def test_a_revert_that_fails_midway_says_so_in_its_record(replace_rollup) -> None:
    """Issue 26, point 5: the record said ``succeeded`` with an empty error (the admin shows
    these fields: tests/test_admin_pages.py)."""
    make_rows(6)
    call_command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=io.StringIO()
    )
    run = BackfillRun.objects.get()
    with connection.cursor() as cursor:
        cursor.execute("CREATE SEQUENCE pg_temp.rollup_calls")
    # The hourly rollup fails (a platform outage, say): the revert restores every row, queues
    # their keys, and stops at its rebuild.
    replace_rollup(
        "IF nextval('pg_temp.rollup_calls') > 0 THEN "
        "RAISE EXCEPTION 'hourly rollup unavailable'; END IF;"
    )
    with pytest.raises(CommandError, match="hourly rollup unavailable"):
        call_command(
            "revert_codex_usage_backfill",
            str(run.pk),
            "--execute",
            "--batch-size",
            "2",
            stdout=io.StringIO(),
        )
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.SUCCEEDED  # not reverted: not every row is
    assert run.revert_state == BackfillRun.RevertState.FAILED
    restored = BackfillJournal.objects.filter(run=run, reverted_at__isnull=False).count()
    assert run.rows_restored == restored == 6
    assert run.rollup_state == BackfillRun.RollupState.PENDING  # its keys wait in the queue
    assert "hourly rollup unavailable" in run.revert_error
    assert run.revert_started_at is not None and run.revert_finished_at is not None

    # Run again, with the rollup back: it finishes, and the record says so.
    with connection.cursor() as cursor:
        cursor.execute("ALTER SEQUENCE pg_temp.rollup_calls MINVALUE -1000000 RESTART -1000000")
    call_command("revert_codex_usage_backfill", str(run.pk), "--execute", stdout=io.StringIO())
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.REVERTED
    assert (run.revert_state, run.rows_restored, run.revert_error) == ("done", 6, "")
