"""The read-only base of the admin: no add, change or delete, no actions, no POST.

Every page of the tool's admin derives from ``ReadOnlyAdmin``. Lists never count a big table:
``BoundedPaginator`` is told the count or counts at most ``COUNT_CAP`` + 1 rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.safestring import SafeString

from usage.admin.formats import SHORT_ID_DEFAULT, short_id, unique_prefix_length

# Counting stops here while searching: enough to page through, never a scan of everything.
COUNT_CAP = 10_000


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
    A list shows the ids of ``id_columns`` as their shortest prefix unique on the page
    (``short_id_of``).
    """

    # A list column that shows an id, and how to get the id from a row.
    id_columns: dict[str, Callable[[Any], Any]] = {}

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

    def history_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> Any:
        """No history page: nothing is ever edited here, so it could only be empty."""
        raise Http404("the tool's records are never edited: they have no history")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ReadOnlyChangeList

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        """The list, each of its rows told how long a prefix tells its ids apart on the page.

        The page's rows are read here once; the template then shows these same objects.
        """
        changelist = super().get_changelist_instance(request)
        if self.id_columns:
            rows = list(changelist.result_list)
            lengths = {
                name: unique_prefix_length(get(row) for row in rows)
                for name, get in self.id_columns.items()
            }
            for row in rows:
                row.id_prefix_lengths = lengths
        return changelist

    def short_id_of(self, obj: Any, column: str) -> SafeString | str:
        """The id of ``column`` as the list shows it: a prefix, the full id in its tooltip."""
        lengths = getattr(obj, "id_prefix_lengths", {})
        return short_id(self.id_columns[column](obj), lengths.get(column, SHORT_ID_DEFAULT))

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


class BoundedPaginator(Paginator):
    """A paginator that never counts a big list: it is told the count, or counts a few.

    With ``known_count`` (the totals pass already counted these rows) it runs no count at
    all; otherwise it counts at most ``cap`` + 1 rows and reports "more than ``cap``".
    """

    def __init__(
        self,
        object_list: Any,
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
        *,
        known_count: int | None = None,
        cap: int = COUNT_CAP,
    ) -> None:
        super().__init__(object_list, per_page, orphans, allow_empty_first_page)
        self.known_count = known_count
        self.cap = cap
        self.capped = False

    @cached_property
    def count(self) -> int:
        if self.known_count is not None:
            return self.known_count
        counted = self.object_list[: self.cap + 1].count()
        if counted > self.cap:
            self.capped = True
            return self.cap
        return counted

    @property
    def count_label(self) -> str:
        return f"more than {self.count:,}" if self.capped else f"{self.count:,}"
