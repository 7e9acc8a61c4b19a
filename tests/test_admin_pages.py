"""What the run, journal and usage row pages show, and how (issue 18, point 8).

Numbers with thousands separators, seconds with a unit, every time in UTC to the second with
its zone, the arguments as a table without ``None``, labels in words (``OS user``,
``Database role``), the run's stamp, the fields of migration 0006 when a run has them, and a
journal entry's repair time apart from the stamp written into its row.
"""

from __future__ import annotations

import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from html import unescape
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.factories import CUTOFF, make_agent, make_task, make_usage, set_rollup_state
from tests.support import CUTOFF_ARG
from usage.admin.runs import STAMP_KINDS, argument_rows
from usage.models import BackfillJournal, BackfillRun
from usage.render import clock, elapsed, number, seconds, short_id, unique_prefix_length

pytestmark = pytest.mark.django_db

# Every time on a page, as the admin writes it; and what Django's own format looks like.
CLOCK = re.compile(r"\b\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{6})? UTC\b")
DJANGO_TIME = re.compile(r"\b(?:a\.m\.|p\.m\.|noon|midnight)|\b[A-Z][a-z]{2}\. \d{1,2}, \d{4}")
WATERMARK = datetime(2026, 6, 20, 8, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fresh_page(settings: Any) -> None:
    settings.CODEX_BACKFILL_CUTOFF = ""
    cache.clear()


def page_text(response: Any) -> str:
    """The page as a reader sees it: no scripts, no tags, entities decoded."""
    assert response.status_code == 200
    html = re.sub(r"<script\b.*?</script>", " ", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html)))


def record_text(response: Any, model: str) -> str:
    """The record's part of its page: the fieldsets."""
    html = response.content.decode()
    start = html.index(f'id="{model}_form"')
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html[start:])))


def execute(*args: str) -> BackfillRun:
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        *args,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    return BackfillRun.objects.order_by("-id").first()


@pytest.fixture
def repaired() -> BackfillRun:
    """A real execute below the platform rollup's watermark, with large token counts."""
    set_rollup_state(WATERMARK, timezone.now() - timedelta(minutes=1))
    task = make_task(make_agent(name="big-agent"))
    make_usage(task, input_tokens=40_000_000, cache_read_tokens=36_627_137)
    make_usage(task, input_tokens=14_345, cache_read_tokens=20_000)  # clamped
    run = execute()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert run.stamp == BackfillRun.Stamp.BELOW_WATERMARK
    # The figure issue 18 saw raw.
    BackfillRun.objects.filter(pk=run.pk).update(rollup_max_lock_seconds=0.506613145999836)
    run.refresh_from_db()
    return run


def run_page(client: Client, run: BackfillRun) -> Any:
    return client.get(reverse("admin:usage_backfillrun_change", args=[run.pk]))


# -- the formats -----------------------------------------------------------------------------


def test_values_are_formatted_for_reading() -> None:
    assert clock(datetime(2026, 12, 3, 8, 11, 2, 123456, tzinfo=UTC)) == "2026-12-03 08:11:02 UTC"
    cet = datetime(2026, 12, 3, 9, 11, 2, 5, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    assert clock(cet, micro=True) == "2026-12-03 09:11:02.000005 UTC"
    assert clock(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01 00:00:00 UTC"
    assert clock(None) == "-"
    assert number(36627137) == "36,627,137" and number(None) == "-"
    assert seconds(0.506613145999836) == "0.507 s"
    assert seconds(12.34) == "12.3 s"
    assert seconds(245) == "4 min 05 s"
    assert seconds(7380) == "2 h 03 min"
    start = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    assert elapsed(start, start + timedelta(milliseconds=1500)) == "1.500 s"
    assert elapsed(start, None) == "-"


def test_ids_in_lists_are_their_shortest_unique_prefix() -> None:
    assert unique_prefix_length([]) == 4
    assert unique_prefix_length(["abcdef01-x", "abcdef02-x", None]) == 8
    assert unique_prefix_length(["abc9", "abc8"]) == 4
    assert unique_prefix_length(["same", "same"]) == 4
    ids = [uuid.UUID(f"{first}aa46de6-0000-4000-8000-000000000000") for first in "12"]
    assert str(short_id(ids[0], unique_prefix_length(ids))) == (
        f'<span class="short-id" title="{ids[0]}">1aa4…</span>'
    )
    assert short_id(None) == "-" and short_id("abc", 8) == "abc"


def test_a_list_shows_ids_as_prefixes_unique_on_its_page(admin_client: Client) -> None:
    workspace = uuid.UUID("5eedf00d-0000-4000-8000-000000000000")
    task = make_task(make_agent(workspace))
    rows = [make_usage(task, input_tokens=100 + i, cache_read_tokens=10) for i in range(3)]
    response = admin_client.get(
        reverse("admin:usage_candidateusage_changelist"), {"cutoff": CUTOFF_ARG}
    )
    html = response.content.decode()
    length = unique_prefix_length(row.id for row in rows)
    for row in rows:
        assert f'title="{row.id}">{str(row.id)[:length]}…</span>' in html
    assert f'title="{workspace}">5eed…</span>' in html  # one workspace: the shortest prefix


def test_arguments_read_as_options_without_none() -> None:
    recorded = {
        "plan": "None",
        "cutoff": "2026-06-13T08:00:00Z",
        "batch_size": "1000",
        "workspace_id": "None",
        "plan_max_age": "None",
        "lock_timeout": "5s",
        "rebuild_rollup": "True",
        "max_replication_lag": None,
        "some_later_option": "x",
    }
    rows = dict(argument_rows(recorded))
    assert list(rows)[:3] == ["--cutoff", "--workspace-id", "--plan"]
    assert (
        rows["--plan"] == rows["--workspace-id"] == rows["--max-replication-lag"] == ("not given")
    )
    assert rows["--batch-size"] == "1000" and rows["--lock-timeout"] == "5s"
    assert rows["--no-rebuild-rollup"] == "not given"
    assert rows["--some-later-option"] == "x"
    assert dict(argument_rows({"rebuild_rollup": "False"})) == {"--no-rebuild-rollup": "given"}
    assert not [value for value in rows.values() if "None" in value]


# -- a run's page ----------------------------------------------------------------------------


def test_a_runs_page_reads_as_words_numbers_and_utc_times(
    admin_client: Client, repaired: BackfillRun
) -> None:
    run = repaired
    response = run_page(admin_client, run)
    text = record_text(response, "backfillrun")

    assert "None" not in page_text(response)
    assert not DJANGO_TIME.search(text), DJANGO_TIME.search(text)
    times = CLOCK.findall(text)
    assert clock(run.started_at) in times and clock(run.cutoff) in times
    assert run.input_tokens_removed == 36_627_137 + 14_345
    for raw in ("36641482", "0.506613145999836", "0.5066"):
        assert raw not in text, raw
    assert "Input tokens removed: 36,641,482" in text
    assert "Longest hold of lock 4246: 0.507 s" in text
    assert f"Batch size: {number(50_000)}" in text  # the default: the most rows a batch takes
    for label in ("OS user:", "Database role:", "Client host:", "PID:", "Backend PID:"):
        assert label in text, label
    assert "Os user" not in text and "Db role" not in text
    assert f"Backend PID: {run.backend_pid}" in text

    # The arguments: a table of options; the unset ones say so.
    html = response.content.decode()
    assert '<table class="arguments">' in html
    assert "<code>--batch-size</code>" in html and "<code>--plan</code>" in html
    assert "--plan not given" in text and "--no-rebuild-rollup not given" in text
    assert '"None"' not in html and "{&quot;" not in html
    # "not given" is greyed by the stylesheet's class, written as a real attribute.
    assert '<code>--plan</code></th><td class="quiet">not given</td>' in html
    assert "&quot;quiet&quot;" not in html

    # The stamp: kind, base and the watermark it was read from, and why.
    assert f"Stamp: {STAMP_KINDS[BackfillRun.Stamp.BELOW_WATERMARK]}" in text
    assert f"Top stamp: {clock(run.stamp_base, micro=True)}" in text
    assert f"Rollup watermark at the start: {clock(WATERMARK, micro=True)}" in text
    assert "on purpose" in text and "never re-rolls" in text

    # Fields the run does not have are left out.
    for label in ("Error:", "Reverted at:", "Continues:", "Continued by:", "Plan made at"):
        assert label not in text, label


def test_a_running_runs_page_shows_its_progress(
    admin_client: Client, repaired: BackfillRun
) -> None:
    """Issue 26: a running run's page showed no live progress."""
    run = repaired
    assert "Progress:" not in record_text(run_page(admin_client, run), "backfillrun")
    BackfillRun.objects.filter(pk=run.pk).update(
        status=BackfillRun.Status.RUNNING,
        started_at=timezone.now() - timedelta(seconds=100),
        rows_planned=4_000,
        rows_updated=1_000,
    )
    text = record_text(run_page(admin_client, run), "backfillrun")
    found = re.search(r"Progress: 1,000 of 4,000 rows \(25%\), (\d+) rows/s since it started, "
                      r"ETA (.+?) \(as of its last batch", text)  # fmt: skip
    assert found, text
    assert 9 <= int(found.group(1)) <= 10  # 1,000 rows in about 100 s
    assert found.group(2).startswith(("5 min", "4 min"))  # 3,000 rows left at about 10/s


def test_a_record_has_no_history_button_and_no_history_page(
    admin_client: Client, repaired: BackfillRun
) -> None:
    """Issue 26: the HISTORY button led to an empty history (nothing is ever edited)."""
    page = run_page(admin_client, repaired).content.decode()
    history = reverse("admin:usage_backfillrun_history", args=[repaired.pk])
    assert history not in page and "historylink" not in page
    assert admin_client.get(history).status_code == 404


def test_a_runs_page_shows_its_latest_revert_when_there_was_one(
    admin_client: Client, repaired: BackfillRun
) -> None:
    """Issue 26, point 5: a half-done revert was nowhere on the run's page."""
    run = repaired
    text = record_text(run_page(admin_client, run), "backfillrun")
    assert "Revert" not in text and "rows restored" not in text  # never reverted
    started = WATERMARK + timedelta(minutes=3)
    BackfillRun.objects.filter(pk=run.pk).update(
        revert_state=BackfillRun.RevertState.FAILED,
        revert_started_at=started,
        revert_finished_at=started + timedelta(seconds=554),
        rows_restored=1,
        revert_error="revert of run 1 stopped: database error: hourly rollup unavailable",
    )
    text = record_text(run_page(admin_client, run), "backfillrun")
    assert "State of its latest revert: Failed" in text
    assert f"Revert started at: {clock(started)}" in text
    assert f"Revert ended at: {clock(started + timedelta(seconds=554))}" in text
    assert "Rows restored: 1 of 2" in text
    assert "Why the revert did not finish: revert of run 1 stopped: database error" in text
    # A revert that is running (or died without a trace) says both.
    BackfillRun.objects.filter(pk=run.pk).update(
        revert_state=BackfillRun.RevertState.RUNNING, revert_finished_at=None, revert_error=""
    )
    text = record_text(run_page(admin_client, run), "backfillrun")
    assert "State of its latest revert: Running (or stopped without a trace" in text
    assert "Revert ended at" not in text and "Why the revert did not finish" not in text


def test_a_runs_page_shows_the_fields_of_migration_0006_when_set(
    admin_client: Client, repaired: BackfillRun
) -> None:
    run = repaired
    text = record_text(run_page(admin_client, run), "backfillrun")
    # A real execute records the stamps it wrote and its rollup's path.
    stamps = f"from {clock(run.stamp_first, micro=True)} to {clock(run.stamp_last, micro=True)}"
    assert f"Stamps written: {stamps}" in text
    assert "Rollup function recognised: this project's fixture of migration 213" in text
    assert "Why this path: the tool's own aggregate-first recompute" in text
    # A run without them (--no-rebuild-rollup chooses no path) leaves them out.
    BackfillRun.objects.filter(pk=run.pk).update(
        stamp_first=None,
        stamp_last=None,
        rollup_path="",
        rollup_function="",
        rollup_fingerprint="",
        rollup_path_reason="",
    )
    text = record_text(run_page(admin_client, run), "backfillrun")
    for label in ("Stamps written:", "Path:", "Rollup function recognised:", "Why this path:"):
        assert label not in text, label

    first = WATERMARK - timedelta(microseconds=2)
    last = WATERMARK - timedelta(microseconds=1)
    later = BackfillRun.objects.create(
        status=BackfillRun.Status.SUCCEEDED,
        cutoff=CUTOFF,
        batch_size=500,
        started_at=timezone.now(),
        continues=run,
    )
    BackfillRun.objects.filter(pk=run.pk).update(
        stamp_first=first,
        stamp_last=last,
        rollup_path=BackfillRun.RollupPath.FUNCTION,
        rollup_function="unknown",
        rollup_fingerprint="sha256:" + "ab" * 32,
        rollup_path_reason="the installed function is not a version the tool knows",
    )
    response = run_page(admin_client, run)
    text = record_text(response, "backfillrun")
    assert f"Stamps written: from {clock(first, micro=True)} to {clock(last, micro=True)}" in text
    assert "Path: the platform's rollup_task_usage_hourly_window" in text
    assert "Rollup function recognised: unknown" in text
    assert "sha256:" + "ab" * 32 in text
    assert "Why this path: the installed function is not a version the tool knows" in text
    later_url = reverse("admin:usage_backfillrun_change", args=[later.pk])
    assert f'<a href="{later_url}">run #{later.pk}</a>' in response.content.decode()
    assert f"Continued by: run #{later.pk} (Succeeded)" in text

    text = record_text(run_page(admin_client, later), "backfillrun")
    assert f"Continues: run #{run.pk} (Succeeded)" in text
    assert "Continued by:" not in text


def test_the_runs_list_shows_times_and_numbers_the_same_way(
    admin_client: Client, repaired: BackfillRun
) -> None:
    BackfillRun.objects.filter(pk=repaired.pk).update(rollup_state=BackfillRun.RollupState.PENDING)
    response = admin_client.get(reverse("admin:usage_backfillrun_changelist"))
    text = page_text(response)
    assert not DJANGO_TIME.search(text)
    assert clock(repaired.started_at) in text and clock(repaired.cutoff) in text
    assert number(repaired.input_tokens_removed) in text
    assert "rollup pending" in text
    assert f"run__id__exact={repaired.pk}" in response.content.decode()  # rows → its journal


# -- a journal entry's page ------------------------------------------------------------------


def test_a_journal_entry_shows_its_repair_time_and_the_stamp_apart(
    admin_client: Client, repaired: BackfillRun
) -> None:
    entry = BackfillJournal.objects.filter(run=repaired).order_by("id").first()
    assert entry.repaired_at is not None
    assert entry.new_updated_at < WATERMARK < entry.repaired_at  # the stamp is not the time
    response = admin_client.get(reverse("admin:usage_backfilljournal_change", args=[entry.pk]))
    text = record_text(response, "backfilljournal")
    whole = page_text(response)

    repaired_at = clock(entry.repaired_at)
    assert (
        f"Journal entry #{entry.pk}: usage row {entry.usage_id}, repaired by run "
        f"#{repaired.pk} at {repaired_at}" in whole
    )
    assert text.index("Repaired at") < text.index("Stamp written to updated_at")
    assert f"<strong>{repaired_at}</strong>" in response.content.decode()
    stamp = clock(entry.new_updated_at, micro=True)
    assert f"Stamp written to updated_at: {stamp}" in text
    assert f"Old updated_at (a revert restores it): {clock(entry.old_updated_at, micro=True)}" in (
        text
    )
    assert "on purpose" in text and "watermark" in text and "Reverted at: not reverted" in text
    assert f"Input before: {number(entry.old_input_tokens)}" in text
    assert not DJANGO_TIME.search(whole) and "New updated at" not in whole

    listing = page_text(admin_client.get(reverse("admin:usage_backfilljournal_changelist")))
    # The list shows the stamp to the microsecond too, as the README promises (issue 26).
    assert repaired_at in listing and clock(entry.new_updated_at, micro=True) in listing
    assert not DJANGO_TIME.search(listing)


def test_a_usage_rows_page_uses_the_same_formats(
    admin_client: Client, repaired: BackfillRun
) -> None:
    entry = BackfillJournal.objects.filter(run=repaired).order_by("id").first()
    response = admin_client.get(
        reverse("admin:usage_candidateusage_change", args=[entry.usage_id])
    )
    text = record_text(response, "candidateusage")
    assert not DJANGO_TIME.search(text)
    assert f"Input tokens: {number(entry.new_input_tokens)}" in text
    assert f"repaired at {clock(entry.repaired_at)}" in text
    # Already repaired: its journal entry, not what a repair would compute now.
    assert "Input after the repair" not in text

    fresh = make_usage(make_task(make_agent()), input_tokens=1_234_567, cache_read_tokens=1_000)
    text = record_text(
        admin_client.get(reverse("admin:usage_candidateusage_change", args=[fresh.id])),
        "candidateusage",
    )
    assert "Input after the repair: 1,233,567" in text and "not repaired" in text
    assert f"Created at: {clock(fresh.created_at, micro=True)}" in text


def test_a_run_without_a_record_of_its_stamp_still_reads(admin_client: Client) -> None:
    """A run recorded before the stamp fields existed, stopped early: dashes, no errors."""
    run = BackfillRun.objects.create(
        status=BackfillRun.Status.FAILED,
        cutoff=CUTOFF,
        batch_size=1000,
        started_at=timezone.now(),
        arguments={},
        error="canceling statement due to lock timeout",
        workspace_id=uuid.uuid4(),
    )
    text = record_text(run_page(admin_client, run), "backfillrun")
    assert "Error: canceling statement due to lock timeout" in text
    assert "Finished at: not finished" in text and "Stamp: -" in text
    assert "Arguments: -" in text
