"""The backfill command's result as the readable table: what an operator reads at 3 a.m.

The dry run's workspace/day groups are a table laid out by rich: at their natural width when
the output is a file or a pipe, and fitted to the terminal's width on a terminal (the
headers go on two lines first; only on a narrow terminal do cells fold onto more lines, and
none is ever cut short). A terminal shows at most
``TABLE_GROUP_LIMIT`` groups; JSON and CSV carry every one of them. The run's figures and the
verification follow as lines.
"""

from __future__ import annotations

import io
from typing import Any

from django.core.management.color import Style
from rich import box
from rich.console import Console
from rich.table import Table

from usage.models import BackfillRun
from usage.render import number, timestamp
from usage.repair.verify import describe as describe_mismatch

# Groups shown in a summary table; --format csv/json always carry all of them.
TABLE_GROUP_LIMIT = 200
# The table lists at most this many mismatched hourly keys (JSON carries up to verify's cap).
VERIFY_LISTED = 20

# (header, the header on two lines, right-aligned)
SUMMARY_COLUMNS = (
    ("workspace", "workspace", False),
    ("date (UTC)", "date\n(UTC)", False),
    ("rows", "rows", True),
    ("input before", "input\nbefore", True),
    ("input after", "input\nafter", True),
    ("tokens removed", "tokens\nremoved", True),
    ("clamped", "clamped", True),
    ("rollup keys", "rollup\nkeys", True),
    ("first created_at", "first\ncreated_at", False),
    ("last created_at", "last\ncreated_at", False),
)

# A rule under the header, and nothing else: the plain layout the table always had.
HEADER_RULE = box.Box(
    "    \n    \n -  \n    \n    \n    \n    \n    \n",
    ascii=True,
)


def summary_table(
    document: dict[str, Any], limit: int = TABLE_GROUP_LIMIT, width: int | None = None
) -> str:
    """The dry-run groups (at most ``limit``) and their total, from a result document.

    With a ``width`` the table fits it: at its natural width if that fits, else with the
    headers on two lines, and only then by folding cells onto more lines (never cut short).
    """
    groups = document["groups"]
    group_count = document.get("group_count", len(groups))
    rows = [
        (
            str(g["workspace_id"]),
            g["date_utc"].isoformat(),
            number(g["rows"]),
            number(g["input_before"]),
            number(g["input_after"]),
            number(g["input_tokens_removed"]),
            number(g["clamped_rows"]),
            number(g["rollup_keys"]),
            timestamp(g["first_created_at"]),
            timestamp(g["last_created_at"]),
        )
        for g in groups[:limit]
    ]
    t = document["totals"]
    rows.append(
        (
            "TOTAL",
            f"{number(group_count)} groups",
            number(t["rows"]),
            number(t["input_before"]),
            number(t["input_after"]),
            number(t["input_tokens_removed"]),
            number(t["clamped_rows"]),
            number(document["expected_rollup_keys"]),
            "",
            "",
        )
    )
    text = _layout(rows, compact=False, width=None)
    if width is not None and _widest(text) > width:
        text = _layout(rows, compact=True, width=width)
    if group_count > limit:
        text += (
            f"\n(the first {limit} of {number(group_count)} workspace/day groups are shown; "
            "--format csv or json --output FILE gives them all)"
        )
    return text


def _layout(rows: list[tuple[str, ...]], *, compact: bool, width: int | None) -> str:
    table = Table(
        box=HEADER_RULE,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="",
        highlight=False,
    )
    for header, two_lines, right in SUMMARY_COLUMNS:
        table.add_column(
            two_lines if compact else header,
            justify="right" if right else "left",
            vertical="bottom",
            overflow="fold",
            no_wrap=width is None,
        )
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width or 100_000,
        color_system=None,
        highlight=False,
        emoji=False,
        markup=False,
        legacy_windows=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def result_table(
    document: dict[str, Any],
    style: Style,
    *,
    plan_out: bool = False,
    plan_line: str | None = None,
    width: int | None = None,
) -> str:
    """The result document as the readable table; ``width``: the terminal's (None: any).

    ``plan_out``: the dry run also saved a plan. ``plan_line``: the plan check's outcome,
    shown under the run's figures.
    """
    lines: list[str] = []
    totals = document.get("totals")
    if totals is not None:
        if totals["rows"] == 0:
            lines.append(style.SUCCESS("No eligible Codex rows: nothing to do."))
        else:
            lines.append(summary_table(document, width=width))
            lines.append(
                f"\n{number(totals['rows'])} rows would change; "
                f"{number(totals['input_tokens_removed'])} input tokens removed "
                f"({number(totals['input_before'])} -> "
                f"{number(totals['input_after'])}); "
                f"{number(totals['clamped_rows'])} clamped to 0; "
                f"{number(document['expected_rollup_keys'])} hourly rollup keys "
                "to rebuild."
            )
    if document["mode"] == "dry_run" and totals and totals["rows"]:
        lines.append(
            style.SUCCESS(
                "Dry run complete: nothing was written. Review the summary, then re-run "
                "with --execute to apply it."
                if not plan_out
                else "Dry run complete: nothing was written to the database. Have the "
                "plan reviewed, then apply it with --execute --plan."
            )
        )
    if "run_id" in document:
        shown_run = run_lines(document, style)
        if plan_line is not None:
            shown_run.insert(1, plan_line)
        lines.extend(shown_run)
    if "verify" in document:
        lines.extend(verify_lines(document["verify"], style))
    return "\n".join(lines)


def run_lines(d: dict[str, Any], style: Style) -> list[str]:
    lines = [
        f"Run {d['run_id']}: rows planned {number(d['rows_planned'])}, "
        f"updated {number(d['rows_updated'])}, "
        f"remaining {number(d['rows_remaining'])}; "
        f"input tokens removed {number(d['input_tokens_removed'])}; "
        f"clamped {number(d['clamped_rows'])}; batches {d['batches']}"
    ]
    for stale in d["stale_runs"]:
        lines.append(style.WARNING(f"Run {stale} had no live owner; marked interrupted."))
    if d["rollup_state"] == BackfillRun.RollupState.SKIPPED:
        lines.append("  rollup not rebuilt (--no-rebuild-rollup): the platform's cron tick will")
    elif d["rollup_slices"] or d["recovered_runs"]:
        recovered = (
            f" (including runs {', '.join(map(str, d['recovered_runs']))})"
            if d["recovered_runs"]
            else ""
        )
        plans = (
            f"{d['rollup_hash_slices']} hashed, "
            f"{d['rollup_slices'] - d['rollup_hash_slices']} nested-loop"
        )
        waits = (
            f"; waited {d['rollup_cron_waits']} time(s) for the platform's cron tick"
            if d["rollup_cron_waits"]
            else ""
        )
        done = (
            "rebuilt"
            if d["rollup_state"] == BackfillRun.RollupState.DONE
            else "stopped (the next run of the command rebuilds the rest)"
        )
        lines.append(
            f"  rollup {done}{recovered}: {number(d['rollup_keys'])} hourly keys "
            f"in {d['rollup_slices']} slices ({plans}) in {d['rollup_seconds']:.1f}s, "
            f"{number(d['rollup_rows'])} hourly rows, "
            f"lock 4246 held at most {d['rollup_max_lock_seconds']:.3f}s{waits}"
        )
    ok = d["status"] == BackfillRun.Status.SUCCEEDED
    shown = style.SUCCESS if ok else style.ERROR
    lines.append(shown(f"Run {d['run_id']} {d['status']}."))
    return lines


def verify_lines(v: dict[str, Any], style: Style) -> list[str]:
    lines = [
        f"Verify run {v['run_id']}: {number(v['eligible_rows_left'])} eligible rows "
        f"left; {number(v['mismatched_keys'])} hourly keys differ from a recompute"
        + (
            f" (the first {min(len(v['mismatches']), VERIFY_LISTED)} are listed)."
            if v["mismatched_keys"] > VERIFY_LISTED
            else "."
        )
    ]
    for m in v["mismatches"][:VERIFY_LISTED]:
        lines.append(f"  {describe_mismatch(m)}")
    shown = style.SUCCESS if v["ok"] else style.ERROR
    lines.append(shown("Verification passed." if v["ok"] else "Verification FAILED."))
    return lines
