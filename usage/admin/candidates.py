"""The candidates page: the rows ``backfill_codex_usage_cache`` would repair, with its sidebar
filters, search and columns (what it lists and totals is ``candidate_page``'s).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse

from usage.admin.base import (
    ReadOnlyAdmin,
    ReadOnlyChangeList,
    id_column,
    names,
    sections,
    shown,
    templated,
)
from usage.admin.candidate_page import (
    CLAMPED_PARAM,
    CREATED_PARAM,
    CUTOFF_PARAM,
    TOTALS_CACHE_SECONDS,
    WORKSPACE_CHOICES,
    WORKSPACE_PARAM,
    CandidatePage,
    load_candidate_page,
    month_range,
    parse_clamped,
    parse_month,
)
from usage.admin.formats import clock_cell, number, stamp, unique_prefix_length
from usage.models import CandidateUsage

# Where the candidates page keeps its state for the request (filters and paginator read it).
PAGE_ATTRIBUTE = "codex_candidate_page"


def _page(request: HttpRequest) -> CandidatePage | None:
    return getattr(request, PAGE_ATTRIBUTE, None)


class PageFilter(admin.SimpleListFilter):
    """A sidebar filter whose choices (``choices_of``) and counts come from the page's totals
    pass; a parsed value narrows the list (``narrow``)."""

    parse: Callable[[str | None], Any] = staticmethod(lambda value: None)
    otherwise = ""  # what the list shows when the value cannot be parsed

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = _page(request)
        return [] if page is None or page.result is None else self.choices_of(page)

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        try:
            value = self.parse(self.value())
        except ValueError as exc:
            messages.warning(request, f"{exc}; {self.otherwise}")
            return queryset
        return queryset if value is None else self.narrow(queryset, value)


class WorkspaceFilter(PageFilter):
    """The command's --workspace-id: the workspaces with the most candidates, by count.

    Applied with the cutoff, not here: the totals depend on it too.
    """

    title = "workspace"
    parameter_name = WORKSPACE_PARAM

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        if page.workspace_id:
            chosen = [(page.workspace_id, page.totals.rows)]
        else:
            chosen = page.result.workspaces[:WORKSPACE_CHOICES]
            if len(page.result.workspaces) > WORKSPACE_CHOICES:
                self.title = f"workspace (top {WORKSPACE_CHOICES} by rows)"
        # A whole id wraps mid-id in the narrow sidebar: the shortest prefix that tells the
        # choices apart (the chosen one is whole in the form).
        length = unique_prefix_length(ws for ws, _ in chosen)
        return [(str(ws), f"{str(ws)[:length]}… ({rows:,})") for ws, rows in chosen]


class CreatedMonthFilter(PageFilter):
    title = "created date (UTC month)"
    parameter_name = CREATED_PARAM
    parse = staticmethod(parse_month)
    otherwise = "showing every month"

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        return [
            (f"{m.year:04d}-{m.month:02d}", f"{m:%B} {m.year:04d} ({rows:,})")
            for m, rows in page.result.months
        ]

    def narrow(self, queryset: QuerySet, value: Any) -> QuerySet:
        start, end = month_range(value)
        queryset = queryset.filter(created_at__gte=start)
        return queryset if end is None else queryset.filter(created_at__lt=end)


class ClampedFilter(PageFilter):
    title = "clamped (input below cached tokens)"
    parameter_name = CLAMPED_PARAM
    parse = staticmethod(parse_clamped)
    otherwise = "showing all rows"

    def choices_of(self, page: CandidatePage) -> list[tuple[str, str]]:
        counts = page.result.counts
        return [
            ("yes", f"Yes ({counts.get((None, True), 0):,})"),
            ("no", f"No ({counts.get((None, False), 0):,})"),
        ]

    def narrow(self, queryset: QuerySet, value: Any) -> QuerySet:
        return queryset.filter(clamped=value)


class CandidateChangeList(ReadOnlyChangeList):
    """Keeps the cutoff in every link, but not as a field lookup."""

    kept_params = (CUTOFF_PARAM, WORKSPACE_PARAM)

    def get_filters_params(self, params: dict | None = None) -> dict:
        lookup_params = super().get_filters_params(params)
        lookup_params.pop(CUTOFF_PARAM, None)
        return lookup_params


@admin.register(CandidateUsage)
class CandidateUsageAdmin(ReadOnlyAdmin):
    """The rows the command would repair for the page's cutoff and workspace."""

    # Fits the list's 1,050 px at a 1,400 px window: ids are a prefix (the full id in the
    # tooltip), times may wrap between date and time, a clamped row says so by its input
    # after; the task is on the row's page (and the search finds it).
    list_display = names(
        "usage_id workspace agent_name model created updated input cached corrected removed"
    )
    list_display_links = ("usage_id",)
    list_filter = (WorkspaceFilter, CreatedMonthFilter, ClampedFilter)
    list_select_related = ("task__agent",)
    # Oldest first, and sortable only where an index serves the order: the page reads just
    # the rows it shows instead of sorting every candidate.
    ordering = ("created_at",)
    sortable_by = ("usage_id", "created", "updated")
    search_fields = ("task__agent__name",)
    search_help_text = "Search by task id, usage row id (a UUID) or agent name (any part)."
    changelist_class = CandidateChangeList
    fieldsets = sections(
        {
            "Usage row": "row_id workspace_id agent_name task provider model created_shown "
            "updated_shown",
            "Tokens now": "input_shown cached_shown output_shown cache_write_shown cost_shown",
            "Repair": "corrected_shown removed_shown is_clamped repair_status",
        }
    )
    # A row already repaired shows its journal entry, not what a repair would compute.
    optional_fields = {
        name: lambda row: row.repair_entry is None
        for name in ("corrected_shown", "removed_shown", "is_clamped")
    }

    usage_id = id_column("id", "id")
    workspace = id_column("workspace", "task.agent.workspace_id")
    created = shown("created", "created_at", clock_cell, sort=True)
    updated = shown("updated", "updated_at", clock_cell, sort=True)
    input = shown("input", "input_tokens", number, sort=True)
    cached = shown("cached", "cache_read_tokens", number, sort=True)
    removed = shown("removed", "tokens_removed", number, sort=True)
    row_id = shown("ID", "id")
    created_shown = shown("created at", "created_at", stamp)
    updated_shown = shown("updated at", "updated_at", stamp, none="none")
    corrected_shown = shown("input after the repair", "corrected_input", number)
    removed_shown = shown("tokens removed", "tokens_removed", number)
    input_shown = shown("input tokens", "input_tokens", number)
    cached_shown = shown("cached input tokens (cache read)", "cache_read_tokens", number)
    output_shown = shown("output tokens", "output_tokens", number)
    cache_write_shown = shown("cache write tokens", "cache_write_tokens", number)
    cost_shown = shown("cost (USD ticks)", "cost_usd_ticks", number)
    is_clamped = shown("clamped", "clamped", bool, sort=True, boolean=True)

    notes = {"Repair": "candidate_repair"}

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).select_related("task__agent").with_repair()
        page = _page(request)
        if page is None:
            return queryset  # A single row's page: any usage row, repaired or not.
        if not page.ready:
            return queryset.none()
        return queryset.eligible(page.cutoff, page.workspace_id)

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in (WORKSPACE_PARAM, CREATED_PARAM, CLAMPED_PARAM)

    def known_count(self, request: HttpRequest) -> int | None:
        page = _page(request)
        return page.known_count(request.GET) if page is not None else None

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
        setattr(request, PAGE_ATTRIBUTE, page)
        if page.error:
            messages.error(request, page.error)
        elif page.ready and not page.workspace_known:
            messages.warning(request, f"No agent belongs to workspace {page.workspace_id}.")
        context = {
            "title": "Candidates: the rows the repair would change",
            "candidate_page": page,
            "totals_cache_seconds": TOTALS_CACHE_SECONDS,
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = {"title": f"Usage row {object_id}", **(extra_context or {})}
        return super().changeform_view(request, object_id, form_url, context)

    workspace_id = templated("workspace", "usage_workspace")
    agent_name = templated("agent", "usage_agent", ordering="task__agent__name")
    corrected = templated("input after", "usage_corrected", ordering="corrected_input")

    repair_status = templated("repaired by", "usage_repair_status")
