"""The operator's lines: prose fitted to a terminal, wrapped at spaces only (a number, a time
or a command is never split), and where they go: context on stdout (stderr beside a document),
warnings on stderr; with ``--log-format json`` every stderr line is one JSON event."""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from django.core.management.base import OutputWrapper
from django.core.management.color import Style

from usage.events import event_line


def wrap(text: str, width: int | None, *, indent: str = "", hanging: str = "  ") -> list[str]:
    """``text`` as lines of at most ``width`` characters (None: one line), split at spaces;
    ``indent`` starts the first line, ``hanging`` the lines that continue it."""
    if width is None:
        return [indent + text]
    lines = textwrap.wrap(
        _UNIT_AFTER_NUMBER.sub("\\1\0\\2", text),
        width=max(width, 20),
        initial_indent=indent,
        subsequent_indent=hanging,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent]
    return [line.replace("\0", " ") for line in lines]


# A unit stays on the line of its number ("0.3 s", not "0.3" then "s;"): the space between
# them is held by a placeholder while the text is wrapped.
_UNIT_AFTER_NUMBER = re.compile(r"(\d) (ms|s|min|h|%|MB|GB)(?=$|[\s;,.:)])")


def labelled(rows: dict[str, str], width: int | None) -> list[str]:
    """``  label  value`` lines, values aligned, a long one continued under itself (under its
    label when the labels leave too little room)."""
    column = max(map(len, rows), default=0) + 4
    lines: list[str] = []
    for label, value in rows.items():
        first = f"  {label}".ljust(column)
        if width is not None and width - len(first) < 30:
            lines.extend(wrap(f"{label}  {value}", width, indent="  ", hanging="    "))
            continue
        lines.extend(wrap(value, width, indent=first, hanging=" " * len(first)))
    return lines


def fit_items(
    items: Sequence[str], width: int | None, between: str = "  ", indent: str = "  ", end: str = ""
) -> list[str]:
    """Items (each kept whole) on lines of at most ``width``, ``between`` apart, the lines after
    the first started by ``indent``, each but the last ended by ``end``."""
    if width is None:
        return [between.join(items)]
    lines: list[str] = []
    current = items[0]
    for item in items[1:]:
        if len(current) + len(between) + len(item) + len(end) <= width:
            current += between + item
        else:
            lines.append(current + end)
            current = indent + item
    return [*lines, current]


class Reporter:
    """A command's context lines, warnings, events and outcome line (``ToolCommand`` is one)."""

    stdout: OutputWrapper
    stderr: OutputWrapper
    style: Style
    json_logs: bool
    document_on_stdout: bool
    verbosity: int

    def context(self, event: str, message: str, **fields: Any) -> None:
        """A line that says what the command works on or what it decided (not at -v 0)."""
        if self.verbosity >= 1:
            stream = self.stderr if self.document_on_stdout else self.stdout
            self._say("info", event, message, fields, stream)

    def warning(self, message: str, event: str = "warning", **fields: Any) -> None:
        self._say("warning", event, message, fields, self.stderr, self.style.WARNING)

    def event(self, event: str, message: str, **fields: Any) -> None:
        """An event that only the JSON log shows (text mode shows it otherwise, or not)."""
        if self.verbosity >= 1:
            self._say("info", event, message, fields, None)

    def outcome(self, message: str, *, ok: bool, **fields: Any) -> None:
        """The command's outcome as its last stderr line, when stdout does not show it."""
        stream = self.stderr if self.document_on_stdout else None
        style = self.style.SUCCESS if ok else self.style.ERROR
        self._say("info" if ok else "error", "outcome", message, fields, stream, style)

    def lines(self, lines: Callable[[int | None], list[str]]) -> None:
        """Lines of the outcome, fitted to where they go: stdout, or stderr beside a document."""
        target = self.stderr if self.document_on_stdout else self.stdout
        width = self.terminal_width() if target is self.stdout else None
        for line in lines(width):
            target.write(line, style_func=lambda text: text)

    def terminal_width(self, stream: OutputWrapper | None = None) -> int | None:
        """The width of the terminal ``stream`` (stdout) is, or None (a file or a pipe)."""
        return shutil.get_terminal_size().columns if (stream or self.stdout).isatty() else None

    def _say(
        self,
        level: str,
        event: str,
        message: str,
        fields: dict[str, Any],
        stream: OutputWrapper | None,
        style: Callable[[str], str] = str,
    ) -> None:
        """One JSON event on stderr (``--log-format json``), else ``message`` on ``stream`` (if
        any), wrapped to its terminal between words."""
        if self.json_logs:
            line = event_line(level, event, " ".join(message.split()), fields)
            self.stderr.write(line, style_func=lambda text: text)
        elif stream is not None:
            for line in wrap(message, self.terminal_width(stream)):
                stream.write(style(line), style_func=lambda text: text)
