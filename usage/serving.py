"""Whether the admin may be served (never with a key anyone could know): asked by
``runserver`` and the WSGI entry point, and reported by ``check --deploy``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from usage.environment import SECRET_KEY_MIN_LENGTH, key_problem

KEY_EXAMPLE = (
    "DJANGO_SECRET_KEY=\"$(python -c 'import secrets; "
    f"print(secrets.token_urlsafe({SECRET_KEY_MIN_LENGTH}))')\""
)


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
