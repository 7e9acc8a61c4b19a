"""The candidates page: the rows the repair would change for a cutoff and workspace, with the
dry run's totals and the sidebar's counts from one grouped aggregate on ``usage.eligibility``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import SEARCH_VAR
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse

from usage import options
from usage.admin.base import ReadOnlyAdmin, names, shown
from usage.eligibility import compose, eligible_params
from usage.events import utc_text
from usage.models import BackfillRun, CandidateUsage
from usage.render import clock_cell, number, short_id, stamp, unique_prefix_length
from usage.repair.summary import CutoffError, Totals, ensure_cutoff_in_past, workspace_has_agents

# GET parameters that choose what the page lists (the command's --cutoff and --workspace-id).
CUTOFF_PARAM = "cutoff"
WORKSPACE_PARAM = "workspace"
CREATED_PARAM = "created"
CLAMPED_PARAM = "clamped"

# Totals and the sidebar's counts in one pass over the eligible rows: the empty grouping set
# is the dry run's totals; the others count rows per workspace, created month and clamped.
CANDIDATE_TOTALS_SQL = """
SELECT
    GROUPING(c.workspace_id), GROUPING(c.created_month), GROUPING(c.clamped),
    c.workspace_id, c.created_month, c.clamped,
    count(*) AS rows,
    coalesce(sum(c.input_before), 0) AS input_before,
    coalesce(sum(c.input_after), 0) AS input_after,
    coalesce(sum(c.input_tokens_removed), 0) AS input_tokens_removed,
    count(*) FILTER (WHERE c.clamped) AS clamped_rows
FROM (
    SELECT
        a.workspace_id,
        date_trunc('month', tu.created_at AT TIME ZONE 'UTC')::date AS created_month,
        {is_clamped} AS clamped,
        tu.input_tokens AS input_before,
        {corrected_input} AS input_after,
        {removed_input} AS input_tokens_removed
    FROM {eligible_from}
    WHERE {eligible_where}
) AS c
GROUP BY GROUPING SETS (
    (), (c.workspace_id), (c.created_month), (c.clamped), (c.created_month, c.clamped)
)"""

# Changes whenever a run changes which rows are eligible: it starts, a batch, it ends, a revert.
RUNS_FINGERPRINT_SQL = """
SELECT md5(coalesce(string_agg(
    concat_ws('/', id, status, rows_updated, finished_at, reverted_at), ',' ORDER BY id
), ''))
FROM {run}"""
# How long paging, filtering and searching reuse the totals pass (it reads every eligible row).
TOTALS_CACHE_SECONDS = 120


@dataclass(frozen=True)
class CandidateTotals:
    """What the page shows above the list, and the counts its sidebar and paginator use."""

    database_now: datetime
    totals: Totals
    workspaces: list[tuple[uuid.UUID, int]]
    counts: dict[tuple[date | None, bool | None], int]  # by (created month, clamped); None: any


def load_candidate_totals(
    cutoff: datetime, workspace_id: uuid.UUID | None
) -> tuple[CandidateTotals, bool]:
    """One read-only pass (refusing a cutoff not in the database's past, as the dry run does), or
    the last while no run changed anything: ingestion only takes rows out; and whether reused."""
    with connection.cursor() as cursor:
        cursor.execute(compose(RUNS_FINGERPRINT_SQL))
        runs = cursor.fetchone()[0]
    key = f"codex-candidates:{cutoff.isoformat()}:{workspace_id or 'all'}:{runs}"
    reused = cache.get(key)
    if reused is not None:
        return reused, True
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute("SELECT now()")
        database_now = cursor.fetchone()[0]
        ensure_cutoff_in_past(cutoff, database_now)
        cursor.execute(compose(CANDIDATE_TOTALS_SQL), eligible_params(cutoff, workspace_id))
        rows = cursor.fetchall()
    totals, workspaces, counts = Totals(), [], {}
    for all_ws, all_months, all_clamped, ws, month, clamped, count, *sums in rows:
        if not all_ws:
            workspaces.append((ws, count))
            continue
        counts[(None if all_months else month, None if all_clamped else clamped)] = count
        if all_months and all_clamped:
            # input_before, input_after, input_tokens_removed, clamped_rows, in Totals' order
            totals = Totals(count, *(int(value) for value in sums))
    workspaces.sort(key=lambda item: (-item[1], str(item[0])))
    result = CandidateTotals(database_now, totals, workspaces, counts)
    cache.set(key, result, TOTALS_CACHE_SECONDS)
    return result, False


@dataclass
class CandidatePage:
    """The cutoff and workspace the page lists candidates for, and what it found."""

    cutoff: datetime | None = None
    cutoff_text: str = ""
    cutoff_source: str = ""
    source_run_id: int | None = None
    workspace_id: uuid.UUID | None = None
    workspace_text: str = ""
    error: str = ""
    result: CandidateTotals | None = None
    reused: bool = False
    chosen: dict[str, Any] = field(default_factory=dict)  # the sidebar's parsed choices

    @property
    def ready(self) -> bool:
        return self.result is not None

    @property
    def totals(self) -> Totals | None:
        return self.result.totals if self.result else None


def load_candidate_page(params: Mapping[str, str]) -> CandidatePage:
    """Resolve the page's cutoff (chosen on the page, else ``CODEX_BACKFILL_CUTOFF``, else the
    latest run's; with none the page lists nothing) and workspace, then load their totals."""
    page = CandidatePage(
        cutoff_text=(params.get(CUTOFF_PARAM) or "").strip(),
        workspace_text=(params.get(WORKSPACE_PARAM) or "").strip(),
    )
    try:
        page.workspace_id = options.parse_workspace_id(page.workspace_text, name="The workspace")
    except ValueError as exc:
        page.error = str(exc)
        return page
    value = page.cutoff_text or settings.CODEX_BACKFILL_CUTOFF
    if value:
        page.cutoff_source = "chosen on this page" if page.cutoff_text else "CODEX_BACKFILL_CUTOFF"
    else:
        run = BackfillRun.objects.order_by("-started_at", "-id").only("id", "cutoff").first()
        if run is None:
            return page
        page.cutoff = run.cutoff
        page.cutoff_source = f"the latest run (#{run.pk})"
        page.source_run_id = run.pk
    # The page's own words, not the command line's flags.
    name = "The cutoff" if page.cutoff_text else page.cutoff_source
    try:
        if value:
            page.cutoff = options.parse_cutoff(value, name=name)
        page.cutoff_text = page.cutoff_text or utc_text(page.cutoff)
        page.result, page.reused = load_candidate_totals(page.cutoff, page.workspace_id)
    except CutoffError as exc:  # a ValueError too, said here in the page's words
        page.error = exc.named(name)
    except ValueError as exc:
        page.error = str(exc)
    return page


class PageFilter(admin.SimpleListFilter):
    """A sidebar filter: choices and counts from the totals pass, a parsed value ``narrow``s."""

    parse: Callable[[str], Any] = staticmethod(lambda value: None)
    otherwise = ""  # what the list shows when the value cannot be parsed

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = request.codex_candidate_page
        return self.choices_of(page) if page.ready else []

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        try:
            value = self.parse(self.value())
        except ValueError as exc:
            messages.warning(request, f"{exc}; {self.otherwise}")
            return queryset
        request.codex_candidate_page.chosen[self.parameter_name] = value
        return queryset if value is None else self.narrow(queryset, value)


class WorkspaceFilter(PageFilter):
    """The command's --workspace-id, applied with the cutoff (the totals depend on it too)."""

    title = "workspace"
    parameter_name = WORKSPACE_PARAM
    top = 20  # the sidebar lists at most this many workspaces, those with the most candidates

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        if page.workspace_id:
            chosen = [(page.workspace_id, page.totals.rows)]
        else:
            chosen = page.result.workspaces[: self.top]
            if len(page.result.workspaces) > self.top:
                self.title = f"workspace (top {self.top} by rows)"
        # A whole id would wrap in the narrow sidebar (the chosen one is whole in the form).
        length = unique_prefix_length(ws for ws, _ in chosen)
        return [(str(ws), f"{str(ws)[:length]}… ({rows:,})") for ws, rows in chosen]


class CreatedMonthFilter(PageFilter):
    title = "created date (UTC month)"
    parameter_name = CREATED_PARAM
    otherwise = "showing every month"

    def parse(self, value: str) -> date:
        try:
            return date.fromisoformat(f"{value.strip()}-01")
        except ValueError:
            raise ValueError(
                f"created month {options.shown(value)} is not YYYY-MM, e.g. 2026-05"
            ) from None

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        counts = page.result.counts
        months = sorted(m for m, clamped in counts if m is not None and clamped is None)
        return [
            (f"{m.year:04d}-{m.month:02d}", f"{m:%B} {m.year:04d} ({counts[m, None]:,})")
            for m in months
        ]

    def narrow(self, queryset: QuerySet, month: date) -> QuerySet:
        start = datetime(month.year, month.month, 1, tzinfo=UTC)
        if (month.year, month.month) == (9999, 12):  # no month after it: no upper bound
            return queryset.filter(created_at__gte=start)
        end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        return queryset.filter(created_at__gte=start, created_at__lt=end)


class ClampedFilter(PageFilter):
    title = "clamped (input below cached tokens)"
    parameter_name = CLAMPED_PARAM
    otherwise = "showing all rows"

    def parse(self, value: str) -> bool:
        if value in ("yes", "no"):
            return value == "yes"
        raise ValueError(f"clamped {options.shown(value)} must be yes or no")

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        counts = page.result.counts
        return [
            ("yes", f"Yes ({counts.get((None, True), 0):,})"),
            ("no", f"No ({counts.get((None, False), 0):,})"),
        ]

    def narrow(self, queryset: QuerySet, value: Any) -> QuerySet:
        return queryset.filter(clamped=value)


@admin.register(CandidateUsage)
class CandidateUsageAdmin(ReadOnlyAdmin):
    # Fits the list's 1,050 px at a 1,400 px window: the task is on the row's page.
    list_display = names(
        "usage_id workspace agent_name model created updated input cached corrected removed"
    )
    list_filter = (WorkspaceFilter, CreatedMonthFilter, ClampedFilter)
    # Oldest first; sortable only where an index serves the order (no sort of every candidate).
    ordering = ("created_at",)
    sortable_by = ("usage_id", "created", "updated")
    search_fields = ("task__agent__name",)
    search_help_text = "Search by task id, usage row id (a UUID) or agent name (any part)."
    kept_params = (CUTOFF_PARAM, WORKSPACE_PARAM)
    page_params = (CUTOFF_PARAM,)  # the workspace filter reads the workspace
    sections = {
        "Usage row": "row_id workspace_id agent_name task provider model created_shown "
        "updated_shown",
        "Tokens now": "input_shown cached_shown output_shown cache_write_shown cost_shown",
        "Repair": "corrected_shown removed_shown is_clamped repair_status",
    }
    # A row already repaired shows its journal entry, not what a repair would compute.
    optional_fields = dict.fromkeys(
        names("corrected_shown removed_shown is_clamped"), lambda row: row.repair_entry is None
    )
    notes = {"Repair": "candidate_repair"}

    usage_id = shown("id", "id", short_id)
    workspace = shown("workspace", "task.agent.workspace_id", short_id)
    agent_name = shown("agent", "task.agent.name", template="usage_agent")
    created = shown("created", "created_at", clock_cell)
    updated = shown("updated", "updated_at", clock_cell)
    input = shown("input", "input_tokens", number)
    cached = shown("cached", "cache_read_tokens", number)
    corrected = shown("input after", "corrected_input", template="usage_corrected")
    removed = shown("removed", "tokens_removed", number)
    row_id = shown("ID", "id")
    workspace_id = shown("workspace", "task.agent.workspace_id", template="usage_workspace")
    created_shown = shown("created at", "created_at", stamp)
    updated_shown = shown("updated at", "updated_at", stamp, none="none")
    corrected_shown = shown("input after the repair", "corrected_input", number)
    removed_shown = shown("tokens removed", "tokens_removed", number)
    input_shown = shown("input tokens", "input_tokens", number)
    cached_shown = shown("cached input tokens (cache read)", "cache_read_tokens", number)
    output_shown = shown("output tokens", "output_tokens", number)
    cache_write_shown = shown("cache write tokens", "cache_write_tokens", number)
    cost_shown = shown("cost (USD ticks)", "cost_usd_ticks", number)
    is_clamped = shown("clamped", "clamped", bool)
    repair_status = shown("repaired by", "repair_entry", template="usage_repair_status")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).select_related("task__agent").with_repair()
        page = getattr(request, "codex_candidate_page", None)
        if page is None:
            return queryset  # A single row's page: any usage row, repaired or not.
        return queryset.eligible(page.cutoff, page.workspace_id) if page.ready else queryset.none()

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in (WORKSPACE_PARAM, CREATED_PARAM, CLAMPED_PARAM)

    def known_count(self, request: HttpRequest) -> int | None:
        """The count for the sidebar's choices (the filters ran first) if the totals counted it."""
        page = request.codex_candidate_page
        if not page.ready:
            return 0
        if request.GET.get(SEARCH_VAR, "").strip():
            return None
        return page.result.counts.get(
            (page.chosen.get(CREATED_PARAM), page.chosen.get(CLAMPED_PARAM)), 0
        )

    def search(self, request: HttpRequest, queryset: QuerySet, term: str) -> QuerySet:
        try:
            wanted = uuid.UUID(term)
        except ValueError:
            return queryset.filter(task__agent__name__icontains=term)
        return queryset.filter(Q(task_id=wanted) | Q(id=wanted))

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        page = load_candidate_page(request.GET)
        request.codex_candidate_page = page  # the filters, list and paginator read it
        if page.error:
            messages.error(request, page.error)
        elif page.ready and not (page.totals.rows or workspace_has_agents(page.workspace_id)):
            messages.warning(request, f"No agent belongs to workspace {page.workspace_id}.")
        context = {
            "title": "Candidates: the rows the repair would change",
            "candidate_page": page,
            "totals_cache_seconds": TOTALS_CACHE_SECONDS,
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def render_change_form(
        self, request: HttpRequest, context: dict, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        context["title"] = f"Usage row {context['object_id']}"
        return super().render_change_form(request, context, *args, **kwargs)
