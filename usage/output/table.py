"""The backfill command's result as readable text, and the dry run's groups as a table: on a
terminal the first of ``SHAPES`` that fits (else a block per group), nothing split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.management.color import Style

from usage.output import outcome
from usage.output.lines import fit_items, wrap
from usage.render import number, render_table, timestamp

# Groups shown in a summary table; --format csv/json always carry all of them.
TABLE_GROUP_LIMIT = 200
# A shortened workspace id keeps at least this many characters (and more when needed to be
# unique in the table); with at most this many workspaces their full ids are listed below.
SHORT_WORKSPACE = 8
LISTED_WORKSPACES = 10


@dataclass(frozen=True)
class Column:
    """A column of the table; ``field``: the group's (and totals') number it shows, if any."""

    key: str
    header: str
    two_lines: str
    field: str = ""


COLUMNS = {
    c.key: c
    for c in (
        Column("workspace", "workspace", "workspace"),
        Column("date", "date (UTC)", "date\n(UTC)"),
        Column("rows", "rows", "rows", "rows"),
        Column("before", "input before", "input\nbefore", "input_before"),
        Column("after", "input after", "input\nafter", "input_after"),
        Column("removed", "tokens removed", "tokens\nremoved", "input_tokens_removed"),
        Column("clamped", "clamped", "clamped", "clamped_rows"),
        Column("keys", "rollup keys", "rollup\nkeys", "rollup_keys"),
        Column("first", "first created_at", "first\ncreated"),
        Column("last", "last created_at", "last\ncreated"),
    )
}
ALL_COLUMNS = tuple(COLUMNS)


@dataclass(frozen=True)
class Shape:
    """One way to lay out the groups: which columns, and how compactly."""

    columns: tuple[str, ...] = ALL_COLUMNS
    two_line_headers: bool = False
    short_workspace: bool = False
    times_of_day: bool = False


# Widest first; the first that fits the terminal is used, else one block per group.
SHAPES = (
    Shape(),
    Shape(two_line_headers=True),
    Shape(two_line_headers=True, short_workspace=True, times_of_day=True),
    Shape(columns=ALL_COLUMNS[:8], two_line_headers=True, short_workspace=True),
    Shape(
        columns=tuple(c for c in ALL_COLUMNS[:8] if c != "after"),
        two_line_headers=True,
        short_workspace=True,
    ),
)


def summary_table(
    document: dict[str, Any], limit: int = TABLE_GROUP_LIMIT, width: int | None = None
) -> str:
    """The dry-run groups (at most ``limit``) and their total, from a result document; with
    a ``width`` no line is longer and no value is split."""
    groups = document["groups"][:limit]
    group_count = document.get("group_count", len(document["groups"]))
    short = _short_workspaces([str(g["workspace_id"]) for g in groups])

    def values(shape: Shape) -> list[dict[str, str]]:
        return [*(_values(g, shape, short) for g in groups), _total_values(document, group_count)]

    lines: list[str] = []
    for shape in SHAPES if width is not None else SHAPES[:1]:
        # At its natural width: nothing wraps, nothing is cut.
        columns = [COLUMNS[key] for key in shape.columns]
        headers = [c.two_lines if shape.two_line_headers else c.header for c in columns]
        text = render_table(headers, [tuple(v[c.key] for c in columns) for v in values(shape)])
        if width is None or max(map(len, text.splitlines()), default=0) <= width:
            lines.append(text)
            lines.extend(_shape_notes(shape, short, width))
            break
    else:
        lines.extend(_blocks(values(Shape(short_workspace=True, times_of_day=True)), width))
        lines.extend(_shape_notes(None, short, width))
    if group_count > limit:
        lines.extend(
            wrap(
                f"(the first {limit} of {number(group_count)} workspace/day groups are shown; "
                "--format csv or json --output FILE gives them all)",
                width,
                hanging="",
            )
        )
    return "\n".join(lines)


def _short_workspaces(ids: list[str]) -> dict[str, str]:
    """Each id's shortest prefix (``SHORT_WORKSPACE`` characters at least) unique among ``ids``."""
    distinct = sorted(set(ids))
    length = SHORT_WORKSPACE
    while length < 36 and len({i[:length] for i in distinct}) < len(distinct):
        length += 1
    return {i: i[:length] for i in distinct}


def _numbers(figures: dict[str, Any]) -> dict[str, str]:
    return {c.key: number(figures[c.field]) for c in COLUMNS.values() if c.field}


def _values(group: dict[str, Any], shape: Shape, short: dict[str, str]) -> dict[str, str]:
    workspace = str(group["workspace_id"])

    def when(value: Any) -> str:
        return timestamp(value)[11:] if shape.times_of_day else timestamp(value)

    return {
        "workspace": short[workspace] if shape.short_workspace else workspace,
        "date": group["date_utc"].isoformat(),
        **_numbers(group),
        "first": when(group["first_created_at"]),
        "last": when(group["last_created_at"]),
    }


def _total_values(document: dict[str, Any], group_count: int) -> dict[str, str]:
    figures = {**document["totals"], "rollup_keys": document["expected_rollup_keys"]}
    date = f"{number(group_count)} groups"
    return {"workspace": "TOTAL", "date": date, **_numbers(figures), "first": "", "last": ""}


def _blocks(rows: list[dict[str, str]], width: int | None) -> list[str]:
    """One block per group: its workspace and day, then its figures, each kept whole."""
    lines: list[str] = []
    for values in rows:
        items = [
            f"{values['workspace']} {values['date']}",
            f"rows {values['rows']}",
            f"input {values['before']} -> {values['after']}",
            f"removed {values['removed']}",
            f"clamped {values['clamped']}",
            f"keys {values['keys']}",
        ]
        if values["first"]:
            items.append(f"created {values['first']}-{values['last']}")
        lines.extend(fit_items(items, width))
    return lines


def _shape_notes(shape: Shape | None, short: dict[str, str], width: int | None) -> list[str]:
    """What a narrower shape left out or shortened, and where to find it whole."""
    if shape is not None and not shape.short_workspace:
        return []
    length = len(next(iter(short.values()), "")) if short else SHORT_WORKSPACE
    changes = [f"workspaces by the first {length} characters of their id"]
    if shape is None or shape.times_of_day:
        changes.append("created_at as the time of day")
    left_out = [] if shape is None or shape.times_of_day else ["first/last created_at"]
    if shape is not None and "after" not in shape.columns:
        left_out.append("input after")
    if left_out:
        changes.append(f"{' and '.join(left_out)} left out")
    lines = wrap(
        f"(fitted to {width} columns: {'; '.join(changes)}; --format csv gives every column)",
        width,
        hanging="",
    )
    if 0 < len(short) <= LISTED_WORKSPACES:
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
        lines.extend(outcome.dry_run_lines(document, style, width, plan_out=plan_out))
    if "run_id" in document:
        lines.extend(
            outcome.execute_lines(
                document, style, width, plan_line=plan_line, signal_name=signal_name
            )
        )
    if "verify" in document:
        lines.extend(outcome.verify_lines(document["verify"], style, width))
    if "run_id" in document:
        lines.extend(outcome.next_step(*outcome.execute_next(document), width))
    return "\n".join(lines)
