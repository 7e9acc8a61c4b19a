"""``ToolCommand``, the base of the tool's commands: one-line argument errors, the shared
options, the context and result output, log lines, the progress bar and stop signals."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NoReturn, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from usage.cron import DEFAULT_TICK_INTERVAL_SECONDS
from usage.db import database_failure
from usage.events import JsonFormatter, event_line
from usage.options import duration_text
from usage.output import document as result
from usage.output.files import OutputError, check_output
from usage.output.progress import ProgressBar, run_events
from usage.output.report import Reporter
from usage.repair.batching import DEFAULT_LOCK_TIMEOUT_SECONDS, DEFAULT_STATEMENT_TIMEOUT_SECONDS
from usage.repair.rollup import DEFAULT_MAX_ROLLUP_LOCK_SECONDS
from usage.repair.rollup.versions import ROLLUP_PATHS

# Exit status when rows stayed locked by other writers: distinct from an error (1).
EXIT_ROWS_REMAINING = 3


@contextmanager
def failing(*kinds: type[Exception], describe: Callable[..., str] | None = None) -> Iterator[None]:
    """An error of ``kinds`` in the block ends the command in one line (``describe``)."""
    try:
        yield
    except kinds as exc:
        if describe is None:
            describe = database_failure if isinstance(exc, DatabaseError) else str
        raise CommandError(describe(exc)) from exc


class ToolParser(CommandParser):
    """Django's parser with the tool's rules for values and errors (see the module)."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """``--flag -1s`` becomes ``--flag=-1s`` for a flag that takes one value."""
        if args is not None:
            args, position = list(args), 0
            attached: list[str] = []
            known = self._option_string_actions
            while position < len(args) and args[position] != "--":
                token, value = args[position], "".join(args[position + 1 : position + 2])
                takes_value = token in known and known[token].nargs is None
                joined = takes_value and value.startswith("-") and value not in known
                attached.append(f"{token}={value}" if joined else token)
                position += 2 if joined else 1
            args = attached + args[position:]
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # argparse quotes the offending value whole: long words and the line are cut short.
        text = re.sub(
            r"\S{80,}",
            lambda word: f"{word[0][:60]}...({len(word[0]) - 60} more characters)",
            " ".join(message.split()),
        )
        if len(text) > 400:
            text = text[:400] + "..."
        text = f"{text} (see {self.prog.strip()} --help)"
        if self.called_from_command_line:
            if getattr(self, "json_errors", False):
                self.exit(1, event_line("error", "error", text, {"exit_status": 1}) + "\n")
            self.exit(1, f"CommandError: {text}\n")
        raise CommandError(f"Error: {text}")


class ToolCommand(Reporter, BaseCommand):
    """A command of the tool; ``examples`` is its help epilog, laid out verbatim."""

    examples = ""
    json_errors = False  # --log-format json on the command line (read by run_from_argv)
    json_logs = False  # until ``start_output`` reads --log-format
    what_next: str  # what a stop signal does now (the command keeps it current)

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        kwargs.update(epilog=self.examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # BaseCommand builds a CommandParser itself; ToolParser only adds behaviour to it.
        parser.__class__ = ToolParser
        parser.json_errors = self.json_errors  # type: ignore[attr-defined]
        return parser

    def run_from_argv(self, argv: list[str]) -> None:
        # Read before the parsing, so that even an argument error is a JSON line.
        args = argv[2:]
        pairs = zip(args, args[1:], strict=False)
        self.json_errors = "--log-format=json" in args or ("--log-format", "json") in pairs
        super().run_from_argv(argv)

    def execute(self, *args: Any, **options: Any) -> str | None:
        """Django's, but under ``--log-format json`` the error is a JSON line too."""
        try:
            return super().execute(*args, **options)
        except CommandError as exc:
            if options.get("traceback") or not self.json_errors:
                raise
            line = event_line("error", "error", str(exc), {"exit_status": exc.returncode})
            self.stderr.write(line, style_func=lambda t: t)
            sys.exit(exc.returncode)

    def add_timeout_arguments(
        self, parser: CommandParser, *, lock: str, statement: str, rollup: str
    ) -> None:
        """The server-side limits of a run (``options.parse_limits`` reads them); ``lock``,
        ``statement`` and ``rollup`` say what each applies to in this command."""
        statement = f"server-side statement_timeout {statement}"
        limits = {
            "--lock-timeout": (DEFAULT_LOCK_TIMEOUT_SECONDS, f"server-side lock_timeout {lock}"),
            "--statement-timeout": (DEFAULT_STATEMENT_TIMEOUT_SECONDS, statement),
            "--max-rollup-lock-seconds": (DEFAULT_MAX_ROLLUP_LOCK_SECONDS, rollup),
            "--cron-tick-interval": (
                DEFAULT_TICK_INTERVAL_SECONDS,
                "how often the platform's scheduler runs rollup_task_usage_hourly(); the "
                "rollup leaves lock 4246 free while a tick is due",
            ),
        }
        for flag, (seconds, text) in limits.items():
            default = duration_text(seconds)
            parser.add_argument(flag, default=default, help=f"{text} (default {default})")
        parser.add_argument(
            "--rollup-path",
            choices=ROLLUP_PATHS,
            default="auto",
            help="how the hourly keys are rebuilt: auto (the tool's own recompute when the "
            "installed rollup function is a definition it knows, proven against the function "
            "on each run's first keys; the function otherwise) or function (always the "
            "platform's function; slower on large tables)",
        )

    def add_output_arguments(self, parser: CommandParser) -> None:
        """``--format``, ``--output`` and ``--log-format`` (read by ``start_output``)."""
        parser.add_argument(
            "--format",
            choices=result.FORMATS,
            default="table",
            help="result format: a readable table (default), JSON or CSV",
        )
        parser.add_argument(
            "--output",
            help="write the result to this file instead of stdout (stdout then shows the "
            "header lines and the outcome)",
        )
        parser.add_argument(
            "--log-format",
            choices=("text", "json"),
            default="text",
            help="stderr as text (with a progress bar on a terminal) or one JSON object per "
            "line, every line",
        )

    def start_output(self, options: dict[str, Any]) -> None:
        """The output options (a refused ``--output`` is a ``ValueError``), and so where this
        command's lines go from now on (``Reporter``, ``usage.output``)."""
        self.output_file = None if options["output"] is None else check_output(options["output"])
        self.format = options["format"]
        # The stream under Django's wrapper: text exactly as given, for the log and the bar.
        self.err: TextIO = self.stderr._out
        self.write_error: str | None = None
        self.signals: list[int] = []
        self.json_logs = options["log_format"] == "json"
        self.document_on_stdout = self.format != "table" and self.output_file is None
        self.verbosity = options["verbosity"]

    def show_context(
        self, database: str, mode: str, lines: list[str], message: str, /, **fields: Any
    ) -> None:
        """The first lines: the database, the mode and ``lines``; in JSON one event."""
        if self.json_logs:
            self.context("context", message, database=database, **fields)
            return
        for line in (f"Database: {database}", f"Mode: {mode}", *lines):
            self.context("context", line)

    def readable(self, document: dict[str, Any], kind: str) -> str:
        """The result as text: ``file`` (whole), ``screen`` (on stdout) or ``brief`` (the
        outcome beside a file)."""
        raise NotImplementedError

    def show_result(self, document: dict[str, Any]) -> dict[str, Any]:
        """Show the result on stdout, or in ``--output`` with the outcome on stdout; a failed
        write is kept in ``write_error``."""
        fmt, output = self.format, self.output_file
        as_data = {"json": result.to_json, "csv": result.to_csv}.get(fmt)
        kind = "screen" if output is None else "file"
        text = as_data(document) if as_data else self.readable(document, kind)
        if output is None:
            self.stdout.write(text)
            return document
        try:
            output.write(text)
        except OutputError as exc:
            self.write_error = str(exc)
        else:
            self.stdout.write(f"Result written to {output.given} ({fmt}).")
        brief = self.readable(document, "brief")
        if brief or self.write_error is not None:
            self.stdout.write(brief)
        return document

    def ending(self, error: CommandError | None, done: str) -> CommandError | None:
        """The command's error with a failed write added; alone, that is exit status 1 and
        ``done`` says what happened all the same."""
        if self.write_error is None:
            return error
        if error is None:
            return CommandError(f"{self.write_error}; {done}")
        return CommandError(f"{error}; also, {self.write_error}", returncode=error.returncode)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signals[0]).name if self.signals else None

    def stopped(self, after: str) -> CommandError:
        """The exit's reason after a stop signal, for the log (the outcome says what next)."""
        signum = self.signals[0] if self.signals else signal.SIGTERM
        return CommandError(
            f"stopped by {signal.Signals(signum).name}{after} (see the outcome)",
            returncode=128 + signum,
        )

    def run_logging(self) -> AbstractContextManager[None]:
        """The library's log lines: as text, warnings (everything at ``--verbosity 2``); as
        JSON, the events (not at 0) and the other messages from warnings up (all at 2)."""
        debug = self.verbosity >= (1 if self.json_logs else 2)
        level = logging.DEBUG if debug else logging.WARNING
        return self.logging_to(self.err, level, json=self.json_logs, every=self.verbosity >= 2)

    @contextmanager
    def logging_to(
        self, stream: TextIO, level: int, *, json: bool = False, every: bool = True
    ) -> Iterator[None]:
        """The ``usage`` loggers' lines on ``stream`` from ``level`` up; unless ``every``,
        messages without an event only from warnings up, and events only in JSON."""
        handler = logging.StreamHandler(stream)
        handler.setLevel(level)
        handler.setFormatter(
            JsonFormatter() if json else logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        )
        plain = logging.NOTSET if every else logging.WARNING
        handler.addFilter(
            lambda record: (every or json) if hasattr(record, "event") else record.levelno >= plain
        )
        logger = logging.getLogger("usage")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)

    @contextmanager
    def live_run(self, phase: str) -> Iterator[tuple[threading.Event, Callable[..., None]]]:
        """A run with its bar, stopped by SIGINT or SIGTERM (kept in ``signals``; each says
        ``what_next``): yields the stop event and the progress callback (``_progress`` first)."""
        stop = threading.Event()
        bar = ProgressBar(self.err, terminal=self.err.isatty())
        show = run_events(bar, phase) if self.verbosity >= 1 and not self.json_logs else None

        def progress(event: str, /, **details: Any) -> None:
            self._progress(event, **details)
            if show:
                show(event, **details)

        with self.stopping_on_signals(stop) as self.signals:
            try:
                yield stop, progress
            finally:
                bar.close()

    @contextmanager
    def stopping_on_signals(
        self, stop: threading.Event, what_next: str | None = None
    ) -> Iterator[list[int]]:
        """While the block runs, SIGINT and SIGTERM set ``stop`` and warn of ``what_next`` (by
        default ``self.what_next`` as it is then); yields the signals received."""
        received: list[int] = []

        def act(signum: int) -> None:
            stop.set()
            message = f"{signal.Signals(signum).name} received: {what_next or self.what_next}"
            if self.json_logs:
                self.warning(message, event="signal")
            else:
                self.stderr.write(self.style.WARNING(f"\n{message}"))

        def on_signal(signum: int, frame: Any) -> None:
            # This runs between two bytecodes of the main thread, which may hold the stop
            # event's or the stream's lock (chaos soak, schedule 110): a thread acts on it.
            received.append(signum)
            threading.Thread(target=act, args=(signum,), name="stop-request").start()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield received
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
