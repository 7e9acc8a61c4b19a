"""Django database backend for the embedded sandbox: PostgreSQL, started on demand.

Starting the server when a connection is first needed (rather than at settings import) keeps
commands that never touch the database, such as ``--help``, instant.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper

from sandbox import server


class DatabaseWrapper(PostgresDatabaseWrapper):
    is_sandbox = True

    def get_connection_params(self) -> dict[str, Any]:
        host = server.ensure_sandbox()
        self.settings_dict["HOST"] = host
        params = super().get_connection_params()
        params["host"] = host
        return params
