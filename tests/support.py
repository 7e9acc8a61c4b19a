"""What several test files share: the cutoff argument, running a command, table snapshots, waits.

Fixtures shared the same way (a second database session, the fast lock retries) live in
``tests/conftest.py``.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from usage.eligibility import compose

# The cutoff of ``tests.factories.CUTOFF`` as an operator types it.
CUTOFF_ARG = "2026-06-13T08:00:00Z"

COLUMNS_SQL = """
SELECT column_name FROM information_schema.columns
WHERE table_schema = %s AND table_name = %s
ORDER BY ordinal_position"""

T = TypeVar("T")

# For tests whose code commits (the repair and the revert run many short transactions of
# their own, other sessions and processes must see the rows): a transactional test whose
# flush afterwards empties only the tool's own tables. Django's auth and content types are
# neither emptied nor re-created (most of a flush's time); the target tables are emptied by
# ``tests/conftest.py`` after every database test. Tests that log in use
# ``django_db(transaction=True)`` instead, or none (a rolled back test needs no flush).
COMMITS = pytest.mark.django_db(transaction=True, available_apps=["usage"])


def command(name: str, *args: str) -> tuple[str, str]:
    """Run a management command in-process; return what it wrote on stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def backfill(*args: str) -> tuple[str, str]:
    """``backfill_codex_usage_cache`` with ``args``: its stdout and stderr."""
    return command("backfill_codex_usage_cache", *args)


def table_snapshot(table: str, exclude: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """Every column of every row of a target table (but ``exclude``), in a total order."""
    with connection.cursor() as cursor:
        cursor.execute(COLUMNS_SQL, [settings.CODEX_TARGET_SCHEMA, table])
        columns = [name for (name,) in cursor.fetchall() if name not in exclude]
        assert columns, f"no columns found for {table}"
        listed = ", ".join(columns)
        cursor.execute(compose(f"SELECT {listed} FROM {{{table}}} ORDER BY {listed}"))
        return cursor.fetchall()


def wait_until(
    condition: Callable[[], T], timeout: float = 30, step: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy and return that; fail if never."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout:g}s")
        time.sleep(step)


def opted_in(config: pytest.Config, marker: str, variable: str) -> bool:
    """Opted in with ``-m MARKER`` (any expression selecting it) or ``VARIABLE=1``."""
    if os.environ.get(variable) == "1":
        return True
    markexpr = config.getoption("markexpr", default="") or ""
    return bool(re.search(rf"(?<!not )\b{marker}\b", markexpr))


def sql(statement: str, params: Any = None) -> list[tuple]:
    """A target-schema statement (shared names filled in); its rows, if it returns any."""
    with connection.cursor() as cursor:
        cursor.execute(compose(statement), params)
        return cursor.fetchall() if cursor.description else []


def live_watermark() -> None:
    """The platform's cron tick is current: its watermark is a few minutes ago."""
    from tests.factories import set_rollup_state
    from usage.db import database_now

    set_rollup_state(database_now() - timedelta(minutes=10), None)


def connect_target() -> psycopg.Connection:
    """The target database for ``pytest -m preflight``: ``DATABASE_URL``, else the sandbox's
    own database (not pytest's test database), with the limits of Django's connection."""
    limits = settings.CODEX_CONNECTION_LIMITS
    options: dict[str, Any] = {
        "autocommit": True,
        "application_name": "codex-usage-repair-preflight",
        "cursor_factory": psycopg.ClientCursor,
        "options": limits.server_options(),
        **limits.libpq_params(),
    }
    if not settings.USING_SANDBOX:
        return psycopg.connect(settings.DATABASE_URL, **options)
    from sandbox import server

    host = server.ensure_sandbox()
    return psycopg.connect(
        **options, host=host, user="postgres", dbname=settings.SANDBOX_DATABASE_NAME
    )


def rollup_mismatches(run_ids: list[int] | None = None, limit: int = 1000) -> list[Any]:
    """The hourly keys that differ from verify's recompute (all keys, or those of some runs)."""
    from usage.repair.verify import find_mismatches

    return find_mismatches(run_ids, limit).mismatches
