"""Bad input never touches a row: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg
import pytest
from django.core.management.base import CommandError
from django.db import connection

from tests.factories import make_agent, make_task, make_usage
from tests.processes import manage
from tests.support import CUTOFF_ARG, backfill
from usage import render
from usage.db import database_now
from usage.models import BackfillRun, TaskUsage
from usage.options import parse_cutoff, parse_duration, parse_run_id, parse_seconds


def run_command(*args: str) -> str:
    return backfill(*args)[0]


@pytest.fixture
def eligible_row(db: None) -> TaskUsage:
    return make_usage(make_task(make_agent()), model="gpt-5-codex")


# Every other bad value is refused before the database is touched: tests/test_options.py.
BAD_ARGUMENTS = [
    (["--cutoff", "2999-01-01T00:00:00Z"], "not before the database's clock"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS)
@pytest.mark.parametrize("execute", [False, True], ids=["dry-run", "execute"])
def test_bad_input_is_refused_and_touches_nothing(
    eligible_row: TaskUsage, args: list[str], message: str, execute: bool
) -> None:
    with pytest.raises(CommandError, match=message) as error:
        run_command(*args, *(["--execute"] if execute else []))
    assert "\n" not in str(error.value)
    row = TaskUsage.objects.get(pk=eligible_row.pk)
    assert (row.input_tokens, row.updated_at) == (1000, eligible_row.updated_at)
    assert BackfillRun.objects.count() == 0


def test_cutoff_is_judged_by_the_database_clock(eligible_row: TaskUsage) -> None:
    """A cutoff a minute in the database's future is refused; a minute in its past is fine."""
    now = database_now()
    future = (now + timedelta(minutes=1)).isoformat()
    with pytest.raises(CommandError, match="not before the database's clock"):
        run_command("--cutoff", future, "--execute")
    assert TaskUsage.objects.get(pk=eligible_row.pk).input_tokens == 1000
    past = (now - timedelta(minutes=1)).isoformat()
    assert "1 rows would change" in run_command("--cutoff", past)


def test_any_offset_is_normalized_to_utc(eligible_row: TaskUsage) -> None:
    output = run_command("--cutoff", "2026-06-13T10:00:00+02:00")
    assert "Cutoff: 2026-06-13T08:00:00Z" in output


def test_missing_rollup_function_is_reported(eligible_row: TaskUsage) -> None:
    with connection.cursor() as cursor:
        cursor.execute("DROP FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz)")
    with pytest.raises(CommandError, match="rollup_task_usage_hourly_window.* not found"):
        run_command("--cutoff", CUTOFF_ARG, "--execute")


def test_missing_table_is_reported(eligible_row: TaskUsage) -> None:
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE agent_task_queue RENAME TO agent_task_queue_moved")
    with pytest.raises(CommandError, match="table agent_task_queue not found"):
        run_command("--cutoff", CUTOFF_ARG)


def test_unmigrated_tool_schema_is_reported(eligible_row: TaskUsage) -> None:
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE backfill_journal RENAME TO backfill_journal_moved")
    with pytest.raises(CommandError, match="python manage.py migrate"):
        run_command("--cutoff", CUTOFF_ARG)


def test_a_tool_schema_behind_this_version_is_reported(eligible_row: TaskUsage) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM django_migrations WHERE app = 'usage' AND name = %s",
            ["0005_run_plan_fingerprint"],
        )
    with pytest.raises(CommandError, match="not migrated to this version") as error:
        run_command("--cutoff", CUTOFF_ARG, "--execute")
    assert "(missing 0005_run_plan_fingerprint)" in str(error.value)
    assert "python manage.py migrate" in str(error.value)
    assert not BackfillRun.objects.exists()


@pytest.mark.slow
def test_unreachable_database_gives_one_line_without_password(
    subprocess_env: dict[str, str],
) -> None:
    env = dict(subprocess_env, DATABASE_URL="postgresql://ops:s3cr3t-pw@127.0.0.1:9/usage")
    result = manage("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, env=env, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("CommandError: database error on 127.0.0.1:9/usage as ops")


@pytest.mark.slow
def test_database_without_the_target_schema_is_reported(
    subprocess_env: dict[str, str], test_database_url: str
) -> None:
    name = f"empty_{uuid.uuid4().hex[:8]}"
    admin_url = test_database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = dict(subprocess_env, DATABASE_URL=test_database_url.rsplit("/", 1)[0] + "/" + name)
        result = manage("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, env=env)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert (
            "table task_usage, agent_task_queue, agent, task_usage_hourly, "
            "task_usage_hourly_dirty, task_usage_hourly_rollup_state not found"
        ) in result.stderr
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# -- the parsers themselves, and values that must be accepted -------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), ("0.5", 0.5), ("0", 0.0), ("500ms", 0.5), ("1m30s", 90.0), ("1s500ms", 1.5)],
)
def test_durations_take_bare_seconds_like_the_timeouts(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert parse_seconds(value, flag="--x", minimum=0, maximum=100) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (" 2s ", "has spaces around it"),
        ("1h1h", "is not a duration"),  # once taken for 2 h
        ("1m1h", "is not a duration"),  # units largest first
        ("5ms1s", "is not a duration"),
    ],
)
def test_a_duration_is_its_units_each_once_largest_first_and_nothing_else(
    value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    "value", ["١٢", "１２", "²", "1_2", "+12", "12.0", "0", "-1", "", "9" * 20]
)
def test_run_ids_are_positive_ascii_numbers(value: str) -> None:
    with pytest.raises(ValueError, match="is not a run number") as refused:
        parse_run_id(value, name="RUN_ID")
    assert str(refused.value).startswith("RUN_ID ")


def test_a_run_id_fits_a_bigint() -> None:
    assert parse_run_id(" 12 ") == 12
    assert parse_run_id(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(ValueError):
        parse_run_id(str(2**63))


def test_year_one_is_rendered_with_four_digits() -> None:
    assert render.timestamp(parse_cutoff("0001-01-01T00:00:00Z")) == "0001-01-01T00:00:00Z"
    assert render.timestamp(parse_cutoff("9999-12-31T23:59:59Z")) == "9999-12-31T23:59:59Z"
    assert render.timestamp(parse_cutoff("2026-06-13T10:00:00+02:00")) == "2026-06-13T08:00:00Z"


def test_a_dry_run_takes_bare_seconds_and_a_year_one_cutoff(eligible_row: TaskUsage) -> None:
    output = run_command("--cutoff", "0001-01-01T00:00:00Z", "--sleep-between-batches", "5")
    assert "Cutoff: 0001-01-01T00:00:00Z" in output
    assert "No eligible Codex rows: nothing to do." in output


def test_an_empty_workspace_id_never_widens_the_repair(eligible_row: TaskUsage) -> None:
    with pytest.raises(CommandError, match="--workspace-id is empty"):
        run_command("--cutoff", CUTOFF_ARG, "--workspace-id", "", "--execute")
    assert TaskUsage.objects.get(pk=eligible_row.pk).input_tokens == 1000
    assert BackfillRun.objects.count() == 0
