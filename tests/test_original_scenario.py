"""The original Go tool's own scenario, through the real command on a real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from tests.factories import (
    AFTER,
    BEFORE,
    CUTOFF,
    make_agent,
    make_task,
    make_usage,
    populate_rollup,
)
from tests.support import COMMITS, CUTOFF_ARG, backfill, rollup_mismatches
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.repair.summary import load_summary

pytestmark = COMMITS


def run_command(*args: str) -> str:
    return backfill(*args)[0]


@pytest.fixture
def scenario() -> dict[str, TaskUsage]:
    workspace = uuid.uuid4()
    agent = make_agent(workspace)
    task = make_task(agent)
    other_agent = make_agent()  # another workspace
    rows = {
        "eligible": make_usage(task, model="gpt-5-codex", created_at=BEFORE),
        "after_cutoff": make_usage(task, model="gpt-5-late", created_at=BEFORE, updated_at=AFTER),
        "non_codex": make_usage(task, provider="claude", model="sonnet", created_at=BEFORE),
        "no_cache": make_usage(task, model="gpt-5-nocache", cache_read_tokens=0),
        "other_workspace": make_usage(make_task(other_agent), model="gpt-5-codex"),
    }
    populate_rollup()
    rows["workspace"] = workspace  # type: ignore[assignment]
    return rows


def test_dry_run_totals_match_the_original_scenario(scenario: dict) -> None:
    summary = load_summary(CUTOFF, scenario["workspace"])
    assert summary.totals.rows == 1
    assert summary.totals.input_before == 1000
    assert summary.totals.input_after == 700
    assert summary.totals.input_tokens_removed == 300
    assert summary.totals.clamped_rows == 0
    assert summary.totals.rollup_keys == 1


def test_execute_repairs_only_the_eligible_row_once(scenario: dict) -> None:
    before = {k: TaskUsage.objects.get(pk=v.pk) for k, v in scenario.items() if k != "workspace"}
    output = run_command(
        "--cutoff", CUTOFF_ARG, "--workspace-id", str(scenario["workspace"]), "--execute"
    )
    assert "succeeded" in output

    after = {k: TaskUsage.objects.get(pk=v.pk) for k, v in before.items()}
    assert after["eligible"].input_tokens == 700
    assert after["eligible"].updated_at > CUTOFF
    for name in ("after_cutoff", "non_codex", "no_cache", "other_workspace"):
        assert after[name].input_tokens == before[name].input_tokens, name
        assert after[name].updated_at == before[name].updated_at, name

    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert (run.rows_updated, run.input_tokens_removed) == (1, 300)
    entry = BackfillJournal.objects.get()
    assert entry.usage_id == scenario["eligible"].pk
    assert (entry.old_input_tokens, entry.new_input_tokens) == (1000, 700)

    second = run_command(
        "--cutoff", CUTOFF_ARG, "--workspace-id", str(scenario["workspace"]), "--execute"
    )
    assert "rows changed    0 of 0 planned" in second
    assert TaskUsage.objects.get(pk=scenario["eligible"].pk).input_tokens == 700

    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT input_tokens, cache_read_tokens FROM task_usage_hourly "
            "WHERE agent_id = %s AND model = 'gpt-5-codex'",
            [scenario["eligible"].task.agent_id],
        )
        assert cursor.fetchall() == [(700, 300)]
    assert rollup_mismatches() == []


def test_dry_run_command_prints_the_summary_and_writes_nothing(scenario: dict) -> None:
    output = run_command("--cutoff", CUTOFF_ARG, "--workspace-id", str(scenario["workspace"]))
    assert "Mode: dry run" in output
    assert "1 rows would change; 300 input tokens removed (1,000 -> 700)" in output
    assert "nothing was written" in output
    assert TaskUsage.objects.get(pk=scenario["eligible"].pk).input_tokens == 1000
    assert BackfillRun.objects.count() == 0
