"""An hour too big for one slice of the own path is recomputed in parts, each the keys of
its hour and of some of its agents, equal to the function's, and the run stays on the own
path (issue 27)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest

from tests.factories import (
    BEFORE,
    CUTOFF,
    make_task,
    make_usage,
    populate_rollup,
)
from tests.support import COMMITS, live_watermark, rollup_mismatches, sql, table_snapshot
from usage.db import database_now
from usage.models import Agent, AgentTaskQueue, BackfillRun
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.revert import RevertOptions, execute_revert
from usage.repair.rollup import own, slices

pytestmark = COMMITS

HOUR = timedelta(hours=1)
WORKSPACE = uuid.UUID(int=99)


def agent(n: int) -> Agent:
    """Agent ``n``: its id orders the parts (they go by agent id)."""
    return Agent.objects.create(
        id=uuid.UUID(int=n), workspace_id=WORKSPACE, name=f"agent-{n}", created_at=BEFORE
    )


def rewritten_since(moment: Any) -> set[tuple[Any, uuid.UUID]]:
    """(bucket hour, agent) of the hourly rows written after ``moment``."""
    rows = sql(
        "SELECT DISTINCT bucket_hour, agent_id FROM {task_usage_hourly} WHERE updated_at > %s",
        [moment],
    )
    return set(rows)


@pytest.fixture
def one_agent_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hour goes in parts of one agent each, after a proof of one stamp's keys."""
    monkeypatch.setattr(own, "FIRST_SLICE_ROWS", 1)
    monkeypatch.setattr(own, "PROOF_KEYS_COUNT", 1)
    monkeypatch.setattr(own, "take", lambda agents, limit: ([agents[0][0]], agents[0][1]))


def test_a_part_recomputes_exactly_its_agents_keys_of_its_hour_as_the_function_does(
    one_agent_a_part: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three agents in one hour and one of them in the next: NULL and set projects, a key
    whose rows are deleted between parts, a task moved between parts to an agent whose part
    is done (its key shared with a task already there). Each part rewrites only its agent's
    keys of its hour; at the end every hourly row equals what the function makes."""
    first, second, third = agent(1), agent(2), agent(3)
    stays = make_task(first)  # no issue: NULL project
    moves = make_task(second)
    AgentTaskQueue.objects.filter(pk=moves.pk).update(runtime_id=stays.runtime_id)
    with_project = make_task(third, project_id=uuid.uuid4())
    for model in ("m0", "m1"):
        make_usage(stays, model=model)
        make_usage(moves, model=model, created_at=BEFORE + timedelta(minutes=5))
    for model in ("m0", "m1", "gone"):
        make_usage(with_project, model=model)
    later = make_task(first)
    make_usage(later, model="m0", created_at=BEFORE + HOUR)
    populate_rollup()
    live_watermark()

    original = own.OwnRebuild.part_work
    calls: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}

    def part_work(self: own.OwnRebuild, params: dict[str, Any]) -> Any:
        calls.append(params)
        if len(calls) == 1:
            seen["started"] = database_now()
        if len(calls) == 2:  # between the first part and the next
            seen["after_first"] = rewritten_since(seen["started"])
            AgentTaskQueue.objects.filter(pk=moves.pk).update(agent=first)
            sql(
                "DELETE FROM {task_usage} WHERE task_id = %s AND model = 'gone'", [with_project.pk]
            )
        return original(self, params)

    monkeypatch.setattr(own.OwnRebuild, "part_work", part_work)
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=1))

    assert result.rollup is not None and result.rollup.path == BackfillRun.RollupPath.OWN
    assert [piece.plan for piece in result.rollup.slices].count("nestloop") == 1  # the proof
    hour = BEFORE.replace(minute=0, second=0, microsecond=0)
    # The first part rewrote its agent's keys of its hour, and nothing else.
    assert seen["after_first"] == {(hour, calls[0]["agents"][0])}
    # One agent a part; the moved task's new agent done again after the move.
    agents_of_parts = [params["agents"] for params in calls]
    assert all(len(agents) == 1 for agents in agents_of_parts)
    assert [first.pk] in agents_of_parts[2:] and [second.pk] in agents_of_parts
    # The deleted key's row is gone, the moved task counts with its new agent.
    assert not sql("SELECT 1 FROM {task_usage_hourly} WHERE model = 'gone'")
    (events,) = sql(
        "SELECT sum(event_count) FROM {task_usage_hourly} WHERE agent_id = %s AND model = 'm0' "
        "AND bucket_hour = %s",
        [first.pk, hour],
    )
    assert events == (2,)
    assert not sql("SELECT 1 FROM {task_usage_hourly} WHERE agent_id = %s", [second.pk])
    assert rollup_mismatches() == []
    ours = table_snapshot("task_usage_hourly", exclude=("updated_at",))
    populate_rollup()  # the platform's function over every key
    assert table_snapshot("task_usage_hourly", exclude=("updated_at",)) == ours


def test_an_hour_too_big_for_one_slice_finishes_in_parts_on_the_own_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whole-hour slices sleep past a tiny budget's cap, as an hour too big for any slice
    would: the hour is cancelled once, then done in parts, never through the function."""
    for n in range(1, 5):
        task = make_task(agent(n))
        for model in range(30):
            make_usage(task, model=f"m{model}")
    populate_rollup()
    live_watermark()
    monkeypatch.setattr(own, "FIRST_PART_ROWS", 40)  # about one agent's 30 rows a part
    sliced = own.OwnRebuild._slice_work

    def too_slow(self: own.OwnRebuild, span: Any) -> Any:
        work = sliced(self, span)

        def slow(cursor: Any, bound: Any) -> Any:
            bound()
            cursor.execute("SELECT pg_sleep(5)")
            return work(cursor, bound)

        return slow

    monkeypatch.setattr(own.OwnRebuild, "_slice_work", too_slow)
    started = time.monotonic()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF, max_rollup_lock_seconds=0.2))
    assert time.monotonic() - started < 30
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert (
        run.status == BackfillRun.Status.SUCCEEDED
        and run.rollup_state == BackfillRun.RollupState.DONE
    )
    assert result.rollup is not None and result.rollup.path == BackfillRun.RollupPath.OWN
    assert len(result.rollup.cancelled_holds) == 1
    plans = [piece.plan for piece in result.rollup.slices]
    assert plans.count("nestloop") == 1  # the proof; no key through the function
    own_parts = [piece for piece in result.rollup.slices if piece.plan == "own"]
    assert len(own_parts) >= 2 and all(piece.keys <= 60 for piece in own_parts)
    assert result.rollup.keys_done == result.rollup.keys_total == 120
    assert rollup_mismatches() == []

    # The revert rebuilds its keys with the same slices: the hour in parts again.
    reverted = execute_revert(RevertOptions(run_id=run.pk, max_rollup_lock_seconds=0.2))
    assert reverted.rows_restored == 120 and reverted.rollup.path == BackfillRun.RollupPath.OWN
    plans = [piece.plan for piece in reverted.rollup.slices]
    assert plans.count("own") >= 2 and plans.count("nestloop") == 1
    assert not sql("SELECT 1 FROM {task_usage_hourly_dirty}")
    assert rollup_mismatches() == []


def test_after_an_hour_in_parts_the_next_hours_go_in_slices_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first slice may take one row: the first hour goes in parts. What the parts held
    then sizes the slices, so the two later hours go in one slice, not in parts each."""
    for n in range(1, 5):
        task = make_task(agent(n))
        for hour in range(3):
            for model in range(10):
                made = BEFORE + hour * HOUR
                make_usage(task, model=f"h{hour}m{model}", created_at=made)
    populate_rollup()
    live_watermark()
    monkeypatch.setattr(own, "FIRST_SLICE_ROWS", 1)
    monkeypatch.setattr(own, "PROOF_KEYS_COUNT", 1)
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.rollup is not None and result.rollup.path == BackfillRun.RollupPath.OWN
    pieces = [piece for piece in result.rollup.slices if piece.plan == "own"]
    widths = [piece.window_to - piece.window_from for piece in pieces]
    first = BEFORE.replace(minute=0, second=0, microsecond=0)
    assert all(p.window_from == first for p, w in zip(pieces, widths, strict=True) if w == HOUR)
    assert widths[-1] == 2 * HOUR  # hours 2 and 3 in one slice
    assert rollup_mismatches() == []


def test_a_proof_too_big_for_a_small_budget_is_halved_down_to_one_stamp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proof calls the function, whose cost per key does not shrink with the budget: it
    is halved (50, 25, 12, 6, 3 stamps' keys) down to one stamp's before its cancellations
    count against the run, five in a row of which would stop the rollup."""
    for n in range(1, 4):
        task = make_task(agent(n))
        for model in range(30):
            make_usage(task, model=f"m{model}")
    populate_rollup()
    live_watermark()
    proved = own.OwnRebuild._prove
    calls: list[int] = []

    def cancelled_five_times(self: own.OwnRebuild, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 5:
            raise slices.SliceCancelled(1.0)
        return proved(self, *args, **kwargs)

    monkeypatch.setattr(own.OwnRebuild, "_prove", cancelled_five_times)
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert result.rollup is not None and result.rollup.path == BackfillRun.RollupPath.OWN
    assert len(calls) == 6 and len(result.rollup.cancelled_holds) == 5
    assert rollup_mismatches() == []
