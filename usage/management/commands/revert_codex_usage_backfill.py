"""``revert_codex_usage_backfill``: undo one execute run from its journal (dry run first)."""

from __future__ import annotations

import re
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError

from usage import options as opts
from usage import render
from usage.db import TargetError, describe_database
from usage.events import pick
from usage.management.base import EXIT_ROWS_REMAINING, ToolCommand, failing
from usage.output import document as result
from usage.output.outcome import changed_lines, revert_lines
from usage.repair import revert
from usage.repair.batching import DEFAULT_BATCH_SIZE
from usage.repair.runs import RunLockError

MAX_SHOW_CHANGED = 10_000

EXAMPLES = """
examples:
  # dry run: what reverting run 12 would restore (writes nothing)
  python manage.py revert_codex_usage_backfill 12

  # apply it
  python manage.py revert_codex_usage_backfill 12 --execute

  # the same, with its result as JSON in a file and one JSON object per stderr line
  python manage.py revert_codex_usage_backfill 12 --execute --format json \\
      --output revert-12.json --log-format json

exit status: 0 done; 1 bad input (nothing changed) or an error (the rows restored so far
stay restored: run it again); 3 rows stayed locked by other writers (run the same revert
again); 130/143 stopped by SIGINT/SIGTERM (run it again).
"""


class Command(ToolCommand):
    help = (
        "Revert one backfill_codex_usage_cache --execute run: restore the rows it changed "
        "(input_tokens and updated_at as journaled) unless someone changed them since, and "
        "rebuild their hourly rollup. Dry run unless --execute is given."
    )
    examples = EXAMPLES

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
            default=str(revert.DEFAULT_SHOW_CHANGED),
            help="how many rows changed since the run to list "
            f"(default {revert.DEFAULT_SHOW_CHANGED})",
        )
        self.add_output_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        with failing(ValueError):
            settings = revert.RevertOptions(
                run_id=opts.parse_run_id(options["run_id"], name="RUN_ID"),
                show_changed=_parse_show(options["show"]),
                batch_size=opts.parse_batch_size(options["batch_size"]),
                **opts.parse_limits(options),
            )
            self.start_output(options)
        self.database = database = describe_database()
        run_id, execute = settings.run_id, options["execute"]
        mode = f"revert run {run_id} ({'execute' if execute else 'dry run'})"
        self.show_context(database, mode, [], mode, mode="revert", run_id=run_id, execute=execute)
        try:
            with self.run_logging(), failing(DatabaseError):
                error = self._execute(settings) if execute else self._dry_run(settings)
        except (TargetError, revert.RevertError, RunLockError) as exc:
            found = getattr(exc, "result", None)
            if found is not None:
                self._show(found, error=str(exc))
            raise CommandError(str(exc)) from exc
        if error is not None:
            raise error

    def _dry_run(self, settings: revert.RevertOptions) -> CommandError | None:
        found = revert.plan_revert(settings.run_id, show_changed=settings.show_changed)
        self._describe_run(found)
        if found.owner_gone:
            self.warning(
                f"Run {found.run.pk} is marked running but no process holds the run lock; "
                "--execute will mark it interrupted first."
            )
        self._show(found)
        return self.ending(None, "the dry run changed nothing")

    def _execute(self, settings: revert.RevertOptions) -> CommandError | None:
        self.what_next = "finishing the current batch or rollup slice, then stopping."
        with self.live_run("revert") as (stop, progress):
            done = revert.execute_revert(settings, stop=stop, progress=progress)
        signal = (self.signal_name or "SIGTERM") if done.stopped else None
        document = self._show(done, signal=signal)
        error = None
        if done.stopped:
            error = self.stopped(f" after {render.number(done.rows_restored)} rows restored")
        elif done.rows_remaining:
            error = CommandError(
                f"{render.number(done.rows_remaining)} rows of run {done.run.pk} stayed locked "
                "by other writers and were not restored; the run is not marked reverted: run "
                "the same revert again to finish",
                returncode=EXIT_ROWS_REMAINING,
            )
        return self.ending(error, f"the revert's outcome is shown above ({document['status']})")

    def _progress(self, event: str, /, **details: Any) -> None:
        if event == "started":
            self._describe_run(details["result"])

    def _describe_run(self, found: revert.RevertResult) -> None:
        """The run being reverted, once, among the first lines."""
        run = found.run
        self.context(
            "run",
            f"Run {run.pk}: {run.status}, started {render.timestamp(run.started_at)} by "
            f"{run.os_user}@{run.client_host}, cutoff {render.timestamp(run.cutoff)}, "
            f"{render.number(run.rows_updated)} rows repaired; "
            f"{render.number(found.entries)} journal entries to read.",
            run_id=run.pk,
            **pick(run, "status", "cutoff", "workspace_id", "rows_updated"),
            **pick(found, "entries", "rows_restorable", "rows_changed"),
        )

    def _show(
        self, found: revert.RevertResult, *, signal: str | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """Show the revert's result once, and its outcome line."""
        found.run.refresh_from_db()
        document = result.build_revert(self.database, found, signal=signal, error=error)
        self.show_result(document)
        ok = document["status"] in ("reverted", "would_revert")
        if document["status"] == "would_revert":
            said = (
                f"Dry run of the revert of run {document['run_id']}: "
                f"{render.number(document['rows_restorable'])} rows to restore; nothing was "
                "written."
            )
        else:
            said = (
                f"Revert of run {document['run_id']}: {document['status']}, "
                f"{render.number(document['rows_restored'])} rows restored, "
                f"{render.number(document['rows_remaining'])} still to restore."
            )
        fields = ("run_id", "status", "rows_restored", "rows_remaining")
        self.outcome(said, ok=ok, **{key: document[key] for key in fields})
        return document

    def readable(self, document: dict[str, Any], kind: str) -> str:
        """The revert's outcome, with the rows changed since the run (not in brief)."""
        width = None if kind == "file" else self.terminal_width()
        lines = changed_lines(document, self.style, width) if kind != "brief" else []
        return "\n".join(lines + revert_lines(document, self.style, width))


def _parse_show(value: str) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) > MAX_SHOW_CHANGED:
        raise ValueError(
            f"--show {opts.shown(value)} must be a whole number from 0 to {MAX_SHOW_CHANGED}"
        )
    return int(text)
