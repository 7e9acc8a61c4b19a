"""``preflight_codex_usage_backfill``: the read-only checklist to run before a repair."""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError

from usage import options as opts
from usage import render
from usage.db import describe_database, error_text
from usage.management.base import ToolCommand, failing
from usage.output.report import wrap
from usage.preflight import CHECKS, DEFAULT_STATEMENT_TIMEOUT_SECONDS, CheckResult, run_preflight

EXAMPLES = """
examples:
  # before the repair: is this database ready for it? (reads only, in a READ ONLY transaction)
  python manage.py preflight_codex_usage_backfill --cutoff 2026-06-13T08:00:00Z

  # the same for one workspace, showing what each check looked at and how long it took
  python manage.py preflight_codex_usage_backfill --cutoff 2026-06-13T08:00:00Z \\
      --workspace-id 0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d --verbosity 2

  # only problems (for scripts); the exit status is non-zero when a check fails
  DATABASE_URL=postgresql://repair@db.internal:5432/app \\
      python manage.py preflight_codex_usage_backfill --cutoff 2026-06-13T08:00:00Z -v 0

  # the same checks as a test run, as the runbook has it
  DATABASE_URL=... CODEX_BACKFILL_CUTOFF=2026-06-13T08:00:00Z python -m pytest -m preflight

checks:
{checks}

verbosity: 0 shows only failures and warnings, 1 the checklist, 2 adds what each check
looked at and its time, 3 adds every SQL statement (on stderr).
"""

TITLES = {check.name: check.title for check in CHECKS}
MARKS = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
STYLES = {"ok": "SUCCESS", "warn": "WARNING", "fail": "ERROR", "skip": "NOTICE"}


class Command(ToolCommand):
    help = (
        "Check, read-only, that the target database is ready for "
        "backfill_codex_usage_cache: server version, tables, columns and types, the rollup "
        "function, indexes, privileges, the tool's own schema, and the candidate rows on "
        "both sides of the cutoff. Prints a checklist with what to do for each failure; "
        "exits non-zero when any check fails."
    )
    examples = EXAMPLES.format(
        checks="\n".join(f"  {check.name:<16} {check.title}" for check in CHECKS)
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.description = textwrap.fill(self.help, 88)
        parser.add_argument(
            "--cutoff",
            help="required: RFC 3339 hosted deployment time of the Codex usage fix, the "
            "value you will pass to backfill_codex_usage_cache, e.g. 2026-06-13T08:00:00Z",
        )
        parser.add_argument(
            "--workspace-id", help="optional workspace UUID, as for the repair itself"
        )
        parser.add_argument(
            "--statement-timeout",
            default=f"{DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s",
            help="longest any one check's query may run, e.g. 30s or 10m "
            f"(default {DEFAULT_STATEMENT_TIMEOUT_SECONDS:g}s); counting candidates scans "
            "task_usage when few rows are eligible",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with failing(ValueError):
            cutoff = opts.parse_cutoff(options["cutoff"])
            workspace_id = opts.parse_workspace_id(options["workspace_id"], allow_empty=False)
            statement_timeout = opts.parse_seconds(
                options["statement_timeout"], flag="--statement-timeout", minimum=0.1, maximum=3600
            )

        verbosity = options["verbosity"]
        # Library log lines on stderr; SQL statements only at --verbosity 3.
        logs = self.logging_to(self.stderr, logging.DEBUG if verbosity >= 3 else logging.WARNING)
        with logs, failing(DatabaseError, describe=_cannot_inspect):
            if verbosity >= 1:
                header = (
                    f"Pre-flight of {describe_database()} (read-only), cutoff "
                    f"{render.timestamp(cutoff)}, workspace {workspace_id or 'all'}"
                )
                self.stdout.write("\n".join(wrap(header, self.terminal_width())))
            results = run_preflight(cutoff, workspace_id, statement_timeout=statement_timeout)

        for result in results:
            self._write_result(result, verbosity)
        counts = Counter(result.status for result in results)
        summary = (
            f"{len(results)} checks: {counts['ok']} passed, {counts['warn']} with warnings, "
            f"{counts['fail']} failed, {counts['skip']} not checked."
        )
        failures = [r.name for r in results if r.status == "fail"]
        if failures or counts["skip"]:
            self.stdout.write(self.style.ERROR(summary))
            raise CommandError(
                f"pre-flight failed: {', '.join(failures)}; do what each failed check says, "
                "then run the pre-flight again before the repair"
            )
        if verbosity >= 1 or counts["warn"]:
            style = self.style.WARNING if counts["warn"] else self.style.SUCCESS
            self.stdout.write(style(summary))

    def _write_result(self, result: CheckResult, verbosity: int) -> None:
        if result.status == "ok" and verbosity < 1:
            return
        mark, style = MARKS[result.status], getattr(self.style, STYLES[result.status])
        timing = f" ({result.seconds:.3f}s)" if verbosity >= 2 else ""
        width = self.terminal_width()
        line = f"{mark} {result.name}: {result.detail}{timing}"
        first, *rest = wrap(line, width, hanging=" " * 9)
        # The mark is styled on its own: the wrapping counts the characters shown.
        self.stdout.write("\n".join([style(mark) + first[len(mark) :], *rest]))
        notes = [f"checked: {TITLES.get(result.name, result.name)}"] if verbosity >= 2 else []
        if result.fix and result.status != "ok":
            notes.append(f"what to do: {result.fix}")
        for note in notes:
            self.stdout.write("\n".join(wrap(note, width, indent=" " * 9, hanging=" " * 11)))


def _cannot_inspect(exc: DatabaseError) -> str:
    return (
        f"cannot inspect {describe_database()}: {error_text(exc)}; "
        "check DATABASE_URL and that the server is reachable"
    )
