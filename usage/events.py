"""A run's events: each sent once (``batching.Chunks.events``) to its direction's log view, as
log records with their fields (one line of JSON each under ``--log-format json``), and to the
``Progress`` callback a command passes for its bars, without the library knowing either."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

# ``progress(event, **details)``: the events the log views read, and ``rollup_slice``
# (``piece``, ``done``, ``total``); a callback ignores what it does not show.
Progress = Callable[..., None]


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""


def pick(source: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(source, name) for name in names}


def log_event(logger: logging.Logger, level: int, event: str, message: str, **fields: Any) -> None:
    logger.log(level, message, extra={"event": event, "fields": fields})


def event_line(
    level: str, event: str, message: str, fields: dict[str, Any], created: float | None = None
) -> str:
    when = datetime.now() if created is None else datetime.fromtimestamp(created)
    time = when.astimezone().isoformat()
    document = {"time": time, "level": level, "event": event, "message": message, **fields}
    return json.dumps(document, default=json_default)


class JsonFormatter(logging.Formatter):
    """A record without an event is a ``log``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", {}))
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).splitlines()[-1]
        event, message = getattr(record, "event", "log"), " ".join(record.getMessage().split())
        return event_line(record.levelname.lower(), event, message, fields, record.created)


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def utc_text(value: datetime) -> str:
    return json_default(value.astimezone(UTC))
