"""App configuration: creates the tool's schema before migrations (the sandbox's backend migrates
the sandbox on its first connection)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import pre_migrate

from usage.eligibility import compose


def create_tool_schema(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    """First on the search path, a missing schema would send Django's tables to the next one."""
    with connections[using].cursor() as cursor:
        cursor.execute(compose("CREATE SCHEMA IF NOT EXISTS {tool_schema}"))


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Codex usage repair"

    def ready(self) -> None:
        from usage import serving  # noqa: F401 - registers the deploy check

        pre_migrate.connect(create_tool_schema, sender=self)
