"""Showing a run's progress: a live bar on a terminal, a line every few seconds elsewhere.

At 3 a.m. an operator needs to see how far a run is, how fast it goes, when it will end and
why it is waiting; a log collector needs the same without a flood of lines.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from usage.repair import rollup
from usage.repair.backfill import BatchResult, ExecuteResult

# Off a terminal, at most one progress line per this many seconds.
LINE_INTERVAL_SECONDS = 5.0


class ProgressBar:
    """Render a repair's progress events (a ``batching.Progress``); ``close()`` at the end."""

    def __init__(self, stream: TextIO, *, terminal: bool, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.terminal = terminal and enabled
        self.started_at = time.monotonic()
        self.last_line = 0.0
        self.was_paused = False
        self.update_task: TaskID | None = None
        self.rollup_task: TaskID | None = None
        self.progress: Progress | None = None
        if self.terminal:
            self.progress = Progress(
                TextColumn("{task.description:<7}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=stream, force_terminal=True),
                transient=False,
            )

    def __call__(self, event: str, /, **details: Any) -> None:
        """A run's event: the ones this renders are its methods of the same name."""
        if event in ("planned", "batch", "paused", "rollup_slice"):
            getattr(self, event)(**details)

    # -- events --------------------------------------------------------------------------

    def planned(self, rows: int) -> None:
        if self.progress is not None:
            self.progress.start()
            self.update_task = self.progress.add_task(
                "update", total=rows, rate="", status="snapshot taken"
            )
        elif self.enabled:
            self._line(f"progress: 0/{rows:,} rows planned", force=True)

    def batch(self, batch: BatchResult, result: ExecuteResult) -> None:
        self.was_paused = False
        rate = result.rows_updated / max(time.monotonic() - self.started_at, 1e-6)
        if self.progress is not None and self.update_task is not None:
            self.progress.update(
                self.update_task,
                completed=result.rows_updated,
                rate=f"{rate:,.0f} rows/s",
                status=f"batch {batch.batch_size:,}" + (" (retry)" if batch.retry else ""),
            )
        elif self.enabled:
            planned = max(result.rows_planned, 1)
            left = max(result.rows_planned - result.rows_updated, 0)
            eta = left / rate if rate > 0 else 0.0
            self._line(
                f"progress: {result.rows_updated:,}/{result.rows_planned:,} rows "
                f"({100 * result.rows_updated / planned:.0f}%), {rate:,.0f} rows/s, "
                f"ETA {_clock(eta)}, batch {batch.batch_size:,}"
            )

    def paused(self, reason: str, seconds: float | None) -> None:
        what = f"paused: {reason}" + (f" ({seconds:g}s)" if seconds else "")
        if self.progress is not None and self.update_task is not None:
            self.progress.update(self.update_task, status=what)
        elif self.enabled and not reason.startswith("sleep"):
            # The start of a pause is always shown; while it lasts, the usual rate applies.
            self._line(what, force=not self.was_paused)
            self.was_paused = True

    def rollup_slice(self, piece: rollup.RollupSlice, done: int, total: int) -> None:
        """``done``/``total`` count the hourly keys the repair's key slices rebuild."""
        done_rows, total_rows = done, total
        status = f"lock 4246 held {piece.lock_held_seconds:.2f}s"
        if self.progress is not None:
            if self.rollup_task is None:
                self.rollup_task = self.progress.add_task(
                    "rollup", total=total_rows, rate="", status=status
                )
            self.progress.update(
                self.rollup_task, completed=done_rows, total=total_rows, status=status
            )
        elif self.enabled:
            self._line(f"rollup: {done_rows:,}/{total_rows:,} hourly keys rebuilt, {status}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    # -- helpers -------------------------------------------------------------------------

    def _line(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_line >= LINE_INTERVAL_SECONDS:
            self.last_line = now
            self.stream.write(text + "\n")
            self.stream.flush()


class OutputStream:
    """A file-like view of a command's OutputWrapper that writes text exactly as given.

    Django's wrapper appends newlines and styles whole messages; a progress bar and a log
    handler need plain, unmodified writes to the same stream.
    """

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> int:
        self.wrapper.write(text, style_func=lambda message: message, ending="")
        return len(text)

    def flush(self) -> None:
        self.wrapper.flush()

    def isatty(self) -> bool:
        return self.wrapper.isatty()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
