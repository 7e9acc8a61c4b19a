"""Reading the settings from the environment: the database URL and the connection limits.

Settings are read once per process, before Django is set up. Every bad value becomes an
``ImproperlyConfigured`` whose message is one line saying what to set; ``manage.py`` prints
it as such, without a traceback. No message here ever contains a password.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from usage.options import parse_seconds

URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
POSTGRES_SCHEMES = ("postgres", "postgresql", "pgsql")

# Defaults of the connection limits (see ``connection_limits``).
DEFAULT_CONNECT_TIMEOUT = "10s"
DEFAULT_STATEMENT_TIMEOUT = "1h"
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = "10m"
# TCP keepalives: a server that vanished mid-statement is noticed within about a minute.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def database_settings(url: str) -> dict[str, Any]:
    """Django's database settings for ``DATABASE_URL``, refused in one line when malformed."""
    problem = _url_problem(url)
    if problem:
        raise ImproperlyConfigured(f"DATABASE_URL {problem}; expected {URL_FORM}")
    try:
        return dict(dj_database_url.parse(url, conn_max_age=0))
    except ValueError:
        raise ImproperlyConfigured(
            f"DATABASE_URL is not a valid URL; expected {URL_FORM}"
        ) from None


def _url_problem(url: str) -> str:
    """What is wrong with a database URL, in words that never repeat its password."""
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        if "port" in str(exc).lower():
            return "has a port that is not a number from 1 to 65535"
        return "is not a valid URL"
    if "://" not in url or not parts.scheme:
        return "is not a URL"
    if parts.scheme not in POSTGRES_SCHEMES:
        return f"names a {parts.scheme!r} database, but the tool works on PostgreSQL only"
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    if not unquote(parts.path[1:]):
        return "names no database (the /DBNAME part)"
    return ""


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits set on every connection the tool opens (seconds; 0 means none)."""

    connect_timeout: int
    statement_timeout: float
    idle_in_transaction_timeout: float

    def libpq_params(self) -> dict[str, Any]:
        """Connection parameters for psycopg (and Django's ``OPTIONS``)."""
        return {"connect_timeout": self.connect_timeout, **KEEPALIVES}

    def server_options(self) -> str:
        """The server-side limits as a libpq ``options`` string (``-c name=value`` each)."""
        return (
            f"-c statement_timeout={_milliseconds(self.statement_timeout)}"
            " -c idle_in_transaction_session_timeout="
            f"{_milliseconds(self.idle_in_transaction_timeout)}"
        )


def connection_limits(environ: os._Environ[str] | dict[str, str]) -> ConnectionLimits:
    """Read ``CODEX_CONNECT_TIMEOUT``, ``CODEX_STATEMENT_TIMEOUT`` and the idle timeout."""

    def seconds(name: str, default: str, minimum: float, maximum: float) -> float:
        value = environ.get(name, "").strip() or default
        try:
            return parse_seconds(value, flag=name, minimum=minimum, maximum=maximum)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None

    return ConnectionLimits(
        # libpq takes whole seconds (and treats 1 as 2).
        connect_timeout=max(
            2, math.ceil(seconds("CODEX_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, 1, 3600))
        ),
        statement_timeout=seconds(
            "CODEX_STATEMENT_TIMEOUT", DEFAULT_STATEMENT_TIMEOUT, 0, 7 * 86400
        ),
        idle_in_transaction_timeout=seconds(
            "CODEX_IDLE_IN_TRANSACTION_TIMEOUT", DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT, 0, 86400
        ),
    )


def _milliseconds(seconds: float) -> str:
    return "0" if seconds <= 0 else f"{max(1, round(seconds * 1000))}ms"
