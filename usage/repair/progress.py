"""How a run reports what happens: one stream of events, each emitted once.

Its subscribers are the run's log (``usage.events``) and the ``Progress`` callback a command
passes to draw its bars, as Django's ``migrate`` passes one to its executor.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol


class Progress(Protocol):
    """``progress(event, **details)``; a callback ignores what it does not show.

    The repair's events: ``started`` (``run``), ``stamping`` (``policy``), ``rollup_path``
    (``path``, ``function``, ``fingerprint``, ``reason``), ``planned`` (``rows``), ``batch``
    (``batch``, ``result``), ``paused`` (``reason``, ``seconds``), ``stamped`` (``first``,
    ``last``) and ``rollup_slice`` (``piece``, ``done``, ``total``). The revert's:
    ``started`` (``result``), ``batch`` and ``rollup_slice``.
    """

    def __call__(self, event: str, /, **details: Any) -> None: ...


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""


class Events:
    """A run's event stream: each event goes once to each subscriber, in order, and to the
    progress callback when it is one of ``shown`` (the others are the log's alone)."""

    def __init__(self, progress: Progress, shown: Collection[str], *subscribers: Progress) -> None:
        self.progress, self.shown, self.subscribers = progress, shown, subscribers

    def __call__(self, event: str, /, **details: Any) -> None:
        for subscriber in self.subscribers:
            subscriber(event, **details)
        if event in self.shown:
            self.progress(event, **details)
