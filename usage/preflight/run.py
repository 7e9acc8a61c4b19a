"""Running the pre-flight: every check, read-only, on Django's connection or the target's.

``run_preflight`` runs each check of ``usage.preflight.checks.CHECKS`` in its own savepoint
of one ``READ ONLY`` transaction that is always rolled back; ``connect_target`` opens the
pre-flight's own connection (``pytest -m preflight``) with the same limits as Django's.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
from django.conf import settings
from django.db import DatabaseError, connection, transaction

from usage.db import SQLSTATE_QUERY_CANCELED, error_text, sqlstate
from usage.preflight.checks import (
    CHECKS,
    DEFAULT_STATEMENT_TIMEOUT_SECONDS,
    LOCK_TIMEOUT_SECONDS,
    READ_ONLY_SQL,
    TIMEOUTS_SQL,
    Check,
    CheckResult,
    Context,
    failed,
)

logger = logging.getLogger("usage.preflight")


class _LoggingCursor:
    """Log each statement at DEBUG (shown with --verbosity 3), then run it."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, query: str, params: Any = None) -> Any:
        logger.debug("SQL: %s", " ".join(str(query).split()))
        return self._cursor.execute(query, params)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


@contextmanager
def _read_only_django() -> Iterator[tuple[Any, Callable[[], Any]]]:
    """Django's default connection: an atomic block (or a savepoint) rolled back at the end."""
    with transaction.atomic(), connection.cursor() as cursor:
        try:
            yield cursor, transaction.atomic
        finally:
            transaction.set_rollback(True)


@contextmanager
def _read_only_psycopg(conn: psycopg.Connection) -> Iterator[tuple[Any, Callable[[], Any]]]:
    """A psycopg connection: a transaction (or savepoint) rolled back at the end."""
    with conn.transaction(force_rollback=True), conn.cursor() as cursor:
        yield cursor, conn.transaction


def run_preflight(
    cutoff: datetime,
    workspace_id: uuid.UUID | None = None,
    *,
    conn: psycopg.Connection | None = None,
    checks: Sequence[Check] = CHECKS,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
) -> list[CheckResult]:
    """Run ``checks`` in one read-only transaction; never writes, always rolls back.

    ``conn`` is a psycopg connection to inspect instead of Django's default connection
    (the pytest pre-flight uses it to reach the real target, not the test database).
    ``statement_timeout`` (seconds) bounds every query: counting candidates scans
    ``task_usage`` when few rows are eligible.
    """
    session = _read_only_django() if conn is None else _read_only_psycopg(conn)
    results: dict[str, CheckResult] = {}
    with session as (raw_cursor, savepoint):
        raw_cursor.execute(READ_ONLY_SQL)
        raw_cursor.execute(
            TIMEOUTS_SQL,
            {
                "statement_timeout": f"{round(statement_timeout * 1000)}ms",
                "lock_timeout": f"{round(LOCK_TIMEOUT_SECONDS * 1000)}ms",
            },
        )
        ctx = Context(
            cursor=_LoggingCursor(raw_cursor),
            cutoff=cutoff,
            workspace_id=workspace_id,
            target_schema=settings.CODEX_TARGET_SCHEMA,
            tool_schema=settings.CODEX_REPAIR_SCHEMA,
        )
        for check in checks:
            results[check.name] = _run_one(check, ctx, savepoint, results, statement_timeout)
    return list(results.values())


def _run_one(
    check: Check,
    ctx: Context,
    savepoint: Callable[[], Any],
    earlier: dict[str, CheckResult],
    statement_timeout: float,
) -> CheckResult:
    blocked = [name for name in check.requires if name in earlier and not earlier[name].ok]
    if blocked:
        # Not checked counts as not passed: the pre-flight proves readiness, never assumes it.
        return CheckResult(
            check.name,
            False,
            f"not checked: needs {', '.join(blocked)}",
            f"fix {', '.join(blocked)} first, then run the pre-flight again",
            skipped=True,
        )
    started = time.monotonic()
    try:
        with savepoint():
            result = check.run(ctx)
    except (DatabaseError, psycopg.Error) as exc:
        if sqlstate(exc) == SQLSTATE_QUERY_CANCELED:
            fix = (
                f"the check's query ran longer than {statement_timeout:g}s: run the pre-flight "
                "again off-peak with a longer --statement-timeout (e.g. 10m)"
            )
        else:
            fix = "fix the error above (often a missing privilege), then run the pre-flight again"
        result = failed(f"query failed: {error_text(exc)}", fix)
    seconds = time.monotonic() - started
    logger.debug("check %s: %s in %.3fs", check.name, result.status, seconds)
    return replace(result, name=check.name, seconds=seconds)


def connect_target() -> psycopg.Connection:
    """A separate connection to the database the tool targets, for ``pytest -m preflight``.

    ``DATABASE_URL`` when set, else the sandbox's own database (not pytest's test database,
    which Django's default connection points at during the tests). ``run_preflight`` keeps
    everything on it inside a read-only transaction. It has the same limits as Django's
    connection: ``CODEX_CONNECT_TIMEOUT`` and the server-side timeouts.
    """
    limits = settings.CODEX_CONNECTION_LIMITS
    options: dict[str, Any] = {
        "autocommit": True,
        "application_name": "codex-usage-repair-preflight",
        "cursor_factory": psycopg.ClientCursor,
        "options": limits.server_options(),
        **limits.libpq_params(),
    }
    if settings.USING_SANDBOX:
        from sandbox import server

        options.update(
            host=server.ensure_sandbox(), user="postgres", dbname=settings.SANDBOX_DATABASE_NAME
        )
        return psycopg.connect(**options)
    return psycopg.connect(settings.DATABASE_URL, **options)
