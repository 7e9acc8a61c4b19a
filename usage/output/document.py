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
from usage.repair.summary import DryRunSummary, SummaryGroup
from usage.repair.verify import VerifyResult

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
    "stamp",
)


def build(
    mode: str,
    database: str,
    *,
    summary: DryRunSummary | None = None,
    execute: ExecuteResult | None = None,
    plan: dict[str, Any] | None = None,
    verify: VerifyResult | None = None,
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
            "rollup_state": run.rollup_state,
            "stamp": run.stamp,
            "stamp_reason": result.stamp.reason if result.stamp else "",
            "recovered_runs": result.recovered_runs,
            "stale_runs": result.stale_runs,
            "error": run.error,
        }
    )


def _add_verify(document: dict[str, Any], result: VerifyResult) -> None:
    document["verify"] = {
        "run_id": result.run_id,
        "ok": result.ok,
        "eligible_rows_left": result.eligible_rows_left,
        "mismatched_keys": result.mismatched_keys,
        "columns": list(result.columns),
        "mismatches": [asdict(m) for m in result.mismatches],
    }


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, default=json_default, indent=2)


def to_csv(document: dict[str, Any]) -> str:
    """The groups (and a TOTAL row); a run's figures follow as a second block."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
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
        writer.writerow([document[key] for key in RUN_FIELDS])
    if "verify" in document:
        buffer.write("\n")
        verify = document["verify"]
        writer.writerow(["verify_run_id", "ok", "eligible_rows_left", "mismatched_keys"])
        writer.writerow(
            [
                verify["run_id"],
                verify["ok"],
                verify["eligible_rows_left"],
                verify["mismatched_keys"],
            ]
        )
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    return json_default(value) if not isinstance(value, int | str | float) else value
