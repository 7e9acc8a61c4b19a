"""Requests the admin refuses before any view sees them."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

NUL_REFUSED = (
    "Bad request: the address or one of its parameters contains a NUL byte (%00), which "
    "no value in this database can hold. Remove it and try again."
)


class RejectNulBytes:
    """A NUL byte in the path or a query gets a 400 page (PostgreSQL text cannot hold one)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        values = (value for _key, given in request.GET.lists() for value in given)
        if any("\x00" in text for text in (request.path, *request.GET, *values)):
            return HttpResponseBadRequest(NUL_REFUSED, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
