"""Where a command's lines go: as text, context on stdout (stderr beside a document), warnings
on stderr; with ``--log-format json`` every stderr line is one JSON event; none at -v 0."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from django.core.management.base import OutputWrapper
from django.core.management.color import Style

from usage.events import event_line
from usage.output.lines import wrap


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
