"""``backfill_codex_usage_cache``: the dry-run-first repair of historical Codex usage rows."""

from __future__ import annotations

import argparse
import signal
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError

from usage import options as opts
from usage import plan, render
from usage.db import TargetError, check_target, database_failure, describe_database
from usage.management.base import ToolCommand
from usage.models import BackfillRun
from usage.output import document as result
from usage.output import outcome
from usage.output.files import OutputError, OutputFile, check_output
from usage.output.progress import OutputStream, ProgressBar, repair_events
from usage.output.table import TABLE_GROUP_LIMIT, result_table
from usage.repair.backfill import (
    BackfillError,
    ExecuteOptions,
    ExecuteResult,
    execute_backfill,
)
from usage.repair.batching import DEFAULT_BATCH_SIZE
from usage.repair.runs import RunLockError
from usage.repair.summary import CutoffError, load_summary, workspace_has_agents
from usage.repair.verdict import verify_run_in_context

# Exit statuses besides 0 (done) and 1 (error or bad input); 128+N after signal N.
EXIT_ROWS_REMAINING = 3
EXIT_VERIFY_FAILED = 4

RECORDED_OPTIONS = (
    "cutoff",
    "workspace_id",
    "batch_size",
    "sleep_between_batches",
    "rebuild_rollup",
    "lock_timeout",
    "statement_timeout",
    "max_rollup_lock_seconds",
    "max_replication_lag",
    "cron_tick_interval",
    "rollup_path",
    "plan",
    "plan_max_age",
)

EXAMPLES = """
examples:
  # dry run (the default): what would change, per workspace and UTC day; writes nothing
  python manage.py backfill_codex_usage_cache --cutoff 2026-06-13T08:00:00Z

  # the same for one workspace, saved as a plan for the reviewer
  python manage.py backfill_codex_usage_cache --cutoff 2026-06-13T08:00:00Z \\
      --workspace-id 0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d --plan-out plan.json

  # apply exactly the reviewed plan (its cutoff and workspace), throttled, pausing while
  # replicas lag more than 10 s, then verify
  python manage.py backfill_codex_usage_cache --execute --plan plan.json \\
      --sleep-between-batches 200ms --max-replication-lag 10 --verify

  # the result as JSON for a script
  python manage.py backfill_codex_usage_cache --cutoff 2026-06-13T08:00:00Z --format json

  # verify an earlier run
  python manage.py backfill_codex_usage_cache --verify --run-id 12

cutoff and workspace: --cutoff (and --workspace-id) for a dry run and for --execute without
a plan; --execute --plan FILE takes both from the plan; --verify --run-id N takes them from
the run.

exit status: 0 done (also: verify of a reverted run whose hourly keys are right); 1 bad
input (nothing changed) or an error (a run that failed keeps what it did, and its outcome
says so); 3 eligible rows left locked by other writers; 4 verification failed; 130/143
stopped by SIGINT/SIGTERM.
"""


class Command(ToolCommand):
    help = (
        "Repair historical Codex task_usage rows whose input_tokens still include cached "
        "input (input_tokens := max(input_tokens - cache_read_tokens, 0)), once per row, and "
        "rebuild the hourly rollup for them. Dry run unless --execute is given."
    )

    def examples(self) -> str:
        return EXAMPLES

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--cutoff",
            help="RFC 3339 hosted deployment time of the Codex usage fix, any offset "
            "(normalized to UTC), e.g. 2026-06-13T08:00:00Z; required for a dry run and for "
            "--execute without --plan (a plan gives it, a verified run has its own)",
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
            help="pause between batches, e.g. 500ms, 2s, 1m (default 0s)",
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
        self.add_timeout_arguments(
            parser,
            lock="per batch and rollup slice",
            statement="per batch",
            rollup="longest time one rollup slice may hold lock 4246",
        )
        parser.add_argument(
            "--max-replication-lag",
            help="pause between batches while a streaming replica lags more than this many "
            "seconds (default: no check)",
        )
        parser.add_argument(
            "--verify",
            action="store_true",
            help="after --execute (or for --run-id), check that no eligible row is left and "
            "that every hourly key the run touched equals a from-scratch recompute",
        )
        parser.add_argument("--run-id", help="with --verify and no --execute: the run to check")
        parser.add_argument(
            "--plan-out",
            help="dry run only: also save the result as a plan (JSON) for review; execute it "
            "with --execute --plan FILE",
        )
        parser.add_argument(
            "--plan",
            help="with --execute: repair what this plan (written by --plan-out) covers, with "
            "its cutoff and workspace, or refuse and change nothing",
        )
        parser.add_argument(
            "--plan-max-age",
            help="with --plan: refuse a plan made longer ago than this by the database's "
            f"clock, e.g. 2h (default {plan.DEFAULT_MAX_AGE}, at most 720h)",
        )
        self.add_output_arguments(parser)

    # -- entry point ---------------------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        with self.bad_input():
            settings = self._parse(options)

        self.verbosity = verbosity = options["verbosity"]
        stderr = OutputStream(self.stderr)
        self.report = self.reporter(options)
        self.write_error: str | None = None
        self.signals: list[int] = []
        self.failure: str | None = None
        self.plan_line: str | None = None
        try:
            with self.run_logging(stderr, self.report), self.database_errors():
                document = self._run(settings, options, verbosity, stderr)
        except (TargetError, CutoffError, RunLockError, plan.PlanError) as exc:
            raise CommandError(str(exc)) from exc
        error = self._exit_status(document)
        if self.write_error:
            error = self._with_write_error(document, error)
        self._final_line(document, error)
        if error is not None:
            raise error

    def _parse(self, options: dict[str, Any]) -> ExecuteOptions:
        run_id = options["run_id"]
        if run_id is not None:
            options["run_id"] = opts.parse_run_id(run_id)
            if not options["verify"] or options["execute"]:
                raise ValueError("--run-id goes with --verify alone (verify an earlier run)")
        elif options["verify"] and not options["execute"]:
            raise ValueError("--verify needs --execute, or --run-id to check an earlier run")
        self.output = check_output(options["output"]) if options["output"] is not None else None
        self.plan_out = self._check_plan_out(options)
        self.plan = self._read_plan(options)
        cutoff, workspace_id = self._scope(options)
        timeouts = opts.parse_limits(options)
        self.plan_check = (
            plan.SnapshotCheck(
                self.plan,
                max_age_seconds=self.plan_max_age,
                lock_timeout=timeouts["lock_timeout"],
            )
            if self.plan is not None
            else None
        )
        lag = options["max_replication_lag"]
        return ExecuteOptions(
            cutoff=cutoff,  # type: ignore[arg-type]
            workspace_id=workspace_id,
            batch_size=opts.parse_batch_size(options["batch_size"]),
            sleep_between_batches=opts.parse_duration(options["sleep_between_batches"]),
            rebuild_rollup=options["rebuild_rollup"],
            **timeouts,
            max_replication_lag=(
                None
                if lag is None
                else opts.parse_seconds(
                    lag, flag="--max-replication-lag", minimum=0.1, maximum=86400
                )
            ),
            arguments={key: str(options[key]) for key in RECORDED_OPTIONS},
            check_snapshot=self.plan_check,
        )

    def _check_plan_out(self, options: dict[str, Any]) -> OutputFile | None:
        """``--plan-out``: a dry run's, checked like ``--output`` before anything is touched."""
        value = options["plan_out"]
        if value is None:
            return None
        if options["execute"] or options["verify"]:
            raise ValueError(
                "--plan-out goes with the dry run (without --execute or --verify): write the "
                "plan, have it reviewed, then run --execute --plan FILE"
            )
        target = check_output(value, flag="--plan-out")
        if self.output is not None and not target.stream and self.output.path == target.path:
            raise ValueError(
                f"--plan-out and --output both name {opts.shown(value)}; give each its own file"
            )
        return target

    def _read_plan(self, options: dict[str, Any]) -> plan.Plan | None:
        """``--plan``: read and checked (checksum, version, fields) before the database."""
        value = options["plan"]
        self.plan_max_age = plan.DEFAULT_MAX_AGE_SECONDS
        if value is None:
            if options["plan_max_age"] is not None:
                raise ValueError("--plan-max-age goes with --execute --plan FILE")
            return None
        if not options["execute"]:
            raise ValueError(
                "--plan goes with --execute (it applies a reviewed plan); a dry run writes "
                "one with --plan-out FILE"
            )
        self.plan_max_age = plan.parse_max_age(options["plan_max_age"])
        self.plan_file = value
        return plan.read_plan(value)

    def _scope(self, options: dict[str, Any]) -> tuple[datetime | None, uuid.UUID | None]:
        """The cutoff and workspace: the plan's (given again, they must be equal), or given."""
        given = options["cutoff"]
        if self.plan is None:
            if options["execute"] and (given is None or not str(given).strip()):
                raise ValueError(
                    "--execute needs the reviewed plan: --execute --plan FILE (a dry run with "
                    "--plan-out FILE writes it); or give --cutoff to execute without a plan"
                )
            standalone_verify = options["run_id"] is not None and not given
            cutoff = None if standalone_verify else opts.parse_cutoff(given)
            return cutoff, opts.parse_workspace_id(options["workspace_id"], allow_empty=False)
        if given is not None and not str(given).strip():
            raise ValueError("--cutoff is empty; leave it out, the plan gives the cutoff")
        plan.bind_options(
            self.plan,
            None if given is None else opts.parse_cutoff(given),
            opts.parse_workspace_id(options["workspace_id"], allow_empty=False),
        )
        return self.plan.cutoff, self.plan.workspace_id

    def _run(
        self,
        settings: ExecuteOptions,
        options: dict[str, Any],
        verbosity: int,
        stderr: OutputStream,
    ) -> dict[str, Any]:
        """Do what the options ask, show its result, and return the result document."""
        database = describe_database()
        if options["run_id"] is not None:
            run_id = options["run_id"]
            self._context(database, f"verify run {run_id}", run_id=run_id)
            check_target()
            if not BackfillRun.objects.filter(pk=run_id).exists():
                raise CommandError(
                    f"run {run_id} does not exist; give the number printed as 'Run N' by "
                    "--execute (the admin lists the runs)"
                )
            document = result.build("verify", database, verify=verify_run_in_context(run_id))
            self._emit(document, options)
            return document

        execute = options["execute"]
        self._context(
            database,
            "execute" if execute else "dry run",
            cutoff=settings.cutoff,
            workspace_id=settings.workspace_id,
        )
        check_target()
        if self.plan is not None:
            # Another database or too old: refused before the summary's pass over the rows.
            plan.check_database(self.plan, self.plan_max_age)
        identity = plan.read_identity() if self.plan_out is not None else None
        # A table shows a bounded number of groups: keep no more in memory than that. A plan
        # keeps them all.
        keep = (
            TABLE_GROUP_LIMIT if options["format"] == "table" and self.plan_out is None else None
        )
        # An execute shown as its outcome alone needs no summary, a pass over every candidate
        # (grouped, their hourly keys counted) before the run's own: its record has the run's
        # figures. JSON, CSV and --output carry the groups, so they take it.
        outcome_only = execute and options["format"] == "table" and self.output is None
        summary = (
            None
            if outcome_only
            else load_summary(settings.cutoff, settings.workspace_id, max_groups=keep)
        )
        if not (
            summary.workspace_known if summary else workspace_has_agents(settings.workspace_id)
        ):
            self.report.warning(f"No agent belongs to workspace {settings.workspace_id}.")
        saved_plan = None
        if identity is not None:
            saved_plan = plan.plan_document(summary, identity)
            if identity.system_identifier is None:
                self.report.warning(
                    "The server's system identifier is not readable by this role (no "
                    "EXECUTE on pg_control_system()): the plan names its database by "
                    "host, port, name and oid."
                )
        if not execute:
            document = result.build("dry_run", database, summary=summary)
            self._emit(document, options)
            if saved_plan is not None:
                self._write_plan(saved_plan, options["plan_out"])
            return document

        try:
            executed = self._execute(settings, verbosity, options["log_format"], stderr)
        except BackfillError as exc:
            if exc.result is None:
                raise CommandError(str(exc)) from exc
            executed, self.failure = exc.result, str(exc)
        checked = self.plan_check.outcome if self.plan_check is not None else None
        self.plan_line = checked.summary() if checked is not None else None
        verified = None
        if options["verify"] and self.failure is None:
            try:
                verified = verify_run_in_context(executed.run.pk)
            except DatabaseError as exc:
                # The run happened: its outcome is printed, then why verify did not run.
                self.failure = (
                    f"run {executed.run.pk} {executed.run.status}, but --verify could not "
                    f"run: {database_failure(exc)}; verify later with --verify --run-id "
                    f"{executed.run.pk}"
                )
        executed.run.refresh_from_db()
        document = result.build(
            "execute",
            database,
            summary=summary,
            execute=executed,
            plan=checked.document() if checked is not None else None,
            verify=verified,
        )
        self._emit(document, options)
        return document

    def _context(self, database: str, mode: str, **scope: Any) -> None:
        """The first lines: the database, the mode and the scope (one event in JSON)."""
        given = self.plan
        if self.report.json_logs:
            if given is not None:
                scope["plan"] = {
                    "file": self.plan_file,
                    "created_at": given.created_at,
                    "rows": given.rows,
                    "fingerprint": given.fingerprint,
                }
            self.report.context(
                "context", f"{mode} on {database}", database=database, mode=mode, **scope
            )
            return
        self.report.context("context", f"Database: {database}")
        self.report.context("context", f"Mode: {mode}")
        if "cutoff" in scope:
            self.report.context("context", f"Cutoff: {render.timestamp(scope['cutoff'])}")
            self.report.context("context", f"Workspace: {scope['workspace_id'] or 'all'}")
        if given is not None:
            self.report.context(
                "context",
                f"Plan: {self.plan_file}, made {render.timestamp(given.created_at)} by the "
                f"database's clock, {render.number(given.rows)} rows, fingerprint "
                f"{plan.short(given.fingerprint)}",
            )

    def _write_plan(self, saved: dict[str, Any], given: str) -> None:
        """Write the plan file after the summary is shown; a failure is said after it."""
        assert self.plan_out is not None
        try:
            self.plan_out.write(plan.plan_text(saved))
        except OutputError as exc:
            self.write_error = f"{self.write_error}; also, {exc}" if self.write_error else str(exc)
            return
        prose = (
            f"Plan written to {given}: {render.number(saved['totals']['rows'])} rows, "
            f"fingerprint {plan.short(saved['fingerprint'])}. Next: have it reviewed, then "
            "apply exactly it"
        )
        command = f"{outcome.REPAIR} --execute --plan {given}"
        if self.report.json_logs:
            self.report.event(
                "plan_written",
                f"{prose}: {command}",
                file=given,
                fingerprint=saved["fingerprint"],
            )
        else:
            self._readable_lines(lambda width: outcome.next_step(prose, command, width))

    def _readable_lines(self, lines: Callable[[int | None], list[str]]) -> None:
        """Lines of the readable outcome, fitted to where they go: with the result, or on
        stderr beside a document."""
        target = self.stderr if self.report.document_on_stdout else self.stdout
        width = self.terminal_width() if target is self.stdout else None
        for line in lines(width):
            target.write(line, style_func=lambda text: text)

    # -- modes ---------------------------------------------------------------------------

    def _execute(
        self, settings: ExecuteOptions, verbosity: int, log_format: str, stderr: OutputStream
    ) -> ExecuteResult:
        stop = threading.Event()
        bar = ProgressBar(
            stderr,
            terminal=stderr.isatty(),
            enabled=verbosity >= 1 and log_format == "text",
        )
        show = repair_events(bar)
        phase = ["update"]

        def progress(event: str, /, **details: Any) -> None:
            if event == "stamped":
                phase[0] = "rollup"  # the batches are done; the rollup comes next
            if event == "started":
                self._started(details["run"])
            elif event == "stamping" and not self.report.json_logs:
                # The JSON log has the library's own ``stamp`` event.
                self.report.context("stamp", f"Stamp: {details['policy'].reason}.")
            elif event == "rollup_path":
                self._rollup_path(**details)
            show(event, **details)

        def what_next() -> str:
            if phase[0] == "rollup":
                return (
                    "stopping the rollup after its current slice; the keys not rebuilt stay "
                    "pending until the same command is run again."
                )
            return "finishing the current batch, then rebuilding the rollup for what was done."

        with self.stopping_on_signals(
            stop,
            what_next,
            new_line=True,
            say=self.signal_said(self.report),
        ) as self.signals:
            try:
                return execute_backfill(settings, stop=stop, progress=progress)
            finally:
                bar.close()

    def _started(self, run: BackfillRun) -> None:
        if not self.report.json_logs:
            # The JSON log has the library's own ``start`` event.
            self.report.context(
                "start",
                f"Run {run.pk} started at {render.timestamp(run.started_at)} "
                f"by {run.os_user}@{run.client_host} as role {run.db_role}.",
            )
        earlier = run.continues
        if earlier is not None:
            self.report.context(
                "continues",
                f"Run {run.pk} continues run {earlier.pk} ({earlier.status}: "
                f"{render.number(earlier.rows_updated)} rows repaired, "
                f"{render.number(earlier.rows_remaining)} left{self._error_note(earlier)}).",
                run_id=run.pk,
                continues=earlier.pk,
                continues_status=earlier.status,
                continues_rows_updated=earlier.rows_updated,
                continues_rows_remaining=earlier.rows_remaining,
            )
        checked = self.plan_check.outcome if self.plan_check is not None else None
        if checked is not None and not self.report.json_logs:
            # The JSON log has the library's own ``plan`` event.
            self.report.context("plan", checked.summary())

    @staticmethod
    def _error_note(run: BackfillRun) -> str:
        first = run.error.split(";")[0].strip() if run.error else ""
        return f"; {first}" if first else ""

    def _rollup_path(self, **details: Any) -> None:
        """The rollup's path (the tool's recompute or the platform's function), and why."""
        if self.report.json_logs:
            return  # the JSON log has the library's own ``rollup_path`` event
        function = f" ({details['function']})" if details.get("function") else ""
        reason = f": {details['reason']}" if details.get("reason") else ""
        self.report.context(
            "rollup_path",
            f"Rollup: {details.get('path')}{function}{reason}.",
            path=details.get("path"),
            function=details.get("function"),
            fingerprint=details.get("fingerprint"),
            reason=details.get("reason"),
        )

    # -- output --------------------------------------------------------------------------

    def _emit(self, document: dict[str, Any], options: dict[str, Any]) -> None:
        """Show the result (see ``ToolCommand.show_result``)."""
        self.write_error = self.show_result(
            document,
            options["format"],
            self.output,
            lambda kind: self._readable(document, kind),
        )

    def _readable(self, document: dict[str, Any], kind: str) -> str:
        """The result as text: whole for a file; for stdout, the groups of a dry run (not at
        --verbosity 0), and for a run its outcome."""
        width = None if kind == "file" else self.terminal_width()
        groups = kind == "file" or (
            kind == "screen" and document["mode"] == "dry_run" and self.verbosity >= 1
        )
        return result_table(
            document,
            self.style,
            groups=groups,
            plan_out=self.plan_out is not None,
            plan_line=self.plan_line,
            signal_name=self._signal_name(),
            width=width,
        )

    def _signal_name(self) -> str | None:
        return signal.Signals(self.signals[0]).name if self.signals else None

    def _final_line(self, document: dict[str, Any], error: CommandError | None) -> None:
        """The outcome as the last stderr line when stdout carries a document (or JSON)."""
        status = 0 if error is None else error.returncode
        if "run_id" in document:
            message = (
                f"Run {document['run_id']} {document['status']}: "
                f"{render.number(document['rows_updated'])} rows changed, "
                f"{render.number(document['rows_remaining'])} still eligible"
            )
            fields: dict[str, Any] = {
                "run_id": document["run_id"],
                "status": document["status"],
                "rows_updated": document["rows_updated"],
                "rows_remaining": document["rows_remaining"],
            }
        elif document["mode"] == "verify":
            verify = document["verify"]
            message = f"Verification of run {verify['run_id']} " + (
                "passed" if verify["ok"] else "FAILED"
            )
            fields = {"run_id": verify["run_id"], "verified": verify["ok"]}
        else:
            rows = document["totals"]["rows"]
            message = (
                f"Dry run complete: {render.number(rows)} rows would change; nothing was written"
            )
            fields = {"rows": rows}
        if "verify" in document and "run_id" in document:
            message += "; verification " + ("passed" if document["verify"]["ok"] else "FAILED")
        self.report.outcome(
            f"{message} (exit status {status}).", ok=status == 0, exit_status=status, **fields
        )

    def _exit_status(self, document: dict[str, Any]) -> CommandError | None:
        """The error that ends the command, if any: a failed run first, then a signal."""
        if self.failure is not None:
            return CommandError(self.failure)
        signum = self.signals[0] if self.signals else None
        if signum:
            # The outcome says what next; this line is the exit's reason, for the log.
            return CommandError(
                f"stopped by {signal.Signals(signum).name}: run {document['run_id']} "
                f"interrupted after {render.number(document['rows_updated'])} rows "
                "(see the outcome)",
                returncode=128 + signum,
            )
        if document.get("rows_remaining"):
            return CommandError(
                f"{render.number(document['rows_remaining'])} eligible rows were locked by "
                "other writers the whole time and were not repaired; re-run the same command "
                "to finish them",
                returncode=EXIT_ROWS_REMAINING,
            )
        verify = document.get("verify")
        if verify is not None and not verify["ok"]:
            listed = (
                "; the first of them are listed with the result" if verify["mismatches"] else ""
            )
            wrong = verify["mismatched_keys"] - verify.get("awaiting_tick_keys", 0)
            unknown = (
                " (the installed rollup function is one this tool does not know)"
                if wrong and verify.get("rollup_function") == "unknown"
                else ""
            )
            return CommandError(
                f"verification of run {verify['run_id']} failed: "
                f"{render.number(verify['eligible_rows_left'])} eligible rows left, "
                f"{render.number(wrong)} hourly keys wrong{unknown}{listed}",
                returncode=EXIT_VERIFY_FAILED,
            )
        return None

    def _with_write_error(
        self, document: dict[str, Any], error: CommandError | None
    ) -> CommandError:
        """Add the --output failure to the command's error; exit 1 when there is none."""
        if error is not None:
            return CommandError(f"{error}; also, {self.write_error}", returncode=error.returncode)
        if "run_id" in document:
            done = f"run {document['run_id']} {document['status']} (its outcome is shown above)"
        elif "verify" in document:
            done = "the verification's outcome is shown above"
        else:
            done = "the dry run changed nothing (its summary is shown above)"
        return CommandError(f"{self.write_error}; {done}")
