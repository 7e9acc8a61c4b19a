"""The settings read from the environment once per process; a bad value is a one-line
``ImproperlyConfigured``, never with a password."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from usage.options import DECLARABLE_MIGRATIONS, parse_seconds, shown

URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
BAD_PORT = "has a port that is not a number from 1 to 65535"

# TCP keepalives: a server that vanished mid-statement is noticed within about a minute.
KEEPALIVES = dict(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)

# Django's own test of a strong key (``check --deploy``, security.W009).
SECRET_KEY_MIN_LENGTH = 50
SECRET_KEY_MIN_UNIQUE = 5

_DECLARATION = re.compile(r"(sha256:[0-9a-f]{64})=([0-9]{1,6})")


def database_settings(url: str) -> dict[str, Any]:
    problem = _url_problem(url)
    if not problem:
        with contextlib.suppress(ValueError):
            return dict(dj_database_url.parse(url, conn_max_age=0))
        problem = "is not a valid URL"
    raise ImproperlyConfigured(f"DATABASE_URL {problem}; expected {URL_FORM}")


def _url_problem(url: str) -> str:
    """What is wrong with a database URL, in words that never repeat its password."""
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return BAD_PORT if "port" in str(exc).lower() else "is not a valid URL"
    if "://" not in url or not parts.scheme:
        return "is not a URL"
    if parts.scheme not in ("postgres", "postgresql", "pgsql"):
        return f"names a {parts.scheme!r} database, but the tool works on PostgreSQL only"
    if port == 0:
        return BAD_PORT
    if not unquote(parts.path[1:]):
        return "names no database (the /DBNAME part)"
    return ""


@dataclass(frozen=True)
class ConnectionLimits:
    """Set on every connection the tool opens (seconds; 0 means none)."""

    connect_timeout: int
    statement_timeout: float
    idle_in_transaction_timeout: float

    def libpq_params(self) -> dict[str, Any]:
        return {"connect_timeout": self.connect_timeout, **KEEPALIVES}

    def server_options(self) -> str:
        return (
            f"-c statement_timeout={timeout_setting(self.statement_timeout)}"
            " -c idle_in_transaction_session_timeout="
            f"{timeout_setting(self.idle_in_transaction_timeout)}"
        )


def connection_limits(environ: os._Environ[str] | dict[str, str]) -> ConnectionLimits:
    def seconds(name: str, default: str, minimum: float, maximum: float) -> float:
        value = environ.get(name, "") or default
        try:
            return parse_seconds(value, flag=name, minimum=minimum, maximum=maximum)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None

    connect_timeout = seconds("CODEX_CONNECT_TIMEOUT", "10s", 2, 3600)
    if connect_timeout != int(connect_timeout):
        # libpq takes whole seconds: a fraction would be rounded, and said nowhere.
        raise ImproperlyConfigured(
            f"CODEX_CONNECT_TIMEOUT {connect_timeout:g}s is not a whole number of seconds; "
            "give whole seconds from 2 to 3600, e.g. 10s"
        )
    return ConnectionLimits(
        connect_timeout=int(connect_timeout),
        statement_timeout=seconds("CODEX_STATEMENT_TIMEOUT", "1h", 0, 7 * 86400),
        idle_in_transaction_timeout=seconds("CODEX_IDLE_IN_TRANSACTION_TIMEOUT", "10m", 0, 86400),
    )


def rollup_declarations(environ: os._Environ[str] | dict[str, str]) -> dict[str, int]:
    """Comma-separated ``FINGERPRINT=MIGRATION`` pairs (the pre-flight prints the fingerprint)."""
    flag = "CODEX_ROLLUP_DECLARE"
    declared: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in environ.get(flag, "").split(","))):
        match = _DECLARATION.fullmatch(item)
        if not match:
            raise ImproperlyConfigured(
                f"{flag} {shown(item)} is not FINGERPRINT=MIGRATION; give the fingerprint the "
                "pre-flight prints (sha256: and 64 hex digits) and a platform migration, "
                f"e.g. sha256:{'0' * 64}=213"
            )
        print_, migration = match.group(1), int(match.group(2))
        if migration not in DECLARABLE_MIGRATIONS:
            known = " or ".join(map(str, DECLARABLE_MIGRATIONS))
            raise ImproperlyConfigured(
                f"{flag} declares {print_[:19]}… as migration {migration}, which this tool "
                f"does not know; declare it as {known}, the versions whose sums it computes"
            )
        if declared.get(print_, migration) != migration:
            raise ImproperlyConfigured(
                f"{flag} declares {print_[:19]}… twice, as {declared[print_]} and {migration}"
            )
        declared[print_] = migration
    return declared


def timeout_setting(seconds: float) -> str:
    """A server timeout in whole milliseconds, rounded (1001ms is 1001ms), at least 1ms."""
    return "0" if seconds <= 0 else f"{max(1, round(seconds * 1000))}ms"


def secret_key(
    environ: os._Environ[str] | dict[str, str], sandbox_dir: Path | None
) -> tuple[str, str]:
    """The key and its source: ``DJANGO_SECRET_KEY``, else the sandbox's kept key, else one for
    this process only (source "": the admin is not served)."""
    if given := environ.get("DJANGO_SECRET_KEY", ""):
        return given, "DJANGO_SECRET_KEY"
    if sandbox_dir is not None:
        # An unwritable sandbox folder: no kept key, so no serving either.
        with contextlib.suppress(OSError):
            return _kept_key(sandbox_dir / "secret_key"), "sandbox"
    return secrets.token_urlsafe(SECRET_KEY_MIN_LENGTH), ""


def _kept_key(path: Path) -> str:
    """Read the sandbox's key, creating it first (atomically: processes may race)."""
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    handle = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(secrets.token_urlsafe(SECRET_KEY_MIN_LENGTH) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(staged, path)  # never replaces a key another process kept first
    finally:
        staged.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> str:
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as stream:
        key = stream.read().strip()
    if key_problem(key):
        raise OSError(f"{path} does not hold a usable key")
    return key


def key_problem(key: str) -> str:
    if len(key) < SECRET_KEY_MIN_LENGTH or len(set(key)) < SECRET_KEY_MIN_UNIQUE:
        return (
            f"has fewer than {SECRET_KEY_MIN_LENGTH} characters or fewer than "
            f"{SECRET_KEY_MIN_UNIQUE} different ones"
        )
    return ""
