"""The repair command's plan options in one place: ``--plan-out`` (the dry run writes the
plan), ``--plan`` and ``--plan-max-age`` (the execute applies it, or refuses)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from usage import render
from usage.options import duration_seconds, parse_cutoff, parse_workspace_id, shown
from usage.output import outcome
from usage.output.files import OutputError, OutputFile, check_output
from usage.output.report import Reporter
from usage.plan.check import PlanOutcome, SnapshotCheck, check_database
from usage.plan.document import (
    DatabaseIdentity,
    Plan,
    PlanError,
    plan_document,
    plan_text,
    read_plan,
    timestamp,
)
from usage.repair.summary import DryRunSummary

# How old a plan may be, by the database's clock, when it is executed.
DEFAULT_MAX_AGE = "24h"
MAX_AGE_LIMIT_SECONDS = 30 * 24 * 3600.0
# Shows lines fitted to the width where they go (see the repair command).
LinesShower = Callable[[Callable[[int | None], list[str]]], None]


@dataclass(frozen=True)
class PlanOptions:
    """The plan to apply (``given``) or to write (``out``), checked before the database."""

    given: Plan | None = None
    max_age: float = 0.0  # seconds, with ``given``
    out: OutputFile | None = None

    @classmethod
    def read(cls, options: dict[str, Any], output: OutputFile | None) -> PlanOptions:
        """The plan options of a command line; ``ValueError`` (one line) when refused."""
        out = None
        if options["plan_out"] is not None:
            if options["execute"] or options["verify"]:
                raise ValueError(
                    "--plan-out goes with the dry run (without --execute or --verify): write "
                    "the plan, have it reviewed, then run --execute --plan FILE"
                )
            out = check_output(options["plan_out"], flag="--plan-out")
            if output is not None and not out.stream and output.path == out.path:
                raise ValueError(
                    f"--plan-out and --output both name {shown(options['plan_out'])}; give "
                    "each its own file"
                )
        if options["plan"] is None:
            if options["plan_max_age"] is not None:
                raise ValueError("--plan-max-age goes with --execute --plan FILE")
            return cls(out=out)
        if not options["execute"]:
            raise ValueError(
                "--plan goes with --execute (it applies a reviewed plan); a dry run writes "
                "one with --plan-out FILE"
            )
        age = options["plan_max_age"]
        max_age = duration_seconds(DEFAULT_MAX_AGE if age is None else age, flag="--plan-max-age")
        if not 1 <= max_age <= MAX_AGE_LIMIT_SECONDS:
            raise PlanError("--plan-max-age must be between 1s and 720h (30 days)")
        return cls(given=read_plan(str(options["plan"])), max_age=max_age, out=out)

    def scope(
        self, cutoff: str | None, workspace_id: str | None
    ) -> tuple[datetime, uuid.UUID | None]:
        """The plan's cutoff and workspace; given again, they must be equal."""
        assert self.given is not None
        if cutoff is not None and not str(cutoff).strip():
            raise ValueError("--cutoff is empty; leave it out, the plan gives the cutoff")
        plan = self.given
        given = None if cutoff is None else parse_cutoff(cutoff)
        workspace = parse_workspace_id(workspace_id, allow_empty=False)
        if given is not None and given != plan.cutoff:
            raise PlanError(
                f"--cutoff {timestamp(given)} is not the cutoff of {plan.name} "
                f"({timestamp(plan.cutoff)}): leave --cutoff out (the plan gives it), or make a "
                "new plan for the other cutoff and have it reviewed"
            )
        if workspace is not None and workspace != plan.workspace_id:
            raise PlanError(
                f"--workspace-id {workspace} is not the workspace of {plan.name} "
                f"({plan.workspace_id or 'every workspace'}): leave --workspace-id out (the "
                "plan gives it), or make a new plan for that workspace and have it reviewed"
            )
        return plan.cutoff, plan.workspace_id

    def snapshot_check(self, lock_timeout: float) -> SnapshotCheck | None:
        if self.given is None:
            return None
        return SnapshotCheck(self.given, max_age_seconds=self.max_age, lock_timeout=lock_timeout)

    def context(self) -> dict[str, Any]:
        """The plan applied, as the JSON log's ``context`` event names it."""
        assert self.given is not None
        fields = ("created_at", "rows", "fingerprint")
        return {"file": self.given.given, **{key: getattr(self.given, key) for key in fields}}

    def context_line(self) -> str:
        given = self.given
        assert given is not None
        return (
            f"Plan: {given.given}, made {render.timestamp(given.created_at)} by the "
            f"database's clock, {render.number(given.rows)} rows, fingerprint "
            f"{render.short_hash(given.fingerprint)}"
        )

    def check_database(self) -> None:
        """Another database or too old: refused before the summary's pass over the rows."""
        if self.given is not None:
            check_database(self.given, self.max_age)

    def document(
        self, summary: DryRunSummary | None, identity: DatabaseIdentity | None, report: Reporter
    ) -> dict[str, Any] | None:
        """The plan to write, from a summary that kept every group."""
        if identity is None or summary is None:
            return None
        saved = plan_document(summary, identity)
        if identity.system_identifier is None:
            report.warning(
                "The server's system identifier is not readable by this role (no "
                "EXECUTE on pg_control_system()): the plan names its database by "
                "host, port, name and oid."
            )
        return saved

    def write(self, saved: dict[str, Any], report: Reporter, show: LinesShower) -> str | None:
        """Write the plan, then say the next command; returns the error of a failed write."""
        assert self.out is not None
        try:
            self.out.write(plan_text(saved))
        except OutputError as exc:
            return str(exc)
        given = self.out.given
        prose = (
            f"Plan written to {given}: {render.number(saved['totals']['rows'])} rows, "
            f"fingerprint {render.short_hash(saved['fingerprint'])}. Next: have it reviewed, "
            "then apply exactly it"
        )
        command = f"{outcome.REPAIR} --execute --plan {given}"
        if report.json_logs:
            report.event(
                "plan_written", f"{prose}: {command}", file=given, fingerprint=saved["fingerprint"]
            )
        else:
            show(lambda width: outcome.next_step(prose, command, width))
        return None


def checked(check: SnapshotCheck | None) -> PlanOutcome | None:
    """How the execute's candidates compared with the plan, once its snapshot was checked."""
    return check.outcome if check is not None else None
