"""Correctness at the edges: stamps strictly after the cutoff, a rollup that makes progress or
stops, privileges checked before the first write, a revert after a killed rollup."""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from tests.factories import CUTOFF, make_agent, make_keys, make_task, make_usage, set_rollup_state
from tests.platform import FAST_ROLLUP, delayed_rollup, installed
from tests.support import (
    COMMITS,
    CUTOFF_ARG,
    live_watermark,
    rollup_mismatches,
    sql,
    table_snapshot,
)
from usage import privileges, render
from usage.db import database_now
from usage.models import BackfillRun, TaskUsage
from usage.repair.backfill import BackfillError, ExecuteOptions, execute_backfill
from usage.repair.revert import RevertOptions, execute_revert
from usage.repair.rollup import own, slices
from usage.repair.verify import verify_run_in_context

pytestmark = COMMITS

MICROSECOND = timedelta(microseconds=1)


# -- 1. stamps strictly between the cutoff and the watermark -------------------------------


@pytest.mark.parametrize(
    ("after_cutoff", "agents", "models", "kind", "stamps"),
    [
        # No microsecond strictly between the cutoff and the watermark: the repair's time.
        (MICROSECOND, 3, 10, BackfillRun.Stamp.REPAIR_TIME, 30),
        # 4 microseconds for 30 keys: they share stamps, 8 keys a stamp at most.
        (5 * MICROSECOND, 3, 10, BackfillRun.Stamp.BELOW_WATERMARK, 4),
        # A millisecond: a stamp a key, all of them after the cutoff (issue 19's 2nd case).
        (timedelta(milliseconds=1), 4, 30, BackfillRun.Stamp.BELOW_WATERMARK, 120),
        # 2 microseconds for 200 keys would be 100 a stamp: the repair's time instead.
        (3 * MICROSECOND, 4, 50, BackfillRun.Stamp.REPAIR_TIME, 200),
    ],
    ids=["1us", "5us", "1ms", "3us-200-keys"],
)
def test_stamps_are_strictly_between_the_cutoff_and_the_watermark(
    after_cutoff: timedelta, agents: int, models: int, kind: str, stamps: int
) -> None:
    rows = make_keys(agents, models)
    watermark = CUTOFF + after_cutoff
    set_rollup_state(watermark, database_now() - timedelta(minutes=1))
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED and run.stamp == kind
    written = [row.updated_at for row in TaskUsage.objects.filter(pk__in=[r.pk for r in rows])]
    assert all(stamp > CUTOFF for stamp in written)  # never on the cutoff itself
    if kind == BackfillRun.Stamp.BELOW_WATERMARK:
        assert all(stamp < watermark for stamp in written)
    assert len(set(written)) == stamps
    # The range written is recorded and printed, as written.
    assert (run.stamp_first, run.stamp_last) == (min(written), max(written))
    first = render.timestamp(run.stamp_first, microseconds=True)
    assert first in out.getvalue()
    assert rollup_mismatches() == []


# -- 2. a slice that can never fit: progress or stop ----------------------------------------


def test_a_slice_that_can_never_fit_ends_the_run_with_its_rollup_pending() -> None:
    """Every call of the function takes 1 s, against a 0.1 s budget (a 0.6 s cap)."""
    make_keys(2, 3)
    live_watermark()
    started = time.monotonic()
    with installed(delayed_rollup("1.0"), FAST_ROLLUP), pytest.raises(BackfillError) as failed:
        execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.1))
    assert time.monotonic() - started < 60
    message = str(failed.value)
    assert "\n" not in message
    assert "could not be rebuilt within the lock budget" in message
    assert "larger --max-rollup-lock-seconds" in message
    rollup = failed.value.result.rollup
    assert rollup is not None and 1 <= len(rollup.cancelled_holds) <= slices.MAX_CANCELLED_IN_A_ROW
    assert max(rollup.cancelled_holds) <= 0.1 + slices.LOCK_CAP_SLACK_SECONDS + 0.3
    run = BackfillRun.objects.get()
    assert (run.status, run.rollup_state) == (
        BackfillRun.Status.FAILED,
        BackfillRun.RollupState.PENDING,
    )
    assert run.rows_updated == 6

    # With the function back to its speed, the same command finishes the rollup.
    execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert rollup_mismatches() == []


# Every write of an hourly row takes 0.2 s: no slice of either path fits a 0.1 s budget.
SLOW_HOURLY_WRITES = """
CREATE FUNCTION public.codex_test_slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.2); RETURN NEW; END $$;
CREATE TRIGGER codex_test_slow_write BEFORE INSERT OR UPDATE ON public.task_usage_hourly
    FOR EACH ROW EXECUTE FUNCTION public.codex_test_slow_write();"""
FAST_HOURLY_WRITES = """
DROP TRIGGER codex_test_slow_write ON public.task_usage_hourly;
DROP FUNCTION public.codex_test_slow_write();"""


def test_on_the_own_path_too_a_rollup_that_cannot_fit_stops() -> None:
    make_keys(3, 10)
    live_watermark()
    with installed(SLOW_HOURLY_WRITES, FAST_HOURLY_WRITES), pytest.raises(BackfillError) as failed:
        execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.1))
    assert "could not be rebuilt within the lock budget" in str(failed.value)
    # The proof halved from 50 stamps' keys to one (5 tries), then five in a row at one.
    assert len(failed.value.result.rollup.cancelled_holds) == 5 + slices.MAX_CANCELLED_IN_A_ROW
    assert BackfillRun.objects.get().rollup_state == BackfillRun.RollupState.PENDING
    execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert rollup_mismatches() == []


# -- 3. refused before writing what could not be finished -----------------------------------


@pytest.fixture
def role() -> Iterator[str]:
    """A login-less role with the repair's reading privileges; the test grants the rest."""
    name = f"codex_edge_{uuid.uuid4().hex[:10]}"
    sql(
        f"CREATE ROLE {name};"
        f"GRANT USAGE ON SCHEMA {{target_schema}}, {{tool_schema}} TO {name};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{target_schema}} TO {name};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{tool_schema}} TO {name};"
    )
    yield name
    with connection.cursor() as cursor:
        cursor.execute("RESET ROLE")
    sql(
        "GRANT EXECUTE ON FUNCTION {rollup_task_usage_hourly_window}(timestamptz, timestamptz)"
        " TO PUBLIC;"
        f"DROP OWNED BY {name}; DROP ROLE {name}"
    )


def as_role(name: str, *args: str) -> str:
    """Run a command in-process as ``name``; the error it ends with (there must be one)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SET ROLE {name}")
    try:
        with pytest.raises(CommandError) as failed:
            call_command(*args, stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")
    message = str(failed.value)
    assert "\n" not in message and failed.value.returncode == 1
    return message


def test_a_role_that_could_not_finish_the_rollup_is_refused_before_it_writes(role: str) -> None:
    make_keys(2, 3)
    live_watermark()
    sql(
        f"GRANT UPDATE ON {{task_usage}} TO {role};"
        f"GRANT INSERT, UPDATE, DELETE ON {{task_usage_hourly}} TO {role};"
        f"GRANT INSERT, UPDATE, DELETE ON {{task_usage_hourly_dirty}} TO {role};"
        f"GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {{tool_schema}} TO {role};"
        "REVOKE EXECUTE ON FUNCTION"
        " {rollup_task_usage_hourly_window}(timestamptz, timestamptz) FROM PUBLIC;"
    )
    before = table_snapshot("task_usage")
    message = as_role(role, "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute")
    assert f"role {role} lacks EXECUTE on" in message
    assert "rollup_task_usage_hourly_window" in message and "nothing was changed" in message
    assert "GRANT EXECUTE ON FUNCTION" in message
    assert "check DATABASE_URL" not in message
    assert BackfillRun.objects.count() == 0 and table_snapshot("task_usage") == before


def test_a_read_only_role_is_told_the_privilege_it_lacks(role: str) -> None:
    make_keys(1, 3)
    live_watermark()
    before = table_snapshot("task_usage")
    message = as_role(role, "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute")
    assert f'role {role} lacks UPDATE on "public"."task_usage" (the rows are rewritten)' in message
    assert "check DATABASE_URL" not in message
    assert BackfillRun.objects.count() == 0 and table_snapshot("task_usage") == before


def test_a_role_that_could_not_finish_a_revert_is_refused_before_it_writes(role: str) -> None:
    make_keys(2, 3)
    live_watermark()
    run = execute_backfill(ExecuteOptions(cutoff=CUTOFF)).run
    sql(
        f"GRANT UPDATE ON {{task_usage}} TO {role};"
        f"GRANT INSERT, UPDATE, DELETE ON {{task_usage_hourly}} TO {role};"
        f"GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {{tool_schema}} TO {role};"
    )
    before = table_snapshot("task_usage")
    message = as_role(role, "revert_codex_usage_backfill", str(run.pk), "--execute")
    assert f"role {role} lacks DELETE on" in message
    assert 'INSERT on "public"."task_usage_hourly_dirty" (queueing keys)' in message
    assert table_snapshot("task_usage") == before
    assert BackfillRun.objects.get(pk=run.pk).status == BackfillRun.Status.SUCCEEDED


def test_a_dry_run_without_a_reading_privilege_names_it(role: str) -> None:
    make_keys(1, 2)
    sql(f"REVOKE SELECT ON {{task_usage}} FROM {role}")
    message = as_role(role, "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG)
    assert "permission denied for table task_usage" in message
    assert "lacks that privilege: grant it" in message
    assert "check DATABASE_URL" not in message


# -- 4. a revert after a killed rollup and rewritten rows -----------------------------------


class Killed(BaseException):
    """What kill -9 does to a run, without killing the test: nothing after it runs."""


def test_a_revert_after_a_killed_rollup_and_rewritten_rows_leaves_every_key_right() -> None:
    make_keys(4, 30)  # 120 keys: the rollup's proof takes 50 of them, slices the rest
    live_watermark()

    def kill_after_the_first_slice(event: str, /, **details: Any) -> None:
        if event == "rollup_slice":
            raise Killed

    with pytest.raises(Killed):
        execute_backfill(ExecuteOptions(cutoff=CUTOFF), progress=kill_after_the_first_slice)
    run = BackfillRun.objects.get()
    assert (run.status, run.rollup_state) == (
        BackfillRun.Status.RUNNING,
        BackfillRun.RollupState.PENDING,
    )
    stale = rollup_mismatches()
    assert len(stale) == 70  # the keys the killed rollup had not reached
    # Ingestion rewrites every row of 5 of those keys (a key is a row here).
    rewritten = [
        row.pk
        for row in TaskUsage.objects.all()
        if any(m.key[3] == row.task.agent_id and m.key[6] == row.model for m in stale[:5])
    ]
    assert len(rewritten) == 5
    sql(
        "UPDATE {task_usage} SET input_tokens = 4242, updated_at = now() WHERE id = ANY(%s)",
        [rewritten],
    )

    reverted = execute_revert(RevertOptions(run_id=run.pk))
    assert reverted.reverted
    assert (reverted.rows_restored, reverted.rows_changed) == (115, 5)
    run.refresh_from_db()
    assert (run.status, run.rollup_state) == (
        BackfillRun.Status.REVERTED,
        BackfillRun.RollupState.DONE,
    )
    assert rollup_mismatches() == []  # the rewritten rows' keys too
    assert verify_run_in_context(run.pk).keys_ok


# -- 5. the smaller ones ---------------------------------------------------------------------


def test_verify_shows_the_columns_that_differ_with_both_values() -> None:
    task = make_task(make_agent())
    for model in ("a", "b", "c", "d"):
        make_usage(task, model=model, cost_usd_ticks=30)
    sql("SELECT {rollup_task_usage_hourly_window}('-infinity', 'infinity')")
    live_watermark()
    run = execute_backfill(ExecuteOptions(cutoff=CUTOFF)).run
    for model, column in (
        ("a", "cost_usd_ticks"),
        ("b", "task_count"),
        ("c", "output_tokens"),
        ("d", "cache_write_tokens"),
    ):
        sql(f"UPDATE {{task_usage_hourly}} SET {column} = {column} + 5 WHERE model = %s", [model])
    verdict = verify_run_in_context(run.pk)
    shown = {
        m.key[6]: [(c.column, c.expected, c.actual) for c in m.columns] for m in verdict.mismatches
    }
    assert shown == {
        "a": [("cost_usd_ticks", 30, 35)],
        "b": [("task_count", 1, 6)],
        "c": [("output_tokens", 50, 55)],
        "d": [("cache_write_tokens", 0, 5)],
    }
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("backfill_codex_usage_cache", "--verify", "--run-id", str(run.pk), stdout=out)
    for line in (
        "cost_usd_ticks expected 30 got 35",
        "task_count expected 1 got 6",
        "output_tokens expected 50 got 55",
        "cache_write_tokens expected 0 got 5",
    ):
        assert line in out.getvalue()


def test_the_repairs_drain_of_rewritten_keys_is_named_as_such(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_keys(2, 3)
    live_watermark()
    rollup_logger = logging.getLogger("usage.rollup")  # it does not propagate to caplog's
    monkeypatch.setattr(rollup_logger, "handlers", [caplog.handler])
    monkeypatch.setattr(rollup_logger, "level", logging.DEBUG)
    # The function path (a definition the tool does not know), and a row rewritten while the
    # run is between its batches and its rollup.

    def rewrite_before_the_rollup(event: str, /, **details: Any) -> None:
        if event == "stamped":
            sql(
                "UPDATE {task_usage} SET input_tokens = 7, updated_at = now() WHERE id = %s",
                [rows[0].pk],
            )

    with installed(delayed_rollup("0"), FAST_ROLLUP):
        execute_backfill(ExecuteOptions(cutoff=CUTOFF), progress=rewrite_before_the_rollup)
    assert "rewritten keys drain: 1 keys" in caplog.text
    assert "revert drain" not in caplog.text
    assert rollup_mismatches() == []


def test_one_agents_hour_too_big_for_a_part_of_the_own_path_goes_through_the_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every own slice and every part sleeps past the cap, as an hour whose one agent holds
    too many rows would: after two tries of that agent's part the hour's keys go through the
    function, and the run ends."""
    make_keys(4, 30)  # one bucket hour: 50 keys for the proof, 70 for the own slices

    def too_slow(make_work: Any) -> Any:
        def slowed(self: own.OwnRebuild, *args: Any) -> Any:
            work = make_work(self, *args)

            def slow(cursor: Any, bound: Any) -> Any:
                bound()
                cursor.execute("SELECT pg_sleep(5)")
                return work(cursor, bound)

            return slow

        return slowed

    live_watermark()
    monkeypatch.setattr(own.OwnRebuild, "_slice_work", too_slow(own.OwnRebuild._slice_work))
    monkeypatch.setattr(own.OwnRebuild, "part_work", too_slow(own.OwnRebuild.part_work))
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.2))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert result.rollup is not None and result.rollup.path == "own"
    # The hour once, then parts down to one agent, that agent twice.
    assert len(result.rollup.cancelled_holds) >= 3
    plans = [piece.plan for piece in result.rollup.slices]
    assert "own" not in plans and plans.count("nestloop") >= 2  # the proof, the function's
    assert rollup_mismatches() == []


def test_the_own_path_needs_to_set_the_platforms_queue_aside_even_as_definer() -> None:
    """The own path's proof sets others' queued keys aside and puts them back (issue 26,
    fault 3): even when the function runs as its owner, the role needs SELECT and DELETE on
    the queue, and the pre-flight and the run say so before anything is written."""
    needs = privileges.requirements(security_definer=True, own_path=True)
    queue = {n.privilege for n in needs if n.obj.endswith('"task_usage_hourly_dirty"')}
    assert queue == {"SELECT", "DELETE", "INSERT", "UPDATE"}
    through_function = privileges.requirements(security_definer=True, own_path=False)
    queue = {n.privilege for n in through_function if n.obj.endswith('"task_usage_hourly_dirty"')}
    assert queue == {"INSERT", "UPDATE"}
