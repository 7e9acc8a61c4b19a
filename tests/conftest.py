"""Test database set-up: the project's own target schema fixture on a real PostgreSQL.

With ``DATABASE_URL`` unset the suite runs on the embedded sandbox server (started on
demand by the sandbox backend); with it set, pytest-django creates its throwaway
``test_<name>`` database on that server and never touches the database named there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings
from psycopg import sql

from sandbox import target
from usage.eligibility import compose
from usage.repair import batching

# The cron tick's state as the schema fixture creates it: the tick never ran.
RESET_ROLLUP_STATE_SQL = """
UPDATE {task_usage_hourly_rollup_state}
SET watermark_at = '1970-01-01 00:00:00+00', last_run_started_at = NULL,
    last_run_finished_at = NULL, last_run_rows = NULL, last_error = NULL
WHERE id = 1"""

TARGET_TABLES = (
    "task_usage_hourly_dirty",
    "task_usage_hourly",
    "task_usage",
    "agent_task_queue",
    "issue",
    "agent",
)


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hasher() -> Iterator[None]:
    """Tests hash passwords with MD5: a login costs microseconds, not PBKDF2's 0.6 s."""
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: pytest.FixtureRequest) -> None:
    """Extend pytest-django's set-up: create the target schema from the project's fixture."""
    with django_db_blocker.unblock(), transaction.atomic(), connection.cursor() as cursor:
        target.create_target_schema(cursor, settings.CODEX_TARGET_SCHEMA)


@pytest.fixture(autouse=True)
def _clean_target_tables(
    request: pytest.FixtureRequest, django_db_blocker: pytest.FixtureRequest
) -> Iterator[None]:
    """Empty the unmanaged target tables after each database test (Django only flushes its own)."""
    yield
    if request.node.get_closest_marker("django_db") is None:
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            sql.SQL("TRUNCATE {} CASCADE")
            .format(
                sql.SQL(", ").join(
                    sql.Identifier(settings.CODEX_TARGET_SCHEMA, t) for t in TARGET_TABLES
                )
            )
            .as_string()
        )
        cursor.execute(compose(RESET_ROLLUP_STATE_SQL))


@pytest.fixture
def test_database_url(transactional_db: None) -> str:
    """A DATABASE_URL for subprocesses, pointing at this test run's database."""
    connection.ensure_connection()
    params = connection.settings_dict
    host = quote(str(params["HOST"] or "127.0.0.1"), safe="")
    port = f":{params['PORT']}" if params.get("PORT") else ""
    password = f":{quote(params['PASSWORD'], safe='')}" if params.get("PASSWORD") else ""
    return f"postgresql://{params['USER']}{password}@{host}{port}/{params['NAME']}"


@pytest.fixture
def subprocess_env(test_database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = test_database_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def other_connection(test_database_url: str) -> Iterator[psycopg.Connection]:
    """A second session on the test database, as another process (a writer) would have."""
    with psycopg.connect(test_database_url) as conn:
        yield conn


@pytest.fixture
def quick_lock_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows a writer holds are retried after 50 to 400 ms, not the production 0.5 to 4 s."""
    monkeypatch.setattr(batching, "LOCK_RETRY_DELAYS_SECONDS", (0.05, 0.1, 0.2, 0.4))
