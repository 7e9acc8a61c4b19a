"""``backfill_codex_usage_cache``: the dry-run-first repair of historical Codex usage rows;
its options are read once (``_read_options``) and ``handle()`` follows the runbook."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError

from usage import options as opts
from usage import plan, render
from usage.db import TargetError, check_target, database_failure, describe_database
from usage.management.base import EXIT_ROWS_REMAINING, ToolCommand, failing
from usage.models import BackfillRun
from usage.output import document as result
from usage.output.table import TABLE_GROUP_LIMIT, result_table
from usage.plan import PlanOptions, checked
from usage.repair import backfill
from usage.repair.runs import RunLockError
from usage.repair.summary import CutoffError, DryRunSummary, load_summary, workspace_has_agents
from usage.repair.verify import verify_run_in_context

# Exit status besides 0, 1, 3 (``EXIT_ROWS_REMAINING``) and 128+N after signal N.
EXIT_VERIFY_FAILED = 4

# The options a run records (``BackfillRun.arguments``), as given.
RECORDED_OPTIONS = render.names(
    "cutoff workspace_id batch_size sleep_between_batches rebuild_rollup lock_timeout "
    "statement_timeout max_rollup_lock_seconds max_replication_lag cron_tick_interval "
    "rollup_path plan plan_max_age"
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


@dataclass(frozen=True)
class RepairSettings:
    """The command's options, read and checked once, before the database."""

    execute: bool
    verify: bool
    run_id: int | None  # --verify --run-id N: an earlier run to check
    plan: PlanOptions
    run: backfill.ExecuteOptions  # what the run (or the dry run's summary) works on, and how


def _outcome(document: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """The outcome line and its fields, and what happened (for a failed ``--output`` write)."""
    verdict = {True: "passed", False: "FAILED"}
    if "run_id" in document:
        message = (
            f"Run {document['run_id']} {document['status']}: "
            f"{render.number(document['rows_updated'])} rows changed, "
            f"{render.number(document['rows_remaining'])} still eligible"
        )
        if "verify" in document:
            message += f"; verification {verdict[document['verify']['ok']]}"
        done = f"run {document['run_id']} {document['status']} (its outcome is shown above)"
        figures = ("run_id", "status", "rows_updated", "rows_remaining")
        return message, {key: document[key] for key in figures}, done
    if document["mode"] == "verify":
        verify = document["verify"]
        message = f"Verification of run {verify['run_id']} {verdict[verify['ok']]}"
        fields = {"run_id": verify["run_id"], "verified": verify["ok"]}
        return message, fields, "the verification's outcome is shown above"
    rows = document["totals"]["rows"]
    message = f"Dry run complete: {render.number(rows)} rows would change; nothing was written"
    return message, {"rows": rows}, "the dry run changed nothing (its summary is shown above)"


class Command(ToolCommand):
    help = (
        "Repair historical Codex task_usage rows whose input_tokens still include cached "
        "input (input_tokens := max(input_tokens - cache_read_tokens, 0)), once per row, and "
        "rebuild the hourly rollup for them. Dry run unless --execute is given."
    )
    examples = EXAMPLES

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
            default=str(opts.MAX_BATCH_SIZE),
            help=f"the most rows an update batch takes (default and limit "
            f"{opts.MAX_BATCH_SIZE}): batches start at {backfill.FIRST_BATCH_SIZE} rows (fewer "
            f"if this is smaller) and are sized to take about {backfill.DEFAULT_BATCH_SECONDS:g}s",
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

    def handle(self, *args: Any, **options: Any) -> None:
        with failing(ValueError):
            self.settings = settings = self._read_options(options)
        self.failure: str | None = None
        refused = (TargetError, CutoffError, RunLockError, plan.PlanError)
        with failing(*refused, DatabaseError), self.run_logging():
            database = describe_database()
            self._context(database)
            check_target()
            if settings.run_id is not None:
                if not BackfillRun.objects.filter(pk=settings.run_id).exists():
                    raise CommandError(
                        f"run {settings.run_id} does not exist; give the number printed as "
                        "'Run N' by --execute (the admin lists the runs)"
                    )
                verified = verify_run_in_context(settings.run_id)
                document = self.show_result(result.build("verify", database, verify=verified))
            elif settings.execute:
                document = self._execute(database, self._summary())
            else:
                document = self._dry_run(database)
        # The outcome is the last stderr line when stdout carries a document (or JSON).
        message, fields, done = _outcome(document)
        error = self.ending(self._exit_status(document), done)
        status = 0 if error is None else error.returncode
        self.outcome(
            f"{message} (exit status {status}).", ok=status == 0, exit_status=status, **fields
        )
        if error is not None:
            raise error

    def _read_options(self, options: dict[str, Any]) -> RepairSettings:
        """The options, checked before the database (a refused one is a one-line ``ValueError``);
        ``run``'s cutoff and workspace are the plan's, or given (none to verify an earlier run)."""
        execute, verify, run_id = options["execute"], options["verify"], None
        if options["run_id"] is not None:
            run_id = opts.parse_run_id(options["run_id"])
            if not verify or execute:
                raise ValueError("--run-id goes with --verify alone (verify an earlier run)")
        elif verify and not execute:
            raise ValueError("--verify needs --execute, or --run-id to check an earlier run")
        self.start_output(options)
        planning = PlanOptions.read(options, self.output_file)
        given = options["cutoff"]
        if planning.given is not None:
            cutoff, workspace_id = planning.scope(given, options["workspace_id"])
        elif execute and (given is None or not str(given).strip()):
            raise ValueError(
                "--execute needs the reviewed plan: --execute --plan FILE (a dry run with "
                "--plan-out FILE writes it); or give --cutoff to execute without a plan"
            )
        else:
            cutoff = None if run_id is not None and not given else opts.parse_cutoff(given)
            workspace_id = opts.parse_workspace_id(options["workspace_id"], allow_empty=False)
        limits = opts.parse_limits(options)
        lag = options["max_replication_lag"]
        run = backfill.ExecuteOptions(
            cutoff=cutoff,  # type: ignore[arg-type]
            workspace_id=workspace_id,
            batch_size=opts.parse_batch_size(options["batch_size"]),
            sleep_between_batches=opts.parse_duration(options["sleep_between_batches"]),
            rebuild_rollup=options["rebuild_rollup"],
            **limits,
            max_replication_lag=None
            if lag is None
            else opts.parse_seconds(lag, flag="--max-replication-lag", minimum=0.1, maximum=86400),
            arguments={key: str(options[key]) for key in RECORDED_OPTIONS},
            check_snapshot=planning.snapshot_check(limits["lock_timeout"]),
        )
        return RepairSettings(execute, verify, run_id, planning, run)

    def _context(self, database: str) -> None:
        cutoff, workspace_id = self.settings.run.cutoff, self.settings.run.workspace_id
        mode = "execute" if self.settings.execute else "dry run"
        scope: dict[str, Any] = {"cutoff": cutoff, "workspace_id": workspace_id}
        lines = [f"Cutoff: {render.timestamp(cutoff)}", f"Workspace: {workspace_id or 'all'}"]
        if self.settings.run_id is not None:
            mode = f"verify run {self.settings.run_id}"
            scope, lines = {"run_id": self.settings.run_id}, []
        if self.settings.plan.given is not None:
            scope["plan"] = self.settings.plan.context()
            lines.append(self.settings.plan.context_line())
        self.show_context(database, mode, lines, f"{mode} on {database}", mode=mode, **scope)

    def _summary(self) -> DryRunSummary | None:
        """What the dry run shows or its plan writes; none when a run shows its outcome alone
        (its record has the figures: no pass over every candidate before the run's own)."""
        cutoff, workspace_id = self.settings.run.cutoff, self.settings.run.workspace_id
        self.settings.plan.check_database()
        table = self.format == "table"
        # A table shows a bounded number of groups: keep no more in memory than that.
        keep = TABLE_GROUP_LIMIT if table and self.settings.plan.out is None else None
        outcome_only = self.settings.execute and table and self.output_file is None
        summary = None if outcome_only else load_summary(cutoff, workspace_id, max_groups=keep)
        if not (summary.workspace_known if summary else workspace_has_agents(workspace_id)):
            self.warning(f"No agent belongs to workspace {workspace_id}.")
        return summary

    def _dry_run(self, database: str) -> dict[str, Any]:
        """The dry run's result, then the plan it writes (``--plan-out``)."""
        # The database a plan to write names, read before the summary.
        identity = plan.read_identity() if self.settings.plan.out is not None else None
        summary = self._summary()
        saved = self.settings.plan.document(summary, identity, self)
        document = self.show_result(result.build("dry_run", database, summary=summary))
        if saved and (failed := self.settings.plan.write(saved, self)):
            self.write_error = "; also, ".join(filter(None, [self.write_error, failed]))
        return document

    def _execute(self, database: str, summary: DryRunSummary | None) -> dict[str, Any]:
        """The run, then its verify (``--verify``); a failed run still shows its outcome."""
        self.what_next = (
            "finishing the current batch, then rebuilding the rollup for what was done."
        )
        try:
            with self.live_run("update") as (stop, progress):
                executed = backfill.execute_backfill(
                    self.settings.run, stop=stop, progress=progress
                )
        except backfill.BackfillError as exc:
            if exc.result is None:
                raise CommandError(str(exc)) from exc
            executed, self.failure = exc.result, str(exc)
        verified = None
        if self.settings.verify and self.failure is None:
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
        compared = checked(self.settings.run.check_snapshot)
        plan_doc = compared.document() if compared is not None else None
        document = result.build(
            "execute", database, summary=summary, execute=executed, plan=plan_doc, verify=verified
        )
        return self.show_result(document)

    def _progress(self, event: str, /, **details: Any) -> None:
        """The run's lines among the first (in JSON the library's own events say them)."""
        text = not self.json_logs
        if event == "stamped":
            self.what_next = (
                "stopping the rollup after its current slice; the keys not rebuilt stay "
                "pending until the same command is run again."
            )
        elif event == "stamping" and text:
            self.context("stamp", f"Stamp: {details['policy'].reason}.")
        elif event == "rollup_path" and text:
            function = f" ({details['function']})" if details.get("function") else ""
            reason = f": {details['reason']}" if details.get("reason") else ""
            self.context("rollup_path", f"Rollup: {details.get('path')}{function}{reason}.")
        if event != "started":
            return
        run = details["run"]
        if text:
            self.context(
                "start",
                f"Run {run.pk} started at {render.timestamp(run.started_at)} "
                f"by {run.os_user}@{run.client_host} as role {run.db_role}.",
            )
        earlier = run.continues
        if earlier is not None:
            first = (earlier.error or "").split(";")[0].strip()
            figures = ("status", "rows_updated", "rows_remaining")
            self.context(
                "continues",
                f"Run {run.pk} continues run {earlier.pk} ({earlier.status}: "
                f"{render.number(earlier.rows_updated)} rows repaired, "
                f"{render.number(earlier.rows_remaining)} left{f'; {first}' if first else ''}).",
                run_id=run.pk,
                continues=earlier.pk,
                **{f"continues_{key}": getattr(earlier, key) for key in figures},
            )
        compared = checked(self.settings.run.check_snapshot)
        if compared is not None and text:
            self.context("plan", compared.summary())

    def readable(self, document: dict[str, Any], kind: str) -> str:
        """Whole for a file; on stdout a dry run's groups (not at -v 0) or a run's outcome."""
        compared = checked(self.settings.run.check_snapshot)
        groups = kind == "file" or (
            kind == "screen" and document["mode"] == "dry_run" and self.verbosity >= 1
        )
        return result_table(
            document,
            self.style,
            groups=groups,
            plan_out=self.settings.plan.out is not None,
            plan_line=compared.summary() if compared is not None else None,
            signal_name=self.signal_name,
            width=None if kind == "file" else self.terminal_width(),
        )

    def _exit_status(self, document: dict[str, Any]) -> CommandError | None:
        """The error that ends the command, if any: a failed run first, then a signal."""
        if self.failure is not None:
            return CommandError(self.failure)
        if self.signals:
            rows = render.number(document["rows_updated"])
            return self.stopped(f": run {document['run_id']} interrupted after {rows} rows")
        if document.get("rows_remaining"):
            return CommandError(
                f"{render.number(document['rows_remaining'])} eligible rows were locked by "
                "other writers the whole time and were not repaired; re-run the same command "
                "to finish them",
                returncode=EXIT_ROWS_REMAINING,
            )
        verify = document.get("verify")
        if verify is None or verify["ok"]:
            return None
        listed = "; the first of them are listed with the result" if verify["mismatches"] else ""
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
