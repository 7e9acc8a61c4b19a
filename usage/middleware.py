"""Requests the admin refuses before any view sees them."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

NUL_REFUSED = (
    "Bad request: the address or one of its parameters contains a NUL byte (%00), which "
    "no value in this database can hold. Remove it and try again."
)


class RejectNulBytes:
    """A NUL byte in the path or a query parameter gets a 400 page, never a server error.

    PostgreSQL text cannot hold NUL, so the driver refuses such a value wherever a filter,
    a search or an id would pass it on; one check here covers every page.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if "\x00" in request.path or any(
            "\x00" in key or any("\x00" in value for value in values)
            for key, values in request.GET.lists()
        ):
            return HttpResponseBadRequest(NUL_REFUSED, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
