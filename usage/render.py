"""Human-readable rendering of dry-run summaries and run results for the commands."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

from rich import box
from rich.console import Console
from rich.table import Table

from usage.summary import DryRunSummary

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
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def number(value: int) -> str:
    return f"{value:,}"


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int = 1000) -> str:
    """Render a plain (colourless) table to text, right-aligning numeric columns."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(len(columns))]
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if numeric[i] else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue().rstrip("\n")


def summary_table(summary: DryRunSummary) -> str:
    rows = [
        (
            str(g.workspace_id),
            g.date_utc.isoformat(),
            number(g.rows),
            number(g.input_before),
            number(g.input_after),
            number(g.input_tokens_removed),
            number(g.clamped_rows),
            number(g.rollup_keys),
            timestamp(g.first_created_at),
            timestamp(g.last_created_at),
        )
        for g in summary.groups
    ]
    t = summary.totals
    rows.append(
        (
            "TOTAL",
            "",
            number(t.rows),
            number(t.input_before),
            number(t.input_after),
            number(t.input_tokens_removed),
            number(t.clamped_rows),
            number(t.rollup_keys),
            "",
            "",
        )
    )
    return render_table(SUMMARY_COLUMNS, rows)


def _looks_numeric(text: str) -> bool:
    return text == "" or text.replace(",", "").isdigit()
