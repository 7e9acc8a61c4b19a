"""The runs and their journal, read-only: what each repair did, row by row."""

from __future__ import annotations

import uuid

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from usage import render
from usage.admin.base import (
    ReadOnlyAdmin,
    candidates_url,
    journal_url,
    number_or_dash,
    run_url,
    usage_url,
)
from usage.admin.candidate_page import cutoff_param
from usage.models import BackfillJournal, BackfillRun


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
        return number_or_dash(obj.rows_updated)

    @admin.display(description="input tokens removed", ordering="input_tokens_removed")
    def removed(self, obj: BackfillRun) -> str:
        return number_or_dash(obj.input_tokens_removed)

    @admin.display(description="clamped rows", ordering="clamped_rows")
    def clamped(self, obj: BackfillRun) -> str:
        return number_or_dash(obj.clamped_rows)

    @admin.display(description="rows remaining", ordering="rows_remaining")
    def remaining(self, obj: BackfillRun) -> str:
        return number_or_dash(obj.rows_remaining)

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
            f"{number_or_dash(obj.plan_rows)} ({number_or_dash(obj.rows_planned)} still "
            "candidates at the execute)"
        )

    @admin.display(description="journal")
    def journal_link(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}">{} entries</a>',
            journal_url(run__id__exact=obj.pk),
            number_or_dash(obj.rows_updated),
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
        return number_or_dash(obj.old_input_tokens)

    @admin.display(description="input after", ordering="new_input_tokens")
    def new_input(self, obj: BackfillJournal) -> str:
        return number_or_dash(obj.new_input_tokens)

    @admin.display(description="tokens removed")
    def removed(self, obj: BackfillJournal) -> str:
        return number_or_dash(obj.old_input_tokens - obj.new_input_tokens)

    @admin.display(description="cached tokens", ordering="cache_read_tokens")
    def cached(self, obj: BackfillJournal) -> str:
        return number_or_dash(obj.cache_read_tokens)
