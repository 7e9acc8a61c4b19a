"""Parsing and validation of the operator's command-line values.

Each parser raises ``ValueError`` with a one-line message that says what is wrong and what to
type instead; the commands turn it into a ``CommandError``. Nothing here touches the database.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

MAX_BATCH_SIZE = 50_000
MAX_SLEEP_SECONDS = 3600.0

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_cutoff(value: str | None) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset and normalize it to UTC."""
    if not value:
        raise ValueError(
            "--cutoff is required: give the hosted deployment time of the Codex usage fix, "
            "e.g. --cutoff 2026-06-13T08:00:00Z"
        )
    text = value.strip()
    if not _RFC3339.match(text):
        raise ValueError(
            f"--cutoff {value!r} is not an RFC 3339 timestamp with an offset; "
            "use e.g. 2026-06-13T08:00:00Z or 2026-06-13T10:00:00+02:00"
        )
    # Python's parser accepts at most microseconds; extra fractional digits are truncated.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("z", "Z").replace("t", "T"))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"--cutoff {value!r} is not a valid date and time: {exc}") from exc
    return parsed.astimezone(UTC)


def parse_workspace_id(value: str | None) -> uuid.UUID | None:
    """Validate the workspace filter here, so a typo never reaches the database as a cast."""
    if value is None or value == "":
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise ValueError(
            f"--workspace-id {value!r} is not a UUID; "
            "use the workspace's id, e.g. 0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d"
        ) from None


def parse_batch_size(value: str | int) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--batch-size {value!r} is not a whole number") from None
    if size <= 0:
        raise ValueError("--batch-size must be positive, e.g. --batch-size 1000")
    if size > MAX_BATCH_SIZE:
        raise ValueError(
            f"--batch-size {size} is too large: batches over {MAX_BATCH_SIZE} rows hold row "
            "locks for too long on a live database; use 1000 to 10000"
        )
    return size


def parse_duration(value: str | float | int, *, flag: str = "--sleep-between-batches") -> float:
    """Parse a Go-style duration (``500ms``, ``2s``, ``1m30s``; a bare ``0`` is allowed)."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if text == "0":
            return 0.0
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"{flag} {value!r} is not a duration; use e.g. 500ms, 2s, 1m or 1m30s"
            )
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds < 0 or seconds > MAX_SLEEP_SECONDS:
        raise ValueError(f"{flag} must be between 0 and 1h")
    return seconds


def parse_seconds(value: str | float, *, flag: str, minimum: float, maximum: float) -> float:
    """Parse a positive number of seconds (a bare number or a duration such as ``5s``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = parse_duration(str(value), flag=flag)
    if not minimum <= seconds <= maximum:
        raise ValueError(f"{flag} must be between {minimum:g} and {maximum:g} seconds")
    return seconds


def parse_timeouts(options: dict[str, Any]) -> dict[str, float]:
    """The server-side limits shared by the repair and the revert, validated once."""
    return {
        "lock_timeout": parse_seconds(
            options["lock_timeout"], flag="--lock-timeout", minimum=0.001, maximum=600
        ),
        "statement_timeout": parse_seconds(
            options["statement_timeout"], flag="--statement-timeout", minimum=0.001, maximum=86400
        ),
        "max_rollup_lock_seconds": parse_seconds(
            options["max_rollup_lock_seconds"],
            flag="--max-rollup-lock-seconds",
            minimum=0.05,
            maximum=60,
        ),
        "cron_tick_interval": parse_seconds(
            options["cron_tick_interval"], flag="--cron-tick-interval", minimum=1, maximum=86400
        ),
    }
