"""The backfill command's result as readable text, and the dry run's groups as a table: on a
terminal the first of ``SHAPES`` that fits (else a block per group), nothing split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.management.color import Style

from usage.output import outcome
from usage.output.document import TOTAL_FIELDS
from usage.output.report import fit_items, wrap
from usage.render import number, render_table, timestamp, unique_prefix_length

# Groups shown in a summary table; --format csv/json always carry all of them.
TABLE_GROUP_LIMIT = 200
# A shortened workspace id keeps at least this many characters (and more when needed to be
# unique in the table); with at most this many workspaces their full ids are listed below.
SHORT_WORKSPACE = 8
LISTED_WORKSPACES = 10
# Each column's header on one line and on two, by the group's field it shows.
HEADERS = {
    "workspace_id": ("workspace", "workspace"),
    "date_utc": ("date (UTC)", "date\n(UTC)"),
    "rows": ("rows", "rows"),
    "input_before": ("input before", "input\nbefore"),
    "input_after": ("input after", "input\nafter"),
    "input_tokens_removed": ("tokens removed", "tokens\nremoved"),
    "clamped_rows": ("clamped", "clamped"),
    "rollup_keys": ("rollup keys", "rollup\nkeys"),
    "first_created_at": ("first created_at", "first\ncreated"),
    "last_created_at": ("last created_at", "last\ncreated"),
}
ALL_COLUMNS = tuple(HEADERS)
# The columns of figures (the totals row has them too), and of times (the totals row has none).
NUMBERS = (*TOTAL_FIELDS, "rollup_keys")
TIMES = ("first_created_at", "last_created_at")


@dataclass(frozen=True)
class Shape:
    """One way to lay out the groups: which columns, and how compactly."""

    columns: tuple[str, ...] = ALL_COLUMNS
    one_line_headers: bool = False
    short_workspace: bool = False
    times_of_day: bool = False


# Widest first; the first that fits the terminal is used, else one block per group (BLOCKS).
SHAPES = (
    Shape(one_line_headers=True),
    Shape(),
    Shape(short_workspace=True, times_of_day=True),
    Shape(columns=ALL_COLUMNS[:8], short_workspace=True),
    Shape(columns=tuple(c for c in ALL_COLUMNS[:8] if c != "input_after"), short_workspace=True),
)
BLOCKS = Shape(short_workspace=True, times_of_day=True)


def summary_table(document: dict[str, Any], width: int | None = None) -> str:
    """The dry-run groups (the first ``TABLE_GROUP_LIMIT``) and their total; with a ``width``
    no line is longer and no value is split."""
    groups = document["groups"][:TABLE_GROUP_LIMIT]
    group_count = document.get("group_count", len(document["groups"]))
    # Each workspace id's shortest prefix (SHORT_WORKSPACE characters at least) unique here.
    ids = sorted({str(g["workspace_id"]) for g in groups})
    length = unique_prefix_length(ids, SHORT_WORKSPACE)
    short = {i: i[:length] for i in ids}

    figures = {**document["totals"], "rollup_keys": document["expected_rollup_keys"]}
    total = {
        "workspace_id": "TOTAL",
        "date_utc": f"{number(group_count)} groups",
        **{key: number(figures[key]) for key in NUMBERS},
        **dict.fromkeys(TIMES, ""),
    }

    def values(shape: Shape) -> list[dict[str, str]]:
        return [*(_values(g, shape, short) for g in groups), total]

    for shape in SHAPES if width is not None else SHAPES[:1]:
        # At its natural width: nothing wraps, nothing is cut.
        headers = [
            one_line if shape.one_line_headers else two_lines
            for one_line, two_lines in (HEADERS[key] for key in shape.columns)
        ]
        text = render_table(headers, [tuple(v[c] for c in shape.columns) for v in values(shape)])
        if width is None or max(map(len, text.splitlines()), default=0) <= width:
            lines = [text]
            break
    else:  # one block per group: its workspace and day, then its figures, each kept whole
        shape, lines = BLOCKS, []
        for v in values(BLOCKS):
            items = [
                f"{v['workspace_id']} {v['date_utc']}",
                f"rows {v['rows']}",
                f"input {v['input_before']} -> {v['input_after']}",
                f"removed {v['input_tokens_removed']}",
                f"clamped {v['clamped_rows']}",
                f"keys {v['rollup_keys']}",
            ]
            if v["first_created_at"]:
                items.append(f"created {v['first_created_at']}-{v['last_created_at']}")
            lines += fit_items(items, width)
    lines += _shape_notes(shape, short, length, width)
    if group_count > TABLE_GROUP_LIMIT:
        lines += wrap(
            f"(the first {TABLE_GROUP_LIMIT} of {number(group_count)} workspace/day "
            "groups are shown; --format csv or json --output FILE gives them all)",
            width,
            hanging="",
        )
    return "\n".join(lines)


def _values(group: dict[str, Any], shape: Shape, short: dict[str, str]) -> dict[str, str]:
    workspace = str(group["workspace_id"])
    time_from = 11 if shape.times_of_day else 0  # the time of day: after "YYYY-MM-DDT"
    return {
        "workspace_id": short[workspace] if shape.short_workspace else workspace,
        "date_utc": group["date_utc"].isoformat(),
        **{key: number(group[key]) for key in NUMBERS},
        "first_created_at": timestamp(group["first_created_at"])[time_from:],
        "last_created_at": timestamp(group["last_created_at"])[time_from:],
    }


def _shape_notes(shape: Shape, short: dict[str, str], length: int, width: int | None) -> list[str]:
    """What a narrower shape left out or shortened (ids to ``length``), and where it is whole."""
    if not shape.short_workspace:
        return []
    changes = [f"workspaces by the first {length} characters of their id"]
    if shape.times_of_day:
        changes.append("created_at as the time of day")
    left_out = [] if shape.times_of_day else ["first/last created_at"]
    if "input_after" not in shape.columns:
        left_out.append("input after")
    if left_out:
        changes.append(f"{' and '.join(left_out)} left out")
    lines = wrap(
        f"(fitted to {width} columns: {'; '.join(changes)}; --format csv gives every column)",
        width,
        hanging="",
    )
    if len(short) <= LISTED_WORKSPACES:
        for full, prefix in short.items():
            lines.extend(wrap(f"{prefix}  {full}", width, indent="  ", hanging="    "))
    return lines


def result_table(
    document: dict[str, Any],
    style: Style,
    *,
    groups: bool = True,
    plan_out: bool = False,
    plan_line: str | None = None,
    signal_name: str | None = None,
    width: int | None = None,
) -> str:
    """The result document as readable text; ``width``: the terminal's (None: any);
    ``groups``: with the workspace/day table; ``plan_out``: the dry run saved a plan."""
    lines: list[str] = []
    totals = document.get("totals")
    dry_run = document["mode"] == "dry_run"
    if totals is not None and (dry_run or groups):
        if totals["rows"] == 0:
            lines.append(style.SUCCESS("No eligible Codex rows: nothing to do."))
        else:
            if groups:
                lines += [summary_table(document, width=width), ""]
            what = "rows would change" if dry_run else "rows were candidates before the run"
            removed = "input tokens removed" if dry_run else "input tokens to remove then"
            n = {key: number(value) for key, value in totals.items()}
            sentence = (
                f"{n['rows']} {what}; {n['input_tokens_removed']} {removed} "
                f"({n['input_before']} -> {n['input_after']}); {n['clamped_rows']} clamped to 0; "
                f"{number(document['expected_rollup_keys'])} hourly rollup keys to rebuild."
            )
            lines.extend(wrap(sentence, width, hanging=""))
    if dry_run and totals and totals["rows"]:
        # With a plan saved, the command's next line names it and what to do with it.
        written = " to the database" if plan_out else ""
        lines.append(style.SUCCESS(f"Dry run complete: nothing was written{written}."))
        if not plan_out:
            command = f"{outcome.REPAIR} {outcome.scope_arguments(document)} --plan-out plan.json"
            lines += outcome.next_step("Next: save it as a plan for the reviewer", command, width)
    if "run_id" in document:
        lines += outcome.execute_lines(document, style, width, plan_line, signal_name)
    if "verify" in document:
        lines.extend(outcome.verify_lines(document["verify"], style, width))
    if "run_id" in document:
        lines.extend(outcome.next_step(*outcome.execute_next(document), width))
    return "\n".join(lines)
