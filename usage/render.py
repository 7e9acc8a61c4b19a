"""Human-readable values for the commands and the admin: numbers, times, durations, a plain
table, and a list's ids as their shortest prefix unique on the page."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.utils.html import format_html
from django.utils.safestring import SafeString

DASH = "-"
# A list's ids are a prefix at least MINIMUM long (as git abbreviates commits), DEFAULT long
# until the page has computed it.
SHORT_ID_MINIMUM = 4
SHORT_ID_DEFAULT = 8


def names(text: str) -> tuple[str, ...]:
    """Field or option names written as one string of words, in order."""
    return tuple(text.split())


def timestamp(value: datetime | None, *, microseconds: bool = False) -> str:
    """RFC 3339 in UTC, four-digit years (isoformat pads them, unlike strftime)."""
    if value is None:
        return DASH
    if value.utcoffset():
        value = value.astimezone(UTC)
    timespec = "microseconds" if microseconds else "seconds"
    return value.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def clock(value: datetime | None, *, micro: bool = False) -> str:
    """``2026-12-03 08:11:02 UTC`` (four-digit years), with microseconds if ``micro``."""
    return timestamp(value, microseconds=micro).replace("T", " ").replace("Z", " UTC")


def clock_cell(value: datetime | None, *, micro: bool = False) -> str:
    """A time for a list column: it may break between the date and the time, nowhere else."""
    if value is None:
        return DASH
    day, time = clock(value, micro=micro).split(" ", 1)
    return format_html('<span class="nowrap">{}</span> <span class="nowrap">{}</span>', day, time)


# An ``updated_at`` stamp: stamps differ by microseconds, so they are shown to one.
stamp = partial(clock, micro=True)


def short_hash(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 12] + "…"


def number(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def seconds(value: float | None) -> str:
    """A duration: ``0.018 s``, ``12.4 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if value is None:
        return DASH
    if value < 10:
        return f"{value:.3f} s"
    if value < 60:
        return f"{value:.1f} s"
    whole = round(value)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600:,} h {whole % 3600 // 60:02d} min"


def elapsed(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return DASH
    return seconds(max((end - start).total_seconds(), 0.0))


def unique_prefix_length(values: Iterable[Any], minimum: int = SHORT_ID_MINIMUM) -> int:
    """The shortest length, at least ``minimum``, whose prefixes tell the values apart."""
    texts = {str(value) for value in values if value is not None}
    longest = max((len(each) for each in texts), default=minimum)
    for length in range(minimum, longest):
        if len({each[:length] for each in texts}) == len(texts):
            return length
    return longest


def short_id(value: Any, length: int = SHORT_ID_DEFAULT) -> SafeString | str:
    """An id short enough for a list column; the full value is in the tooltip."""
    if value is None:
        return DASH
    full = str(value)
    if length >= len(full):
        return full
    return format_html('<span class="short-id" title="{}">{}…</span>', full, full[:length])


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
