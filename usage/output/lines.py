"""Lines of prose fitted to a terminal: wrapped at spaces only, so that a number, a time or
a command is never split across lines."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence


def wrap(text: str, width: int | None, *, indent: str = "", hanging: str = "  ") -> list[str]:
    """``text`` as lines of at most ``width`` characters (None: one line), split at spaces;
    ``indent`` starts the first line, ``hanging`` the lines that continue it."""
    if width is None:
        return [indent + text]
    lines = textwrap.wrap(
        _UNIT_AFTER_NUMBER.sub("\\1\0\\2", text),
        width=max(width, 20),
        initial_indent=indent,
        subsequent_indent=hanging,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent]
    return [line.replace("\0", " ") for line in lines]


# A unit stays on the line of its number ("0.3 s", not "0.3" then "s;"): the space between
# them is held by a placeholder while the text is wrapped.
_UNIT_AFTER_NUMBER = re.compile(r"(\d) (ms|s|min|h|%|MB|GB)(?=$|[\s;,.:)])")


def labelled(rows: dict[str, str], width: int | None) -> list[str]:
    """``  label  value`` lines, values aligned, a long one continued under itself (under its
    label when the labels leave too little room)."""
    column = max(map(len, rows), default=0) + 4
    lines: list[str] = []
    for label, value in rows.items():
        first = f"  {label}".ljust(column)
        if width is not None and width - len(first) < 30:
            lines.extend(wrap(f"{label}  {value}", width, indent="  ", hanging="    "))
            continue
        lines.extend(wrap(value, width, indent=first, hanging=" " * len(first)))
    return lines


def fit_items(
    items: Sequence[str], width: int | None, between: str = "  ", indent: str = "  ", end: str = ""
) -> list[str]:
    """Items (each kept whole) on lines of at most ``width``, ``between`` apart, the lines after
    the first started by ``indent``, each but the last ended by ``end``."""
    if width is None:
        return [between.join(items)]
    lines: list[str] = []
    current = items[0]
    for item in items[1:]:
        if len(current) + len(between) + len(item) + len(end) <= width:
            current += between + item
        else:
            lines.append(current + end)
            current = indent + item
    return [*lines, current]
