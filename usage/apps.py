"""App configuration: creates the tool's schema before migrations and migrates the sandbox."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.db import connections
from django.db.backends.signals import connection_created
from django.db.models.signals import pre_migrate

from usage.eligibility import compose

logger = logging.getLogger("usage.apps")


def create_tool_schema(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    """First on the search path, a missing schema would send Django's tables to the next one."""
    with connections[using].cursor() as cursor:
        cursor.execute(compose("CREATE SCHEMA IF NOT EXISTS {tool_schema}"))


def migrate_sandbox(sender: Any, connection: Any, **kwargs: Any) -> None:
    """On the first connection to the sandbox's database, once: it then stops listening."""
    sandbox = getattr(connection, "is_sandbox", False)
    if not sandbox or connection.settings_dict["NAME"] != settings.SANDBOX_DATABASE_NAME:
        return
    connection_created.disconnect(migrate_sandbox)
    from django.core.management import call_command
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        logger.info("migrating the sandbox database")
        call_command("migrate", verbosity=0, interactive=False)


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Codex usage repair"

    def ready(self) -> None:
        from usage import serving  # noqa: F401 - registers the deploy check

        pre_migrate.connect(create_tool_schema, sender=self)
        connection_created.connect(migrate_sandbox)
