"""Which rows the repair changes, and how: clamping, legacy rows, runtimes, workspaces."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection

from tests.factories import BEFORE, CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.processes import manage
from tests.support import COMMITS, rollup_mismatches, table_snapshot
from usage.models import AgentTaskQueue, BackfillRun, TaskUsage
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.summary import load_summary

pytestmark = COMMITS


def test_clamped_row_ends_at_zero_and_is_counted() -> None:
    row = make_usage(make_task(make_agent()), input_tokens=200, cache_read_tokens=300)
    summary = load_summary(CUTOFF, None)
    assert (summary.totals.clamped_rows, summary.totals.input_tokens_removed) == (1, 200)
    assert summary.totals.input_after == 0
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert (result.rows_updated, result.clamped_rows, result.input_tokens_removed) == (1, 1, 200)
    assert TaskUsage.objects.get(pk=row.pk).input_tokens == 0
    assert BackfillRun.objects.get().clamped_rows == 1


def test_zero_input_row_is_not_a_candidate() -> None:
    row = make_usage(make_task(make_agent()), input_tokens=0, cache_read_tokens=300)
    assert load_summary(CUTOFF, None).totals.rows == 0
    execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert TaskUsage.objects.get(pk=row.pk).updated_at == row.updated_at


def test_legacy_row_with_null_updated_at_is_repaired_and_rolled_up() -> None:
    task = make_task(make_agent())
    legacy = make_usage(task, model="gpt-5-codex", updated_at=None)
    populate_rollup()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.rows_updated == 1
    repaired = TaskUsage.objects.get(pk=legacy.pk)
    assert repaired.input_tokens == 700
    assert repaired.updated_at is not None and repaired.updated_at > CUTOFF
    assert rollup_mismatches() == []
    with connection.cursor() as cursor:
        cursor.execute("SELECT input_tokens FROM task_usage_hourly WHERE model = 'gpt-5-codex'")
        assert cursor.fetchall() == [(700,)]


def test_task_without_runtime_is_repaired_but_never_rolled_up() -> None:
    row = make_usage(make_task(make_agent(), runtime=False), model="gpt-5-codex")
    populate_rollup()
    assert table_snapshot("task_usage_hourly") == []
    assert load_summary(CUTOFF, None).totals.rollup_keys == 0
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.rows_updated == 1
    assert TaskUsage.objects.get(pk=row.pk).input_tokens == 700
    assert table_snapshot("task_usage_hourly") == []
    assert rollup_mismatches() == []


def test_workspace_filter_limits_dry_run_and_execute() -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    my_row = make_usage(make_task(make_agent(mine)), model="m1")
    their_row = make_usage(make_task(make_agent(theirs)), model="m2")
    populate_rollup()
    assert load_summary(CUTOFF, mine).totals.rows == 1
    assert load_summary(CUTOFF, None).totals.rows == 2
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, workspace_id=mine))
    assert result.rows_updated == 1
    assert TaskUsage.objects.get(pk=my_row.pk).input_tokens == 700
    assert TaskUsage.objects.get(pk=their_row.pk).input_tokens == 1000
    assert rollup_mismatches() == []


def test_unknown_workspace_is_warned_about() -> None:
    make_usage(make_task(make_agent()))
    out, err = io.StringIO(), io.StringIO()
    stranger = str(uuid.uuid4())
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        "2026-06-13T08:00:00Z",
        "--workspace-id",
        stranger,
        stdout=out,
        stderr=err,
    )
    assert f"No agent belongs to workspace {stranger}" in err.getvalue()
    assert "nothing to do" in out.getvalue()


def test_many_batches_keep_the_rollup_right() -> None:
    """Rows of several hourly keys spread over many small batches and rollup slices."""
    agents = [make_agent() for _ in range(3)]
    for agent in agents:
        task = make_task(agent, project_id=uuid.uuid4())
        for model in ("a", "b", "c", "d"):
            make_usage(task, model=model, input_tokens=500 + len(model), cache_read_tokens=120)
    populate_rollup()
    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, batch_size=2, max_rollup_lock_seconds=0.05)
    )
    assert result.rows_updated == 12
    assert result.batches == 6
    assert result.rollup is not None and result.rollup.rollup_rows >= 12
    assert rollup_mismatches() == []
    assert TaskUsage.objects.filter(input_tokens__gte=500).count() == 0


def test_dry_run_writes_nothing() -> None:
    make_usage(make_task(make_agent()), model="x")
    make_usage(make_task(make_agent()), model="y", updated_at=None)
    populate_rollup()
    before = [table_snapshot(t) for t in ("task_usage", "task_usage_hourly")]
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", "2026-06-13T08:00:00Z", stdout=out)
    assert "2 rows would change" in out.getvalue()
    assert [table_snapshot(t) for t in ("task_usage", "task_usage_hourly")] == before
    assert BackfillRun.objects.count() == 0


@pytest.mark.slow
def test_dry_run_works_for_a_read_only_role(test_database_url: str, subprocess_env: dict) -> None:
    make_usage(make_task(make_agent()), model="x")
    role = f"codex_ro_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} LOGIN")
        cursor.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        cursor.execute(f"GRANT USAGE ON SCHEMA public, codex_repair TO {role}")
        cursor.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public, codex_repair TO {role}")
    try:
        scheme, rest = test_database_url.split("://", 1)
        url = f"{scheme}://{role}@{rest.split('@', 1)[1]}"
        result = manage(
            "backfill_codex_usage_cache",
            "--cutoff",
            "2026-06-13T08:00:00Z",
            env=dict(subprocess_env, DATABASE_URL=url),
        )
        assert result.returncode == 0, result.stderr
        assert f"as {role}" in result.stdout
        assert "1 rows would change" in result.stdout
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP OWNED BY {role}")
            cursor.execute(f"DROP ROLE {role}")


def test_dry_run_groups_count_keys_and_total_all_groups_when_showing_few() -> None:
    """Per workspace and UTC day: rows, sums and distinct hourly keys; totals over every group.

    A table view keeps only the first groups; its totals must still cover all of them.
    """
    first, second = make_agent(), make_agent()
    task = make_task(first)

    def same_runtime_task() -> AgentTaskQueue:
        other = make_task(first)
        AgentTaskQueue.objects.filter(pk=other.pk).update(runtime_id=task.runtime_id)
        return other

    make_usage(task, model="a", created_at=BEFORE, input_tokens=1000, cache_read_tokens=300)
    make_usage(same_runtime_task(), model="a", created_at=BEFORE)  # the same key
    make_usage(task, model="b", created_at=BEFORE)  # a second key that hour
    make_usage(same_runtime_task(), model="a", created_at=BEFORE + timedelta(hours=1))  # third
    make_usage(make_task(first, runtime=False), model="a", created_at=BEFORE)  # no key
    make_usage(make_task(second), model="a", input_tokens=100, cache_read_tokens=300)
    make_usage(same_runtime_task(), model="a", created_at=BEFORE - timedelta(days=1))
    full = load_summary(CUTOFF, None)
    assert full.group_count == len(full.groups) == 3
    day = {(g.workspace_id, g.date_utc): g for g in full.groups}
    main = day[(first.workspace_id, BEFORE.date())]
    assert (main.rows, main.rollup_keys) == (5, 3)
    assert (main.input_before, main.input_after, main.input_tokens_removed) == (
        5000,
        3500,
        1500,
    )
    clamped = day[(second.workspace_id, BEFORE.date())]
    assert (clamped.rows, clamped.clamped_rows, clamped.input_after) == (1, 1, 0)
    assert full.totals.rows == 7
    assert full.totals.rollup_keys == 5
    assert full.totals.clamped_rows == 1
    shown = load_summary(CUTOFF, None, max_groups=1)
    assert len(shown.groups) == 1 and shown.groups[0] == full.groups[0]
    assert (shown.group_count, shown.totals) == (3, full.totals)
