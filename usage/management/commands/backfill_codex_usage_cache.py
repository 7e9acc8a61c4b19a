"""``backfill_codex_usage_cache``: the dry-run-first repair of historical Codex usage rows."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from usage import options as opts
from usage import render
from usage.backfill import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOCK_TIMEOUT_SECONDS,
    DEFAULT_STATEMENT_TIMEOUT_SECONDS,
    BackfillError,
    ExecuteOptions,
    ExecuteResult,
    execute_backfill,
)
from usage.db import TargetError, check_target, describe_database, scrub
from usage.rollup import DEFAULT_MAX_ROLLUP_LOCK_SECONDS
from usage.runs import RunLockError
from usage.summary import CutoffError, load_summary

# Exit status when eligible rows were left (locked by writers): distinct from errors (1).
EXIT_ROWS_REMAINING = 3

EXAMPLES = """
examples:
  # dry run: what would change (writes nothing)
  python manage.py backfill_codex_usage_cache --cutoff 2026-06-13T08:00:00Z

  # one workspace, then apply, throttled
  python manage.py backfill_codex_usage_cache --cutoff 2026-06-13T08:00:00Z \\
      --workspace-id 0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d --execute --sleep-between-batches 200ms
"""


class Command(BaseCommand):
    help = (
        "Repair historical Codex task_usage rows whose input_tokens still include cached "
        "input (input_tokens := max(input_tokens - cache_read_tokens, 0)), once per row, and "
        "rebuild the hourly rollup for them. Dry run unless --execute is given."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.epilog = EXAMPLES
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--cutoff",
            help="required: RFC 3339 hosted deployment time of the Codex usage fix "
            "(any offset; normalized to UTC), e.g. 2026-06-13T08:00:00Z",
        )
        parser.add_argument("--workspace-id", help="optional workspace UUID to limit the repair")
        parser.add_argument(
            "--batch-size",
            default=str(DEFAULT_BATCH_SIZE),
            help=f"rows per update batch (default {DEFAULT_BATCH_SIZE}, "
            f"at most {opts.MAX_BATCH_SIZE})",
        )
        parser.add_argument(
            "--sleep-between-batches",
            default="0",
            help="pause between batches, e.g. 500ms, 2s, 1m (default 0)",
        )
        parser.add_argument(
            "--execute",
            action="store_true",
            help="change rows; without it the command only prints a dry-run summary",
        )
        parser.add_argument(
            "--rebuild-rollup",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="after --execute, rebuild the hourly rollup for the changed rows (default on)",
        )
        parser.add_argument(
            "--lock-timeout",
            default=f"{DEFAULT_LOCK_TIMEOUT_SECONDS:g}s",
            help="server-side lock_timeout per batch and rollup slice "
            f"(default {DEFAULT_LOCK_TIMEOUT_SECONDS:g}s)",
        )
        parser.add_argument(
            "--statement-timeout",
            default=f"{DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s",
            help="server-side statement_timeout per batch "
            f"(default {DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s)",
        )
        parser.add_argument(
            "--max-rollup-lock-seconds",
            default=f"{DEFAULT_MAX_ROLLUP_LOCK_SECONDS:g}",
            help="longest time one rollup slice may hold lock 4246 "
            f"(default {DEFAULT_MAX_ROLLUP_LOCK_SECONDS:g})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            cutoff = opts.parse_cutoff(options["cutoff"])
            workspace_id = opts.parse_workspace_id(options["workspace_id"])
            execute_options = ExecuteOptions(
                cutoff=cutoff,
                workspace_id=workspace_id,
                batch_size=opts.parse_batch_size(options["batch_size"]),
                sleep_between_batches=opts.parse_duration(options["sleep_between_batches"]),
                rebuild_rollup=options["rebuild_rollup"],
                lock_timeout=opts.parse_seconds(
                    options["lock_timeout"], flag="--lock-timeout", minimum=0.001, maximum=600
                ),
                statement_timeout=opts.parse_seconds(
                    options["statement_timeout"],
                    flag="--statement-timeout",
                    minimum=0.001,
                    maximum=86400,
                ),
                max_rollup_lock_seconds=opts.parse_seconds(
                    options["max_rollup_lock_seconds"],
                    flag="--max-rollup-lock-seconds",
                    minimum=0.05,
                    maximum=60,
                ),
                arguments={
                    key: str(options[key])
                    for key in (
                        "cutoff",
                        "workspace_id",
                        "batch_size",
                        "sleep_between_batches",
                        "rebuild_rollup",
                        "lock_timeout",
                        "statement_timeout",
                        "max_rollup_lock_seconds",
                    )
                },
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

        verbosity = options["verbosity"]
        handler = self._attach_log_handler(verbosity)
        try:
            self._write_header(execute_options, options["execute"])
            if options["execute"]:
                self._execute(execute_options, verbosity)
            else:
                self._dry_run(execute_options)
        except (TargetError, CutoffError, RunLockError) as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(
                f"database error on {describe_database()}: {scrub(str(exc))}; "
                "check DATABASE_URL and that the server is reachable"
            ) from exc
        finally:
            logging.getLogger("usage").removeHandler(handler)

    # -- modes ---------------------------------------------------------------------------

    def _dry_run(self, options: ExecuteOptions) -> None:
        check_target()
        summary = load_summary(options.cutoff, options.workspace_id)
        if not summary.workspace_known:
            self.stderr.write(
                self.style.WARNING(f"No agent belongs to workspace {options.workspace_id}.")
            )
        if summary.totals.rows == 0:
            self.stdout.write(self.style.SUCCESS("No eligible Codex rows: nothing to do."))
            return
        self.stdout.write(render.summary_table(summary))
        t = summary.totals
        self.stdout.write(
            f"\n{render.number(t.rows)} rows would change; "
            f"{render.number(t.input_tokens_removed)} input tokens removed "
            f"({render.number(t.input_before)} -> {render.number(t.input_after)}); "
            f"{render.number(t.clamped_rows)} clamped to 0; "
            f"{render.number(t.rollup_keys)} hourly rollup keys to rebuild."
        )
        self.stdout.write(
            self.style.SUCCESS(
                "Dry run complete: nothing was written. Review the summary, then re-run with "
                "--execute to apply it."
            )
        )

    def _execute(self, options: ExecuteOptions, verbosity: int) -> None:
        stop = threading.Event()
        received: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            received.append(signum)
            stop.set()
            self.stderr.write(
                self.style.WARNING(
                    f"{signal.Signals(signum).name} received: finishing the current batch, "
                    "then rebuilding the rollup for what was done."
                )
            )

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = execute_backfill(
                options,
                stop=stop,
                on_start=lambda run: self.stdout.write(
                    f"Run {run.pk} started at {render.timestamp(run.started_at)} "
                    f"by {run.os_user}@{run.client_host} as role {run.db_role}."
                ),
            )
        except BackfillError as exc:
            if exc.result is not None:
                self._write_result(exc.result)
            raise CommandError(str(exc)) from exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._write_result(result)
        if result.stopped:
            raise CommandError(
                f"stopped by {signal.Signals(received[0]).name} after "
                f"{result.rows_updated} rows; re-run the same command to resume",
                returncode=128 + received[0],
            )
        if result.rows_remaining:
            raise CommandError(
                f"{result.rows_remaining} eligible rows were locked by other writers the whole "
                "time and were not repaired; re-run the same command to finish them",
                returncode=EXIT_ROWS_REMAINING,
            )

    # -- output --------------------------------------------------------------------------

    def _write_header(self, options: ExecuteOptions, execute: bool) -> None:
        self.stdout.write(f"Database: {describe_database()}")
        self.stdout.write(f"Mode: {'EXECUTE' if execute else 'dry run'}")
        self.stdout.write(f"Cutoff: {render.timestamp(options.cutoff)}")
        self.stdout.write(f"Workspace: {options.workspace_id or 'all'}")

    def _write_result(self, result: ExecuteResult) -> None:
        run = result.run
        run.refresh_from_db()
        for stale in result.stale_runs:
            self.stderr.write(
                self.style.WARNING(f"Run {stale} had no live owner; marked interrupted.")
            )
        self.stdout.write(f"Run {run.pk}: {run.status}")
        self.stdout.write(
            f"  rows planned {render.number(result.rows_planned)}, "
            f"updated {render.number(result.rows_updated)}, "
            f"remaining {render.number(result.rows_remaining)}; "
            f"input tokens removed {render.number(result.input_tokens_removed)}; "
            f"clamped {render.number(result.clamped_rows)}; batches {result.batches}"
        )
        if result.rollup is not None:
            r = result.rollup
            recovered = (
                f" (including runs {', '.join(map(str, result.recovered_runs))})"
                if result.recovered_runs
                else ""
            )
            self.stdout.write(
                f"  rollup rebuilt{recovered}: {len(r.slices)} slices, "
                f"{render.number(r.rollup_rows)} hourly rows, "
                f"lock 4246 held at most {r.max_lock_held_seconds:.3f}s"
            )
        elif run.rollup_state == run.RollupState.SKIPPED:
            self.stdout.write("  rollup not rebuilt (--no-rebuild-rollup): the cron tick will")
        style = self.style.SUCCESS if run.status == run.Status.SUCCEEDED else self.style.ERROR
        self.stdout.write(style(f"Run {run.pk} {run.status}."))

    def _attach_log_handler(self, verbosity: int) -> logging.Handler:
        handler = logging.StreamHandler(self.stderr)
        levels = {0: logging.WARNING, 1: logging.INFO}
        handler.setLevel(levels.get(verbosity, logging.DEBUG))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.getLogger("usage").addHandler(handler)
        return handler
