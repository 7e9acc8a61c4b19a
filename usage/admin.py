"""The read-only admin: the candidates a repair would change, its runs and its journal.

Operators review here, in a browser, what a repair will do (the candidates page, whose totals
are the dry run's) and what it did (runs and journal entries, linked to each other and to the
usage rows). Nothing can be added, changed or deleted from it: every admin refuses add,
change and delete, offers no bulk action, and refuses a POST to its list.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth.models import Group, User
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html

from usage import render
from usage.candidates import (
    CLAMPED_PARAM,
    COUNT_CAP,
    CREATED_PARAM,
    CUTOFF_PARAM,
    TOTALS_CACHE_SECONDS,
    WORKSPACE_CHOICES,
    WORKSPACE_PARAM,
    BoundedPaginator,
    CandidatePage,
    CandidateUsage,
    annotate_repair,
    cutoff_param,
    eligible_only,
    load_candidate_page,
    month_range,
    parse_clamped,
    parse_month,
)
from usage.models import BackfillJournal, BackfillRun

logger = logging.getLogger("usage.admin")

admin.site.site_header = "Codex usage repair"
admin.site.site_title = "Codex usage repair"
admin.site.index_title = "Review (read-only)"
admin.site.site_url = None  # The tool has no site besides this admin.
admin.site.enable_nav_sidebar = False  # Room for the wide lists.
# Logins are made with manage.py (createsuperuser, changepassword), not through the
# browser, so that nothing here can write.
for _model in (User, Group):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)

# Where the candidates page keeps its state for the request (filters and paginator read it).
PAGE_ATTRIBUTE = "codex_candidate_page"


def _page(request: HttpRequest) -> CandidatePage | None:
    return getattr(request, PAGE_ATTRIBUTE, None)


def _short(value: Any) -> str:
    """A uuid short enough for a list column; the full value is in the tooltip."""
    text = str(value)
    return format_html('<span title="{}">{}…</span>', text, text[:8])


def _number(value: int | None) -> str:
    return "-" if value is None else render.number(value)


def run_url(run_id: int) -> str:
    return reverse("admin:usage_backfillrun_change", args=[run_id])


def usage_url(usage_id: uuid.UUID) -> str:
    return reverse("admin:usage_candidateusage_change", args=[usage_id])


def journal_url(**params: Any) -> str:
    url = reverse("admin:usage_backfilljournal_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def candidates_url(**params: Any) -> str:
    url = reverse("admin:usage_candidateusage_changelist")
    return f"{url}?{urlencode({k: v for k, v in params.items() if v})}"


def refuse_writes(request: HttpRequest) -> None:
    """Only reading methods reach a view: a POST, forged or not, never gets to Django's forms."""
    if request.method not in ("GET", "HEAD"):
        raise PermissionDenied("this admin is read-only")


class ReadOnlyChangeList(ChangeList):
    """A change list whose "show all" link keeps the page's own parameters."""

    kept_params: tuple[str, ...] = ()

    @property
    def reset_query(self) -> str:
        kept = {k: v for k, v in self.params.items() if k in self.kept_params}
        return "?" + urlencode(kept)


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only pages: no add, change or delete, no actions, no POST to the list.

    Viewing needs a staff login with the model's view permission (superusers have it).
    """

    actions = None
    show_facets = admin.ShowFacets.NEVER
    show_full_result_count = False
    list_per_page = 100
    view_on_site = False
    # Lists count at most this many rows; past it the page says "more than".
    count_cap = COUNT_CAP

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """Every shown field: the detail pages render values, never inputs."""
        if self.fieldsets:
            return flatten_fieldsets(self.fieldsets)
        return self.fields or ()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ReadOnlyChangeList

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet,
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> BoundedPaginator:
        return BoundedPaginator(
            queryset, per_page, orphans, allow_empty_first_page, cap=self.count_cap
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        refuse_writes(request)
        return super().changelist_view(request, extra_context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        refuse_writes(request)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        raise PermissionDenied("this admin is read-only")


# -- candidates ----------------------------------------------------------------------------


class WorkspaceFilter(admin.SimpleListFilter):
    """The command's --workspace-id: the workspaces with the most candidates, by count."""

    title = "workspace"
    parameter_name = WORKSPACE_PARAM

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        page = _page(request)
        if page is None or page.result is None:
            return []
        if page.workspace_id:
            return [(str(page.workspace_id), f"{page.workspace_id} ({page.totals.rows:,})")]
        top = page.result.workspaces[:WORKSPACE_CHOICES]
        if len(page.result.workspaces) > WORKSPACE_CHOICES:
            self.title = f"workspace (top {WORKSPACE_CHOICES} by rows)"
        return [(str(ws), f"{ws} ({rows:,})") for ws, rows in top]

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

    list_display = (
        "usage_id",
        "workspace",
        "agent_name",
        "task_short",
        "model",
        "created",
        "updated",
        "input",
        "cached",
        "corrected",
        "removed",
        "is_clamped",
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
    fieldsets = (
        (
            "Usage row",
            {
                "fields": (
                    "id",
                    "workspace_id",
                    "agent_name",
                    "task",
                    "provider",
                    "model",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "Tokens now",
            {
                "fields": (
                    "input_tokens",
                    "cache_read_tokens",
                    "output_tokens",
                    "cache_write_tokens",
                    "cost_usd_ticks",
                )
            },
        ),
        (
            "Repair",
            {"fields": ("corrected", "removed", "is_clamped", "repair_status")},
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = annotate_repair(super().get_queryset(request).select_related("task__agent"))
        page = _page(request)
        if page is None:
            return queryset  # A single row's page: any usage row, repaired or not.
        if not page.ready:
            return queryset.none()
        return eligible_only(queryset, page.cutoff, page.workspace_id)

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

    @admin.display(description="usage row id", ordering="id")
    def usage_id(self, obj: CandidateUsage) -> str:
        return _short(obj.id)

    @admin.display(description="workspace", ordering="task__agent__workspace_id")
    def workspace(self, obj: CandidateUsage) -> str:
        return _short(obj.task.agent.workspace_id)

    @admin.display(description="workspace")
    def workspace_id(self, obj: CandidateUsage) -> str:
        ws = obj.task.agent.workspace_id
        return format_html('{} (<a href="{}">candidates</a>)', ws, candidates_url(workspace=ws))

    @admin.display(description="agent name", ordering="task__agent__name")
    def agent_name(self, obj: CandidateUsage) -> str:
        return obj.task.agent.name

    @admin.display(description="task", ordering="task_id")
    def task_short(self, obj: CandidateUsage) -> str:
        return _short(obj.task_id)

    @admin.display(description="created at (UTC)", ordering="created_at")
    def created(self, obj: CandidateUsage) -> str:
        return render.timestamp(obj.created_at)

    @admin.display(description="updated at (UTC)", ordering="updated_at")
    def updated(self, obj: CandidateUsage) -> str:
        return render.timestamp(obj.updated_at)

    @admin.display(description="input tokens", ordering="input_tokens")
    def input(self, obj: CandidateUsage) -> str:
        return _number(obj.input_tokens)

    @admin.display(description="cached tokens", ordering="cache_read_tokens")
    def cached(self, obj: CandidateUsage) -> str:
        return _number(obj.cache_read_tokens)

    @admin.display(description="corrected input", ordering="corrected_input")
    def corrected(self, obj: CandidateUsage) -> str:
        return _number(obj.corrected_input)

    @admin.display(description="tokens removed", ordering="tokens_removed")
    def removed(self, obj: CandidateUsage) -> str:
        return _number(obj.tokens_removed)

    @admin.display(description="clamped", boolean=True, ordering="clamped")
    def is_clamped(self, obj: CandidateUsage) -> bool:
        return obj.clamped

    @admin.display(description="repaired by")
    def repair_status(self, obj: CandidateUsage) -> str:
        entry = (
            BackfillJournal.objects.filter(usage_id=obj.id, reverted_at__isnull=True)
            .select_related("run")
            .first()
        )
        history = journal_url(q=obj.id)
        if entry is None:
            return format_html(
                'not repaired (<a href="{}">journal entries for this row</a>)', history
            )
        return format_html(
            '<a href="{}">journal entry #{}</a> of <a href="{}">run #{}</a> at {}: '
            "input {} → {} (<a href='{}'>all journal entries for this row</a>)",
            reverse("admin:usage_backfilljournal_change", args=[entry.pk]),
            entry.pk,
            run_url(entry.run_id),
            entry.run_id,
            render.timestamp(entry.new_updated_at),
            _number(entry.old_input_tokens),
            _number(entry.new_input_tokens),
            history,
        )


# -- runs ----------------------------------------------------------------------------------


@admin.register(BackfillRun)
class BackfillRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "status",
        "started_at",
        "finished_at",
        "cutoff",
        "workspace_id",
        "updated",
        "removed",
        "clamped",
        "remaining",
        "rollup_state",
        "os_user",
        "journal_link",
    )
    list_filter = ("status", "rollup_state")
    ordering = ("-id",)
    fieldsets = (
        ("Run", {"fields": ("status", "error", "started_at", "finished_at", "reverted_at")}),
        ("Who", {"fields": ("os_user", "client_host", "db_role", "pid", "backend_pid")}),
        (
            "What",
            {"fields": ("cutoff", "workspace_id", "batch_size", "arguments", "candidates_link")},
        ),
        ("Saved plan", {"fields": ("plan_fingerprint_shown", "plan_made", "plan_rows_shown")}),
        (
            "Result",
            {
                "fields": (
                    "rows_planned",
                    "rows_updated",
                    "input_tokens_removed",
                    "clamped_rows",
                    "rows_remaining",
                    "journal_link",
                )
            },
        ),
        (
            "Hourly rollup",
            {
                "fields": (
                    "rollup_state",
                    "rollup_from",
                    "rollup_to",
                    "rollup_slices",
                    "rollup_rows",
                    "rollup_max_lock_seconds",
                )
            },
        ),
    )

    @admin.display(description="rows updated", ordering="rows_updated")
    def updated(self, obj: BackfillRun) -> str:
        return _number(obj.rows_updated)

    @admin.display(description="input tokens removed", ordering="input_tokens_removed")
    def removed(self, obj: BackfillRun) -> str:
        return _number(obj.input_tokens_removed)

    @admin.display(description="clamped rows", ordering="clamped_rows")
    def clamped(self, obj: BackfillRun) -> str:
        return _number(obj.clamped_rows)

    @admin.display(description="rows remaining", ordering="rows_remaining")
    def remaining(self, obj: BackfillRun) -> str:
        return _number(obj.rows_remaining)

    @admin.display(description="plan fingerprint")
    def plan_fingerprint_shown(self, obj: BackfillRun) -> str:
        return obj.plan_fingerprint or "none: executed without --plan"

    @admin.display(description="plan made at (database clock)")
    def plan_made(self, obj: BackfillRun) -> str:
        return render.timestamp(obj.plan_created_at)

    @admin.display(description="rows in the plan")
    def plan_rows_shown(self, obj: BackfillRun) -> str:
        if obj.plan_rows is None:
            return "-"
        return (
            f"{_number(obj.plan_rows)} ({_number(obj.rows_planned)} still candidates at the "
            "execute)"
        )

    @admin.display(description="journal")
    def journal_link(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}">{} entries</a>',
            journal_url(run__id__exact=obj.pk),
            _number(obj.rows_updated),
        )

    @admin.display(description="candidates now")
    def candidates_link(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}">rows still eligible for this cutoff and workspace</a>',
            candidates_url(cutoff=cutoff_param(obj.cutoff), workspace=obj.workspace_id or ""),
        )


# -- journal -------------------------------------------------------------------------------


@admin.register(BackfillJournal)
class BackfillJournalAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "run_link",
        "usage_link",
        "old_input",
        "new_input",
        "removed",
        "cached",
        "old_updated_at",
        "new_updated_at",
        "reverted_at",
    )
    list_filter = ("run", ("reverted_at", admin.EmptyFieldListFilter))
    ordering = ("-id",)
    search_fields = ("usage_id",)
    search_help_text = "Search by usage row id (a UUID)."
    fields = (
        "id",
        "run_link",
        "usage_link",
        "old_input",
        "new_input",
        "removed",
        "cached",
        "old_updated_at",
        "new_updated_at",
        "reverted_at",
    )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(usage_id=uuid.UUID(term)), False
        except ValueError:
            messages.warning(request, f"{term!r} is not a usage row id (a UUID).")
            return queryset.none(), False

    @admin.display(description="run", ordering="run_id")
    def run_link(self, obj: BackfillJournal) -> str:
        return format_html('<a href="{}">run #{}</a>', run_url(obj.run_id), obj.run_id)

    @admin.display(description="usage row", ordering="usage_id")
    def usage_link(self, obj: BackfillJournal) -> str:
        return format_html('<a href="{}">{}</a>', usage_url(obj.usage_id), obj.usage_id)

    @admin.display(description="input before", ordering="old_input_tokens")
    def old_input(self, obj: BackfillJournal) -> str:
        return _number(obj.old_input_tokens)

    @admin.display(description="input after", ordering="new_input_tokens")
    def new_input(self, obj: BackfillJournal) -> str:
        return _number(obj.new_input_tokens)

    @admin.display(description="tokens removed")
    def removed(self, obj: BackfillJournal) -> str:
        return _number(obj.old_input_tokens - obj.new_input_tokens)

    @admin.display(description="cached tokens", ordering="cache_read_tokens")
    def cached(self, obj: BackfillJournal) -> str:
        return _number(obj.cache_read_tokens)
