"""Small read-only database facts the commands need: where we are, what is there, what went
wrong."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection

from usage.eligibility import REQUIRED_TARGET_TABLES, compose
from usage.environment import timeout_setting

ROLLUP_FUNCTION_SIGNATURE = "rollup_task_usage_hourly_window(timestamptz, timestamptz)"
# The rollup queue's unique key: the repair and the revert upsert keys on it, as the platform does.
QUEUE_CONSTRAINT = "uq_task_usage_hourly_dirty_key"
REQUIRED_TOOL_TABLES = ("backfill_run", "backfill_journal")

SQLSTATE_LOCK_NOT_AVAILABLE = "55P03"
SQLSTATE_QUERY_CANCELED = "57014"
SQLSTATE_READ_ONLY = "25006"
SQLSTATE_SERIALIZATION_FAILURE = "40001"
SQLSTATE_INSUFFICIENT_PRIVILEGE = "42501"

MISSING_OBJECTS_SQL = """
SELECT name FROM unnest(%(tables)s::text[]) AS name
WHERE to_regclass(quote_ident(%(schema)s) || '.' || quote_ident(name)) IS NULL"""

# Whether the rollup function exists, what it returns, whether it runs as its owner, and what
# its fingerprint is made of: its language, its SET clauses and its body.
ROLLUP_FUNCTION_SQL = """
SELECT p.oid IS NOT NULL, format_type(p.prorettype, NULL), p.prosecdef,
       l.lanname, coalesce(array_to_string(p.proconfig, E'\\n'), ''), p.prosrc
FROM (SELECT to_regprocedure(%(signature)s) AS oid) f
LEFT JOIN pg_proc p ON p.oid = f.oid LEFT JOIN pg_language l ON l.oid = p.prolang"""

# The queue's unique constraint the tool's upserts name, and its shape.
QUEUE_CONSTRAINT_SQL = """
SELECT c.contype, i.indnullsnotdistinct,
       array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             ORDER BY k.n)
FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
WHERE c.conrelid = %(table)s::regclass AND c.conname = %(name)s"""


def set_local_timeouts(cursor: Any, lock_timeout: float, statement_timeout: float) -> None:
    """Server-side limits end a stuck statement even if this process is gone (0 means none)."""
    cursor.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        [timeout_setting(lock_timeout), timeout_setting(statement_timeout)],
    )


class TargetError(Exception):
    """The target database cannot be used as it is; the message says what to do."""


def describe_database() -> str:
    params = connection.settings_dict
    if getattr(connection, "is_sandbox", False):
        return f"sandbox (embedded PostgreSQL, database {params['NAME']})"
    host = params.get("HOST") or "local socket"
    port = params.get("PORT") or 5432
    user = params.get("USER") or "(default role)"
    return f"{host}:{port}/{params['NAME']} as {user}"


def scrub(message: str) -> str:
    """The first line (DETAIL and CONTEXT can be kilobytes of PL/pgSQL), without the password."""
    password = connection.settings_dict.get("PASSWORD") or ""
    lines = [line for line in str(message).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    return text.replace(password, "***") if password else text


def error_text(exc: BaseException) -> str:
    """The server's primary message, searched along the chain (Django's wrapper included)."""
    candidate: BaseException | None = exc
    for _ in range(8):  # a chain can loop
        primary = getattr(getattr(candidate, "diag", None), "message_primary", None)
        if primary:
            return scrub(primary)
        candidate = candidate and (candidate.__cause__ or candidate.__context__)
    return scrub(str(exc)) or type(exc).__name__


def database_failure(exc: BaseException) -> str:
    role = connection.settings_dict.get("USER") or "the role"
    advice = {
        SQLSTATE_QUERY_CANCELED: (
            "a statement ran longer than the server-side statement timeout; raise "
            "CODEX_STATEMENT_TIMEOUT (or the command's --statement-timeout) and re-run"
        ),
        SQLSTATE_INSUFFICIENT_PRIVILEGE: (
            f"{role} lacks that privilege: grant it, or connect as a role that has it "
            "(preflight_codex_usage_backfill lists every privilege the repair needs)"
        ),
        SQLSTATE_READ_ONLY: (
            "the server only reads (a standby, or default_transaction_read_only): point "
            "DATABASE_URL at the primary"
        ),
    }.get(sqlstate(exc), "check DATABASE_URL and that the server is reachable")
    return f"database error on {describe_database()}: {error_text(exc)}; {advice}"


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None) or getattr(exc.__cause__, "sqlstate", None) or None


def missing_tables(cursor: Any, tables: Sequence[str], schema: str) -> list[str]:
    cursor.execute(MISSING_OBJECTS_SQL, {"tables": list(tables), "schema": schema})
    return [row[0] for row in cursor.fetchall()]


def rollup_function(cursor: Any) -> tuple[Any, ...]:
    signature = f"{settings.CODEX_TARGET_SCHEMA}.{ROLLUP_FUNCTION_SIGNATURE}"
    cursor.execute(ROLLUP_FUNCTION_SQL, {"signature": signature})
    return cursor.fetchone()


def queue_constraint(cursor: Any) -> tuple[str, bool, list[str]] | None:
    """Its kind, NULLS NOT DISTINCT and key columns; None when the queue has no such constraint."""
    table = compose("{task_usage_hourly_dirty}")
    cursor.execute(QUEUE_CONSTRAINT_SQL, {"table": table, "name": QUEUE_CONSTRAINT})
    return cursor.fetchone()


def migrations(cursor: Any) -> tuple[set[tuple[str, str]], list[tuple[str, str]]]:
    """The applied (app, name) pairs, and those on disk not applied (replaced ones aside)."""
    from django.db.migrations.loader import MigrationLoader

    cursor.execute(compose("SELECT app, name FROM {tool_schema}.django_migrations"))
    applied = {tuple(row) for row in cursor.fetchall()}
    loader = MigrationLoader(None, ignore_no_migrations=True)
    on_disk = {key for key, migration in loader.disk_migrations.items() if not migration.replaces}
    return applied, sorted(on_disk - applied)


def check_target() -> None:
    target, tool = settings.CODEX_TARGET_SCHEMA, settings.CODEX_REPAIR_SCHEMA
    with connection.cursor() as cursor:
        if missing := missing_tables(cursor, REQUIRED_TARGET_TABLES, target):
            raise TargetError(
                f"table {', '.join(missing)} not found in schema {target!r}: point DATABASE_URL "
                "at the application database (or set CODEX_TARGET_SCHEMA)"
            )
        if not rollup_function(cursor)[0]:
            raise TargetError(
                f"function {ROLLUP_FUNCTION_SIGNATURE} not found in schema {target!r}: this "
                "database does not have the hourly rollup the repair must call; check DATABASE_URL"
            )
        constraint = queue_constraint(cursor)
        if constraint is None or constraint[0] != "u":
            raise TargetError(
                f"task_usage_hourly_dirty has no unique constraint {QUEUE_CONSTRAINT}: the "
                "repair queues hourly keys with ON CONFLICT ON CONSTRAINT, as the platform "
                "does; run preflight_codex_usage_backfill for the details"
            )
        if missing_tables(cursor, REQUIRED_TOOL_TABLES, tool):
            raise TargetError(
                f"the tool's own tables are missing from schema {tool!r}:"
                " run `python manage.py migrate` first (it creates only that schema)"
            )
        if missing := [name for app, name in migrations(cursor)[1] if app == "usage"]:
            raise TargetError(
                f"the tool's schema {tool!r} is not migrated to this version (missing "
                f"{', '.join(missing)}): run `python manage.py migrate` first (it changes "
                "only that schema)"
            )


def database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def reconnect_if_dead() -> None:
    if connection.connection is not None and not connection.is_usable():
        connection.close()


def drop_temp_table(statement: str, what: str, logger: logging.Logger) -> None:
    """When the session is gone, its temp table went with it."""
    try:
        if connection.is_usable():
            with connection.cursor() as cursor:
                cursor.execute(statement)
    except Exception:
        logger.debug("%s left to die with the session", what, exc_info=True)
