"""How a run reports what happens: one stream of events (``batching.Chunks.events``), each to
its direction's ``log_view`` and to the ``Progress`` callback a command passes for its bars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``progress(event, **details)``: the events the log views read, and ``rollup_slice``
# (``piece``, ``done``, ``total``); a callback ignores what it does not show.
Progress = Callable[..., None]


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""


def pick(source: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(source, name) for name in names}
