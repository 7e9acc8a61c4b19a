"""Django database backend for the embedded sandbox: PostgreSQL, started on demand, and the
tool's own tables migrated on the first connection to the sandbox's database.

Starting the server when a connection is first needed (rather than at settings import) keeps
commands that never touch the database, such as ``--help``, instant.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper
from django.db.backends.signals import connection_created

from sandbox import server

logger = logging.getLogger("usage.sandbox")


class DatabaseWrapper(PostgresDatabaseWrapper):
    is_sandbox = True

    def get_connection_params(self) -> dict[str, Any]:
        host = server.ensure_sandbox()
        self.settings_dict["HOST"] = host
        params = super().get_connection_params()
        params["host"] = host
        return params


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


connection_created.connect(migrate_sandbox)
