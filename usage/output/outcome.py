"""What a command did, said once, in the same words and number format in every command.

After an execute or a revert the operator needs the outcome, not the plan again: what
changed, the run's id and status, and the next command to type. A dry run ends with the
command that comes next in the runbook. Every figure is formatted by ``render.number``, and
every line is wrapped to the terminal between words (``lines.wrap``), so a number or a
command is never split.
"""

from __future__ import annotations

from typing import Any

from django.core.management.color import Style

from usage.events import json_default
from usage.models import BackfillRun
from usage.output.lines import labelled, wrap
from usage.render import number

REPAIR = "python manage.py backfill_codex_usage_cache"
REVERT = "python manage.py revert_codex_usage_backfill"

STAMPS = {
    BackfillRun.Stamp.BELOW_WATERMARK: "just below the platform rollup's watermark",
    BackfillRun.Stamp.REPAIR_TIME: "the time the run started; the platform's rollup re-rolls them",
}


def count(value: int, word: str, plural: str | None = None) -> str:
    """``1 slice``, ``2 slices``, ``1,000 slices``."""
    return f"{number(value)} {word if value == 1 else plural or word + 's'}"


def moment(value: Any) -> str:
    """A time as the tool prints it everywhere: RFC 3339, UTC, ``Z``, its full precision."""
    return str(json_default(value)) if value is not None else "-"


def scope_arguments(document: dict[str, Any]) -> str:
    """``--cutoff T [--workspace-id W]`` for the document's scope."""
    arguments = f"--cutoff {moment(document['cutoff'])}"
    if document.get("workspace_id"):
        arguments += f" --workspace-id {document['workspace_id']}"
    return arguments


def next_step(prose: str, command: str | None, width: int | None) -> list[str]:
    """``Next: <prose>: <command>``, the command whole: on the same line when it fits, else
    on lines of its own, broken before an option with a shell continuation (``\\``), so
    that it can be copied as it is. Without a command: the prose, wrapped."""
    if command is None:
        return wrap(prose + ".", width, hanging="  ")
    line = f"{prose}: {command}"
    if width is None or len(line) <= width:
        return [line]
    lines = wrap(prose + ":", width, hanging="  ")
    pieces = command.split(" --")
    current = "  " + pieces[0]
    for piece in pieces[1:]:
        option = "--" + piece
        if len(current) + 1 + len(option) + 2 <= width:
            current += " " + option
        else:
            lines.append(current + " \\")
            current = "      " + option
    lines.append(current)
    return lines


def dry_run_lines(
    document: dict[str, Any], style: Style, width: int | None, *, plan_out: bool
) -> list[str]:
    """The end of a dry run that found rows: nothing written, and the runbook's next step."""
    if plan_out:
        # The command's next line names the plan and what to do with it.
        return [style.SUCCESS("Dry run complete: nothing was written to the database.")]
    return [
        style.SUCCESS("Dry run complete: nothing was written."),
        *next_step(
            "Next: save it as a plan for the reviewer",
            f"{REPAIR} {scope_arguments(document)} --plan-out plan.json",
            width,
        ),
    ]


def execute_lines(
    d: dict[str, Any],
    style: Style,
    width: int | None,
    *,
    plan_line: str | None = None,
    signal_name: str | None = None,
) -> list[str]:
    """The outcome of an execute: status, what changed, the rollup (``execute_next`` says what
    to do next, after the verification when there is one)."""
    status = d["status"]
    ok = status == BackfillRun.Status.SUCCEEDED
    heading = f"Run {d['run_id']} {status}"
    if status == BackfillRun.Status.INTERRUPTED and signal_name:
        heading += f" by {signal_name}"
    lines = [(style.SUCCESS if ok else style.ERROR)(line) for line in wrap(heading + ".", width)]
    for stale in d["stale_runs"]:
        lines.append(style.WARNING(f"Run {stale} had no live owner; marked interrupted."))
    rows = [
        (
            "rows changed",
            f"{number(d['rows_updated'])} of {number(d['rows_planned'])} planned; "
            f"{number(d['rows_remaining'])} still eligible",
        ),
        (
            "tokens removed",
            f"{number(d['input_tokens_removed'])} input tokens; "
            f"{number(d['clamped_rows'])} rows clamped to 0",
        ),
        ("rollup keys", _rollup(d)),
    ]
    if d.get("stamp_first"):
        rows.append(
            (
                "stamps",
                f"{moment(d['stamp_first'])} to {moment(d['stamp_last'])} "
                f"({STAMPS.get(d['stamp'], d['stamp'])})",
            )
        )
    if d.get("rollup_path"):
        function = f" ({d['rollup_function']})" if d.get("rollup_function") else ""
        reason = f": {d['rollup_path_reason']}" if d.get("rollup_path_reason") else ""
        rows.append(("rollup path", f"{d['rollup_path']}{function}{reason}"))
    if d.get("continues"):
        rows.append(("continues", f"run {d['continues']}"))
    if plan_line:
        rows.append(("plan", plan_line.removeprefix("Plan check: ")))
    plain_stop = status == BackfillRun.Status.INTERRUPTED and d.get("error", "").startswith(
        "stopped by a signal;"
    )
    if d.get("error") and not ok and not plain_stop:
        rows.append(("why", d["error"]))
    lines.extend(labelled(rows, width))
    return lines


def _rollup(d: dict[str, Any]) -> str:
    if d["rollup_state"] == BackfillRun.RollupState.SKIPPED:
        return "not rebuilt (--no-rebuild-rollup): the platform's cron tick rebuilds them"
    if not d["rollup_slices"] and not d["recovered_runs"]:
        if d["rollup_state"] == BackfillRun.RollupState.PENDING and d["rows_updated"]:
            # The run stopped before its rollup: its keys wait for the next run, not the tick.
            return "none rebuilt yet: pending (re-running the same command rebuilds them)"
        return "none to rebuild"
    done = "rebuilt" if d["rollup_state"] == BackfillRun.RollupState.DONE else "rebuilt so far"
    recovered = (
        f" (including runs {', '.join(map(str, d['recovered_runs']))})"
        if d["recovered_runs"]
        else ""
    )
    if d.get("rollup_path") == BackfillRun.RollupPath.OWN:
        plans = (
            "the first proven against the platform's function"
            if d["rollup_slices"] > 1
            else "proven against the platform's function"
        )
    else:
        plans = (
            f"{number(d['rollup_hash_slices'])} hashed, "
            f"{number(d['rollup_slices'] - d['rollup_hash_slices'])} nested-loop"
        )
    waits = (
        f"; waited {number(d['rollup_cron_waits'])} time(s), "
        f"{d.get('rollup_cron_wait_seconds', 0):.1f} s in all, for the platform's cron tick"
        if d["rollup_cron_waits"]
        else ""
    )
    text = (
        f"{number(d['rollup_keys'])} {done}{recovered} in {count(d['rollup_slices'], 'slice')} "
        f"({plans}) in {d['rollup_seconds']:.1f} s; lock 4246 held at most "
        f"{d['rollup_max_lock_seconds']:.3f} s{waits}"
    )
    return text + rows_against_keys(d["rollup_rows"], d["rollup_keys"])


def rows_against_keys(rows: int, keys: int) -> str:
    """Why the rollup function's count may differ from the keys rebuilt, when it does."""
    if rows == keys:
        return ""
    return (
        f"; the rollup function reported {number(rows)} hourly rows: it counts rows upserted "
        "plus rows deleted (a key left with no rows) for every key its windows found, other "
        "rows stamped in those windows and keys other writers queued included"
    )


def execute_next(d: dict[str, Any]) -> tuple[str, str | None]:
    """What to do after this run, and the command to type."""
    run_id = d["run_id"]
    verify = f"{REPAIR} --verify --run-id {run_id}"
    again = None
    if d["status"] == BackfillRun.Status.SUCCEEDED:
        checked = d.get("verify")
        if checked is None:
            return "Next: verify it", verify
        if checked["ok"]:
            return "Nothing else to do. To undo the run", f"{REVERT} {run_id}"
        return "Next: look at the keys above, then verify again", verify
    if d["status"] == BackfillRun.Status.FAILED:
        if "locked by other writers" in d.get("error", ""):
            return (
                "Next: re-run the same command later (writers held those rows); the new run "
                f"continues run {run_id}",
                again,
            )
        return (
            "Next: fix what the error says, then re-run the same command; the new run "
            f"continues run {run_id}",
            again,
        )
    return (
        f"Next: re-run the same command; the new run continues run {run_id} (the rows still "
        "eligible, and the rollup of what was done)",
        again,
    )


def verify_context(v: dict[str, Any]) -> list[str]:
    """What the verification covers, before its figures: a reverted run, a chain of runs."""
    lines = []
    if v["run_status"] == BackfillRun.Status.REVERTED:
        lines.append(
            f"Run {v['run_id']} was reverted: its rows were restored and are eligible again by "
            "design, so rows left are not a failure. Checked: the hourly keys of its rows "
            "equal a recompute (the revert rebuilt them)."
        )
    if v.get("continues"):
        lines.append(f"Run {v['run_id']} continues run {v['continues']}.")
    if v.get("continued_by"):
        lines.append(
            f"Run {v['run_id']} ({v['run_status']}) was continued by run {v['continued_by']}: "
            f"its rows left are judged by the last run of the chain, run {v['runs'][-1]} "
            f"({v['last_run_status']})."
        )
    if len(v["runs"]) > 1:
        lines.append(
            f"Runs {', '.join(map(str, v['runs']))} are one repair done in several goes: the "
            "hourly keys of all of them are checked."
        )
    return lines


def verify_next(v: dict[str, Any]) -> str:
    if v["ok"]:
        return ""
    last = v["runs"][-1]
    if v["eligible_rows_left"] and not v["eligible_rows_expected"]:
        if v["last_run_status"] in (BackfillRun.Status.INTERRUPTED, BackfillRun.Status.FAILED):
            return (
                f"Run {last} did not finish ({v['last_run_status']}): re-run its command to "
                f"continue it, then verify the run that finishes."
            )
        return (
            "Rows became eligible after the run (written before the cutoff since?): run the "
            "dry run to see them."
        )
    return ""


def revert_lines(d: dict[str, Any], style: Style, width: int | None) -> list[str]:
    """The outcome of a revert (or what its dry run would do), once."""
    run_id = d["run_id"]
    if not d["executed"]:
        rows = [
            ("rows to restore", number(d["rows_restorable"])),
            ("changed since", f"{number(d['rows_changed'])} (left alone)"),
            ("rollup keys", f"{number(d['rollup_keys'])} hourly keys to rebuild"),
        ]
        return [
            # The block names its run (at -v 0 it is all there is).
            *wrap(f"Revert of run {run_id} (dry run):", width),
            *labelled(rows, width, indent="  "),
            style.SUCCESS("Dry run complete: nothing was written."),
            *next_step("Next: revert it", f"{REVERT} {run_id} --execute", width),
        ]
    status = d["status"]
    heading = {
        "reverted": f"Run {run_id} reverted.",
        "stopped": f"Revert of run {run_id} stopped by {d.get('signal') or 'a signal'}.",
        "incomplete": f"Revert of run {run_id} incomplete: rows stayed locked by writers.",
        "failed": f"Revert of run {run_id} failed.",
    }[status]
    shown = style.SUCCESS if status == "reverted" else style.ERROR
    lines = [shown(line) for line in wrap(heading, width)]
    for stale in d["stale_runs"]:
        lines.append(style.WARNING(f"Run {stale} had no live owner; marked interrupted."))
    rollup = (
        f"{number(d['rollup_keys'])} hourly keys queued and rebuilt in "
        f"{count(d['rollup_calls'], 'call')}; lock 4246 held at most "
        f"{d['rollup_max_lock_seconds']:.3f} s"
        + rows_against_keys(d["rollup_rows"], d["rollup_keys"])
    )
    rows = [
        (
            "rows restored",
            f"{number(d['rows_restored'])} of {number(d['rows_restorable'])}; "
            f"{number(d['rows_remaining'])} still to restore",
        ),
        ("changed since", f"{number(d['rows_changed'])} (left alone)"),
        ("rollup keys", rollup),
    ]
    if d.get("error"):
        rows.append(("why", d["error"]))
    lines.extend(labelled(rows, width))
    if status == "reverted":
        scope = {"cutoff": d["cutoff"], "workspace_id": d.get("workspace_id")}
        lines.extend(
            next_step(
                "Next: its rows are candidates again; see them with the dry run",
                f"{REPAIR} {scope_arguments(scope)}",
                width,
            )
        )
    else:
        lines.extend(
            next_step(
                "Next: run the same revert again to finish", f"{REVERT} {run_id} --execute", width
            )
        )
    return lines
