"""Human-readable values for the commands and the admin: numbers, times, a plain table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime


def timestamp(value: datetime | None, *, microseconds: bool = False) -> str:
    """RFC 3339 in UTC, four-digit years (unlike strftime)."""
    if value is None:
        return "-"
    if value.utcoffset():
        value = value.astimezone(UTC)
    fraction = f".{value.microsecond:06d}" if microseconds else ""
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}{fraction}Z"
    )


def short_hash(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 12] + "…"


def number(value: int) -> str:
    return f"{value:,}"


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A header (a name may take lines, bottom-aligned), a rule, the rows; numbers right."""
    heads = [name.split("\n") for name in columns]
    height = max(map(len, heads), default=1)
    heads = [[""] * (height - len(head)) + head for head in heads]
    widths = [max(map(len, head)) for head in heads]
    numeric = [bool(rows)] * len(columns)
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
            numeric[i] = numeric[i] and (cell == "" or cell.replace(",", "").isdigit())

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    header = [line([head[n] for head in heads]) for n in range(height)]
    rule = "  ".join("-" * width for width in widths)
    return "\n".join([*header, rule, *(line(row) for row in rows)])
