"""The rollup rebuild holds lock 4246 only in short slices, each key once, none missed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest

from tests.factories import BEFORE, CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.platform import FAST_ROLLUP, SLOW_ROLLUP, delayed_rollup, installed
from tests.support import COMMITS, rollup_mismatches
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.rollup import function, slices
from usage.repair.rollup.slices import RollupResult
from usage.repair.summary import load_summary

pytestmark = COMMITS


@pytest.fixture
def slow_rollup() -> Iterator[None]:
    with installed(SLOW_ROLLUP, FAST_ROLLUP):
        yield


def test_slices_stay_within_the_lock_budget_and_cover_every_key(slow_rollup: None) -> None:
    for _ in range(3):
        task = make_task(make_agent())
        for model in range(20):
            make_usage(task, model=f"m{model}")
    populate_rollup()
    keys = load_summary(CUTOFF, None).totals.rollup_keys
    assert keys == 60
    budget = 0.3
    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, batch_size=1000, max_rollup_lock_seconds=budget)
    )
    assert result.rows_updated == 60  # one batch: a window per batch could not be split
    slices = result.rollup.slices
    assert len(slices) > 3
    assert sum(piece.keys for piece in slices) == keys  # each key once
    assert max(piece.lock_held_seconds for piece in slices) <= budget + 0.5
    assert rollup_mismatches() == []


# Every key costs 1 ms per task of its agent, plus 20 ms: the documented cost shape of the
# nested-loop plan (the test data has one usage row a key, all found by the call's window).
AGENT_SIZED_ROLLUP = delayed_rollup(
    """0.001 * (
        SELECT coalesce(sum(20 + (SELECT count(*) FROM agent_task_queue t
                                  WHERE t.agent_id = q.agent_id)), 0)
        FROM task_usage tu JOIN agent_task_queue q ON q.id = tu.task_id
        WHERE tu.updated_at >= p_from AND tu.updated_at < p_to)"""
)


@pytest.fixture
def agent_sized_rollup() -> Iterator[None]:
    with installed(AGENT_SIZED_ROLLUP, FAST_ROLLUP):
        yield


def test_slices_are_sized_by_the_cost_of_their_keys(
    agent_sized_rollup: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of an agent with many tasks get smaller slices, so no slice has to be cancelled.

    Sized by key count, the slice after 30 cheap keys (21 ms each) took 10 expensive ones
    (120 ms each) and went over the cap.
    """
    light = make_task(make_agent())
    for model in range(30):
        make_usage(light, model=f"m{model}", created_at=BEFORE)
    heavy_agent = make_agent()
    heavy = make_task(heavy_agent)
    for _ in range(99):
        make_task(heavy_agent)
    for model in range(10):
        make_usage(heavy, model=f"m{model}", created_at=BEFORE + timedelta(hours=1))
    populate_rollup()
    budget = 0.6
    monkeypatch.setattr(function, "FIRST_SLICE_KEYS", 10)  # the first slice: cheap keys only
    # The nested-loop plan only, whose cost grows with the tasks of a key's agent: a whole
    # scan is predicted far over the budget, so the hash plan is never tried.
    monkeypatch.setattr(function, "PRIOR_SCAN_SECONDS_PER_PAGE", 10.0)
    rollup_logger = logging.getLogger("usage.rollup")  # it does not propagate to caplog's
    monkeypatch.setattr(rollup_logger, "handlers", [caplog.handler])
    monkeypatch.setattr(rollup_logger, "level", logging.INFO)
    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, batch_size=1000, max_rollup_lock_seconds=budget)
    )
    slices = result.rollup.slices
    assert sum(piece.keys for piece in slices) == 40
    # A cheap key's agent has 1 task, an expensive key's 100: slices of expensive keys take
    # fewer of them, so they hold about as long as those of the cheap ones.
    cheap = [piece.keys for piece in slices if piece.tasks == piece.keys]
    expensive = [piece.keys for piece in slices if piece.tasks == 100 * piece.keys]
    assert cheap and expensive
    assert max(expensive) < max(cheap)
    assert "rollup slice of" not in caplog.text  # no slice was cancelled and retried
    assert max(piece.lock_held_seconds for piece in slices) <= budget + 0.5
    assert rollup_mismatches() == []


@pytest.mark.parametrize(
    ("budget", "gap"), [(0.2, 0.1), (1.0, 0.1), (2.5, 0.1), (4.0, 0.16), (5.0, 0.2), (30.0, 0.2)]
)
def test_the_gap_after_a_slice_follows_a_small_budget_down_to_a_tenth_of_a_second(
    budget: float, gap: float
) -> None:
    """A fixed 0.2 s was a fifth of every slice's cycle at a 1 s budget; a try-lock caller
    polling every 50 ms still gets at least two tries in 0.1 s."""
    made = slices.Slicer(slices.SliceLimits(budget), RollupResult())
    assert made.gap == pytest.approx(gap)
    quiet = slices.SliceLimits(budget, gap=0)
    assert slices.Slicer(quiet, RollupResult()).gap == 0


def test_one_cancelled_slice_does_not_cap_the_rest_of_the_run() -> None:
    """After a cancelled slice the next is at most half of it; once a slice ran, the
    measured rate alone sizes the next (a transient stall must not send every later hour
    into parts). A rate with whole scans keeps its ceiling."""
    rate = slices.Rate(target=0.7, rate=100_000.0)
    rate.cancelled(20_000)
    assert rate.limit(20_000) <= 10_000
    rate.add(10_000, 0.1)  # fast: 100,000 rows a second
    assert rate.limit(20_000) > 10_000
    scans = slices.Rate(target=0.7, rate=100_000.0, scans=True)
    scans.cancelled(20_000)
    scans.add(10_000, 0.1)
    assert scans.limit(20_000) <= 10_000
