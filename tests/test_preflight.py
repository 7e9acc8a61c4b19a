"""The pre-flight checks: each one on the test database, and the runbook's ``-m preflight``.

Part one breaks the test database's target schema inside the test's own transaction (rolled
back afterwards) and asserts that the right check fails with the right advice.

Part two (``@pytest.mark.preflight``) is the runbook's pre-flight: it runs every check, one
test each, against the REAL target database (``DATABASE_URL``, or the sandbox's own
``codex_usage`` database when unset), never against pytest's test database, read-only.
It is opt-in, because the ordinary suite runs against databases that are not targets:

    DATABASE_URL=postgresql://USER@HOST:5432/DB CODEX_BACKFILL_CUTOFF=2026-06-13T08:00:00Z \\
        python -m pytest -m preflight

(``CODEX_BACKFILL_WORKSPACE_ID`` narrows it to one workspace,
``CODEX_PREFLIGHT_STATEMENT_TIMEOUT`` (default 60s) bounds each query, and
``CODEX_PREFLIGHT=1`` opts in without ``-m``.)
"""

from __future__ import annotations

import io
import os
import re
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from tests.factories import (
    AFTER,
    BEFORE,
    CUTOFF,
    make_agent,
    make_task,
    make_usage,
    set_rollup_state,
)
from tests.processes import manage
from tests.support import CUTOFF_ARG, connect_target, opted_in
from usage.eligibility import compose
from usage.management.commands.preflight_codex_usage_backfill import Command
from usage.models import BackfillJournal, BackfillRun
from usage.options import parse_cutoff, parse_seconds, parse_workspace_id
from usage.preflight import (
    CHECK_NAMES,
    Check,
    CheckResult,
    Context,
    passed,
    run_preflight,
)


def results(
    cutoff: datetime = CUTOFF, workspace_id: uuid.UUID | None = None
) -> dict[str, CheckResult]:
    return {r.name: r for r in run_preflight(cutoff, workspace_id)}


def sql(template: str) -> None:
    """Run DDL or DML on the test database with schema-qualified names."""
    with connection.cursor() as cursor:
        cursor.execute(compose(template))


def failing(found: dict[str, CheckResult]) -> set[str]:
    return {name for name, result in found.items() if not result.ok}


@pytest.fixture
def usage_rows() -> None:
    """Eligible rows before the cutoff and normalized ones after it, as in production."""
    task = make_task(make_agent())
    for _ in range(3):
        make_usage(task, input_tokens=1300, cache_read_tokens=300, created_at=BEFORE)
    make_usage(task, input_tokens=100, cache_read_tokens=300, created_at=AFTER)
    # The platform's cron tick runs: its last tick started a minute ago.
    set_rollup_state(AFTER + timedelta(hours=1), datetime.now(UTC) - timedelta(minutes=1))


# -- part one: each check on the test database ----------------------------------------------


@pytest.mark.django_db
def test_a_cron_tick_that_stopped_long_ago_is_a_warning(usage_rows: None) -> None:
    set_rollup_state(AFTER + timedelta(hours=1), datetime.now(UTC) - timedelta(days=166))
    found = results()["rollup_cron"]
    assert found.status == "warn"
    assert re.search(r"last cron tick started 16[56] days ago", found.detail), found.detail
    assert "scheduler looks stopped" in found.fix
    # Said first, once, and in words (issue 26: it came last, after 604,799,999,999 µs).
    assert found.detail.startswith("the platform's scheduler looks stopped: its last cron tick")
    assert found.detail.count("last cron tick started") == 1
    assert "microseconds" not in found.detail and len(found.detail) < 260, found.detail


@pytest.mark.django_db
def test_a_cron_tick_that_never_ran_is_said_once(usage_rows: None) -> None:
    set_rollup_state(datetime(1970, 1, 1, tzinfo=UTC), None)
    found = results()["rollup_cron"]
    assert found.status == "warn"
    assert found.detail.count("never ran") == 1, found.detail
    assert "microseconds" not in found.detail and len(found.detail) < 260, found.detail


@pytest.mark.django_db
def test_good_schema_passes_every_check(usage_rows: None) -> None:
    found = results()
    assert list(found) == list(CHECK_NAMES)
    assert {name: r.status for name, r in found.items()} == dict.fromkeys(CHECK_NAMES, "ok")
    assert "3 eligible Codex rows" in found["candidates"].detail
    assert "no streaming replicas" in found["replication"].detail


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            "ALTER TABLE {task_usage} RENAME COLUMN cache_read_tokens TO cached_tokens",
            "task_usage.cache_read_tokens is missing",
        ),
        (
            "ALTER TABLE {task_usage} ALTER COLUMN updated_at TYPE timestamp",
            "task_usage.updated_at is timestamp without time zone, expected timestamp with",
        ),
        (
            "ALTER TABLE {agent} ALTER COLUMN workspace_id TYPE text",
            "agent.workspace_id is text, expected uuid",
        ),
        ("ALTER TABLE {task_usage_hourly} DROP COLUMN event_count", "event_count is missing"),
    ],
    ids=["renamed", "retyped-timestamp", "retyped-uuid", "dropped"],
)
def test_changed_columns_fail_the_columns_check(
    usage_rows: None, change: str, expected: str
) -> None:
    sql(change)
    found = results()
    assert expected in found["columns"].detail
    assert "CODEX_TARGET_SCHEMA" in found["columns"].fix
    # What builds on the columns is not run on a schema the tool does not understand.
    assert found["candidates"].status == "skip"
    assert failing(found) == {"columns", "candidates", "after_cutoff"}


@pytest.mark.django_db
def test_missing_table_fails_the_tables_check() -> None:
    sql("ALTER TABLE {task_usage_hourly_dirty} RENAME TO task_usage_hourly_dirty_old")
    try:
        found = results()
    finally:
        # Renamed back before the suite's clean-up, which truncates it by name.
        sql(
            "ALTER TABLE {target_schema}.task_usage_hourly_dirty_old"
            " RENAME TO task_usage_hourly_dirty"
        )
    assert not found["tables"].ok
    assert "task_usage_hourly_dirty" in found["tables"].detail
    assert "DATABASE_URL" in found["tables"].fix
    assert {"columns", "indexes", "privileges"} <= failing(found)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "expected", "statement"),
    [
        (
            "DROP INDEX {target_schema}.idx_task_usage_updated_at",
            "no usable index on task_usage(updated_at)",
            "CREATE INDEX CONCURRENTLY ON public.task_usage (updated_at);",
        ),
        (
            # The partial legacy index on created_at remains, and must not count.
            "DROP INDEX {target_schema}.idx_task_usage_created_at",
            "no usable index on task_usage(created_at)",
            "CREATE INDEX CONCURRENTLY ON public.task_usage (created_at);",
        ),
        (
            "ALTER TABLE {task_usage} DROP CONSTRAINT task_usage_pkey",
            "no usable unique index (primary key) on task_usage(id)",
            "CREATE UNIQUE INDEX CONCURRENTLY ON public.task_usage (id);",
        ),
        (
            # task_id is the leading column of the unique key too: both must go.
            "DROP INDEX {target_schema}.idx_task_usage_task_id;"
            "ALTER TABLE {task_usage} DROP CONSTRAINT uq_task_usage_task_provider_model",
            "no usable index on task_usage(task_id)",
            "CREATE INDEX CONCURRENTLY ON public.task_usage (task_id);",
        ),
        (
            "DROP INDEX {target_schema}.idx_task_usage_updated_at;"
            "CREATE INDEX idx_task_usage_updated_at ON {task_usage} (updated_at)"
            " WHERE updated_at IS NOT NULL;"
            "CREATE INDEX idx_task_usage_updated_at_hash ON {task_usage} USING hash (updated_at)",
            "no usable index on task_usage(updated_at)",
            "(updated_at);",
        ),
    ],
    ids=["updated_at", "created_at", "primary-key", "task_id", "partial-or-hash"],
)
def test_missing_index_fails_with_the_statement_to_restore_it(
    change: str, expected: str, statement: str
) -> None:
    sql(change)
    found = results()
    assert not found["indexes"].ok
    assert expected in found["indexes"].detail
    assert statement in found["indexes"].fix


@pytest.mark.django_db
def test_indexes_are_judged_by_leading_column_not_by_name(usage_rows: None) -> None:
    sql(
        "DROP INDEX {target_schema}.idx_task_usage_created_at;"
        "ALTER INDEX {target_schema}.idx_task_usage_updated_at RENAME TO anything;"
        "CREATE INDEX some_other_name ON {task_usage} (created_at, id)"
    )
    assert results()["indexes"].ok


@pytest.mark.django_db
def test_missing_rollup_function_fails_and_blocks_the_privilege_check() -> None:
    sql("DROP FUNCTION {rollup_task_usage_hourly_window}(timestamptz, timestamptz)")
    found = results()
    assert not found["rollup_function"].ok
    assert "not found" in found["rollup_function"].detail
    assert "deploy the application migration" in found["rollup_function"].fix
    assert found["privileges"].status == "skip"


@pytest.mark.django_db
def test_rollup_function_with_another_signature_or_result_fails() -> None:
    sql(
        "DROP FUNCTION {rollup_task_usage_hourly_window}(timestamptz, timestamptz);"
        "CREATE FUNCTION {rollup_task_usage_hourly_window}(p_from timestamp, p_to timestamp)"
        " RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint'"
    )
    detail = results()["rollup_function"].detail
    assert "found only" in detail
    assert "(timestamp without time zone,timestamp without time zone)" in detail

    sql(
        "DROP FUNCTION {rollup_task_usage_hourly_window}(timestamp, timestamp);"
        "CREATE FUNCTION {rollup_task_usage_hourly_window}(p_from timestamptz, p_to timestamptz)"
        " RETURNS integer LANGUAGE sql AS 'SELECT 0'"
    )
    assert "returns integer, expected bigint" in results()["rollup_function"].detail


@pytest.mark.django_db
def test_missing_privileges_are_named_with_the_grants_that_fix_them(usage_rows: None) -> None:
    role = f"codex_preflight_{uuid.uuid4().hex[:12]}"
    sql(
        f"CREATE ROLE {role};"
        f"GRANT USAGE ON SCHEMA {{target_schema}}, {{tool_schema}} TO {role};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{target_schema}} TO {role};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{tool_schema}} TO {role};"
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {role}")
        found = results()
        cursor.execute("RESET ROLE")
    check = found["privileges"]
    assert not check.ok
    assert check.detail.startswith(f'role {role} lacks UPDATE on "public"."task_usage"')
    assert 'INSERT on "public"."task_usage_hourly"' in check.detail  # caller's privileges
    assert 'INSERT on "codex_repair"."backfill_journal"' in check.detail
    assert failing(found) == {"privileges"}

    # The suggested statements are exactly what is missing.
    sql(";".join(re.findall(r"GRANT [^;]+", check.fix)))
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {role}")
        assert results()["privileges"].ok
        cursor.execute("RESET ROLE")


@pytest.mark.django_db
def test_a_security_definer_rollup_needs_no_hourly_write_privileges() -> None:
    role = f"codex_preflight_{uuid.uuid4().hex[:12]}"
    sql(
        "ALTER FUNCTION {rollup_task_usage_hourly_window}(timestamptz, timestamptz)"
        " SECURITY DEFINER;"
        f"CREATE ROLE {role};"
        f"GRANT USAGE ON SCHEMA {{target_schema}}, {{tool_schema}} TO {role};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{target_schema}} TO {role};"
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {{tool_schema}} TO {role};"
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {role}")
        detail = results()["privileges"].detail
        cursor.execute("RESET ROLE")
    # A security definer rollup writes the hourly table itself; the repair's own enqueue
    # (an upsert into the queue) still needs INSERT and UPDATE there.
    assert detail == (
        f'role {role} lacks UPDATE on "public"."task_usage" (the rows are rewritten), '
        'INSERT on "public"."task_usage_hourly_dirty" (queueing keys), '
        'UPDATE on "public"."task_usage_hourly_dirty" (queueing keys)'
    )


@pytest.mark.django_db
def test_unmigrated_tool_schema_fails_with_migrate_advice(usage_rows: None) -> None:
    sql("DELETE FROM {tool_schema}.django_migrations WHERE app = 'usage'")
    found = results()
    assert not found["tool_schema"].ok
    assert "unapplied migrations: usage.0001_initial" in found["tool_schema"].detail
    assert "python manage.py migrate" in found["tool_schema"].fix
    assert found["candidates"].status == "skip"


@pytest.mark.django_db
def test_cutoff_must_be_in_the_databases_past(usage_rows: None) -> None:
    future = timezone.now() + timedelta(days=1)
    check = results(cutoff=future)["cutoff"]
    assert not check.ok
    assert "not before the database's clock" in check.detail

    early = results(cutoff=CUTOFF - timedelta(days=30))["cutoff"]
    assert early.status == "warn"
    assert "earlier than the fix landed upstream (2026-06-13)" in early.detail


@pytest.mark.django_db
@pytest.mark.parametrize("cutoff", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_a_cutoff_at_the_edge_of_the_calendar_is_checked_not_crashed(
    usage_rows: None, cutoff: str
) -> None:
    """The neighbourhood a week around the cutoff stays within years 1 to 9999."""
    found = results(cutoff=parse_cutoff(cutoff))
    assert found["after_cutoff"].status in ("ok", "warn"), found["after_cutoff"].detail
    assert found["cutoff"].ok == cutoff.startswith("0001")


@pytest.mark.django_db
def test_no_candidates_fails_unless_earlier_runs_repaired_them() -> None:
    check = results()["candidates"]
    assert not check.ok
    assert "no eligible Codex rows before the cutoff" in check.detail
    assert "--cutoff" in check.fix

    run = BackfillRun.objects.create(cutoff=CUTOFF, batch_size=10, started_at=timezone.now())
    BackfillJournal.objects.create(
        run=run,
        usage_id=uuid.uuid4(),
        old_input_tokens=1300,
        new_input_tokens=1000,
        cache_read_tokens=300,
        new_updated_at=timezone.now(),
    )
    check = results()["candidates"]
    assert check.ok
    assert "earlier runs repaired them" in check.detail


@pytest.mark.django_db
def test_unknown_workspace_fails(usage_rows: None) -> None:
    check = results(workspace_id=uuid.uuid4())["candidates"]
    assert not check.ok
    assert "no agent belongs to workspace" in check.detail


def _rows(count: int, *, input_tokens: int, cache_read_tokens: int, created_at: datetime) -> None:
    task = make_task(make_agent())
    for _ in range(count):
        make_usage(
            task,
            input_tokens=input_tokens,
            cache_read_tokens=cache_read_tokens,
            created_at=created_at,
        )


@pytest.mark.django_db
def test_rows_after_the_cutoff_that_still_look_unnormalized_warn(usage_rows: None) -> None:
    _rows(25, input_tokens=1300, cache_read_tokens=300, created_at=AFTER)
    check = results()["after_cutoff"]
    assert check.status == "warn"
    assert "after it 25 of 26 (96%)" in check.detail
    assert "deployed later than --cutoff" in check.fix


@pytest.mark.django_db
def test_rows_before_the_cutoff_that_already_look_normalized_warn(usage_rows: None) -> None:
    _rows(25, input_tokens=100, cache_read_tokens=300, created_at=BEFORE)
    check = results()["after_cutoff"]
    assert check.status == "warn"
    assert "before the cutoff 3 of 28 (11%)" in check.detail
    assert "deployed earlier than --cutoff" in check.fix


@pytest.mark.django_db
def test_normalized_rows_after_the_cutoff_pass(usage_rows: None) -> None:
    _rows(25, input_tokens=1300, cache_read_tokens=300, created_at=BEFORE)
    _rows(20, input_tokens=100, cache_read_tokens=300, created_at=AFTER)
    _rows(5, input_tokens=900, cache_read_tokens=300, created_at=AFTER)  # small cache hits
    check = results()["after_cutoff"]
    assert check.status == "ok", check.detail
    assert "after it 5 of 26 (19%)" in check.detail


@pytest.mark.django_db
def test_a_slow_check_is_cancelled_by_the_statement_timeout() -> None:
    def sleeps(ctx: Context) -> CheckResult:
        ctx.one("SELECT pg_sleep(5)")
        return passed("slept")

    started = time.monotonic()
    (result,) = run_preflight(CUTOFF, checks=[Check("sleeps", "", sleeps)], statement_timeout=0.2)
    assert time.monotonic() - started < 3
    assert not result.ok
    assert "canceling statement due to statement timeout" in result.detail
    assert "longer --statement-timeout" in result.fix


@pytest.mark.django_db
def test_checks_run_read_only_and_leave_the_session_writable() -> None:
    def writes(ctx: Context) -> CheckResult:
        ctx.cursor.execute(compose("DELETE FROM {task_usage_hourly_dirty}"))
        return passed("wrote")

    def reads(ctx: Context) -> CheckResult:
        return passed(str(ctx.one("SELECT current_setting('transaction_read_only')")[0]))

    found = {
        r.name: r
        for r in run_preflight(CUTOFF, checks=[Check("writes", "", writes), Check("r", "", reads)])
    }
    assert not found["writes"].ok
    assert "read-only transaction" in found["writes"].detail
    assert found["r"].ok and found["r"].detail == "on"  # a failed check spoils nothing else
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('transaction_read_only')")
        assert cursor.fetchone()[0] == "off"


# -- the command ----------------------------------------------------------------------------


def preflight_command(*args: str, verbosity: int = 1) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(
            "preflight_codex_usage_backfill", *args, verbosity=verbosity, stdout=out, stderr=err
        )
    except CommandError as exc:
        raise CommandError(f"{exc}\n--stdout--\n{out.getvalue()}") from exc
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_command_prints_the_checklist(usage_rows: None) -> None:
    out, _ = preflight_command("--cutoff", CUTOFF_ARG)
    assert "(read-only), cutoff 2026-06-13T08:00:00Z, workspace all" in out
    for name in CHECK_NAMES:
        assert f"[ok]   {name}: " in out
    assert "16 checks: 16 passed, 0 with warnings, 0 failed, 0 not checked." in out


@pytest.mark.django_db
def test_command_fails_with_what_to_do(usage_rows: None) -> None:
    sql("DROP INDEX {target_schema}.idx_task_usage_updated_at")
    with pytest.raises(CommandError) as raised:
        preflight_command("--cutoff", CUTOFF_ARG)
    message = str(raised.value)
    assert message.startswith("pre-flight failed: indexes;")
    assert "[FAIL] indexes: no usable index on task_usage(updated_at)" in message
    assert "what to do: restore the application's indexes" in message
    assert "16 checks: 15 passed, 0 with warnings, 1 failed, 0 not checked." in message


@pytest.mark.django_db
def test_command_verbosity(usage_rows: None) -> None:
    quiet, _ = preflight_command("--cutoff", CUTOFF_ARG, verbosity=0)
    assert quiet == ""
    _rows(25, input_tokens=1300, cache_read_tokens=300, created_at=AFTER)
    quiet, _ = preflight_command("--cutoff", CUTOFF_ARG, verbosity=0)
    assert quiet.splitlines()[0].startswith("[warn] after_cutoff: ")
    assert "[ok]" not in quiet

    detailed, _ = preflight_command("--cutoff", CUTOFF_ARG, verbosity=2)
    assert re.search(r"\[ok\]   tables: .* \(\d+\.\d{3}s\)", detailed)
    assert "checked: the indexes the tool relies on" in detailed

    _, statements = preflight_command("--cutoff", CUTOFF_ARG, verbosity=3)
    assert "SQL: SELECT current_setting('server_version_num')" in statements


def test_command_help_is_complete_with_examples() -> None:
    text = Command().create_parser("manage.py", "preflight_codex_usage_backfill").format_help()
    for option in ("--cutoff", "--workspace-id", "--statement-timeout", "--verbosity"):
        assert option in text
    assert "examples:" in text
    assert "python manage.py preflight_codex_usage_backfill --cutoff 2026-06-13T08:00:00Z" in text
    assert "python -m pytest -m preflight" in text
    for name in CHECK_NAMES:
        assert f"  {name} " in text


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_command_exit_status_as_a_process(subprocess_env: dict[str, str]) -> None:
    task = make_task(make_agent())
    make_usage(task, created_at=BEFORE)
    ok = manage("preflight_codex_usage_backfill", "--cutoff", CUTOFF_ARG, env=subprocess_env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The test database's cron tick never ran: a warning (the repair stamps its own time).
    assert "16 checks: 15 passed, 1 with warnings" in ok.stdout
    assert "[warn] rollup_cron: the platform's cron tick never ran" in ok.stdout

    late = manage(
        "preflight_codex_usage_backfill", "--cutoff", "2099-01-01T00:00:00Z", env=subprocess_env
    )
    assert late.returncode == 1
    assert "[FAIL] cutoff: --cutoff 2099-01-01T00:00:00Z is not before" in late.stdout
    assert "pre-flight failed: cutoff;" in late.stderr


# -- part two: the runbook's pre-flight of the real target (opt-in) ---------------------------


class PreflightWarning(UserWarning):
    """A check passed with a warning: the operator should read it before the repair."""


@pytest.fixture(scope="module")
def target_results(request: pytest.FixtureRequest) -> dict[str, CheckResult]:
    if not opted_in(request.config, "preflight", "CODEX_PREFLIGHT"):
        pytest.skip(
            "the pre-flight of the real target database is opt-in: run "
            "`python -m pytest -m preflight` (or set CODEX_PREFLIGHT=1)"
        )
    raw_cutoff = os.environ.get("CODEX_BACKFILL_CUTOFF", "").strip()
    if not raw_cutoff:
        pytest.skip(
            "set CODEX_BACKFILL_CUTOFF to the hosted deployment time of the Codex fix "
            "(RFC 3339, e.g. 2026-06-13T08:00:00Z) to run the pre-flight"
        )
    try:
        cutoff = parse_cutoff(raw_cutoff)
        workspace_id = parse_workspace_id(os.environ.get("CODEX_BACKFILL_WORKSPACE_ID"))
        timeout = parse_seconds(
            os.environ.get("CODEX_PREFLIGHT_STATEMENT_TIMEOUT", "60s"),
            flag="CODEX_PREFLIGHT_STATEMENT_TIMEOUT",
            minimum=0.1,
            maximum=3600,
        )
    except ValueError as exc:
        pytest.fail(f"pre-flight settings: {exc}", pytrace=False)
    try:
        with connect_target() as conn:
            found = run_preflight(cutoff, workspace_id, conn=conn, statement_timeout=timeout)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"cannot connect to the target database: {exc}; check DATABASE_URL", pytrace=False
        )
    return {r.name: r for r in found}


@pytest.mark.preflight
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_target_database(name: str, target_results: dict[str, CheckResult]) -> None:
    result = target_results[name]
    if result.warning:
        # Attributed to the check, not to this line: pytest's summary then shows the warning
        # alone, without a source line (``warnings.warn(``) under it.
        warnings.warn_explicit(
            PreflightWarning(f"{result.detail} -- what to do: {result.fix}"),
            PreflightWarning,
            f"pre-flight check {name}",
            0,
        )
    if not result.ok:
        pytest.fail(f"{name}: {result.detail}\nwhat to do: {result.fix}", pytrace=False)


@pytest.mark.django_db(transaction=True)
def test_a_run_whose_rollup_did_not_finish_is_a_warning(usage_rows: None) -> None:
    from usage.models import BackfillRun
    from usage.repair.backfill import ExecuteOptions, execute_backfill

    run = execute_backfill(ExecuteOptions(cutoff=CUTOFF)).run
    assert results()["pending_rollups"].status == "ok"
    BackfillRun.objects.filter(pk=run.pk).update(rollup_state=BackfillRun.RollupState.PENDING)
    found = results()["pending_rollups"]
    assert found.status == "warn"
    assert f"run(s) {run.pk} did not finish" in found.detail
    assert "--execute with the same cutoff" in found.fix
