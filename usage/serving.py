"""Serving the admin safely: never with a key anyone could know (``runserver`` and the WSGI entry
point refuse, ``check --deploy`` reports); the tool's own models, read-only, no password form
(logins are made with manage.py); no NUL bytes; no secret on error pages (``DJANGO_DEBUG=1``)."""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Callable, Iterable
from functools import update_wrapper
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.contrib.admin.apps import AdminConfig
from django.contrib.admin.sites import AdminSite
from django.core import checks
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.db.models.base import ModelBase
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from usage.environment import SECRET_KEY_MIN_LENGTH, key_problem

KEY_EXAMPLE = (
    "DJANGO_SECRET_KEY=\"$(python -c 'import secrets; "
    f"print(secrets.token_urlsafe({SECRET_KEY_MIN_LENGTH}))')\""
)
NUL_REFUSED = (
    "Bad request: the address or one of its parameters contains a NUL byte (%00), which "
    "no value in this database can hold. Remove it and try again."
)
HIDDEN = SafeExceptionReporterFilter.cleansed_substitute


def serving_refusal() -> str:
    source = settings.CODEX_SECRET_KEY_SOURCE
    if not source:
        return (
            "DJANGO_SECRET_KEY is not set: the admin of a real database is not served "
            f"without a secret key of its own; set it once per install, e.g. export {KEY_EXAMPLE}"
        )
    problem = key_problem(settings.SECRET_KEY)
    if problem:
        return f"{source} {problem}: the admin is not served with a weak key; e.g. {KEY_EXAMPLE}"
    return ""


@checks.register(checks.Tags.security, deploy=True)
def check_secret_key_source(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    refusal = serving_refusal()
    return [checks.Error(refusal, id="usage.E001")] if refusal else []


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
        for model in model_or_iterable:
            if model._meta.app_label == "usage":  # the tool's own models only
                super().register(model, admin_class, **options)

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
        raise Http404(
            "This admin changes no password: run `python manage.py changepassword USERNAME` "
            "against the same database instead."
        )

    password_change_done = password_change


class ReviewAdminConfig(AdminConfig):
    default = False  # Not the default config of the ``usage`` package it lives in.
    default_site = "usage.serving.ReviewAdminSite"


class RejectNulBytes:
    """A NUL byte in the path or a query gets a 400 page (PostgreSQL text cannot hold one)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        values = (value for _key, given in request.GET.lists() for value in given)
        if any("\x00" in text for text in (request.path, *request.GET, *values)):
            return HttpResponseBadRequest(NUL_REFUSED, content_type="text/plain; charset=utf-8")
        return self.get_response(request)


def known_secrets() -> list[str]:
    """The database URL and its password (as written and decoded), passwords, the key."""
    url = getattr(settings, "DATABASE_URL", "")
    found = [url, settings.SECRET_KEY]
    found += [str(db["PASSWORD"]) for db in settings.DATABASES.values() if db.get("PASSWORD")]
    with contextlib.suppress(ValueError):  # a URL that does not parse has no password to hide
        password = urlsplit(url).password or ""
        found += [password, unquote(password)]
    # Longest first, so that a password inside the URL goes with the URL.
    return sorted({s for s in found if s}, key=len, reverse=True)


def _holds_secret(value: Any, secrets: list[str]) -> bool:
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # noqa: BLE001 - what cannot be shown safely is not shown
        return True
    return any(secret in text for secret in secrets)


class SecretHidingFilter(SafeExceptionReporterFilter):
    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|DATABASE_URL|DSN", flags=re.I
    )

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        return self.cleansed_substitute if _holds_secret(cleansed, known_secrets()) else cleansed

    def get_traceback_frame_variables(self, request: Any, tb_frame: Any) -> Any:
        secrets = known_secrets()
        return [
            (name, self.cleansed_substitute if _holds_secret(value, secrets) else value)
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]


class SecretHidingReporter(ExceptionReporter):
    def get_traceback_html(self) -> str:
        return _without_secrets(super().get_traceback_html())

    def get_traceback_text(self) -> str:
        return _without_secrets(super().get_traceback_text())


def _without_secrets(text: str) -> str:
    for secret in known_secrets():
        text = text.replace(secret, HIDDEN).replace(html.escape(secret), HIDDEN)
    return text
