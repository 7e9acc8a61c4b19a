"""The admin site of the tool: for reading only, and without a password form.

Logins are created and changed with ``manage.py`` (``createsuperuser``, ``changepassword``),
never through the browser, so that nothing can be written through the admin. Django's
site would offer ``/admin/password_change/`` to every logged-in user; this one answers 404
there, and its pages show no link to it (``templates/admin/base_site.html``).
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.apps import AdminConfig
from django.contrib.admin.sites import AdminSite
from django.http import Http404, HttpRequest, HttpResponse

PASSWORD_FORM_GONE = (
    "This admin changes no password: run `python manage.py changepassword USERNAME` "
    "against the same database instead."
)


class ReviewAdminSite(AdminSite):
    """Django's admin site less the password change form."""

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
