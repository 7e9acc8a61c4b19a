"""Django's error pages (``DJANGO_DEBUG=1``) without secrets: no DATABASE_URL, password or key,
whatever the name of the setting or variable holding one."""

from __future__ import annotations

import html
import re
from typing import Any

from django.conf import settings
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from usage.environment import url_secrets

HIDDEN = SafeExceptionReporterFilter.cleansed_substitute


def known_secrets() -> list[str]:
    found = url_secrets(getattr(settings, "DATABASE_URL", ""))
    found += [str(db["PASSWORD"]) for db in settings.DATABASES.values() if db.get("PASSWORD")]
    found.append(settings.SECRET_KEY)
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
        if cleansed is not self.cleansed_substitute and _holds_secret(cleansed, known_secrets()):
            return self.cleansed_substitute
        return cleansed

    def get_traceback_frame_variables(self, request: Any, tb_frame: Any) -> Any:
        secrets = known_secrets()
        return [
            (name, self.cleansed_substitute if _holds_secret(value, secrets) else value)
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]


class SecretHidingReporter(ExceptionReporter):
    def get_traceback_html(self) -> str:
        return _without_secrets(super().get_traceback_html(), escaped=True)

    def get_traceback_text(self) -> str:
        return _without_secrets(super().get_traceback_text(), escaped=False)


def _without_secrets(text: str, *, escaped: bool) -> str:
    for secret in known_secrets():
        text = text.replace(secret, HIDDEN)
        if escaped:
            text = text.replace(html.escape(secret), HIDDEN)
    return text
