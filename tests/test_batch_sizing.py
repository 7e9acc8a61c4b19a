"""The repair's batches are sized for a time, within the operator's --batch-size, and write
the same journal whatever their sizes."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import psycopg
from django.db import connection

from tests.factories import CUTOFF, make_agent, make_task, make_usage
from tests.support import COMMITS, CUTOFF_ARG, command, wait_until
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.repair import backfill
from usage.repair.backfill import ExecuteOptions, execute_backfill

pytestmark = COMMITS

BLOCKED_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE %s"""


def make_rows(count: int) -> list[TaskUsage]:
    agents = [make_agent() for _ in range(3)]
    return [
        make_usage(make_task(agents[n % 3]), model=f"m{n % 4}", input_tokens=1000 + n)
        for n in range(count)
    ]


def sizes_of(options: ExecuteOptions) -> list[int]:
    sizes: list[int] = []

    def progress(event: str, /, **details: object) -> None:
        if event == "batch":
            sizes.append(details["batch"].batch_size)  # type: ignore[attr-defined]

    assert execute_backfill(options, progress=progress).rows_remaining == 0
    return sizes


def test_fast_batches_grow_from_the_first_size_up_to_the_batch_size(monkeypatch) -> None:
    monkeypatch.setattr(backfill, "FIRST_BATCH_SIZE", 2)
    make_rows(40)
    sizes = sizes_of(ExecuteOptions(cutoff=CUTOFF, batch_size=8, batch_seconds=60))
    assert sizes[:4] == [2, 4, 8, 8]
    assert max(sizes) == 8
    assert BackfillRun.objects.get().rows_updated == 40


def test_a_slow_batch_makes_the_next_one_smaller(other_connection: psycopg.Connection) -> None:
    make_rows(16)
    other_connection.execute("LOCK TABLE task_usage IN SHARE MODE")

    def release_after_the_first_batch_waited() -> None:
        with psycopg.connect(other_connection.info.dsn, autocommit=True) as watcher:
            wait_until(
                lambda: watcher.execute(BLOCKED_SQL, ["%WITH locked AS%"]).fetchone()[0],
                what="the first batch waiting for the table lock",
            )
        time.sleep(0.5)  # the batch now takes at least 5 times its target
        other_connection.rollback()

    release = threading.Thread(target=release_after_the_first_batch_waited)
    release.start()
    options = ExecuteOptions(cutoff=CUTOFF, batch_size=8, batch_seconds=0.1, lock_timeout=30)
    sizes = sizes_of(options)
    release.join()
    assert sizes[:2] == [8, 4]  # at most halved, whatever the pace said


def test_the_operators_batch_size_caps_every_batch_and_is_recorded() -> None:
    make_rows(12)
    _, err = command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", "--batch-size", "5",
        "--log-format", "json",
    )  # fmt: skip
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    sizes = [event["batch_size"] for event in events if event["event"] == "batch"]
    assert sizes and max(sizes) == 5
    assert BackfillRun.objects.get().batch_size == 5


def test_without_batch_size_the_first_batch_is_small_and_the_cap_is_the_limit() -> None:
    make_rows(3)
    _, err = command(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", "--log-format", "json"
    )
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [e["batch_size"] for e in events if e["event"] == "batch"] == [1000]
    assert BackfillRun.objects.get().batch_size == 50_000


def test_the_journal_is_the_same_whatever_the_batch_sizes(monkeypatch) -> None:
    """Each entry holds the row's values before and after, whatever batch wrote it; the rows
    of one hourly key share one stamp, the row's new updated_at."""
    monkeypatch.setattr(backfill, "FIRST_BATCH_SIZE", 1)
    rows = make_rows(30)
    task = make_task(make_agent())
    clamped = make_usage(task, input_tokens=100, cache_read_tokens=400, updated_at=None)
    ineligible = make_usage(task, provider="claude")
    before = {r.pk: r for r in TaskUsage.objects.all()}
    sizes = sizes_of(ExecuteOptions(cutoff=CUTOFF, batch_size=7, batch_seconds=60))
    assert len(set(sizes)) > 2  # the rows went through batches of several sizes
    after = {r.pk: r for r in TaskUsage.objects.all()}
    journal = BackfillJournal.objects.values_list(
        "usage_id",
        "old_input_tokens",
        "old_updated_at",
        "new_input_tokens",
        "cache_read_tokens",
        "new_updated_at",
    )
    expected = {
        (
            pk,
            row.input_tokens,
            row.updated_at,
            max(row.input_tokens - row.cache_read_tokens, 0),
            row.cache_read_tokens,
            after[pk].updated_at,
        )
        for pk, row in before.items()
        if pk != ineligible.pk
    }
    assert set(journal) == expected and len(journal) == len(rows) + 1
    assert after[clamped.pk].input_tokens == 0
    stamps: dict[tuple[object, ...], set[object]] = defaultdict(set)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT q.agent_id, q.runtime_id, tu.model, date_trunc('hour', tu.created_at), "
            "tu.updated_at "
            "FROM task_usage tu JOIN agent_task_queue q ON q.id = tu.task_id "
            "WHERE tu.id <> %s",
            [ineligible.pk],
        )
        for *key, stamp in cursor.fetchall():
            stamps[tuple(key)].add(stamp)
    assert all(len(one) == 1 for one in stamps.values())
