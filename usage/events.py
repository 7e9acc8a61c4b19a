"""Events of a run, for progress displays and structured logs.

The library reports what happens (a batch, a pause, a rollup slice, the end) to the run's
progress callback (``usage.repair.progress``) and to the ``usage`` loggers with the event's
fields attached, so a command can show a progress bar on a terminal, throttled lines
elsewhere, or one JSON object per event, without the library knowing which.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime
from typing import Any
from uuid import UUID


def log_event(logger: logging.Logger, level: int, event: str, message: str, **fields: Any) -> None:
    """Log ``message`` with ``event`` and its ``fields`` attached for structured output."""
    logger.log(level, message, extra={"event": event, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, event, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        document.update(getattr(record, "fields", {}))
        if record.exc_info:
            document["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(document, default=json_default, sort_keys=False)


def json_default(value: Any) -> Any:
    """JSON for the values our documents hold: datetimes, dates, UUIDs."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
