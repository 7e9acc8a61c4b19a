"""The environment the tool runs in: DATABASE_URL, connection limits, the secret key, serving.

Real processes throughout: ``manage.py`` as an operator runs it, a TCP server that never
answers, ``runserver`` with ``DJANGO_DEBUG=1`` against a database that disappears.
"""

from __future__ import annotations

import html
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from django.contrib.messages import constants
from django.contrib.messages.storage.base import Message
from django.contrib.messages.storage.cookie import CookieStorage
from django.db import connection
from django.test import Client, RequestFactory, override_settings
from django.utils.safestring import mark_safe

from tests.processes import (
    PROJECT_DIR,
    error_lines,
    free_port,
    manage,
    silent_server,
    start_manage,
)
from tests.support import CUTOFF_ARG, connect_target, wait_until
from usage.environment import ConnectionLimits

PASSWORD = "s3cr3t-pw"
# The key this repository once committed (with it, anyone could forge the admin's cookies).
FORMERLY_COMMITTED_KEY = "codex-usage-repair-local-only-key"
STRONG_KEY = "k" + uuid.uuid4().hex + uuid.uuid4().hex


def base_env(**changes: str | None) -> dict[str, str]:
    """This process's environment without the tool's variables, plus ``changes``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CODEX_", "DJANGO_")) and k != "DATABASE_URL"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the project's settings loaded, as a separate process."""
    setup = "import django; django.setup()\n"
    return subprocess.run(
        [sys.executable, "-c", setup + code],
        cwd=PROJECT_DIR,
        env=dict(env, DJANGO_SETTINGS_MODULE="repair_project.settings"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_exit_1(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- DATABASE_URL and the other settings ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("garbage", "DATABASE_URL is not a URL"),
        (f"mysql://ops:{PASSWORD}@db.internal/app", "names a 'mysql' database"),
        (f"postgresql://ops:{PASSWORD}@db.internal:99999/app", "port that is not a number"),
        (f"postgresql://ops:{PASSWORD}@db.internal:0/app", "port that is not a number"),
        ("postgresql://", "names no database"),
        (f"postgresql://ops:{PASSWORD}@db.internal/", "names no database"),
        (f"postgresql://ops:{PASSWORD}@db internal/app", "contains spaces"),
        (f"postgresql://ops:{PASSWORD}@[::1/app", "is not a valid URL"),
    ],
)
def test_a_malformed_database_url_gives_one_line(url: str, expected: str) -> None:
    result = manage(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, env=base_env(DATABASE_URL=url)
    )
    line = assert_one_line_exit_1(result)
    assert expected in line
    assert "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME" in line
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CODEX_CONNECT_TIMEOUT", "soon", "CODEX_CONNECT_TIMEOUT 'soon' is not a duration"),
        ("CODEX_CONNECT_TIMEOUT", "0", "CODEX_CONNECT_TIMEOUT must be between 2 and 3600"),
        ("CODEX_CONNECT_TIMEOUT", "1", "CODEX_CONNECT_TIMEOUT must be between 2 and 3600"),
        ("CODEX_CONNECT_TIMEOUT", "2.5", "is not a whole number of seconds"),
        ("CODEX_STATEMENT_TIMEOUT", "1h1h", "CODEX_STATEMENT_TIMEOUT '1h1h' is not a duration"),
        ("CODEX_STATEMENT_TIMEOUT", " 5s", "has spaces around it"),
        ("CODEX_STATEMENT_TIMEOUT", "-1s", "CODEX_STATEMENT_TIMEOUT '-1s' is negative"),
        ("CODEX_IDLE_IN_TRANSACTION_TIMEOUT", "١٠", "is not a duration"),
        ("CODEX_REPAIR_SCHEMA", "Robert'); DROP", "is not a plain lower-case PostgreSQL"),
        ("CODEX_TARGET_SCHEMA", "public ", "CODEX_TARGET_SCHEMA='public ' has spaces around it"),
        ("CODEX_REPAIR_SCHEMA", "codex_repair\n", "has spaces around it"),
        ("DJANGO_HTTPS", "yes", "DJANGO_HTTPS='yes' must be 1, proxy or unset"),
        ("CODEX_ROLLUP_DECLARE", "213", "CODEX_ROLLUP_DECLARE '213' is not FINGERPRINT=MIGRATION"),
        ("CODEX_ROLLUP_DECLARE", f"sha256:{'a' * 63}=213", "is not FINGERPRINT=MIGRATION"),
        ("CODEX_ROLLUP_DECLARE", f"sha256:{'a' * 64}=214", "as migration 214, which this tool"),
        (
            "CODEX_ROLLUP_DECLARE",
            f"sha256:{'a' * 64}=213,sha256:{'a' * 64}=102",
            "declares sha256:aaaaaaaaaaaa… twice, as 213 and 102",
        ),
    ],
)
def test_a_malformed_setting_gives_one_line(name: str, value: str, expected: str) -> None:
    result = manage(
        "preflight_codex_usage_backfill", "--cutoff", CUTOFF_ARG, env=base_env(**{name: value})
    )
    assert expected in assert_one_line_exit_1(result)


@pytest.mark.slow
def test_migrate_on_an_unreachable_database_gives_one_line() -> None:
    """The runbook's first step: Django's own command, not only the tool's, says it in one line."""
    port = free_port()
    url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{port}/app"
    result = manage("migrate", env=base_env(DATABASE_URL=url))
    line = assert_one_line_exit_1(result)
    assert line.startswith(f"OperationalError: cannot use 127.0.0.1:{port}/app as ops: ")
    assert "check DATABASE_URL" in line
    assert PASSWORD not in result.stdout + result.stderr


# -- connection limits ------------------------------------------------------------------------


def test_every_connection_carries_the_server_side_limits(
    settings: Any, test_database_url: str
) -> None:
    limits = settings.CODEX_CONNECTION_LIMITS
    assert limits == ConnectionLimits(
        connect_timeout=10, statement_timeout=3600, idle_in_transaction_timeout=600
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        )
        assert cursor.fetchone() == ("1h", "10min")
    assert connection.connection.info.get_parameters()["connect_timeout"] == "10"
    settings.DATABASE_URL, settings.USING_SANDBOX = test_database_url, False
    with connect_target() as target:
        row = target.execute(
            "SELECT current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        ).fetchone()
        assert row == ("1h", "10min")
        assert target.info.get_parameters()["connect_timeout"] == "10"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_limits_are_set_from_the_environment(subprocess_env: dict[str, str]) -> None:
    env = dict(
        subprocess_env,
        CODEX_CONNECT_TIMEOUT="7",
        CODEX_STATEMENT_TIMEOUT="1m30s",
        CODEX_IDLE_IN_TRANSACTION_TIMEOUT="2m",
    )
    shown = (
        "SELECT current_setting('statement_timeout'),"
        " current_setting('idle_in_transaction_session_timeout')"
    )
    code = (
        "from django.db import connection\n"
        "from tests.support import connect_target\n"
        "with connection.cursor() as c:\n"
        f"    c.execute({shown!r}); print(*c.fetchone())\n"
        "print(connection.connection.info.get_parameters()['connect_timeout'])\n"
        "with connect_target() as t:\n"
        f"    print(*t.execute({shown!r}).fetchone())\n"
        "    print(t.info.get_parameters()['connect_timeout'])\n"
    )
    result = python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["90s 2min", "7", "90s 2min", "7"]


# Every entry point that opens a connection: the commands, and the admin (with and without
# the reloader).
SILENT_SERVER_COMMANDS = {
    "dry-run": ("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG),
    "execute": ("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute"),
    "revert": ("revert_codex_usage_backfill", "1", "--execute"),
    "preflight": ("preflight_codex_usage_backfill", "--cutoff", CUTOFF_ARG),
    "admin": ("runserver", "--noreload", "127.0.0.1:1"),
    "admin-reloader": ("runserver", "127.0.0.1:1"),
}


@pytest.mark.slow
def test_a_server_that_never_answers_gives_one_line() -> None:
    """Each process is given a minute; without a connect timeout it would wait forever.

    The default limit (10 s) is checked on the connection's parameters above; here the
    shortest one libpq takes (2 s) keeps the wait short, and the entry points wait on the
    silent server side by side rather than one after the other."""
    with silent_server() as port:
        url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{port}/app"
        env = base_env(DATABASE_URL=url, CODEX_CONNECT_TIMEOUT="2", DJANGO_SECRET_KEY=STRONG_KEY)
        with ThreadPoolExecutor(max_workers=len(SILENT_SERVER_COMMANDS)) as pool:
            results = dict(
                zip(
                    SILENT_SERVER_COMMANDS,
                    pool.map(
                        lambda command: manage(*command, env=env, timeout=60),
                        SILENT_SERVER_COMMANDS.values(),
                    ),
                    strict=True,
                )
            )
    for name, result in results.items():
        line = assert_one_line_exit_1(result)
        assert "connection timeout expired" in line, name
        assert f"127.0.0.1:{port}/app" in line, name
        assert PASSWORD not in result.stdout + result.stderr, name


def test_the_preflight_connection_gives_up_on_a_server_that_never_answers(
    settings: Any,
) -> None:
    """``pytest -m preflight`` opens its own psycopg connection: it has the same limits."""
    with silent_server() as port:
        settings.DATABASE_URL = f"postgresql://ops:{PASSWORD}@127.0.0.1:{port}/app"
        settings.USING_SANDBOX = False
        settings.CODEX_CONNECTION_LIMITS = ConnectionLimits(2, 60, 60)
        with pytest.raises(psycopg.OperationalError, match="connection timeout expired"):
            connect_target()


# -- the secret key and serving ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, "DJANGO_SECRET_KEY is not set"),
        (FORMERLY_COMMITTED_KEY, "DJANGO_SECRET_KEY has fewer than 50 characters"),
    ],
    ids=["unset", "formerly-committed"],
)
def test_runserver_refuses_a_real_database_without_a_strong_key(
    key: str | None, expected: str
) -> None:
    env = base_env(DATABASE_URL="postgresql://repair@db.internal:5432/app", DJANGO_SECRET_KEY=key)
    result = manage("runserver", "--noreload", f"127.0.0.1:{free_port()}", env=env)
    assert expected in assert_one_line_exit_1(result)

    served = python("import repair_project.wsgi", env)
    assert served.returncode != 0
    assert expected in error_lines(served.stderr)[-1]


@pytest.mark.slow
def test_check_deploy_is_clean_when_served_for_real() -> None:
    real = base_env(
        DATABASE_URL="postgresql://repair@db.internal:5432/app",
        DJANGO_SECRET_KEY=STRONG_KEY,
        DJANGO_ALLOWED_HOSTS="repair.example.com",
        DJANGO_HTTPS="proxy",
    )
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=real)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout

    without_key = dict(real)
    del without_key["DJANGO_SECRET_KEY"]
    result = manage("check", "--deploy", env=without_key)
    assert result.returncode == 1
    assert "(usage.E001) DJANGO_SECRET_KEY is not set" in result.stderr


@pytest.mark.slow
def test_the_sandbox_keeps_a_generated_key_outside_the_repository(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    env = base_env(CODEX_REPAIR_SANDBOX_DIR=str(sandbox))
    show = (
        "from django.conf import settings\n"
        "print(settings.CODEX_SECRET_KEY_SOURCE, settings.SECRET_KEY)"
    )
    first, second = python(show, env), python(show, env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout  # kept, so sessions survive a restart
    source, key = first.stdout.split()
    assert source == "sandbox"
    assert len(key) >= 50 and key != FORMERLY_COMMITTED_KEY
    kept = sandbox / "secret_key"
    assert kept.read_text().strip() == key
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    sources = [
        path
        for path in PROJECT_DIR.rglob("*.py")
        if not any(part.startswith(".") for part in path.relative_to(PROJECT_DIR).parts)
        and FORMERLY_COMMITTED_KEY in path.read_text()
    ]
    assert sources == [Path(__file__)]


@pytest.mark.django_db
def test_a_messages_cookie_forged_with_the_old_key_shows_nothing(
    admin_client: Client, settings: Any
) -> None:
    forged = Message(constants.ERROR, mark_safe("<script>alert('forged')</script>"))
    with override_settings(SECRET_KEY=FORMERLY_COMMITTED_KEY):
        storage = CookieStorage(RequestFactory().get("/"))
        value = storage._encode([forged])
    admin_client.cookies["messages"] = value
    response = admin_client.get("/admin/")
    assert response.status_code == 200
    assert "alert('forged')" not in response.content.decode()
    assert settings.SECRET_KEY != FORMERLY_COMMITTED_KEY


# -- Django's error page with DJANGO_DEBUG=1 --------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_debug_error_page_shows_no_database_url_and_no_password(
    test_database_url: str,
) -> None:
    """runserver with DJANGO_DEBUG=1; its database disappears; a page fails to connect."""
    name = f"vanishing_{uuid.uuid4().hex[:8]}"
    server_url = test_database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    scheme, rest = f"{server_url}/{name}".split("://", 1)
    user, host = rest.split("@", 1)
    url = f"{scheme}://{user.split(':')[0]}:{quote(PASSWORD)}@{host}"
    port = free_port()
    env = base_env(DATABASE_URL=url, DJANGO_DEBUG="1", DJANGO_SECRET_KEY=STRONG_KEY)
    server = start_manage("runserver", "--noreload", f"127.0.0.1:{port}", env=env)
    try:
        wait_until(lambda: _listening(port) or server.poll() is not None, timeout=60)
        assert server.poll() is None, server.communicate()
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        pages = [_fetch(port, accept) for accept in ("text/html", "text/plain")]
    finally:
        server.terminate()
        server.communicate(timeout=30)
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for status, body in pages:
        assert status == 500
        assert "OperationalError" in body  # Django's debug page, with settings and frames
        assert f'database "{name}" does not exist' in html.unescape(body)
        assert PASSWORD not in body and quote(PASSWORD) not in body
        assert url not in body
        assert STRONG_KEY not in body


def _listening(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _fetch(port: int, accept: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/",
        headers={"Cookie": "sessionid=0123456789abcdefghijklmnopqrstuv", "Accept": accept},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
