"""The read-only admin, through Django's test client on a real PostgreSQL.

Covers each page (candidates, runs, journal, usage row), who may see them, that nothing can
be written through them, that the candidates page agrees with the command's dry run, and
that it stays within a fixed number of queries without counting the table.
"""

from __future__ import annotations

import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from sandbox.dataset import DatasetSpec, generate_dataset
from tests.factories import AFTER, BEFORE, CUTOFF, make_agent, make_task, make_usage
from tests.support import CUTOFF_ARG
from usage.admin.base import COUNT_CAP
from usage.admin.candidates import CandidateUsageAdmin
from usage.eligibility import CANDIDATE_IDS_SQL, compose, eligible_params
from usage.models import BackfillJournal, BackfillRun, CandidateUsage, TaskUsage
from usage.repair.summary import load_summary

pytestmark = pytest.mark.django_db

CANDIDATES = "admin:usage_candidateusage_changelist"
RUNS = "admin:usage_backfillrun_changelist"
JOURNAL = "admin:usage_backfilljournal_changelist"
DRY_RUN_TOTALS = re.compile(
    r"([\d,]+) rows would change; ([\d,]+) input tokens removed "
    r"\(([\d,]+) -> ([\d,]+)\); ([\d,]+) clamped"
)


def candidates(**params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return reverse(CANDIDATES) + (f"?{query}" if query else "")


def listed_ids(response: Any) -> set[uuid.UUID]:
    return {row.id for row in response.context["cl"].result_list}


def eligible_ids(workspace_id: uuid.UUID | None = None) -> set[uuid.UUID]:
    with connection.cursor() as cursor:
        cursor.execute(compose(CANDIDATE_IDS_SQL), eligible_params(CUTOFF, workspace_id))
        return {row[0] for row in cursor.fetchall()}


def page_totals(response: Any) -> tuple[int, int, int, int, int]:
    t = response.context["candidate_page"].totals
    return (t.rows, t.input_before, t.input_after, t.input_tokens_removed, t.clamped_rows)


def dry_run_totals(workspace_id: uuid.UUID | None) -> tuple[int, ...]:
    """The totals line the command prints, parsed back into numbers."""
    args = ["--cutoff", CUTOFF_ARG]
    if workspace_id:
        args += ["--workspace-id", str(workspace_id)]
    out = io.StringIO()
    call_command("backfill_codex_usage_cache", *args, stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    if "nothing to do" in text:
        return (0, 0, 0, 0, 0)
    rows, removed, before, after, clamped = (
        int(v.replace(",", "")) for v in DRY_RUN_TOTALS.search(text).groups()
    )
    return (rows, before, after, removed, clamped)


@pytest.fixture(autouse=True)
def _fresh_page(settings: Any) -> None:
    """No default cutoff from the environment, and no totals kept from another test's data."""
    settings.CODEX_BACKFILL_CUTOFF = ""
    cache.clear()


@pytest.fixture
def scenario() -> dict[str, Any]:
    """Two workspaces; eligible rows (one clamped, one in May) and rows that are not."""
    ws_a, ws_b = uuid.uuid4(), uuid.uuid4()
    task_a = make_task(make_agent(ws_a, name="alpha-agent"))
    task_b = make_task(make_agent(ws_b, name="beta-agent"))
    may = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
    rows = {
        "plain": make_usage(task_a, input_tokens=1000, cache_read_tokens=300),
        "clamped": make_usage(task_a, input_tokens=100, cache_read_tokens=300),
        "may": make_usage(task_a, input_tokens=5000, cache_read_tokens=1000, created_at=may),
        "other_ws": make_usage(task_b, input_tokens=2000, cache_read_tokens=500),
        "after_cutoff": make_usage(task_a, updated_at=AFTER),
        "non_codex": make_usage(task_a, provider="claude"),
        "no_cache": make_usage(task_a, cache_read_tokens=0),
        "zero_input": make_usage(task_a, input_tokens=0),
    }
    return {"ws_a": ws_a, "ws_b": ws_b, "task_a": task_a, "task_b": task_b, **rows}


@pytest.fixture
def run_and_entry(scenario: dict[str, Any]) -> tuple[BackfillRun, BackfillJournal]:
    """A run record and a journal entry written directly (for the read-only checks)."""
    run = BackfillRun.objects.create(
        status=BackfillRun.Status.SUCCEEDED,
        cutoff=CUTOFF,
        batch_size=1000,
        started_at=timezone.now(),
        rows_updated=1,
    )
    entry = BackfillJournal.objects.create(
        run=run,
        usage_id=scenario["plain"].id,
        old_input_tokens=1000,
        old_updated_at=BEFORE,
        new_input_tokens=700,
        cache_read_tokens=300,
        new_updated_at=timezone.now(),
    )
    return run, entry


# -- who may see the pages -----------------------------------------------------------------


def test_pages_need_a_staff_login(client: Client) -> None:
    for name in (CANDIDATES, RUNS, JOURNAL, "admin:index"):
        response = client.get(reverse(name))
        assert response.status_code == 302, name
        assert response["Location"].startswith(reverse("admin:login")), name

    User.objects.create_user("someone", password="x-pass-123")
    assert client.login(username="someone", password="x-pass-123")
    response = client.get(reverse(CANDIDATES))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_needs_the_view_permission(client: Client, scenario: dict[str, Any]) -> None:
    staff = User.objects.create_user("staff", password="x-pass-123", is_staff=True)
    client.force_login(staff)
    for name in (CANDIDATES, RUNS, JOURNAL):
        assert client.get(reverse(name)).status_code == 403, name

    codenames = ("view_candidateusage", "view_backfillrun", "view_backfilljournal")
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="usage", codename__in=codenames)
    )
    for name in (CANDIDATES, RUNS, JOURNAL):
        assert client.get(reverse(name)).status_code == 200, name
    response = client.get(candidates(cutoff=CUTOFF_ARG))
    assert listed_ids(response) == eligible_ids()


# -- the candidates page -------------------------------------------------------------------


def test_without_a_cutoff_the_page_explains_instead_of_listing(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    with CaptureQueriesContext(connection) as ctx:
        response = admin_client.get(candidates())
    assert response.status_code == 200
    content = response.content.decode()
    assert "Choose a cutoff to list the candidates" in content
    assert "CODEX_BACKFILL_CUTOFF" in content
    assert list(response.context["cl"].result_list) == []
    assert str(scenario["plain"].id)[:8] not in content
    assert not any("task_usage" in q["sql"] for q in ctx.captured_queries)


def test_default_cutoff_comes_from_the_setting(
    admin_client: Client, scenario: dict[str, Any], settings: Any
) -> None:
    settings.CODEX_BACKFILL_CUTOFF = "2026-06-13T10:00:00+02:00"
    response = admin_client.get(candidates())
    page = response.context["candidate_page"]
    assert page.cutoff == CUTOFF
    assert page.cutoff_source == "CODEX_BACKFILL_CUTOFF"
    assert listed_ids(response) == eligible_ids()
    assert 'value="2026-06-13T08:00:00Z"' in response.content.decode()


def test_a_bad_cutoff_setting_is_reported(
    admin_client: Client, scenario: dict[str, Any], settings: Any
) -> None:
    settings.CODEX_BACKFILL_CUTOFF = "yesterday"
    response = admin_client.get(candidates())
    assert response.status_code == 200
    shown = " ".join(str(m) for m in response.context["messages"])
    # In the page's words: the setting's name, never the command line's flag (issue 26).
    assert shown.startswith("CODEX_BACKFILL_CUTOFF 'yesterday' is not an RFC 3339"), shown
    assert "--cutoff" not in shown
    assert list(response.context["cl"].result_list) == []


def test_default_cutoff_comes_from_the_latest_run(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    older = BackfillRun.objects.create(
        cutoff=CUTOFF - timedelta(days=30),
        batch_size=1000,
        started_at=timezone.now() - timedelta(days=1),
    )
    latest = BackfillRun.objects.create(cutoff=CUTOFF, batch_size=1000, started_at=timezone.now())
    response = admin_client.get(candidates())
    page = response.context["candidate_page"]
    assert page.cutoff == CUTOFF
    assert page.source_run_id == latest.pk != older.pk
    assert reverse("admin:usage_backfillrun_change", args=[latest.pk]) in (
        response.content.decode()
    )
    assert listed_ids(response) == eligible_ids()


def test_lists_exactly_the_rows_the_command_would_repair(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    response = admin_client.get(candidates(cutoff=CUTOFF_ARG))
    assert response.status_code == 200
    expected = {scenario[k].id for k in ("plain", "clamped", "may", "other_ws")}
    assert listed_ids(response) == expected == eligible_ids()

    rows = {row.id: row for row in response.context["cl"].result_list}
    clamped = rows[scenario["clamped"].id]
    assert (clamped.corrected_input, clamped.tokens_removed, clamped.clamped) == (0, 100, True)
    plain = rows[scenario["plain"].id]
    assert (plain.corrected_input, plain.tokens_removed, plain.clamped) == (700, 300, False)

    content = response.content.decode()
    for header in (
        "id",
        "workspace",
        "agent",
        "model",
        "created",
        "updated",
        "input",
        "cached",
        "input after",
        "removed",
    ):
        assert f">{header}<" in content.lower() or f">{header}</a>" in content.lower(), header
    assert content.count('class="clamped"') == 1  # the clamped row says so by its input after
    assert "alpha-agent" in content and "beta-agent" in content
    assert 'name="_selected_action"' not in content  # no bulk actions
    assert page_totals(response) == (4, 8100, 6200, 1900, 1)
    assert '<td id="total-input-before" data-value="8100">8,100</td>' in content


@pytest.mark.parametrize("scope", ["all", "first", "second"])
def test_totals_equal_the_dry_run_on_the_same_data(admin_client: Client, scope: str) -> None:
    with connection.cursor() as cursor:
        generate_dataset(cursor, DatasetSpec(rows=3000, cutoff=CUTOFF))
    workspaces = sorted({g.workspace_id for g in load_summary(CUTOFF, None).groups}, key=str)
    workspace = {"all": None, "first": workspaces[0], "second": workspaces[-1]}[scope]

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, workspace=workspace or ""))
    shown = page_totals(response)
    summary = load_summary(CUTOFF, workspace).totals
    assert shown[0] > 0
    assert shown == (
        summary.rows,
        summary.input_before,
        summary.input_after,
        summary.input_tokens_removed,
        summary.clamped_rows,
    )
    assert shown == dry_run_totals(workspace)
    content = response.content.decode()
    assert f'id="total-rows" data-value="{summary.rows}">{summary.rows:,}<' in content
    assert f'id="total-removed" data-value="{summary.input_tokens_removed}"' in content

    # The counts the sidebar and the paginator use are the list's real sizes.
    cl = response.context["cl"]
    assert cl.result_count == summary.rows == cl.queryset.count()
    for params in ({"clamped": "yes"}, {"clamped": "no"}, {"created": "2026-05"}):
        filtered = admin_client.get(
            candidates(cutoff=CUTOFF_ARG, workspace=workspace or "", **params)
        )
        fcl = filtered.context["cl"]
        assert fcl.result_count == fcl.queryset.count(), params
        if params == {"clamped": "yes"}:
            assert fcl.result_count == summary.clamped_rows
            assert all(row.clamped for row in fcl.result_list)


def test_filters_and_search(admin_client: Client, scenario: dict[str, Any]) -> None:
    ws_a, ws_b = scenario["ws_a"], scenario["ws_b"]
    response = admin_client.get(candidates(cutoff=CUTOFF_ARG))
    content = response.content.decode()
    assert f"workspace={ws_a}" in content and f"workspace={ws_b}" in content
    assert "Yes (1)" in content and "May 2026 (1)" in content

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, workspace=ws_b))
    assert listed_ids(response) == {scenario["other_ws"].id} == eligible_ids(ws_b)
    assert page_totals(response) == (1, 2000, 1500, 500, 0)
    # Links on the page keep the cutoff.
    assert f"cutoff={CUTOFF_ARG}".replace(":", "%3A") in response.content.decode()

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, clamped="yes"))
    assert listed_ids(response) == {scenario["clamped"].id}
    assert page_totals(response)[0] == 4  # the totals stay the dry run's

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, created="2026-05"))
    assert listed_ids(response) == {scenario["may"].id}

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, q="beta"))
    assert listed_ids(response) == {scenario["other_ws"].id}

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, q=scenario["task_a"].id))
    assert listed_ids(response) == {scenario[k].id for k in ("plain", "clamped", "may")}
    assert "3 results" in response.content.decode()

    response = admin_client.get(candidates(cutoff=CUTOFF_ARG))  # oldest first
    assert [r.id for r in response.context["cl"].result_list][0] == scenario["may"].id
    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, o="-5"))  # newest first
    assert [r.id for r in response.context["cl"].result_list][-1] == scenario["may"].id


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"cutoff": "2026-06-13"}, "is not an RFC 3339 timestamp"),
        ({"cutoff": CUTOFF_ARG, "workspace": "nope"}, "is not a UUID"),
        ({"cutoff": "2999-01-01T00:00:00Z"}, "is not before the database"),
        ({"cutoff": CUTOFF_ARG, "workspace": uuid.uuid4()}, "No agent belongs to workspace"),
        ({"cutoff": CUTOFF_ARG, "created": "May"}, "is not YYYY-MM"),
        ({"cutoff": CUTOFF_ARG, "clamped": "maybe"}, "must be yes or no"),
        ({"cutoff": CUTOFF_ARG, "input_tokens__gt": "1"}, None),
    ],
)
def test_bad_values_show_a_message_not_an_error(
    admin_client: Client, scenario: dict[str, Any], params: dict[str, Any], message: str | None
) -> None:
    response = admin_client.get(candidates(**params))
    if message is None:  # a hand-made field lookup is not allowed
        assert response.status_code == 400
        return
    assert response.status_code == 200
    assert message in response.content.decode()


def test_page_load_is_a_fixed_number_of_queries_without_a_count(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    for params in ({}, {"clamped": "yes"}, {"created": "2026-05", "p": "1"}):
        with CaptureQueriesContext(connection) as ctx:
            response = admin_client.get(candidates(cutoff=CUTOFF_ARG, **params))
        assert response.status_code == 200
        statements = [q["sql"] for q in ctx.captured_queries]
        assert not [s for s in statements if s.upper().startswith("SELECT COUNT(")], statements
        # session, user, runs fingerprint, [begin, read only, now(), totals, commit], rows
        assert len(statements) <= 10, statements

    with CaptureQueriesContext(connection) as ctx:
        response = admin_client.get(candidates(cutoff=CUTOFF_ARG, q="alpha"))
    counts = [q["sql"] for q in ctx.captured_queries if q["sql"].startswith("SELECT COUNT(")]
    assert len(counts) == 1 and f"LIMIT {COUNT_CAP + 1}" in counts[0]
    assert len(ctx.captured_queries) <= 10


def test_totals_are_reused_until_a_run_changes_rows(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    first = admin_client.get(candidates(cutoff=CUTOFF_ARG))
    assert not first.context["candidate_page"].reused
    with CaptureQueriesContext(connection) as ctx:
        again = admin_client.get(candidates(cutoff=CUTOFF_ARG, clamped="yes"))
    assert again.context["candidate_page"].reused
    assert not any("GROUPING SETS" in q["sql"] for q in ctx.captured_queries)
    assert page_totals(again) == page_totals(first) == (4, 8100, 6200, 1900, 1)
    assert "reused while no run changes anything" in again.content.decode()

    dry_run_totals(scenario["ws_a"])  # a dry run records nothing: still reused
    assert admin_client.get(candidates(cutoff=CUTOFF_ARG)).context["candidate_page"].reused

    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--workspace-id",
        str(scenario["ws_a"]),
        "--execute",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    after = admin_client.get(candidates(cutoff=CUTOFF_ARG))
    assert not after.context["candidate_page"].reused
    assert page_totals(after) == (1, 2000, 1500, 500, 0) == dry_run_totals(None)
    assert listed_ids(after) == {scenario["other_ws"].id}


def test_a_search_past_the_cap_says_more_than(
    admin_client: Client, scenario: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CandidateUsageAdmin, "count_cap", 2)
    response = admin_client.get(candidates(cutoff=CUTOFF_ARG, q="alpha"))
    assert "more than 2 results" in response.content.decode()


def test_usage_row_page_shows_any_row(admin_client: Client, scenario: dict[str, Any]) -> None:
    row = scenario["non_codex"]
    response = admin_client.get(reverse("admin:usage_candidateusage_change", args=[row.id]))
    assert response.status_code == 200
    content = response.content.decode()
    assert f"Usage row {row.id}" in content
    assert "not repaired" in content
    assert str(scenario["ws_a"]) in content


# -- runs and journal ----------------------------------------------------------------------


def test_runs_journal_and_usage_rows_link_to_each_other(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    out = io.StringIO()
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--workspace-id",
        str(scenario["ws_a"]),
        "--execute",
        stdout=out,
        stderr=io.StringIO(),
    )
    run = BackfillRun.objects.get()
    entries = list(BackfillJournal.objects.order_by("id"))
    assert {e.usage_id for e in entries} == {scenario[k].id for k in ("plain", "clamped", "may")}

    run_url = reverse("admin:usage_backfillrun_change", args=[run.pk])
    run_journal = f"{reverse(JOURNAL)}?run__id__exact={run.pk}"

    content = admin_client.get(reverse(RUNS)).content.decode()
    assert run_url in content and run_journal in content

    content = admin_client.get(run_url).content.decode()
    assert run_journal in content
    assert f"workspace={scenario['ws_a']}" in content  # the candidates for its cutoff
    assert "succeeded" in content

    response = admin_client.get(run_journal)
    assert {e.pk for e in response.context["cl"].result_list} == {e.pk for e in entries}
    content = response.content.decode()
    assert run_url in content
    for entry in entries:
        assert reverse("admin:usage_candidateusage_change", args=[entry.usage_id]) in content

    entry = entries[0]
    content = admin_client.get(
        reverse("admin:usage_backfilljournal_change", args=[entry.pk])
    ).content.decode()
    assert run_url in content
    assert reverse("admin:usage_candidateusage_change", args=[entry.usage_id]) in content

    content = admin_client.get(
        reverse("admin:usage_candidateusage_change", args=[entry.usage_id])
    ).content.decode()
    assert reverse("admin:usage_backfilljournal_change", args=[entry.pk]) in content
    assert run_url in content

    response = admin_client.get(f"{reverse(JOURNAL)}?q={entry.usage_id}")
    assert [e.pk for e in response.context["cl"].result_list] == [entry.pk]
    response = admin_client.get(f"{reverse(JOURNAL)}?q=not-a-uuid")
    assert list(response.context["cl"].result_list) == []
    assert "is not a usage row id" in response.content.decode()

    # After the run its rows are no longer candidates; the latest run gives the default cutoff.
    response = admin_client.get(candidates())
    assert response.context["candidate_page"].source_run_id == run.pk
    assert listed_ids(response) == {scenario["other_ws"].id} == eligible_ids()


# -- strictly read-only --------------------------------------------------------------------


def _objects(scenario: dict[str, Any], run: BackfillRun, entry: BackfillJournal) -> dict:
    return {
        "candidateusage": (scenario["plain"], {"input_tokens": "1", "model": "x"}),
        "backfillrun": (run, {"status": "failed", "rows_updated": "0"}),
        "backfilljournal": (entry, {"new_input_tokens": "1", "usage_id": str(uuid.uuid4())}),
    }


def _state(obj: Any) -> tuple:
    model = TaskUsage if isinstance(obj, CandidateUsage | TaskUsage) else type(obj)
    fresh = model.objects.get(pk=obj.pk)
    return tuple(getattr(fresh, f.attname) for f in model._meta.concrete_fields)


@pytest.mark.parametrize("model", ["candidateusage", "backfillrun", "backfilljournal"])
def test_forged_writes_are_refused(
    admin_client: Client,
    scenario: dict[str, Any],
    run_and_entry: tuple[BackfillRun, BackfillJournal],
    model: str,
) -> None:
    obj, data = _objects(scenario, *run_and_entry)[model]
    before = _state(obj)
    counts = (TaskUsage.objects.count(), BackfillRun.objects.count())
    change = reverse(f"admin:usage_{model}_change", args=[obj.pk])
    delete = reverse(f"admin:usage_{model}_delete", args=[obj.pk])
    add = reverse(f"admin:usage_{model}_add")
    changelist = reverse(f"admin:usage_{model}_changelist")

    assert admin_client.post(change, data).status_code == 403
    assert admin_client.post(change, {**data, "_save": "Save"}).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert admin_client.get(delete).status_code == 403
    assert admin_client.post(add, data).status_code == 403
    assert admin_client.get(add).status_code == 403
    forged_action = {"action": "delete_selected", "_selected_action": [str(obj.pk)], "post": "yes"}
    assert admin_client.post(changelist, forged_action).status_code == 403
    assert admin_client.post(f"{changelist}?cutoff={CUTOFF_ARG}", forged_action).status_code == 403

    assert _state(obj) == before
    assert (TaskUsage.objects.count(), BackfillRun.objects.count()) == counts

    view = admin_client.get(change)
    assert view.status_code == 200
    content = view.content.decode()
    assert 'name="_save"' not in content and delete not in content
    listing = admin_client.get(f"{changelist}?cutoff={CUTOFF_ARG}").content.decode()
    assert add not in listing
    assert 'name="_selected_action"' not in listing and 'name="action"' not in listing


def test_the_workspace_filter_shows_ids_that_do_not_wrap(
    admin_client: Client, scenario: dict[str, Any]
) -> None:
    """Issue 26: a 36-character id wrapped mid-id in the sidebar."""
    html = admin_client.get(candidates(cutoff=CUTOFF_ARG)).content.decode()
    sidebar = html[html.index('id="changelist-filter"') :]
    links = re.findall(r'href="\?[^"]*workspace=([0-9a-f-]{36})[^"]*"[^>]*>([^<]+)<', sidebar)
    assert len(links) == 2, links
    for workspace, label in links:
        prefix = label.split("…")[0].strip()
        assert workspace.startswith(prefix) and 4 <= len(prefix) < 36, (workspace, label)
