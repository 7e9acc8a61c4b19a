"""Human-readable rendering for the commands: numbers, times, plain text tables.

Tables are formatted by hand (two passes: widths, then lines) so that a summary of a
hundred thousand groups renders in well under a second; a terminal still shows only the
first ``TABLE_GROUP_LIMIT`` groups, since JSON and CSV carry every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

# Groups shown in a summary table; --format csv/json always carry all of them.
TABLE_GROUP_LIMIT = 200

SUMMARY_COLUMNS = (
    "workspace",
    "date (UTC)",
    "rows",
    "input before",
    "input after",
    "tokens removed",
    "clamped",
    "rollup keys",
    "first created_at",
    "last created_at",
)


def timestamp(value: datetime | None) -> str:
    """RFC 3339 in UTC to the second; four-digit years (``strftime`` gives year 1 as "1")."""
    if value is None:
        return "-"
    if value.utcoffset():
        value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}Z"
    )


def number(value: int) -> str:
    return f"{value:,}"


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain table: a header, a rule, the rows; numeric columns right-aligned."""
    widths = [len(name) for name in columns]
    numeric = [bool(rows)] * len(columns)
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
            if numeric[i] and not _looks_numeric(cell):
                numeric[i] = False

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def summary_table(document: dict[str, Any], limit: int = TABLE_GROUP_LIMIT) -> str:
    """The dry-run groups (at most ``limit``) and their total, from a result document."""
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
    table = render_table(SUMMARY_COLUMNS, rows)
    if group_count > limit:
        table += (
            f"\n(the first {limit} of {number(group_count)} workspace/day groups are shown; "
            "--format csv or json --output FILE gives them all)"
        )
    return table


def _looks_numeric(text: str) -> bool:
    return text == "" or text.replace(",", "").isdigit()
