"""``revert_codex_usage_backfill``: undo one execute run from its journal (dry run first)."""

from __future__ import annotations

import logging
import re
import signal
import threading
from datetime import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser

from usage import options as opts
from usage import render
from usage.db import TargetError, describe_database
from usage.management.base import ToolCommand
from usage.repair.batching import DEFAULT_BATCH_SIZE
from usage.repair.revert import (
    DEFAULT_SHOW_CHANGED,
    RevertError,
    RevertOptions,
    RevertResult,
    execute_revert,
    plan_revert,
)
from usage.repair.runs import RunLockError

# Exit status when restorable rows were left (locked by writers): distinct from errors (1).
EXIT_ROWS_REMAINING = 3
MAX_SHOW_CHANGED = 10_000

EXAMPLES = """
examples:
  # dry run: what reverting run 12 would restore (writes nothing)
  python manage.py revert_codex_usage_backfill 12

  # apply it
  python manage.py revert_codex_usage_backfill 12 --execute
"""

CHANGED_COLUMNS = (
    "usage id",
    "input (run left)",
    "input (now)",
    "updated_at (run left)",
    "updated_at (now)",
)


class Command(ToolCommand):
    help = (
        "Revert one backfill_codex_usage_cache --execute run: restore the rows it changed "
        "(input_tokens and updated_at as journaled) unless someone changed them since, and "
        "rebuild their hourly rollup. Dry run unless --execute is given."
    )

    def examples(self) -> str:
        return EXAMPLES

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", metavar="RUN_ID", help="the run to revert (its number)")
        parser.add_argument(
            "--execute",
            action="store_true",
            help="restore rows; without it the command only reports what it would do",
        )
        parser.add_argument(
            "--batch-size",
            default=str(DEFAULT_BATCH_SIZE),
            help=f"journal entries per batch (default {DEFAULT_BATCH_SIZE})",
        )
        self.add_timeout_arguments(
            parser,
            lock="per batch and rollup call",
            statement="per batch and rollup call",
            rollup="lock 4246 budget per rollup call; batches shrink when one goes over",
        )
        parser.add_argument(
            "--show",
            default=str(DEFAULT_SHOW_CHANGED),
            help=f"how many rows changed since the run to list (default {DEFAULT_SHOW_CHANGED})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with self.bad_input():
            run_id = opts.parse_run_id(options["run_id"], name="RUN_ID")
            show = _parse_show(options["show"])
            revert_options = RevertOptions(
                run_id=run_id,
                batch_size=opts.parse_batch_size(options["batch_size"]),
                **opts.parse_timeouts(options),
                show_changed=show,
            )

        level = {0: logging.WARNING, 1: logging.INFO}.get(options["verbosity"], logging.DEBUG)
        try:
            with self.logging_to(self.stderr, level), self.database_errors():
                self.stdout.write(f"Database: {describe_database()}")
                self.stdout.write(f"Mode: {'EXECUTE' if options['execute'] else 'dry run'}")
                if options["execute"]:
                    self._execute(revert_options)
                else:
                    self._dry_run(revert_options)
        except (TargetError, RevertError, RunLockError) as exc:
            result = getattr(exc, "result", None)
            if result is not None:
                self._write_result(result, f"Revert of run {result.run.pk} failed.")
            raise CommandError(str(exc)) from exc

    # -- modes ---------------------------------------------------------------------------

    def _dry_run(self, options: RevertOptions) -> None:
        result = plan_revert(options.run_id, show_changed=options.show_changed)
        run = result.run
        self.stdout.write(
            f"Run {run.pk}: {run.status}, started {render.timestamp(run.started_at)} by "
            f"{run.os_user}@{run.client_host}, cutoff {render.timestamp(run.cutoff)}, "
            f"{render.number(run.rows_updated)} rows repaired."
        )
        if result.owner_gone:
            self.stderr.write(
                self.style.WARNING(
                    f"Run {run.pk} is marked running but no process holds the run lock; "
                    "--execute will mark it interrupted first."
                )
            )
        self._write_changed(result)
        self.stdout.write(
            f"{render.number(result.rows_restorable)} rows would be restored "
            f"({render.number(result.rollup_keys)} hourly rollup keys to rebuild); "
            f"{render.number(result.rows_changed)} changed since the run would be left alone."
        )
        self.stdout.write(
            self.style.SUCCESS(
                "Dry run complete: nothing was written. Re-run with --execute to revert."
            )
        )

    def _execute(self, options: RevertOptions) -> None:
        stop = threading.Event()
        with self.stopping_on_signals(
            stop, "finishing the current batch and its rollup, then stopping."
        ) as received:
            result = execute_revert(options, stop=stop, progress=self._progress)
        signum = received[0] if received else signal.SIGTERM
        self._write_result(result, self._outcome(result, signum))
        if result.stopped:
            raise CommandError(
                f"stopped by {signal.Signals(signum).name} after "
                f"{result.rows_restored} rows; run the same revert again to finish",
                returncode=128 + signum,
            )
        if result.rows_remaining:
            raise CommandError(
                f"{result.rows_remaining} rows of run {result.run.pk} stayed locked by other "
                "writers and were not restored; the run is not marked reverted: run the same "
                "revert again to finish",
                returncode=EXIT_ROWS_REMAINING,
            )

    # -- output --------------------------------------------------------------------------

    def _progress(self, event: str, /, **details: Any) -> None:
        if event == "started":
            r = details["result"]
            self.stdout.write(
                f"Reverting run {r.run.pk} ({r.run.status}): "
                f"{render.number(r.rows_restorable)} rows to restore, "
                f"{render.number(r.rows_changed)} changed since."
            )

    def _outcome(self, result: RevertResult, signum: int) -> str:
        """The revert's own outcome, never the status of the run it reverts."""
        run = result.run
        if result.stopped:
            return (
                f"Revert of run {run.pk} stopped by {signal.Signals(signum).name}: "
                f"{render.number(result.rows_restored)} rows restored, "
                f"{render.number(result.rows_remaining)} still to restore."
            )
        if result.rows_remaining:
            return (
                f"Revert of run {run.pk} incomplete: "
                f"{render.number(result.rows_remaining)} rows stayed locked."
            )
        return f"Run {run.pk} {run.status}."

    def _write_result(self, result: RevertResult, outcome: str) -> None:
        run = result.run
        run.refresh_from_db()
        for stale in result.stale_runs:
            self.stderr.write(
                self.style.WARNING(f"Run {stale} had no live owner; marked interrupted.")
            )
        self._write_changed(result)
        r = result.rollup
        self.stdout.write(
            f"  rows restored {render.number(result.rows_restored)}, "
            f"changed since (left alone) {render.number(result.rows_changed)}, "
            f"remaining {render.number(result.rows_remaining)}; batches {result.batches}; "
            f"rollup: {len(r.slices)} calls, {render.number(r.rollup_rows)} hourly rows, "
            f"lock 4246 held at most {r.max_lock_held_seconds:.3f}s"
        )
        style = self.style.SUCCESS if result.reverted else self.style.ERROR
        self.stdout.write(style(outcome))

    def _write_changed(self, result: RevertResult) -> None:
        if not result.rows_changed:
            return
        self.stderr.write(
            self.style.WARNING(
                f"{render.number(result.rows_changed)} rows were changed by someone else since "
                "the run; they are left as they are"
                + (f" (first {len(result.changed)}):" if result.changed else ".")
            )
        )
        if result.changed:
            rows = [
                (
                    str(c.usage_id),
                    str(c.expected_input_tokens),
                    "deleted" if c.deleted else str(c.current_input_tokens),
                    _precise(c.expected_updated_at),
                    "deleted" if c.deleted else _precise(c.current_updated_at),
                )
                for c in result.changed
            ]
            self.stderr.write(render.render_table(CHANGED_COLUMNS, rows))


def _parse_show(value: str) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) > MAX_SHOW_CHANGED:
        raise ValueError(
            f"--show {opts.shown(value)} must be a whole number from 0 to {MAX_SHOW_CHANGED}"
        )
    return int(text)


def _precise(value: datetime | None) -> str:
    """Timestamps to the microsecond: a row changed a moment later must not look the same."""
    return value.isoformat() if value else "NULL"
