"""What a command did, in the same words for every command: a run's outcome, a verification,
a revert, and the next command to type; wrapped between words, never splitting a value."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.core.management.color import Style

from usage.events import json_default
from usage.models import BackfillRun
from usage.output.report import fit_items, labelled, wrap
from usage.render import number, render_table
from usage.repair.verify import describe as describe_mismatch

REPAIR = "python manage.py backfill_codex_usage_cache"
REVERT = "python manage.py revert_codex_usage_backfill"
# The verification lists at most this many mismatched hourly keys (JSON carries verify's cap).
VERIFY_LISTED = 20

STAMPS = {
    BackfillRun.Stamp.BELOW_WATERMARK: "just below the platform rollup's watermark",
    BackfillRun.Stamp.REPAIR_TIME: "the time the run started; the platform's rollup re-rolls them",
}
Status = BackfillRun.Status


def count(value: int, word: str) -> str:
    """``1 slice``, ``2 slices``, ``1,000 slices``."""
    return f"{number(value)} {word if value == 1 else word + 's'}"


def moment(value: Any) -> str:
    """A time as the tool prints it everywhere: RFC 3339, UTC, ``Z``, its full precision."""
    return str(json_default(value)) if value is not None else "-"


def listed(values: Iterable[Any]) -> str:
    return ", ".join(map(str, values))


def scope_arguments(d: dict[str, Any]) -> str:
    """``--cutoff T [--workspace-id W]`` for the document's scope."""
    workspace = f" --workspace-id {d['workspace_id']}" if d.get("workspace_id") else ""
    return f"--cutoff {moment(d['cutoff'])}{workspace}"


def next_step(prose: str, command: str | None, width: int | None) -> list[str]:
    """``Next: <prose>: <command>``; a command too long is broken before options, to be copied."""
    if command is None:
        return wrap(prose + ".", width)
    line = f"{prose}: {command}"
    if width is None or len(line) <= width:
        return [line]
    first, *options = command.split(" --")
    items = ["  " + first, *("--" + option for option in options)]
    broken = fit_items(items, width, between=" ", indent="      ", end=" \\")
    return wrap(prose + ":", width) + broken


def _heading(text: str, ok: bool, width: int | None, d: dict[str, Any], style: Style) -> list[str]:
    """The outcome's first line(s), then the runs found without a live owner."""
    shown = style.SUCCESS if ok else style.ERROR
    stale = [f"Run {run} had no live owner; marked interrupted." for run in d["stale_runs"]]
    return [shown(line) for line in wrap(text, width)] + [style.WARNING(s) for s in stale]


def execute_lines(
    d: dict[str, Any],
    style: Style,
    width: int | None,
    plan_line: str | None,
    signal_name: str | None,
) -> list[str]:
    """The outcome of an execute: status, what changed, the rollup."""
    status = d["status"]
    ok = status == Status.SUCCEEDED
    by = f" by {signal_name}" if status == Status.INTERRUPTED and signal_name else ""
    lines = _heading(f"Run {d['run_id']} {status}{by}.", ok, width, d, style)
    rows = {
        "rows changed": f"{number(d['rows_updated'])} of {number(d['rows_planned'])} planned; "
        f"{number(d['rows_remaining'])} still eligible",
        "tokens removed": f"{number(d['input_tokens_removed'])} input tokens; "
        f"{number(d['clamped_rows'])} rows clamped to 0",
        "rollup keys": _rollup(d),
    }
    if d.get("stamp_first"):
        stamp = STAMPS.get(d["stamp"], d["stamp"])
        rows["stamps"] = f"{moment(d['stamp_first'])} to {moment(d['stamp_last'])} ({stamp})"
    if d.get("rollup_path"):
        function = f" ({d['rollup_function']})" if d.get("rollup_function") else ""
        reason = f": {d['rollup_path_reason']}" if d.get("rollup_path_reason") else ""
        rows["rollup path"] = f"{d['rollup_path']}{function}{reason}"
    if d.get("continues"):
        rows["continues"] = f"run {d['continues']}"
    if plan_line:
        rows["plan"] = plan_line.removeprefix("Plan check: ")
    error = d.get("error", "")
    plain_stop = status == Status.INTERRUPTED and error.startswith("stopped by a signal;")
    if error and not ok and not plain_stop:
        rows["why"] = error
    return lines + labelled(rows, width)


def _rollup(d: dict[str, Any]) -> str:
    state, slices = d["rollup_state"], d["rollup_slices"]
    if state == BackfillRun.RollupState.SKIPPED:
        return "not rebuilt (--no-rebuild-rollup): the platform's cron tick rebuilds them"
    if not slices and not d["recovered_runs"]:
        if state == BackfillRun.RollupState.PENDING and d["rows_updated"]:
            # The run stopped before its rollup: its keys wait for the next run, not the tick.
            return "none rebuilt yet: pending (re-running the same command rebuilds them)"
        return "none to rebuild"
    done = "rebuilt" if state == BackfillRun.RollupState.DONE else "rebuilt so far"
    recovered = f" (including runs {listed(d['recovered_runs'])})" if d["recovered_runs"] else ""
    if d.get("rollup_path") == BackfillRun.RollupPath.OWN:
        first = "the first " if slices > 1 else ""
        plans = f"{first}proven against the platform's function"
    else:
        hashed = d["rollup_hash_slices"]
        plans = f"{number(hashed)} hashed, {number(slices - hashed)} nested-loop"
    waits = (
        f"; waited {number(d['rollup_cron_waits'])} time(s), "
        f"{d.get('rollup_cron_wait_seconds', 0):.1f} s in all, for the platform's cron tick"
        if d["rollup_cron_waits"]
        else ""
    )
    return (
        f"{number(d['rollup_keys'])} {done}{recovered} in {count(slices, 'slice')} "
        f"({plans}) in {d['rollup_seconds']:.1f} s; {_held(d, waits)}"
    )


def _held(d: dict[str, Any], waits: str = "") -> str:
    """Lock 4246's longest hold, and why the function's row count differs from the keys."""
    held = f"lock 4246 held at most {d['rollup_max_lock_seconds']:.3f} s{waits}"
    if d["rollup_rows"] == d["rollup_keys"]:
        return held
    return held + (
        f"; the rollup function reported {number(d['rollup_rows'])} hourly rows: it counts rows "
        "upserted plus rows deleted (a key left with no rows) for every key its windows found, "
        "other rows stamped in those windows and keys other writers queued included"
    )


def execute_next(d: dict[str, Any]) -> tuple[str, str | None]:
    """What to do after this run, and the command to type."""
    run_id = d["run_id"]
    verify = f"{REPAIR} --verify --run-id {run_id}"
    if d["status"] == Status.SUCCEEDED:
        checked = d.get("verify")
        if checked is None:
            return "Next: verify it", verify
        if checked["ok"]:
            return "Nothing else to do. To undo the run", f"{REVERT} {run_id}"
        return "Next: look at the keys above, then verify again", verify
    left = ""
    if d["status"] != Status.FAILED:
        first = "re-run the same command"
        left = " (the rows still eligible, and the rollup of what was done)"
    elif "locked by other writers" in d.get("error", ""):
        first = "re-run the same command later (writers held those rows)"
    else:
        first = "fix what the error says, then re-run the same command"
    return f"Next: {first}; the new run continues run {run_id}{left}", None


def verify_lines(v: dict[str, Any], style: Style, width: int | None) -> list[str]:
    """The verification: what was checked (a reverted run, a chain), the counts, the keys, what
    the differing keys are due to (a tick to come, an unknown rollup function), what to do."""
    run_id, runs, differing = v["run_id"], v["runs"], v["mismatched_keys"]
    lines: list[str] = []

    def say(text: str) -> None:
        lines.extend(wrap(text, width))

    if v["run_status"] == Status.REVERTED:
        say(
            f"Run {run_id} was reverted: its rows were restored and are eligible again by "
            "design, so rows left are not a failure. Checked: the hourly keys of its rows "
            "equal a recompute (the revert rebuilt them)."
        )
    if v.get("continues"):
        say(f"Run {run_id} continues run {v['continues']}.")
    if v.get("continued_by"):
        say(
            f"Run {run_id} ({v['run_status']}) was continued by run {v['continued_by']}: "
            f"its rows left are judged by the last run of the chain, run {runs[-1]} "
            f"({v['last_run_status']})."
        )
    if len(runs) > 1:
        say(
            f"Runs {listed(runs)} are one repair done in several goes: the hourly keys of all "
            "of them are checked."
        )
    covered = f" with its chain (runs {listed(runs)})" if len(runs) > 1 else ""
    left = f"{number(v['eligible_rows_left'])} eligible rows left"
    if v["eligible_rows_expected"] and v["eligible_rows_left"]:
        left += " (eligible again by design: restored by a revert)"
    listing = min(len(v["mismatches"]), VERIFY_LISTED)
    first = f" (the first {listing} are listed)." if differing > VERIFY_LISTED else "."
    say(
        f"Verify run {run_id}{covered}: {left}; "
        f"{number(differing)} hourly keys differ from a recompute{first}"
    )
    lines += [f"  {describe_mismatch(m)}" for m in v["mismatches"][:VERIFY_LISTED]]
    waiting = v.get("awaiting_tick_keys", 0)
    if waiting:
        say(
            f"{number(waiting)} of the {number(differing)} differing keys wait for the "
            "platform's cron tick (others wrote their rows since its watermark, or the key is "
            "queued): the tick rebuilds them from scratch, so they are not the run's; verify "
            "again after it to see them equal."
        )
    if differing > waiting and v.get("rollup_function") == "unknown":
        say(
            "The installed rollup function is not a definition this tool knows: it may "
            "compute the hourly sums otherwise than the documented ones verify compares with "
            "(see the pre-flight's rollup_function and rollup_path)."
        )
    shown = style.SUCCESS if v["ok"] else style.ERROR
    lines.append(shown("Verification passed." if v["ok"] else "Verification FAILED."))
    if not v["ok"] and v["eligible_rows_left"] and not v["eligible_rows_expected"]:
        if v["last_run_status"] in (Status.INTERRUPTED, Status.FAILED):
            say(
                f"Run {runs[-1]} did not finish ({v['last_run_status']}): re-run its command "
                "to continue it, then verify the run that finishes."
            )
        else:
            say(
                "Rows became eligible after the run (written before the cutoff since?): run "
                "the dry run to see them."
            )
    return lines


def revert_lines(d: dict[str, Any], style: Style, width: int | None) -> list[str]:
    """The outcome of a revert (or what its dry run would do), once."""
    run_id = d["run_id"]
    again = f"{REVERT} {run_id} --execute"
    changed = f"{number(d['rows_changed'])} (left alone)"
    if not d["executed"]:
        rows = {
            "rows to restore": number(d["rows_restorable"]),
            "changed since": changed,
            "rollup keys": f"{number(d['rollup_keys'])} hourly keys to rebuild",
        }
        return [
            # The block names its run (at -v 0 it is all there is).
            *wrap(f"Revert of run {run_id} (dry run):", width),
            *labelled(rows, width),
            style.SUCCESS("Dry run complete: nothing was written."),
            *next_step("Next: revert it", again, width),
        ]
    status = d["status"]
    heading = {
        "reverted": f"Run {run_id} reverted.",
        "stopped": f"Revert of run {run_id} stopped by {d.get('signal') or 'a signal'}.",
        "incomplete": f"Revert of run {run_id} incomplete: rows stayed locked by writers.",
        "failed": f"Revert of run {run_id} failed.",
    }[status]
    lines = _heading(heading, status == "reverted", width, d, style)
    rows = {
        "rows restored": f"{number(d['rows_restored'])} of {number(d['rows_restorable'])}; "
        f"{number(d['rows_remaining'])} still to restore",
        "changed since": changed,
        "rollup keys": f"{number(d['rollup_keys'])} hourly keys queued and rebuilt in "
        f"{count(d['rollup_calls'], 'call')}; {_held(d)}",
    }
    if d.get("error"):
        rows["why"] = d["error"]
    lines += labelled(rows, width)
    if status != "reverted":
        return lines + next_step("Next: run the same revert again to finish", again, width)
    prose = "Next: its rows are candidates again; see them with the dry run"
    return lines + next_step(prose, f"{REPAIR} {scope_arguments(d)}", width)


def changed_lines(d: dict[str, Any], style: Style, width: int | None) -> list[str]:
    """The rows someone changed since the run (a revert leaves them): a table, or on a narrow
    terminal one block per row, each value whole."""
    if not d["rows_changed"]:
        return []
    changed = d["changed"]
    lines = [
        style.WARNING(
            f"{number(d['rows_changed'])} rows were changed by someone else since the run; "
            "they are left as they are" + (f" (first {len(changed)}):" if changed else ".")
        )
    ]
    if not changed:
        return lines
    rows = [
        {
            "usage id": str(c["usage_id"]),
            "input (run left)": number(c["expected_input_tokens"]),
            "input (now)": "deleted" if c["deleted"] else number(c["current_input_tokens"]),
            "updated_at (run left)": _precise(c["expected_updated_at"]),
            "updated_at (now)": "deleted" if c["deleted"] else _precise(c["current_updated_at"]),
        }
        for c in changed
    ]
    table = render_table(list(rows[0]), [list(row.values()) for row in rows])
    if width is None or max(map(len, table.splitlines())) <= width:
        return [*lines, table]
    for usage, was, now, was_at, now_at in map(dict.values, rows):
        items = [usage, f"input {was} -> now {now}", f"updated_at {was_at} -> now {now_at}"]
        lines.extend(fit_items(items, width))
    return lines


def _precise(value: datetime | None) -> str:
    """Timestamps to the microsecond: a row changed a moment later must not look the same."""
    return value.isoformat() if value else "NULL"
