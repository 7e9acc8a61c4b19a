"""The journal, read-only: every row a run changed, with what it was before, the time of the
repair apart from the ``updated_at`` stamp the repair wrote into the row.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from usage.admin.base import ReadOnlyAdmin, id_column, names, sections, shown, templated
from usage.admin.formats import clock, clock_cell, number, stamp, stamp_cell
from usage.models import BackfillJournal

STAMP_TITLE = "The row's updated_at"


@admin.register(BackfillJournal)
class BackfillJournalAdmin(ReadOnlyAdmin):
    list_display = names(
        "id run_link usage_cell repaired_cell old_input new_input removed cached stamp_cell "
        "reverted_cell"
    )
    list_filter = ("run", ("reverted_at", admin.EmptyFieldListFilter))
    ordering = ("-id",)
    search_fields = ("usage_id",)
    search_help_text = "Search by usage row id (a UUID)."
    fieldsets = sections(
        {
            "Repair": "repaired run_link usage_link reverted",
            "Input tokens": "old_input new_input removed cached",
            STAMP_TITLE: "old_updated_at_shown stamp_shown",
        }
    )

    usage_cell = id_column("usage row", "usage_id", link="admin:usage_candidateusage_change")
    repaired_cell = shown("repaired at", "repaired_at", clock_cell)
    reverted = shown("reverted at", "reverted_at", clock, none="not reverted")
    reverted_cell = shown("reverted", "reverted_at", clock_cell)
    old_input = shown("input before", "old_input_tokens", number)
    new_input = shown("input after", "new_input_tokens", number)
    cached = shown("cached", "cache_read_tokens", number)
    old_updated_at_shown = shown(
        "old updated_at (a revert restores it)",
        "old_updated_at",
        stamp,
        none="none (the row had no updated_at)",
    )
    stamp_shown = shown("stamp written to updated_at", "new_updated_at", stamp)
    stamp_cell = shown("stamp written", "new_updated_at", stamp_cell)

    notes = {STAMP_TITLE: "journal_stamp"}

    def render_change_form(
        self, request: HttpRequest, context: dict, *args: Any, obj: BackfillJournal, **kwargs: Any
    ) -> Any:
        context["subtitle"] = (
            f"Journal entry #{obj.pk}: usage row {obj.usage_id}, repaired by run "
            f"#{obj.run_id} at {clock(obj.repaired_at)}"
        )
        return super().render_change_form(request, context, *args, obj=obj, **kwargs)

    def search(self, request: HttpRequest, queryset: QuerySet, term: str) -> QuerySet:
        try:
            return queryset.filter(usage_id=uuid.UUID(term))
        except ValueError:
            messages.warning(request, f"{term!r} is not a usage row id (a UUID).")
            return queryset.none()

    repaired = templated("repaired at (database clock)", "journal_repaired")
    run_link = templated("run", "journal_run", ordering="run_id")
    usage_link = templated("usage row", "journal_usage")

    @admin.display(description="removed")
    def removed(self, obj: BackfillJournal) -> str:
        return number(obj.old_input_tokens - obj.new_input_tokens)
