"""The generated dataset and its from-scratch rollup agree with the rollup function."""

from __future__ import annotations

from django.db import connection

from sandbox import dataset
from tests.factories import CUTOFF
from tests.support import COMMITS, rollup_mismatches
from usage.repair.summary import load_summary

pytestmark = COMMITS

HOURLY = (
    "SELECT bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd_ticks,"
    " task_count, event_count FROM task_usage_hourly ORDER BY 1, 2, 3, 4, 5, 6, 7"
)


def test_populate_hourly_equals_the_rollup_function_from_scratch() -> None:
    with connection.cursor() as cursor:
        stats = dataset.generate_dataset(
            cursor, dataset.DatasetSpec(rows=3000, cutoff=CUTOFF), bulk_load=False
        )
        assert stats.rows == 3000 and stats.eligible > 0
        assert dataset.populate_hourly(cursor) > 0
        cursor.execute(HOURLY)
        populated = cursor.fetchall()
        cursor.execute("TRUNCATE task_usage_hourly")
        cursor.execute("SELECT rollup_task_usage_hourly_window('-infinity', 'infinity')")
        cursor.execute(HOURLY)
        assert cursor.fetchall() == populated
    assert rollup_mismatches() == []
    assert load_summary(CUTOFF, None).totals.rows == stats.eligible
