"""The result document of the backfill command: one dict, built once, as JSON or CSV.

The JSON layout is part of the tool's interface (documented in the README and checked by a
test): operators hand it to reviewers and scripts read it. ``usage.output.table`` renders the
same document as the readable table.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

from usage.events import json_default
from usage.repair.backfill import ExecuteResult
from usage.repair.revert import RevertResult
from usage.repair.summary import DryRunSummary, SummaryGroup
from usage.repair.verdict import RunVerification

FORMATS = ("table", "json", "csv")

GROUP_FIELDS = (
    "workspace_id",
    "date_utc",
    "rows",
    "input_before",
    "input_after",
    "input_tokens_removed",
    "clamped_rows",
    "rollup_keys",
    "first_created_at",
    "last_created_at",
)
TOTAL_FIELDS = ("rows", "input_before", "input_after", "input_tokens_removed", "clamped_rows")
RUN_FIELDS = (
    "run_id",
    "status",
    "rows_planned",
    "rows_updated",
    "rows_remaining",
    "input_tokens_removed",
    "clamped_rows",
    "batches",
    "rollup_rows",
    "rollup_slices",
    "rollup_max_lock_seconds",
    "rollup_keys",
    "rollup_seconds",
    "rollup_hash_slices",
    "rollup_cron_waits",
    "rollup_cron_wait_seconds",
    "stamp",
    "stamp_first",
    "stamp_last",
    "rollup_path",
    "rollup_function",
    "rollup_path_reason",
    "continues",
)
VERIFY_FIELDS = (
    "run_id",
    "run_status",
    "ok",
    "eligible_rows_left",
    "eligible_rows_expected",
    "mismatched_keys",
    "awaiting_tick_keys",
    "continues",
    "continued_by",
)


def build(
    mode: str,
    database: str,
    *,
    summary: DryRunSummary | None = None,
    execute: ExecuteResult | None = None,
    plan: dict[str, Any] | None = None,
    verify: RunVerification | None = None,
) -> dict[str, Any]:
    """The result of one command: its mode and database, then whichever parts it has."""
    document: dict[str, Any] = {"mode": mode, "database": database}
    if summary is not None:
        _add_summary(document, summary)
    if execute is not None:
        _add_execute(document, execute)
    if plan is not None:
        document["plan"] = plan
    if verify is not None:
        _add_verify(document, verify)
    return document


def _add_summary(document: dict[str, Any], summary: DryRunSummary) -> None:
    totals = asdict(summary.totals)
    document.update(
        {
            "cutoff": summary.cutoff,
            "workspace_id": summary.workspace_id,
            "database_now": summary.database_now,
            "totals": {key: totals[key] for key in TOTAL_FIELDS},
            "expected_rollup_keys": summary.totals.rollup_keys,
            "group_count": summary.group_count,
            # vars(), not asdict(): a shallow copy, fast enough for 100,000s of groups. The
            # ids digest is for saved plans (usage.plan), not for readers of the summary.
            "groups": [_public_group(group) for group in summary.groups],
        }
    )


def _public_group(group: SummaryGroup) -> dict[str, Any]:
    fields = dict(vars(group))
    del fields["ids_digest"]
    return fields


def _add_execute(document: dict[str, Any], result: ExecuteResult) -> None:
    run = result.run
    rollup = result.rollup
    document.update(
        {
            "run_id": run.pk,
            "status": run.status,
            "rows_planned": result.rows_planned,
            "rows_updated": result.rows_updated,
            "rows_remaining": result.rows_remaining,
            "input_tokens_removed": result.input_tokens_removed,
            "clamped_rows": result.clamped_rows,
            "batches": result.batches,
            "rollup_rows": rollup.rollup_rows if rollup else 0,
            "rollup_slices": len(rollup.slices) if rollup else 0,
            "rollup_max_lock_seconds": round(rollup.max_lock_held_seconds, 6) if rollup else 0,
            "rollup_keys": rollup.keys_done if rollup else 0,
            "rollup_seconds": round(rollup.seconds, 3) if rollup else 0,
            "rollup_hash_slices": rollup.hash_slices if rollup else 0,
            "rollup_cron_waits": rollup.cron_waits if rollup else 0,
            "rollup_cron_wait_seconds": round(rollup.cron_wait_seconds, 3) if rollup else 0,
            "rollup_state": run.rollup_state,
            "stamp": run.stamp,
            "stamp_reason": result.stamp.reason if result.stamp else "",
            "stamp_first": run.stamp_first,
            "stamp_last": run.stamp_last,
            "rollup_path": run.rollup_path,
            "rollup_function": run.rollup_function,
            "rollup_path_reason": run.rollup_path_reason,
            "continues": run.continues_id,
            "recovered_runs": result.recovered_runs,
            "stale_runs": result.stale_runs,
            "error": run.error,
        }
    )


def _add_verify(document: dict[str, Any], result: RunVerification) -> None:
    document["verify"] = {
        "run_id": result.run_id,
        "run_status": result.run_status,
        "runs": result.runs,
        "continues": result.continues,
        "continued_by": result.continued_by,
        "last_run_status": result.last_status,
        "ok": result.ok,
        "eligible_rows_left": result.eligible_rows_left,
        "eligible_rows_expected": result.eligible_rows_expected,
        "mismatched_keys": result.mismatched_keys,
        "awaiting_tick_keys": result.awaiting_tick_keys,
        "rollup_function": result.rollup_function,
        "columns": list(result.columns),
        "mismatches": [asdict(m) for m in result.mismatches],
    }


REVERT_FIELDS = (
    "run_id",
    "run_status",
    "executed",
    "status",
    "entries",
    "rows_restorable",
    "rows_restored",
    "rows_changed",
    "rows_remaining",
    "rollup_keys",
    "batches",
    "rollup_calls",
    "rollup_rows",
    "rollup_max_lock_seconds",
    "seconds",
    "error",
)
CHANGED_FIELDS = (
    "journal_id",
    "usage_id",
    "expected_input_tokens",
    "expected_updated_at",
    "current_input_tokens",
    "current_updated_at",
    "deleted",
)


def build_revert(
    database: str,
    result: RevertResult,
    *,
    signal: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The result of a revert (``executed``) or of its dry run, for every format.

    ``status`` is the revert's own outcome, never the reverted run's: ``would_revert`` (dry
    run), ``reverted``, ``stopped`` (by ``signal``), ``incomplete`` (rows stayed locked) or
    ``failed`` (``error``).
    """
    run = result.run
    rollup = result.rollup
    if not result.executed:
        status = "would_revert"
    elif error is not None:
        status = "failed"
    elif result.stopped:
        status = "stopped"
    elif result.rows_remaining:
        status = "incomplete"
    else:
        status = "reverted"
    return {
        "mode": "revert" if result.executed else "revert_dry_run",
        "database": database,
        "run_id": run.pk,
        "run_status": run.status,
        "cutoff": run.cutoff,
        "workspace_id": run.workspace_id,
        "executed": result.executed,
        "status": status,
        "signal": signal,
        "entries": result.entries,
        "rows_restorable": result.rows_restorable,
        "rows_restored": result.rows_restored,
        "rows_changed": result.rows_changed,
        "rows_remaining": result.rows_remaining,
        # Executed: the keys the revert queued and rebuilt; a dry run: the keys it would.
        "rollup_keys": rollup.keys_done if result.executed else result.rollup_keys,
        "batches": result.batches,
        "rollup_calls": len(rollup.slices),
        "rollup_rows": rollup.rollup_rows,
        "rollup_max_lock_seconds": round(rollup.max_lock_held_seconds, 6),
        "seconds": round(result.seconds, 3),
        "stale_runs": result.stale_runs,
        "error": error or "",
        "changed": [asdict(c) for c in result.changed],
    }


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, default=json_default, indent=2)


def to_csv(document: dict[str, Any]) -> str:
    """The groups (and a TOTAL row); a run's figures follow as a second block.

    A revert's document: its figures, then the rows changed since the run.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if document["mode"] in ("revert", "revert_dry_run"):
        writer.writerow(REVERT_FIELDS)
        writer.writerow([_cell(document[key]) for key in REVERT_FIELDS])
        if document["changed"]:
            buffer.write("\n")
            writer.writerow(CHANGED_FIELDS)
            for changed in document["changed"]:
                writer.writerow([_cell(changed[key]) for key in CHANGED_FIELDS])
        return buffer.getvalue()
    if "groups" in document:
        writer.writerow(GROUP_FIELDS)
        for group in document["groups"]:
            writer.writerow([_cell(group[key]) for key in GROUP_FIELDS])
        totals = document["totals"]
        writer.writerow(
            ["TOTAL", ""]
            + [totals[key] for key in TOTAL_FIELDS]
            + [document["expected_rollup_keys"], "", ""]
        )
    if "run_id" in document:
        if "groups" in document:
            buffer.write("\n")
        writer.writerow(RUN_FIELDS)
        writer.writerow([_cell(document[key]) for key in RUN_FIELDS])
    if "verify" in document:
        buffer.write("\n")
        verify = document["verify"]
        writer.writerow([f"verify_{key}" for key in VERIFY_FIELDS])
        writer.writerow([_cell(verify[key]) for key in VERIFY_FIELDS])
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json_default(value) if not isinstance(value, int | str | float) else value
