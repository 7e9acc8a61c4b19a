"""A run's progress: a live bar per phase (update, rollup, revert) on a terminal, fitted to
its width at every refresh; a line every few seconds elsewhere."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from usage.render import number

# Off a terminal, at most one progress line per this many seconds.
LINE_INTERVAL_SECONDS = 5.0
# The rate behind the ETA: over the updates of the last this many seconds (at least two).
RATE_WINDOW_SECONDS = 10.0
# The bar's width when there is room, and the least worth drawing.
BAR_WIDTH = 30
MIN_BAR_WIDTH = 10


@dataclass
class Phase:
    """One phase's figures, and its recent updates for the rate."""

    label: str
    unit: str
    total: int
    done: int = 0
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    shown: int | None = None  # off a terminal: the done count its last line showed

    def update(self, done: int) -> None:
        now = time.monotonic()
        self.done = done
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()

    def parts(self) -> dict[str, str]:
        """The texts of the line, each kept whole; the rate is over the recent updates."""
        rate = eta = None
        if len(self.samples) >= 2:
            (first, done_first), (last, done_last) = self.samples[0], self.samples[-1]
            rate = (done_last - done_first) / (last - first) if last > first else None
        if self.done >= self.total:
            eta = 0.0
        elif rate and rate > 0:
            eta = (self.total - self.done) / rate
        return {
            "label": f"{self.label:<6}",
            "count": f"{number(self.done)}/{number(self.total)} {self.unit}",
            "rate": f"{rate:,.0f} {self.unit}/s" if rate is not None else f"- {self.unit}/s",
            "eta": f"ETA {clock(eta)}" if eta is not None else "ETA -:--:--",
            "elapsed": f"elapsed {clock(time.monotonic() - self.started)}",
            "status": self.status,
        }


def compose(phase: Phase, width: int) -> Text:
    """The phase's line at most ``width`` wide: until it fits, the bar shrinks, the elapsed
    time goes, the bar goes, the status is cut between words (or goes), the label goes, the
    rate's unit is shortened; narrower still, the line is cropped."""
    parts = phase.parts()
    names = [n for n in ("label", "count", "rate", "eta", "elapsed", "status") if parts[n]]

    def size(bar: int) -> int:
        return len("  ".join(parts[n] for n in names)) + (bar + 1 if bar else 0)

    def bar_room() -> int:
        room = width - size(0) - 1
        return min(BAR_WIDTH, room) if room >= MIN_BAR_WIDTH else 0

    bar = bar_room()
    if size(bar) > width:
        names.remove("elapsed")
        bar = bar_room()
    if size(bar) > width and "status" in names:
        spare = width - (size(0) - len(parts["status"])) - 1
        words = parts["status"].split(" ")
        while words and len(" ".join(words)) + 1 > spare:
            words.pop()
        if words:
            parts["status"] = " ".join(words) + "…"
        else:
            names.remove("status")
    if size(bar) > width:
        names.remove("label")
    if size(bar) > width:
        parts["rate"] = parts["rate"].replace(f" {phase.unit}/s", "/s")
    line = Text(no_wrap=True, overflow="crop")
    for index, name in enumerate(names):
        if index:
            line.append(" " if name == "count" and bar else "  ")
        if name == "count" and bar:
            filled = round(bar * min(phase.done / phase.total, 1.0)) if phase.total else bar
            line.append("━" * filled, style="magenta")
            line.append("━" * (bar - filled), style="grey37")
            line.append(" ")
        line.append(parts[name], style="cyan" if name == "eta" else "")
    return line


class ProgressBar:
    """Show a run's phases (fed by ``run_events``); ``close()`` ends."""

    def __init__(self, stream: TextIO, *, terminal: bool) -> None:
        self.stream = stream
        self.last_line = 0.0
        self.phases: dict[str, Phase] = {}
        self.live: Live | None = None
        if terminal:
            console = Console(file=stream, force_terminal=True)
            phases = self.phases.values
            self.live = Live(
                get_renderable=lambda: Group(*(compose(p, console.width) for p in phases())),
                console=console,
                refresh_per_second=10,
                redirect_stdout=False,
            )

    def phase(
        self, key: str, total: int, unit: str, status: str = "", *, started_now: bool = True
    ) -> None:
        """Start a phase, named ``key`` (once; a second call only updates its total). Without
        ``started_now`` its first update is its first measure (it follows a set-up)."""
        if key in self.phases:
            self.phases[key].total = total
            return
        self._show_where_phases_ended()
        self.phases[key] = Phase(key, unit, total, status=status)
        if started_now:
            self.phases[key].update(0)
        if self.live is not None:
            self.live.start()  # with the first phase (a no-op while it runs)
            self.live.refresh()
        elif started_now:
            self._line(f"{key}: 0/{number(total)} {unit}", force=True)
            self.phases[key].shown = 0

    def update(self, key: str, done: int, *, status: str | None = None) -> None:
        phase = self.phases.get(key)
        if phase is None:
            return
        phase.update(done)
        if status is not None:
            phase.status = status
        # Off a terminal, a phase's first line is shown at once; then one every few seconds.
        if self.live is None and self._line(plain(phase), force=len(phase.samples) == 1):
            phase.shown = phase.done

    def pause(self, text: str, *, force: bool) -> None:
        """The rollup's pause (else the latest phase's); off a terminal, ``force`` shows it now."""
        phase = self.phases.get("rollup") or next(reversed(self.phases.values()), None)
        if phase is None:
            return
        phase.status = text
        if self.live is None:
            self._line(text, force=force)

    def close(self) -> None:
        self._show_where_phases_ended()
        if self.live is not None and self.phases:
            self.live.refresh()
            self.live.stop()

    def _show_where_phases_ended(self) -> None:
        """Off a terminal, each phase's last line says where it ended."""
        if self.live is not None:
            return
        for phase in self.phases.values():
            if phase.shown != phase.done:
                self._line(plain(phase), force=True)
                phase.shown = phase.done

    def _line(self, text: str, *, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last_line >= LINE_INTERVAL_SECONDS:
            self.last_line = now
            self.stream.write(text + "\n")
            self.stream.flush()
            return True
        return False


def plain(phase: Phase) -> str:
    """A phase as one line for a log (off a terminal)."""
    parts = phase.parts()
    percent = 100 * phase.done / phase.total if phase.total else 100.0
    status = f", {parts['status']}" if parts["status"] else ""
    return (
        f"{phase.label}: {parts['count']} ({percent:.0f}%), {parts['rate']}, {parts['eta']}, "
        f"{parts['elapsed']}{status}"
    )


def run_events(bar: ProgressBar, phase: str) -> Callable[..., None]:
    """Show a run's events on ``bar``: its ``phase`` (a repair's ``update``, from its plan's rows;
    a revert's ``revert``, its journal entries), batches, pauses, rollup slices (their
    ``done``/``total`` count hourly keys)."""
    paused = False
    entries = 0  # the journal entries a revert's batches read (a retry reads them again)

    def show(event: str, /, **details: Any) -> None:
        nonlocal paused, entries
        if event == "planned":
            bar.phase("update", details["rows"], "rows", status="snapshot taken")
        elif event == "started" and phase == "revert":
            bar.phase("revert", details["result"].entries, "entries")
        elif event == "batch":
            paused = False
            batch, result = details["batch"], details["result"]
            if phase == "update":
                status = f"batch {number(batch.batch_size)}" + (" (retry)" if batch.retry else "")
                bar.update("update", result.rows_updated, status=status)
            else:
                entries += 0 if batch.retry else batch.entries
                bar.update("revert", entries, status=f"restored {number(result.rows_restored)}")
        elif event == "paused" and not (
            details["reason"].startswith("sleep") and bar.live is None
        ):
            # (A sleep is the operator's own throttle: not worth a line in a log.) The start of
            # a pause is always shown off a terminal; while it lasts, at the usual rate.
            seconds = details.get("seconds")
            what = f"paused: {details['reason']}" + (f" ({seconds:g}s)" if seconds else "")
            bar.pause(what, force=not paused)
            paused = True
        elif event == "rollup_slice":
            # The first slice event comes after the rollup's set-up and its first (probe) slice.
            bar.phase("rollup", details["total"], "keys", started_now=False)
            held = f"lock 4246 held {details['piece'].lock_held_seconds:.2f}s"
            bar.update("rollup", details["done"], status=held)

    return show


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
