"""``check --deploy``: serving the admin for real needs a secret key of its own."""

from __future__ import annotations

from typing import Any

from django.core import checks

from usage.serving import serving_refusal


@checks.register(checks.Tags.security, deploy=True)
def check_secret_key_source(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    refusal = serving_refusal()
    if not refusal:
        return []
    return [checks.Error(refusal, id="usage.E001")]
