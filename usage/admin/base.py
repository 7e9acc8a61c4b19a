"""The read-only base of every admin page (no add, change, delete, action or history): fields
declared as data, lists that never count a big table. ``usage.serving`` refuses every write."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from usage.render import SHORT_ID_DEFAULT, names, short_id, text, unique_prefix_length

# Counting stops here while searching: enough to page through, never a scan of everything.
COUNT_CAP = 10_000


def html(name: str, **context: Any) -> SafeString:
    """A fragment of a page (a field, a fieldset's note) from ``admin/usage/<name>.html``."""
    return mark_safe(render_to_string(f"admin/usage/{name}.html", context).strip())


def shown(
    description: str,
    attribute: str | Callable[[Any], Any],
    fmt: Callable[[Any], Any] = text,
    *,
    none: str | None = None,
    optional: bool = False,
    link: str = "",
    template: str = "",
) -> Callable[[Any, Any], Any]:
    """An attribute (dotted for a relation; a method is called; a list sorts by it) or a function
    of the record, formatted (bool: an icon; short_id: unique on the page, maybe a ``link``) or by
    ``fields/<template>.html``; ``none`` stands for None or "", ``optional``: shown only if set."""
    get = attribute if callable(attribute) else attrgetter(attribute)

    @admin.display(
        description=description,
        ordering=None if callable(attribute) else attribute.replace(".", "__"),
        boolean=fmt is bool or None,
    )
    def show(model_admin: ReadOnlyAdmin, obj: Any) -> Any:
        if template:
            return html(f"fields/{template}", obj=obj)
        value = get(obj)
        value = value() if callable(value) else value
        if none is not None and value in (None, ""):
            return none
        if fmt is not short_id:
            return fmt(value)
        lengths = getattr(obj, "id_prefix_lengths", {})
        shown_id = short_id(value, lengths.get(attribute, SHORT_ID_DEFAULT))
        if not link or value is None:
            return shown_id
        return format_html('<a href="{}">{}</a>', reverse(link, args=[value]), shown_id)

    if optional:
        show.shown_if = get  # type: ignore[attr-defined]
    if fmt is short_id:
        show.id_attribute = attribute  # type: ignore[attr-defined]
    return show


class ReadOnlyChangeList(ChangeList):
    """A change list told its page's own GET parameters (``kept_params``, ``page_params``)."""

    @property
    def reset_query(self) -> str:
        kept = self.model_admin.kept_params
        return "?" + urlencode({k: v for k, v in self.params.items() if k in kept})

    def get_filters_params(self, params: dict | None = None) -> dict:
        lookup_params = super().get_filters_params(params)
        return {k: v for k, v in lookup_params.items() if k not in self.model_admin.page_params}


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only pages (a staff login with the view permission): no bulk actions, no history."""

    actions = None
    show_facets = admin.ShowFacets.NEVER
    show_full_result_count = False
    kept_params: tuple[str, ...] = ()  # GET parameters the "show all" link keeps
    page_params: tuple[str, ...] = ()  # GET parameters the page reads, never field lookups
    count_cap = COUNT_CAP  # lists count at most this many rows; past it they say "more than"
    sections: dict[str, str] = {}  # the record page's fieldsets: {title: "field field ..."}
    optional_fields: dict[str, Callable[[Any], Any]] = {}  # field -> test the record must pass
    notes: dict[str, str] = {}  # a fieldset's description: title -> template in notes/, with obj

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    has_add_permission = has_delete_permission = has_change_permission

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """Every shown field: the detail pages render values, never inputs."""
        return [name for layout in self.sections.values() for name in names(layout)]

    def history_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> Any:
        raise Http404("the tool's records are never edited: they have no history")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        shown_sets = []
        for title, layout in self.sections.items():
            fields = tuple(name for name in names(layout) if self.has_field(name, obj))
            if fields:  # a section with nothing to show (a run never reverted) is left out
                note = self.notes.get(title)
                description = note and html(f"notes/{note}", obj=obj)
                shown_sets.append((title, {"fields": fields, "description": description}))
        return shown_sets

    def has_field(self, name: str, obj: Any) -> bool:
        test = self.optional_fields.get(name) or getattr(getattr(self, name, None), "shown_if", 0)
        return not test or bool(test(obj))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ReadOnlyChangeList

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        """The list, each row told how long a prefix tells its ids apart on the page."""
        changelist = super().get_changelist_instance(request)
        columns = (getattr(self, name, None) for name in self.list_display)
        attributes = {getattr(c, "id_attribute", None) for c in columns} - {None}
        rows = list(changelist.result_list)  # read once; the template shows these rows
        lengths = {a: unique_prefix_length(attrgetter(a)(r) for r in rows) for a in attributes}
        for row in rows:
            row.id_prefix_lengths = lengths
        return changelist

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """A list with ``search_fields`` finds rows by ``search(request, queryset, term)``."""
        term = search_term.strip()
        if not term or not self.search_fields:
            return queryset, False
        return self.search(request, queryset, term), False

    def known_count(self, request: HttpRequest) -> int | None:
        return None

    def get_paginator(
        self, request: HttpRequest, queryset: QuerySet, per_page: int, *args: Any, **kwargs: Any
    ) -> BoundedPaginator:
        paginator = BoundedPaginator(queryset, per_page, *args, **kwargs)
        paginator.known_count = self.known_count(request)
        paginator.cap = self.count_cap
        return paginator


class BoundedPaginator(Paginator):
    """Told the count (``known_count``), or counting at most ``cap`` + 1 rows: "more than"."""

    capped = False

    @cached_property
    def count(self) -> int:
        if self.known_count is not None:
            return self.known_count
        counted = self.object_list[: self.cap + 1].count()
        self.capped = counted > self.cap
        return min(counted, self.cap)

    @property
    def count_label(self) -> str:
        return f"more than {self.count:,}" if self.capped else f"{self.count:,}"
