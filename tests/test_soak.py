"""The chaos soak (``chaos``), as tests: its checks catch what they promise to, and a few
schedules pass.

Opt-in (``-m soak``): each schedule starts real processes on a database of its own on the
server ``CODEX_SOAK_SERVER`` names (default the local one). The long soak is
``python -m chaos --schedules 1000``; ``.ci/run`` runs a short one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from chaos.schedule import draw
from chaos.soak import Row, Soak, check
from tests.support import opted_in

SERVER = os.environ.get("CODEX_SOAK_SERVER", "postgresql://postgres@127.0.0.1:5432")

pytestmark = [pytest.mark.soak, pytest.mark.slow]


@pytest.fixture(scope="module")
def soak(request: pytest.FixtureRequest) -> Iterator[Soak]:
    if not opted_in(request.config, "soak", "CODEX_SOAK"):
        pytest.skip("the soak is opt-in: run `python -m pytest -m soak` (or set CODEX_SOAK=1)")
    with Soak.on_server(SERVER, f"codex_soak_test_{os.getpid()}") as soak:
        yield soak


def test_a_schedule_is_drawn_the_same_from_its_seed() -> None:
    assert draw(42) == draw(42)
    assert {draw(n).describe() for n in range(20)} != {draw(0).describe()}
    # Every kind of fault and neighbour is drawn somewhere in the first hundred schedules.
    steps = [step for n in range(100) for step in draw(n).steps]
    assert {s.fault.kind for s in steps if s.fault} == {
        "kill9",
        "sigterm",
        "sigint",
        "terminate_backend",
    }
    assert {name for s in steps for name in s.neighbours} >= {"ingestion", "cron_tick"}


# 1005: a revert stopped by SIGINT, a repair, the revert finished: verify of the repair
# blamed the restored rows on writes since (fixed in usage.repair.verdict). 110: a SIGTERM
# during --sleep-between-batches hung the run when it landed while the stop event's lock
# was held (fixed in usage.management.base; tests/test_faults.py pins it deterministically).
@pytest.mark.parametrize("seed_no", [3, 10, 110, 1005])
def test_schedules_pass(soak: Soak, seed_no: int) -> None:
    outcome = soak.run(draw(seed_no))
    assert outcome.ok, outcome.violations
    assert outcome.commands >= 2


def test_the_checks_catch_a_row_repaired_twice_and_a_wrong_hourly_key(soak: Soak) -> None:
    schedule = draw(5).keeping((0,))
    schedule = schedule.without_neighbours_and_faults(0)
    outcome = soak.run(schedule)
    assert outcome.ok, outcome.violations
    assert check_with_all_rows(soak) == []
    with soak.connect() as conn:
        repaired = conn.execute(
            "SELECT usage_id, cache_read_tokens FROM codex_repair.backfill_journal"
            " WHERE reverted_at IS NULL LIMIT 1"
        ).fetchone()
        assert repaired is not None
        # The same row subtracted once more, as the original tool's clock bug did.
        conn.execute(
            "UPDATE task_usage SET input_tokens = greatest(input_tokens - %s, 0) + 1"
            " WHERE id = %s",
            [repaired[1], repaired[0]],
        )
        conn.execute(
            "UPDATE task_usage_hourly SET input_tokens = input_tokens + 1 WHERE ctid ="
            " (SELECT ctid FROM task_usage_hourly LIMIT 1)"
        )
        conn.execute("SELECT pg_advisory_lock(4246)")  # and a session that keeps 4246
        violations = check_with_all_rows(soak)
        conn.execute("SELECT pg_advisory_unlock(4246)")
    assert any("journaled as repaired holds" in v for v in violations), violations
    assert any("hourly table differs" in v for v in violations), violations
    assert any("advisory locks left held" in v for v in violations), violations


def check_with_all_rows(soak: Soak) -> list[str]:
    """The checks, with the model of every row read back from the table and the journal."""
    rows = {}
    with soak.connect() as own:
        for row_id, input_tokens, cache_read, new_input in own.execute(
            "SELECT tu.id, coalesce(j.old_input_tokens, tu.input_tokens), tu.cache_read_tokens,"
            " j.new_input_tokens FROM task_usage tu"
            " LEFT JOIN codex_repair.backfill_journal j ON j.usage_id = tu.id"
        ).fetchall():
            rows[str(row_id)] = Row(input_tokens, cache_read, eligible=new_input is not None)
    return check(soak, rows)
