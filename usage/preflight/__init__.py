"""Pre-flight: is this database ready for the repair, checked read-only before a run; each check
in its own savepoint of one ``READ ONLY`` transaction, always rolled back, on Django's
connection or the target's own (``pytest -m preflight`` opens one)."""

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

from usage.db import SQLSTATE_QUERY_CANCELED, error_text, set_local_timeouts, sqlstate
from usage.preflight.catalog import Check, CheckResult, Context, failed, passed  # noqa: F401
from usage.preflight.checks import CHECK_NAMES, CHECKS  # noqa: F401

logger = logging.getLogger("usage.preflight")

# Every statement is bounded: the pre-flight may run on a busy production primary.
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 60.0
LOCK_TIMEOUT_SECONDS = 5.0


class _LoggingCursor:
    """Log each statement at DEBUG (shown with --verbosity 3), then run it."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.fetchone, self.fetchall = cursor.fetchone, cursor.fetchall

    def execute(self, query: str, params: Any = None) -> Any:
        logger.debug("SQL: %s", " ".join(str(query).split()))
        return self._cursor.execute(query, params)


@contextmanager
def _read_only(conn: psycopg.Connection | None) -> Iterator[tuple[Any, Callable[[], Any]]]:
    """A cursor in a transaction rolled back at the end, and how to open a savepoint in it."""
    if conn is not None:
        with conn.transaction(force_rollback=True), conn.cursor() as cursor:
            yield cursor, conn.transaction
        return
    with transaction.atomic(), connection.cursor() as cursor:
        try:
            yield cursor, transaction.atomic
        finally:
            transaction.set_rollback(True)


def run_preflight(
    cutoff: datetime,
    workspace_id: uuid.UUID | None = None,
    *,
    conn: psycopg.Connection | None = None,
    checks: Sequence[Check] = CHECKS,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
) -> list[CheckResult]:
    results: dict[str, CheckResult] = {}
    with _read_only(conn) as (raw_cursor, savepoint):
        raw_cursor.execute("SET TRANSACTION READ ONLY")
        set_local_timeouts(raw_cursor, LOCK_TIMEOUT_SECONDS, statement_timeout)
        schemas = settings.CODEX_TARGET_SCHEMA, settings.CODEX_REPAIR_SCHEMA
        ctx = Context(_LoggingCursor(raw_cursor), cutoff, workspace_id, *schemas)
        for check in checks:
            blocked = [name for name in check.requires if name in results and not results[name].ok]
            if blocked:
                # Not checked counts as not passed: the pre-flight proves readiness.
                names = ", ".join(blocked)
                fix = f"fix {names} first, then run the pre-flight again"
                why = f"not checked: needs {names}"
                results[check.name] = CheckResult(check.name, "skip", why, fix)
                continue
            started = time.monotonic()
            try:
                with savepoint():
                    result = check.run(ctx)
            except (DatabaseError, psycopg.Error) as exc:
                fix = (
                    f"the check's query ran longer than {statement_timeout:g}s: run the "
                    "pre-flight again off-peak with a longer --statement-timeout (e.g. 10m)"
                    if sqlstate(exc) == SQLSTATE_QUERY_CANCELED
                    else "fix the error above (often a missing privilege), then run the "
                    "pre-flight again"
                )
                result = failed(f"query failed: {error_text(exc)}", fix)
            seconds = time.monotonic() - started
            logger.debug("check %s: %s in %.3fs", check.name, result.status, seconds)
            results[check.name] = replace(result, name=check.name, seconds=seconds)
    return list(results.values())
