"""The result document of the backfill and revert commands: one dict, built once, as JSON
or CSV. Its JSON layout is part of the tool's interface (the README documents it)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

from usage.events import json_default
from usage.render import names
from usage.repair.backfill import ExecuteResult
from usage.repair.revert import RevertResult
from usage.repair.rollup import RollupResult
from usage.repair.summary import DryRunSummary
from usage.repair.verify import RunVerification

FORMATS = ("table", "json", "csv")


GROUP_FIELDS = names(
    "workspace_id date_utc rows input_before input_after input_tokens_removed clamped_rows "
    "rollup_keys first_created_at last_created_at"
)
TOTAL_FIELDS = names("rows input_before input_after input_tokens_removed clamped_rows")
ROLLUP_FIELDS = tuple(RollupResult().figures())  # a rebuild's figures, as the run record has them
VERIFY_FIELDS = names(
    "run_id run_status ok eligible_rows_left eligible_rows_expected mismatched_keys "
    "awaiting_tick_keys continues continued_by"
)
REVERT_FIELDS = names(
    "run_id run_status executed status entries rows_restorable rows_restored rows_changed "
    "rows_remaining rollup_keys batches rollup_calls rollup_rows rollup_max_lock_seconds "
    "seconds error"
)
CHANGED_FIELDS = names(
    "journal_id usage_id expected_input_tokens expected_updated_at current_input_tokens "
    "current_updated_at deleted"
)
# The verification in the JSON document, and the result's names where they differ.
_VERIFY_KEYS = names(
    "run_id run_status runs continues continued_by last_run_status ok eligible_rows_left "
    "eligible_rows_expected mismatched_keys awaiting_tick_keys rollup_function"
)
_VERIFY_ATTRIBUTES = {"last_run_status": "last_status"}
# The result's (and the run record's) figures copied under their own names.
_RUN_COUNTS = names(
    "rows_planned rows_updated rows_remaining input_tokens_removed clamped_rows batches"
)
_RUN_PATH = names("stamp_first stamp_last rollup_path rollup_function rollup_path_reason")
_REVERT_COUNTS = names("entries rows_restorable rows_restored rows_changed rows_remaining")
RUN_FIELDS = ("run_id", "status", *_RUN_COUNTS, *ROLLUP_FIELDS, "stamp", *_RUN_PATH, "continues")


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
        totals = asdict(summary.totals)
        document |= {
            "cutoff": summary.cutoff,
            "workspace_id": summary.workspace_id,
            "database_now": summary.database_now,
            "totals": {key: totals[key] for key in TOTAL_FIELDS},
            "expected_rollup_keys": summary.totals.rollup_keys,
            "group_count": summary.group_count,
            # vars(), not asdict(): fast enough for 100,000s of groups; ids_digest is for saved
            # plans (usage.plan), not for readers of the summary.
            "groups": [
                {key: value for key, value in vars(group).items() if key != "ids_digest"}
                for group in summary.groups
            ],
        }
    if execute is not None:
        run = execute.run
        document |= {
            "run_id": run.pk,
            "status": run.status,
            **{name: getattr(execute, name) for name in _RUN_COUNTS},
            **_rollup(execute.rollup),
            "rollup_state": run.rollup_state,
            "stamp": run.stamp,
            "stamp_reason": execute.stamp.reason if execute.stamp else "",
            **{name: getattr(run, name) for name in _RUN_PATH},
            "continues": run.continues_id,
            "recovered_runs": execute.recovered_runs,
            "stale_runs": execute.stale_runs,
            "error": run.error,
        }
    if plan is not None:
        document["plan"] = plan
    if verify is not None:
        document["verify"] = {
            **{name: getattr(verify, _VERIFY_ATTRIBUTES.get(name, name)) for name in _VERIFY_KEYS},
            "columns": list(verify.columns),
            "mismatches": [asdict(m) for m in verify.mismatches],
        }
    return document


def _rollup(rollup: RollupResult | None) -> dict[str, Any]:
    """A rebuild's figures, as every document names them (zeros without one)."""
    if rollup is None:
        return dict.fromkeys(ROLLUP_FIELDS, 0)
    digits = {"rollup_max_lock_seconds": 6, "rollup_seconds": 3, "rollup_cron_wait_seconds": 3}
    return {
        name: round(value, digits[name]) if name in digits else value
        for name, value in rollup.figures().items()
    }


def build_revert(
    database: str, result: RevertResult, *, signal: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """A revert's result or its dry run's; ``status``: the revert's own (docs/reference.md)."""
    run = result.run
    rollup = _rollup(result.rollup)
    if not result.executed:
        status = "would_revert"
    elif error is not None:
        status = "failed"
    elif result.stopped:
        status = "stopped"
    else:
        status = "incomplete" if result.rows_remaining else "reverted"
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
        **{name: getattr(result, name) for name in _REVERT_COUNTS},
        # Executed: the keys the revert queued and rebuilt; a dry run: the keys it would.
        "rollup_keys": rollup["rollup_keys"] if result.executed else result.rollup_keys,
        "batches": result.batches,
        "rollup_calls": rollup["rollup_slices"],
        "rollup_rows": rollup["rollup_rows"],
        "rollup_max_lock_seconds": rollup["rollup_max_lock_seconds"],
        "seconds": round(result.seconds, 3),
        "stale_runs": result.stale_runs,
        "error": error or "",
        "changed": [asdict(c) for c in result.changed],
    }


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, default=json_default, indent=2)


def to_csv(document: dict[str, Any]) -> str:
    """Blocks of rows: the groups and a TOTAL, a run, its verify; a revert, the rows changed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def block(
        fields: tuple[str, ...], rows: list[dict[str, Any]], prefix: str = "", gap: bool = False
    ) -> None:
        if gap or buffer.tell():
            buffer.write("\n")
        writer.writerow([prefix + key for key in fields])
        writer.writerows([plain(row[key]) for key in fields] for row in rows)

    if document["mode"] in ("revert", "revert_dry_run"):
        block(REVERT_FIELDS, [document])
        if document["changed"]:
            block(CHANGED_FIELDS, document["changed"])
        return buffer.getvalue()
    if "groups" in document:
        block(GROUP_FIELDS, document["groups"])
        figures = [document["totals"][key] for key in TOTAL_FIELDS]
        writer.writerow(["TOTAL", "", *figures, document["expected_rollup_keys"], "", ""])
    if "run_id" in document:
        block(RUN_FIELDS, [document])
    if "verify" in document:
        block(VERIFY_FIELDS, [document["verify"]], prefix="verify_", gap=True)
    return buffer.getvalue()


def plain(value: Any) -> Any:
    """A value as a CSV cell or a plan's group holds it: a time, a date or an id as text."""
    if value is None:
        return ""
    return json_default(value) if not isinstance(value, int | str | float) else value
