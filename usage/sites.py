"""The tool's admin site: its own models only (never auth's User and Group), every view but
logging out answers only GET and HEAD, no password form (logins are made with manage.py), and
no request with a NUL byte."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import update_wrapper
from typing import Any

from django.contrib.admin.apps import AdminConfig
from django.contrib.admin.sites import AdminSite
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.db.models.base import ModelBase
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest

logger = logging.getLogger("usage.admin")

PASSWORD_FORM_GONE = (
    "This admin changes no password: run `python manage.py changepassword USERNAME` "
    "against the same database instead."
)
SERVED_APP_LABELS = frozenset({"usage"})
NUL_REFUSED = (
    "Bad request: the address or one of its parameters contains a NUL byte (%00), which "
    "no value in this database can hold. Remove it and try again."
)


class ReviewAdminSite(AdminSite):
    site_header = site_title = "Codex usage repair"
    index_title = "Review (read-only)"
    site_url = None  # The tool has no site besides this admin.
    enable_nav_sidebar = False  # Room for the wide lists.

    def register(
        self,
        model_or_iterable: type[Model] | Iterable[type[Model]],
        admin_class: Any = None,
        **options: Any,
    ) -> None:
        if isinstance(model_or_iterable, ModelBase):
            model_or_iterable = [model_or_iterable]
        served = []
        for model in model_or_iterable:
            if model._meta.app_label in SERVED_APP_LABELS:
                served.append(model)
            else:
                logger.debug("the admin does not serve %s", model._meta.label)
        if served:
            super().register(served, admin_class, **options)

    def admin_view(self, view: Callable[..., HttpResponse], cacheable: bool = False) -> Any:
        """A write (a POST, forged or not) never reaches a view but logging out."""
        if view == self.logout:
            return super().admin_view(view, cacheable)

        def reading_only(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in ("GET", "HEAD"):
                raise PermissionDenied("this admin is read-only")
            return view(request, *args, **kwargs)

        return super().admin_view(update_wrapper(reading_only, view), cacheable)

    def password_change(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        raise Http404(PASSWORD_FORM_GONE)

    password_change_done = password_change


class ReviewAdminConfig(AdminConfig):
    default = False  # Not the default config of the ``usage`` package it lives in.
    default_site = "usage.sites.ReviewAdminSite"


class RejectNulBytes:
    """A NUL byte in the path or a query gets a 400 page (PostgreSQL text cannot hold one)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        values = (value for _key, given in request.GET.lists() for value in given)
        if any("\x00" in text for text in (request.path, *request.GET, *values)):
            return HttpResponseBadRequest(NUL_REFUSED, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
