"""The one way a run reports what happens: a ``Progress`` callback.

Django's ``migrate`` passes one progress callback to its executor; the repair, the revert and
the rollup do the same: ``progress(event, **details)``.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """The one way a run reports what happens: ``progress(event, **details)``.

    The repair's events: ``started`` (``run``), ``planned`` (``rows``), ``stamping``
    (``policy``), ``batch`` (``batch``, ``result``), ``paused`` (``reason``, ``seconds``) and
    ``rollup_slice`` (``piece``, ``done``, ``total``). The revert's: ``started``
    (``result``) and ``batch`` (``batch``, ``result``). A callback ignores what it does not
    show.
    """

    def __call__(self, event: str, /, **details: Any) -> None: ...


def no_progress(event: str, /, **details: Any) -> None:
    """The progress callback of a run nobody watches."""
