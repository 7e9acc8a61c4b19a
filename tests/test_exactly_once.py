"""A row repaired once is never repaired again, whatever the clocks say."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection

from tests.factories import CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.support import COMMITS
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.summary import load_summary

pytestmark = COMMITS


@pytest.fixture
def repaired() -> TaskUsage:
    row = make_usage(make_task(make_agent()), model="gpt-5-codex")
    populate_rollup()
    assert execute_backfill(ExecuteOptions(cutoff=CUTOFF)).rows_updated == 1
    return TaskUsage.objects.get(pk=row.pk)


def test_rerun_with_the_same_cutoff_changes_nothing(repaired: TaskUsage) -> None:
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert (result.rows_planned, result.rows_updated) == (0, 0)
    assert TaskUsage.objects.get(pk=repaired.pk).input_tokens == 700


def test_later_cutoff_does_not_repair_again(repaired: TaskUsage) -> None:
    """A cutoff after the repair's own updated_at would match the row by time alone."""
    later = repaired.updated_at + timedelta(milliseconds=1)
    time.sleep(0.01)
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        assert later < cursor.fetchone()[0]
    assert load_summary(later, None).totals.rows == 0
    result = execute_backfill(ExecuteOptions(cutoff=later))
    assert result.rows_updated == 0
    assert TaskUsage.objects.get(pk=repaired.pk).input_tokens == 700
    assert BackfillJournal.objects.count() == 1


def test_updated_at_set_back_by_hand_does_not_make_it_eligible(repaired: TaskUsage) -> None:
    TaskUsage.objects.filter(pk=repaired.pk).update(updated_at=CUTOFF - timedelta(days=3))
    assert load_summary(CUTOFF, None).totals.rows == 0
    assert execute_backfill(ExecuteOptions(cutoff=CUTOFF)).rows_updated == 0
    assert TaskUsage.objects.get(pk=repaired.pk).input_tokens == 700


def test_the_database_refuses_a_second_active_journal_entry(repaired: TaskUsage) -> None:
    entry = BackfillJournal.objects.get()
    run = BackfillRun.objects.get()
    with pytest.raises(IntegrityError):
        BackfillJournal.objects.create(
            run=run,
            usage_id=repaired.pk,
            old_input_tokens=700,
            new_input_tokens=400,
            cache_read_tokens=300,
            new_updated_at=entry.new_updated_at,
        )
