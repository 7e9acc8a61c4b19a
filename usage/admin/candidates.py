"""The candidates page: the rows ``backfill_codex_usage_cache`` would repair, read-only.

What it lists and totals is ``usage.admin.candidate_page``'s; this is the page itself: its
sidebar filters, its search and its columns.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html

from usage.admin.base import (
    BoundedPaginator,
    ReadOnlyAdmin,
    ReadOnlyChangeList,
    candidates_url,
    journal_url,
    refuse_writes,
    run_url,
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
from usage.admin.formats import clock, clock_cell, number, unique_prefix_length
from usage.models import BackfillJournal, CandidateUsage

# Where the candidates page keeps its state for the request (filters and paginator read it).
PAGE_ATTRIBUTE = "codex_candidate_page"


def _page(request: HttpRequest) -> CandidatePage | None:
    return getattr(request, PAGE_ATTRIBUTE, None)


class WorkspaceFilter(admin.SimpleListFilter):
    """The command's --workspace-id: the workspaces with the most candidates, by count."""

    title = "workspace"
    parameter_name = WORKSPACE_PARAM

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = _page(request)
        if page is None or page.result is None:
            return []
        if page.workspace_id:
            chosen = [(page.workspace_id, page.totals.rows)]
        else:
            chosen = page.result.workspaces[:WORKSPACE_CHOICES]
            if len(page.result.workspaces) > WORKSPACE_CHOICES:
                self.title = f"workspace (top {WORKSPACE_CHOICES} by rows)"
        # A 36-character id wrapped mid-id in the narrow sidebar: each is shown as the
        # shortest prefix that tells the choices apart (the chosen one is whole in the form).
        length = unique_prefix_length(ws for ws, _ in chosen)
        return [(str(ws), f"{str(ws)[:length]}… ({rows:,})") for ws, rows in chosen]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset  # Applied with the cutoff: the totals depend on it too.


class CreatedMonthFilter(admin.SimpleListFilter):
    title = "created date (UTC month)"
    parameter_name = CREATED_PARAM

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = _page(request)
        if page is None or page.result is None:
            return []
        return [
            (f"{m.year:04d}-{m.month:02d}", f"{m:%B} {m.year:04d} ({rows:,})")
            for m, rows in page.result.months
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        try:
            month = parse_month(self.value())
        except ValueError as exc:
            messages.warning(request, f"{exc}; showing every month")
            return queryset
        if month is None:
            return queryset
        start, end = month_range(month)
        queryset = queryset.filter(created_at__gte=start)
        return queryset if end is None else queryset.filter(created_at__lt=end)


class ClampedFilter(admin.SimpleListFilter):
    title = "clamped (input below cached tokens)"
    parameter_name = CLAMPED_PARAM

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = _page(request)
        if page is None or page.result is None:
            return []
        counts = page.result.counts
        return [
            ("yes", f"Yes ({counts.get((None, True), 0):,})"),
            ("no", f"No ({counts.get((None, False), 0):,})"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        try:
            clamped = parse_clamped(self.value())
        except ValueError as exc:
            messages.warning(request, f"{exc}; showing all rows")
            return queryset
        return queryset if clamped is None else queryset.filter(clamped=clamped)


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
    list_display = (
        "usage_id",
        "workspace",
        "agent_name",
        "model",
        "created",
        "updated",
        "input",
        "cached",
        "corrected",
        "removed",
    )
    list_display_links = ("usage_id",)
    id_columns = {
        "usage_id": lambda row: row.id,
        "workspace": lambda row: row.task.agent.workspace_id,
    }
    list_filter = (WorkspaceFilter, CreatedMonthFilter, ClampedFilter)
    list_select_related = ("task__agent",)
    # Oldest first, and sortable only where an index serves the order: the page reads just
    # the rows it shows instead of sorting every candidate.
    ordering = ("created_at",)
    sortable_by = ("usage_id", "created", "updated")
    search_fields = ("task__agent__name",)
    search_help_text = "Search by task id, usage row id (a UUID) or agent name (any part)."
    fieldsets = (
        (
            "Usage row",
            {
                "fields": (
                    "row_id",
                    "workspace_id",
                    "agent_name",
                    "task",
                    "provider",
                    "model",
                    "created_shown",
                    "updated_shown",
                )
            },
        ),
        (
            "Tokens now",
            {
                "fields": (
                    "input_shown",
                    "cached_shown",
                    "output_shown",
                    "cache_write_shown",
                    "cost_shown",
                )
            },
        ),
        (
            "Repair",
            {
                "fields": ("corrected_shown", "removed_shown", "is_clamped", "repair_status"),
                "description": (
                    "What the repair computes for this row as it is now. It changes the row "
                    "only if the row is a candidate for the cutoff and workspace it is run "
                    "with, and never a row it has already repaired."
                ),
            },
        ),
    )

    def get_fieldsets(self, request: HttpRequest, obj: CandidateUsage | None = None) -> Any:
        """A row already repaired shows its journal entry, not what a repair would compute."""
        if obj is None or self.active_entry(obj) is None:
            return self.fieldsets
        *rest, (title, _options) = self.fieldsets
        return [*rest, (title, {"fields": ("repair_status",)})]

    @staticmethod
    def active_entry(obj: CandidateUsage) -> BackfillJournal | None:
        """The journal entry of the repair that holds for this row (not reverted), if any."""
        return BackfillJournal.objects.filter(usage_id=obj.id, reverted_at__isnull=True).first()

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).select_related("task__agent").with_repair()
        page = _page(request)
        if page is None:
            return queryset  # A single row's page: any usage row, repaired or not.
        if not page.ready:
            return queryset.none()
        return queryset.eligible(page.cutoff, page.workspace_id)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CandidateChangeList

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in (WORKSPACE_PARAM, CREATED_PARAM, CLAMPED_PARAM)

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet,
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> BoundedPaginator:
        page = _page(request)
        known = page.known_count(request.GET) if page is not None else None
        return BoundedPaginator(
            queryset,
            per_page,
            orphans,
            allow_empty_first_page,
            known_count=known,
            cap=self.count_cap,
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            wanted = uuid.UUID(term)
        except ValueError:
            return queryset.filter(task__agent__name__icontains=term), False
        return queryset.filter(Q(task_id=wanted) | Q(id=wanted)), False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        refuse_writes(request)
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
            "latest_run_url": run_url(page.source_run_id) if page.source_run_id else "",
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

    @admin.display(description="id", ordering="id")
    def usage_id(self, obj: CandidateUsage) -> str:
        return self.short_id_of(obj, "usage_id")

    @admin.display(description="workspace", ordering="task__agent__workspace_id")
    def workspace(self, obj: CandidateUsage) -> str:
        return self.short_id_of(obj, "workspace")

    @admin.display(description="workspace")
    def workspace_id(self, obj: CandidateUsage) -> str:
        ws = obj.task.agent.workspace_id
        return format_html('{} (<a href="{}">candidates</a>)', ws, candidates_url(workspace=ws))

    @admin.display(description="agent", ordering="task__agent__name")
    def agent_name(self, obj: CandidateUsage) -> str:
        name = obj.task.agent.name
        return format_html('<span class="agent-name" title="{}">{}</span>', name, name)

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: CandidateUsage) -> str:
        return clock_cell(obj.created_at)

    @admin.display(description="updated", ordering="updated_at")
    def updated(self, obj: CandidateUsage) -> str:
        return clock_cell(obj.updated_at)

    @admin.display(description="created at")
    def created_shown(self, obj: CandidateUsage) -> str:
        return clock(obj.created_at, micro=True)

    @admin.display(description="updated at")
    def updated_shown(self, obj: CandidateUsage) -> str:
        return clock(obj.updated_at, micro=True) if obj.updated_at else "none"

    @admin.display(description="input", ordering="input_tokens")
    def input(self, obj: CandidateUsage) -> str:
        return number(obj.input_tokens)

    @admin.display(description="cached", ordering="cache_read_tokens")
    def cached(self, obj: CandidateUsage) -> str:
        return number(obj.cache_read_tokens)

    @admin.display(description="input after", ordering="corrected_input")
    def corrected(self, obj: CandidateUsage) -> str:
        if obj.clamped:
            return format_html(
                '{} <span class="clamped" title="{}">clamped</span>',
                number(obj.corrected_input),
                "input was below the cached tokens: the repair sets it to 0",
            )
        return number(obj.corrected_input)

    @admin.display(description="removed", ordering="tokens_removed")
    def removed(self, obj: CandidateUsage) -> str:
        return number(obj.tokens_removed)

    @admin.display(description="ID")
    def row_id(self, obj: CandidateUsage) -> str:
        return str(obj.id)

    @admin.display(description="input after the repair")
    def corrected_shown(self, obj: CandidateUsage) -> str:
        return number(obj.corrected_input)

    @admin.display(description="tokens removed")
    def removed_shown(self, obj: CandidateUsage) -> str:
        return number(obj.tokens_removed)

    @admin.display(description="input tokens")
    def input_shown(self, obj: CandidateUsage) -> str:
        return number(obj.input_tokens)

    @admin.display(description="cached input tokens (cache read)")
    def cached_shown(self, obj: CandidateUsage) -> str:
        return number(obj.cache_read_tokens)

    @admin.display(description="output tokens")
    def output_shown(self, obj: CandidateUsage) -> str:
        return number(obj.output_tokens)

    @admin.display(description="cache write tokens")
    def cache_write_shown(self, obj: CandidateUsage) -> str:
        return number(obj.cache_write_tokens)

    @admin.display(description="cost (USD ticks)")
    def cost_shown(self, obj: CandidateUsage) -> str:
        return number(obj.cost_usd_ticks)

    @admin.display(description="clamped", boolean=True, ordering="clamped")
    def is_clamped(self, obj: CandidateUsage) -> bool:
        return obj.clamped

    @admin.display(description="repaired by")
    def repair_status(self, obj: CandidateUsage) -> str:
        entry = self.active_entry(obj)
        history = journal_url(q=obj.id)
        if entry is None:
            return format_html(
                'not repaired (<a href="{}">journal entries for this row</a>)', history
            )
        return format_html(
            '<a href="{}">journal entry #{}</a> of <a href="{}">run #{}</a>, repaired at {}: '
            "input {} → {} (<a href='{}'>all journal entries for this row</a>)",
            reverse("admin:usage_backfilljournal_change", args=[entry.pk]),
            entry.pk,
            run_url(entry.run_id),
            entry.run_id,
            clock(entry.repaired_at),
            number(entry.old_input_tokens),
            number(entry.new_input_tokens),
            history,
        )


# -- runs ----------------------------------------------------------------------------------
