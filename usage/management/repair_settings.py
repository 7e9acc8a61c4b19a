"""The repair command's settings: its options read and checked once, before the database,
into one ``RepairSettings`` that the command and the library calls read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from usage import options as opts
from usage.management.base import OutputOptions
from usage.plan import PlanOptions
from usage.repair.backfill import ExecuteOptions

# The options a run records (``BackfillRun.arguments``), as given.
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


@dataclass(frozen=True)
class RepairSettings:
    out: OutputOptions
    execute: bool
    verify: bool
    run_id: int | None  # --verify --run-id N: an earlier run to check
    plan: PlanOptions
    run: ExecuteOptions  # what the run (or the dry run's summary) works on, and how


def read_settings(options: dict[str, Any]) -> RepairSettings:
    """The options as one ``RepairSettings``; a refused value is a one-line ``ValueError``."""
    execute, verify = options["execute"], options["verify"]
    run_id = None
    if options["run_id"] is not None:
        run_id = opts.parse_run_id(options["run_id"])
        if not verify or execute:
            raise ValueError("--run-id goes with --verify alone (verify an earlier run)")
    elif verify and not execute:
        raise ValueError("--verify needs --execute, or --run-id to check an earlier run")
    out = OutputOptions.read(options)
    planning = PlanOptions.read(options, out.file)
    cutoff, workspace_id = _scope(options, planning, run_id)
    limits = opts.parse_limits(options)
    check_snapshot = planning.snapshot_check(limits["lock_timeout"])
    lag = options["max_replication_lag"]
    run = ExecuteOptions(
        cutoff=cutoff,  # type: ignore[arg-type]
        workspace_id=workspace_id,
        batch_size=opts.parse_batch_size(options["batch_size"]),
        sleep_between_batches=opts.parse_duration(options["sleep_between_batches"]),
        rebuild_rollup=options["rebuild_rollup"],
        **limits,
        max_replication_lag=(
            None
            if lag is None
            else opts.parse_seconds(lag, flag="--max-replication-lag", minimum=0.1, maximum=86400)
        ),
        arguments={key: str(options[key]) for key in RECORDED_OPTIONS},
        check_snapshot=check_snapshot,
    )
    return RepairSettings(out, execute, verify, run_id, planning, run)


def _scope(
    options: dict[str, Any], planning: PlanOptions, run_id: int | None
) -> tuple[datetime | None, uuid.UUID | None]:
    """The cutoff and workspace: the plan's, or given (none for an earlier run's verify)."""
    given = options["cutoff"]
    if planning.given is not None:
        return planning.scope(given, options["workspace_id"])
    if options["execute"] and (given is None or not str(given).strip()):
        raise ValueError(
            "--execute needs the reviewed plan: --execute --plan FILE (a dry run with "
            "--plan-out FILE writes it); or give --cutoff to execute without a plan"
        )
    cutoff = None if run_id is not None and not given else opts.parse_cutoff(given)
    return cutoff, opts.parse_workspace_id(options["workspace_id"], allow_empty=False)
