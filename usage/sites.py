"""The admin site of the tool: the tool's own pages only, for reading, without a password form.

Logins are created and changed with ``manage.py`` (``createsuperuser``, ``changepassword``),
never through the browser, so that nothing can be written through the admin. The site makes
that true by itself, whatever the order of ``INSTALLED_APPS`` and whatever other admin modules
are imported:

* it serves only the tool's own models: ``django.contrib.auth``'s admin module registers User
  and Group (with add, change and password pages) on whatever site is the default one, and
  autodiscovery imports it after ours, so unregistering them from our module cannot work;
  ``register`` here simply does not take a model of another app;
* every view it serves answers only GET and HEAD (a POST, forged or not, is refused with 403
  before any form sees it), except logging out;
* Django's ``/admin/password_change/`` answers 404, and its pages show no link to it
  (``templates/admin/base_site.html``).
"""

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
from django.http import Http404, HttpRequest, HttpResponse

logger = logging.getLogger("usage.admin")

PASSWORD_FORM_GONE = (
    "This admin changes no password: run `python manage.py changepassword USERNAME` "
    "against the same database instead."
)
READ_ONLY = "this admin is read-only"
# The apps whose models the site serves: the tool's own, and nothing else.
SERVED_APP_LABELS = frozenset({"usage"})
READING_METHODS = ("GET", "HEAD")


class ReviewAdminSite(AdminSite):
    """Django's admin site for the tool's models only, reading only, less the password form."""

    def register(
        self,
        model_or_iterable: type[Model] | Iterable[type[Model]],
        admin_class: Any = None,
        **options: Any,
    ) -> None:
        """Register the tool's models; a model of another app (User, Group) is not served."""
        models = (
            [model_or_iterable]
            if isinstance(model_or_iterable, ModelBase)
            else list(model_or_iterable)
        )
        served = [m for m in models if m._meta.app_label in SERVED_APP_LABELS]
        for model in models:
            if model not in served:
                logger.debug("the admin does not serve %s", model._meta.label)
        if served:
            super().register(served, admin_class, **options)

    def admin_view(self, view: Callable[..., HttpResponse], cacheable: bool = False) -> Any:
        """Every view of the site, wrapped so that only reading methods reach it."""
        if view == self.logout:
            return super().admin_view(view, cacheable)

        def reading_only(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in READING_METHODS:
                raise PermissionDenied(READ_ONLY)
            return view(request, *args, **kwargs)

        return super().admin_view(update_wrapper(reading_only, view), cacheable)

    def password_change(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        raise Http404(PASSWORD_FORM_GONE)

    def password_change_done(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        raise Http404(PASSWORD_FORM_GONE)


class ReviewAdminConfig(AdminConfig):
    """``django.contrib.admin`` with ``ReviewAdminSite`` as ``admin.site``."""

    default = False  # Not the default config of the ``usage`` package it lives in.
    default_site = "usage.sites.ReviewAdminSite"
