"""The operator's values, checked before the database: a one-line ``ValueError`` says what to
type instead. Only ASCII digits count (``int()`` also reads full-width ones, ``_``, ``nan``)."""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from datetime import UTC, datetime
from typing import Any

MAX_BATCH_SIZE = 50_000
SHOWN_CHARS = 200

_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_WHOLE = re.compile(r"[0-9]{1,30}")
_NUMBER = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")
# Go-style: each unit at most once, largest first (1h30m, 2m5s, 1s500ms).
_DURATION = re.compile(
    r"(?=[0-9])([0-9]{1,30}(\.[0-9]{1,30})?h)?([0-9]{1,30}(\.[0-9]{1,30})?m(?!s))?"
    r"([0-9]{1,30}(\.[0-9]{1,30})?s)?([0-9]{1,30}(\.[0-9]{1,30})?ms)?"
)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def shown(value: Any) -> str:
    """A value as a message quotes it: its repr (escapes stay escaped), cut short."""
    text = str(value)
    if len(text) > SHOWN_CHARS:
        return repr(text[:SHOWN_CHARS]) + f" (and {len(text) - SHOWN_CHARS} more characters)"
    return repr(text)


def parse_cutoff(value: str | None, *, name: str = "--cutoff") -> datetime:
    text = str(value or "").strip()
    if not text:
        raise ValueError(
            f"{name} is required: give the hosted deployment time of the Codex usage fix, "
            "e.g. 2026-06-13T08:00:00Z"
        )
    if not _RFC3339.fullmatch(text):
        raise ValueError(
            f"{name} {shown(value)} is not an RFC 3339 timestamp with an offset; "
            "use e.g. 2026-06-13T08:00:00Z or 2026-06-13T10:00:00+02:00"
        )
    # Python's parser accepts at most microseconds; extra fractional digits are truncated.
    text = re.sub(r"(\.[0-9]{6})[0-9]+", r"\1", text.replace("z", "Z").replace("t", "T"))
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError as exc:
        raise ValueError(f"{name} {shown(value)} is not a valid date and time: {exc}") from exc
    except OverflowError:
        raise ValueError(
            f"{name} {shown(value)} is out of range: in UTC it falls before year 1 or after "
            "year 9999; use the hosted deployment time of the fix, e.g. 2026-06-13T08:00:00Z"
        ) from None


def parse_workspace_id(
    value: str | None, *, allow_empty: bool = True, name: str = "--workspace-id"
) -> uuid.UUID | None:
    """An empty value is refused on the command line (an unset ``$WS`` must not widen the
    repair), while the admin's form sends it for all."""
    if value is None or (value == "" and allow_empty):
        return None
    text = str(value).strip()
    if not text:
        raise ValueError(
            f"{name} is empty; give a workspace UUID, or leave it out to work on every workspace"
        )
    if text.isascii():
        with contextlib.suppress(ValueError):
            return uuid.UUID(text)
    raise ValueError(
        f"{name} {shown(value)} is not a UUID; "
        "use the workspace's id, e.g. 0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d"
    )


def parse_run_id(value: str | int | None, *, name: str = "--run-id") -> int:
    text = "" if value is None else str(value).strip()
    number = int(text) if _WHOLE.fullmatch(text) else 0
    if not 0 < number < 2**63:  # a PostgreSQL bigint
        raise ValueError(
            f"{name} {shown(value)} is not a run number; give the number printed as "
            "'Run N' by backfill_codex_usage_cache --execute, e.g. 12"
        )
    return number


def parse_batch_size(value: str | int) -> int:
    text = str(value).strip()
    if re.fullmatch(r"-[0-9]+", text) or text == "0":
        raise ValueError("--batch-size must be positive, e.g. --batch-size 1000")
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"--batch-size {shown(value)} is not a whole number, e.g. 1000")
    size = int(text)
    if size > MAX_BATCH_SIZE:
        raise ValueError(
            f"--batch-size {size} is too large: batches over {MAX_BATCH_SIZE} rows hold row "
            "locks for too long on a live database; leave it out for the default"
        )
    return size


def duration_seconds(value: str | float | int, *, flag: str, minimum: float = 0.0) -> float:
    """Seconds as a plain number (``0.5``) or Go-style (``1m30s``); the callers check the range."""
    if isinstance(value, bool):
        raise ValueError(f"{flag} {shown(value)} is not a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{flag} {shown(value)} is not a finite number of seconds")
        return float(value)
    text = str(value)
    if text != text.strip():
        raise ValueError(
            f"{flag} {shown(value)} has spaces around it; give the duration alone, e.g. 500ms"
        )
    if text.startswith("-") and (_NUMBER.fullmatch(text[1:]) or _DURATION.fullmatch(text[1:])):
        least = "0 or more" if minimum <= 0 else f"{minimum:g} seconds or more"
        raise ValueError(f"{flag} {shown(value)} is negative; give {least}, e.g. 500ms")
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"{flag} {shown(value)} is not a duration; "
            "use e.g. 500ms, 2s, 1m, 1m30s or a number of seconds"
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def parse_duration(value: str | float | int, *, flag: str = "--sleep-between-batches") -> float:
    seconds = duration_seconds(value, flag=flag)
    if not 0 <= seconds <= 3600:
        raise ValueError(f"{flag} must be between 0 and 1h")
    return seconds


def duration_text(seconds: float) -> str:
    """Seconds as the options take them: ``500ms``, ``5s``, ``1m``, ``1h30m``."""
    if 0 < seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")


def parse_seconds(value: str | float, *, flag: str, minimum: float, maximum: float) -> float:
    seconds = duration_seconds(value, flag=flag, minimum=minimum)
    if not minimum <= seconds <= maximum:
        raise ValueError(f"{flag} must be between {minimum:g} and {maximum:g} seconds")
    return seconds


# The server-side limits shared by the repair and the revert, in seconds: least, most.
TIMEOUT_LIMITS = {
    "lock_timeout": (0.001, 600),
    "statement_timeout": (0.001, 86400),
    "max_rollup_lock_seconds": (0.05, 60),
    "cron_tick_interval": (1, 86400),
}


def parse_limits(options: dict[str, Any]) -> dict[str, Any]:
    timeouts = {
        key: parse_seconds(
            options[key], flag=f"--{key.replace('_', '-')}", minimum=least, maximum=most
        )
        for key, (least, most) in TIMEOUT_LIMITS.items()
    }
    return {**timeouts, "rollup_path": options.get("rollup_path") or "auto"}


# The platform versions an operator may declare a rollup definition equal to.
DECLARABLE_MIGRATIONS = (102, 213)
