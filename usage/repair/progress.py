"""How a run reports what happens: one stream of events, each emitted once.

Its subscribers are the run's log (``usage.events``) and the ``Progress`` callback a command
passes to draw its bars, as Django's ``migrate`` passes one to its executor.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection
from typing import Any, Protocol

from usage import render
from usage.events import log_event
from usage.models import BackfillRun


class Progress(Protocol):
    """``progress(event, **details)``; a callback ignores what it does not show.

    The repair's events: ``started`` (``run``), ``stamping`` (``policy``), ``rollup_path``
    (``path``, ``function``, ``fingerprint``, ``reason``), ``planned`` (``rows``), ``batch``
    (``batch``, ``result``), ``paused`` (``reason``, ``seconds``), ``stamped`` (``first``,
    ``last``) and ``rollup_slice`` (``piece``, ``done``, ``total``). The revert's:
    ``started`` (``result``), ``batch`` and ``rollup_slice``.
    """

    def __call__(self, event: str, /, **details: Any) -> None: ...


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""


class Events:
    """A run's event stream: each event goes once to each subscriber, in order, and to the
    progress callback when it is one of ``shown`` (the others are the log's alone)."""

    def __init__(self, progress: Progress, shown: Collection[str], *subscribers: Progress) -> None:
        self.progress, self.shown, self.subscribers = progress, shown, subscribers

    def __call__(self, event: str, /, **details: Any) -> None:
        for subscriber in self.subscribers:
            subscriber(event, **details)
        if event in self.shown:
            self.progress(event, **details)


def pick(source: Any, *names: str) -> dict[str, Any]:
    """Some attributes of ``source``, by name, in this order."""
    return {name: getattr(source, name) for name in names}


def repair_log(logger: logging.Logger, current: Callable[[], Any]) -> Progress:
    """The repair's events as its log has them: each one a record with the name and fields
    of its JSON line. ``current()`` is the run's ``ExecuteResult``."""

    def log(event: str, /, **d: Any) -> None:
        result = current()
        run_id = result.run.pk
        line = functools.partial(log_event, logger)
        if event == "started":
            line(logging.INFO, "start", f"run {run_id} started", run_id=run_id)
        elif event == "stamping":
            p = d["policy"]
            fields = pick(p, "stamp", "watermark_at", "first", "top", "keys")
            line(logging.INFO, "stamp", p.reason, run_id=run_id, **fields)
        elif event in ("rollup_path", "path_changed"):
            level = logging.INFO if event == "rollup_path" else logging.WARNING
            fields = {k: v for k, v in d.items() if k != "reason"}
            line(level, "rollup_path", d["reason"], run_id=run_id, **fields)
        elif event == "planned":
            message = f"run {run_id}: {d['rows']} candidate rows"
            line(logging.INFO, "planned", message, run_id=run_id, rows_planned=d["rows"])
        elif event == "batch":
            b = d["batch"]
            line(
                logging.DEBUG,
                "batch",
                f"batch {b.number}: {b.rows} rows, {b.input_tokens_removed} input tokens "
                f"removed, {b.clamped_rows} clamped, {b.seconds:.3f}s",
                run_id=run_id,
                batch=b.number,
                **pick(b, "rows", "input_tokens_removed", "clamped_rows", "batch_size"),
                seconds=round(b.seconds, 6),
                rows_done=result.rows_updated,
                rows_planned=result.rows_planned,
                retry=b.retry,
            )
        elif event == "paused" and d["seconds"] is not None:
            seconds = d["seconds"]
            line(logging.DEBUG, "pause", f"pause {seconds:.3f}s", reason="sleep", seconds=seconds)
        elif event == "paused":
            reason = d["reason"]
            line(
                logging.INFO, "pause", f"paused: {reason}", reason="replication_lag", detail=reason
            )
        elif event == "stamped":
            first, last = (render.timestamp(d[k], microseconds=True) for k in ("first", "last"))
            message = f"run {run_id} wrote stamps from {first} to {last}"
            line(logging.INFO, "stamped", message, run_id=run_id, **d)
        elif event == "end":
            status, error = d["status"], d["error"]
            level = logging.INFO if status == BackfillRun.Status.SUCCEEDED else logging.WARNING
            message = (
                f"run {run_id} {status}: {result.rows_updated} rows updated, "
                f"{result.rows_remaining} remaining"
            )
            counts = ("rows_planned", "rows_updated", "rows_remaining")
            figures = pick(result, *counts, "input_tokens_removed", "clamped_rows")
            line(level, "end", message, run_id=run_id, status=status, **figures, error=error)

    return log


def revert_log(logger: logging.Logger, current: Callable[[], Any]) -> Progress:
    """The revert's events as its log has them: plain lines (the command shows the events).
    ``current()`` is the run's ``RevertResult``."""

    def log(event: str, /, **d: Any) -> None:
        r = current()
        if event == "started":
            message = (
                "revert of run %d: %d active journal entries, %d restorable, %d changed since"
            )
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

    return log
