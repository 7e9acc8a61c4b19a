"""The rollup's entry point, ``rebuild_keys`` (the repair's and the revert's), on the run's
path: ``OwnRebuild``, or ``FunctionPath`` (its fallback too).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from usage.models import BackfillRun
from usage.repair.progress import Progress, no_progress
from usage.repair.rollup.recompute import RUN_KEYS, KeySource, OwnRebuild
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    NeighbourOptions,
    RollupError,
    RollupResult,
    RollupSlice,
    ShouldStop,
    SliceLimits,
)
from usage.repair.rollup.stamps import FunctionPath
from usage.repair.rollup.versions import PathChoice, choose_path


def rebuild_keys(
    run_ids: Sequence[int],
    *,
    choice: PathChoice | None = None,
    max_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    lock_timeout: float = 5.0,
    statement_timeout: float = 600.0,
    neighbours: NeighbourOptions | None = None,
    should_stop: ShouldStop | None = None,
    progress: Progress = no_progress,
    source: KeySource = RUN_KEYS,
) -> RollupResult:
    """Rebuild every hourly key of the rows the given runs changed (or of ``source``, the
    revert's keys), each key once, on ``choice``'s path (``choose_path()`` when not given; a
    failed proof: the function's).

    Stops between slices on ``should_stop()`` (``result.stopped``). Reports ``rollup_slice``,
    ``paused`` (a wait for the cron tick) and ``rollup_path`` to ``progress``.
    """

    def on_slice(piece: RollupSlice, done: int, total: int) -> None:
        progress("rollup_slice", piece=piece, done=done, total=total)

    def on_wait(reason: str, seconds: float) -> None:
        progress("paused", reason=reason, seconds=seconds)

    started = time.monotonic()
    choice = choice or choose_path()
    limits = SliceLimits(max_lock_seconds, lock_timeout, statement_timeout)
    stop = should_stop or (lambda: False)
    result = RollupResult(path=choice.path)
    function = FunctionPath(limits, neighbours, label="rewritten keys drain", result=result)
    try:
        own = choice.own and choice.version is not None
        if not own:
            function.rebuild(run_ids, stop, on_slice, on_wait, queued=source.queued)
        elif (
            not OwnRebuild(choice, function).rebuild(run_ids, stop, on_slice, on_wait, source)
            and not result.stopped
        ):
            # The function rebuilds every key; the proof's keys count once.
            result.path = BackfillRun.RollupPath.FUNCTION
            result.keys_total = 0
            result.slices = [dataclasses.replace(piece, keys=0) for piece in result.slices]
            progress("rollup_path", path=result.path, reason=result.path_reason)
            function.rebuild(run_ids, stop, on_slice, on_wait, queued=source.queued)
    except RollupError as exc:
        exc.result = result
        raise
    finally:
        function.finish()
        result.seconds = time.monotonic() - started
    return result
