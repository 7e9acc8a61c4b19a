"""The one base of the tool's commands (``ToolCommand``) and the surface they share.

Argument errors are bad input like any other: one line and exit status 1. Plain argparse
prints its usage and exits 2, and it reads a value that starts with ``-`` (``--sleep-between-
batches -1s``) as an unknown option; here such a value goes to its option, whose own parser
then says what is wrong with it.

Besides its parser and the examples in ``--help``, the base gives the commands what they
share: the server-side timeout options of the repair and the revert, bad input and database
errors turned into a one-line ``CommandError``, the library's log lines on a command's
stream, and SIGINT/SIGTERM turned into a stop request while a run lasts.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from usage.cron import DEFAULT_TICK_INTERVAL_SECONDS
from usage.db import database_failure
from usage.events import JsonFormatter
from usage.repair.batching import DEFAULT_LOCK_TIMEOUT_SECONDS, DEFAULT_STATEMENT_TIMEOUT_SECONDS
from usage.repair.rollup import DEFAULT_MAX_ROLLUP_LOCK_SECONDS

# An argument error quotes at most this much of a value, and says at most this much.
LONGEST_WORD = 80
LONGEST_MESSAGE = 400


def _shorten(match: re.Match[str]) -> str:
    word = match.group(0)
    return f"{word[:60]}...({len(word) - 60} more characters)"


class ToolParser(CommandParser):
    """Django's parser with the tool's rules for values and errors (see the module)."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            args = self._attach_dash_values(list(args))
        return super().parse_known_args(args, namespace)

    def _attach_dash_values(self, args: list[str]) -> list[str]:
        """``--flag -1s`` becomes ``--flag=-1s`` for a flag that takes one value."""
        known = set(self._option_string_actions)
        takes_value = {
            option
            for action in self._actions
            if action.nargs is None
            for option in action.option_strings
        }
        attached: list[str] = []
        position = 0
        while position < len(args):
            token = args[position]
            if token == "--":
                attached.extend(args[position:])
                break
            following = args[position + 1] if position + 1 < len(args) else None
            if (
                token in takes_value
                and following is not None
                and following.startswith("-")
                and following not in known
            ):
                attached.append(f"{token}={following}")
                position += 2
                continue
            attached.append(token)
            position += 1
        return attached

    def error(self, message: str) -> NoReturn:
        # argparse quotes the offending value whole: keep the line short whatever it was.
        text = re.sub(rf"\S{{{LONGEST_WORD},}}", _shorten, " ".join(message.split()))
        if len(text) > LONGEST_MESSAGE:
            text = text[:LONGEST_MESSAGE] + "..."
        text = f"{text} (see {self.prog.strip()} --help)"
        if self.called_from_command_line:
            self.exit(1, f"CommandError: {text}\n")
        raise CommandError(f"Error: {text}")


class ToolCommand(BaseCommand):
    """A command of the tool: its parser, its help epilog (``examples()``, laid out verbatim)
    and the surface the commands share (see the module)."""

    def examples(self) -> str:
        return ""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # BaseCommand builds a CommandParser itself; ToolParser only adds behaviour to it.
        parser.__class__ = ToolParser
        parser.epilog = self.examples()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser

    # -- options ---------------------------------------------------------------------------

    def add_timeout_arguments(
        self, parser: CommandParser, *, lock: str, statement: str, rollup: str
    ) -> None:
        """The server-side limits of a run (``options.parse_timeouts`` reads them).

        ``lock``, ``statement`` and ``rollup`` say what each limit applies to in this command.
        """
        parser.add_argument(
            "--lock-timeout",
            default=f"{DEFAULT_LOCK_TIMEOUT_SECONDS:g}s",
            help=f"server-side lock_timeout {lock} (default {DEFAULT_LOCK_TIMEOUT_SECONDS:g}s)",
        )
        parser.add_argument(
            "--statement-timeout",
            default=f"{DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s",
            help=f"server-side statement_timeout {statement} "
            f"(default {DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s)",
        )
        parser.add_argument(
            "--max-rollup-lock-seconds",
            default=f"{DEFAULT_MAX_ROLLUP_LOCK_SECONDS:g}",
            help=f"{rollup} (default {DEFAULT_MAX_ROLLUP_LOCK_SECONDS:g})",
        )
        parser.add_argument(
            "--cron-tick-interval",
            default=f"{DEFAULT_TICK_INTERVAL_SECONDS:g}s",
            help="how often the platform's scheduler runs rollup_task_usage_hourly(); the "
            "rollup leaves lock 4246 free while a tick is due "
            f"(default {DEFAULT_TICK_INTERVAL_SECONDS:g}s)",
        )

    # -- running ---------------------------------------------------------------------------

    @contextmanager
    def bad_input(self) -> Iterator[None]:
        """A value refused while the options are read (``ValueError``): one line, exit 1."""
        try:
            yield
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

    @contextmanager
    def database_errors(
        self, describe: Callable[[DatabaseError], str] = database_failure
    ) -> Iterator[None]:
        """A database error that ends the command: one line (``describe``), exit 1."""
        try:
            yield
        except DatabaseError as exc:
            raise CommandError(describe(exc)) from exc

    @contextmanager
    def logging_to(self, stream: TextIO, level: int, *, json: bool = False) -> Iterator[None]:
        """The library's log lines (the ``usage`` loggers) on ``stream`` from ``level`` up."""
        handler = logging.StreamHandler(stream)
        handler.setLevel(level)
        handler.setFormatter(
            JsonFormatter() if json else logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        )
        logger = logging.getLogger("usage")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)

    @contextmanager
    def stopping_on_signals(
        self, stop: threading.Event, what_next: str, *, new_line: bool = False
    ) -> Iterator[list[int]]:
        """While the block runs, SIGINT and SIGTERM set ``stop`` and say ``what_next``.

        Yields the signals received, in order; the previous handlers are back afterwards.
        ``new_line`` starts the message on a line of its own (after a progress bar).
        """
        received: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            received.append(signum)
            stop.set()
            name = signal.Signals(signum).name
            start = "\n" if new_line else ""
            self.stderr.write(self.style.WARNING(f"{start}{name} received: {what_next}"))

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield received
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
