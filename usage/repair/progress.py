"""How a run reports what happens: one stream of events (``batching.Chunks.events``), each to
the run's log view below and to the ``Progress`` callback a command passes to draw its bars."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from usage import render
from usage.events import log_event
from usage.models import BackfillRun

# ``progress(event, **details)``: the events the log views below read, and ``rollup_slice``
# (``piece``, ``done``, ``total``); a callback ignores what it does not show.
Progress = Callable[..., None]


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""


def pick(source: Any, *names: str) -> dict[str, Any]:
    """Some attributes of ``source``, by name, in this order."""
    return {name: getattr(source, name) for name in names}


def repair_log(logger: logging.Logger, result: Any, event: str, /, **d: Any) -> None:
    """The repair's events as its log has them: records with their JSON line's name and fields."""
    run_id = result.run.pk
    level, name, fields = logging.INFO, event, {"run_id": run_id}
    if event == "started":
        name, message = "start", f"run {run_id} started"
    elif event == "stamping":
        name, message = "stamp", d["policy"].reason
        fields.update(pick(d["policy"], "stamp", "watermark_at", "first", "top", "keys"))
    elif event in ("rollup_path", "path_changed"):
        level = logging.INFO if event == "rollup_path" else logging.WARNING
        name, message = "rollup_path", d.pop("reason")
        fields.update(d)
    elif event == "planned":
        message = f"run {run_id}: {d['rows']} candidate rows"
        fields["rows_planned"] = d["rows"]
    elif event == "batch":
        b = d["batch"]
        level = logging.DEBUG
        message = (
            f"batch {b.number}: {b.rows} rows, {b.input_tokens_removed} input tokens "
            f"removed, {b.clamped_rows} clamped, {b.seconds:.3f}s"
        )
        counts = pick(b, "rows", "input_tokens_removed", "clamped_rows", "batch_size")
        fields.update(batch=b.number, **counts, seconds=round(b.seconds, 6))
        fields.update(rows_done=result.rows_updated, rows_planned=result.rows_planned)
        fields["retry"] = b.retry
    elif event == "paused" and d["seconds"] is not None:
        level, name, message = logging.DEBUG, "pause", f"pause {d['seconds']:.3f}s"
        fields = {"reason": "sleep", "seconds": d["seconds"]}
    elif event == "paused":
        name, message = "pause", f"paused: {d['reason']}"
        fields = {"reason": "replication_lag", "detail": d["reason"]}
    elif event == "stamped":
        first, last = (render.timestamp(d[k], microseconds=True) for k in ("first", "last"))
        message = f"run {run_id} wrote stamps from {first} to {last}"
        fields.update(d)
    elif event == "end":
        if d["status"] != BackfillRun.Status.SUCCEEDED:
            level = logging.WARNING
        message = (
            f"run {run_id} {d['status']}: {result.rows_updated} rows updated, "
            f"{result.rows_remaining} remaining"
        )
        counts = ("rows_planned", "rows_updated", "rows_remaining")
        figures = pick(result, *counts, "input_tokens_removed", "clamped_rows")
        fields.update(status=d["status"], **figures, error=d["error"])
    else:
        return
    log_event(logger, level, name, message, **fields)


def revert_log(logger: logging.Logger, r: Any, event: str, /, **d: Any) -> None:
    """The revert's events as its log has them: plain lines (the command shows the events)."""
    if event == "started":
        message = "revert of run %d: %d active journal entries, %d restorable, %d changed since"
        logger.info(message, r.run.pk, r.entries, r.rows_restorable, r.rows_changed)
    elif event == "batch":
        b = d["batch"]
        message = "revert batch %d: %d entries, %d rows restored, %d hourly keys queued, "
        figures = (b.number, b.entries, b.rows, b.keys_enqueued, len(b.skipped), b.seconds)
        logger.info(message + "%d locked, %.3fs", *figures)
    elif event == "end" and r.reverted:
        message = "run %d reverted: %d rows restored, %d left as changed since"
        logger.info(message, r.run.pk, r.rows_restored, r.rows_changed)
    elif event == "end":
        message = "revert of run %d incomplete: %d rows restored, %d remaining%s"
        signal = ", stopped by a signal" if r.stopped else ""
        logger.info(message, r.run.pk, r.rows_restored, r.rows_remaining, signal)
