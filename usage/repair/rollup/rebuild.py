"""The rollup's entry point (the repair's and the revert's), on the run's path: ``OwnRebuild``,
or ``FunctionPath`` (its fallback too)."""

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
    """Every hourly key of the rows the runs changed (or of ``source``), each once, on
    ``choice``'s path (after a failed proof, the function's)."""
    started = time.monotonic()
    choice = choice or choose_path()
    limits = SliceLimits(max_lock_seconds, lock_timeout, statement_timeout)
    result = RollupResult(path=choice.path)
    neighbours = neighbours or NeighbourOptions()
    function = FunctionPath(limits, neighbours, result, should_stop or (lambda: False), progress)
    try:
        if not (choice.own and choice.version is not None):
            function.rebuild(run_ids, queued=source.queued)
        elif not OwnRebuild(choice, function, run_ids, source).rebuild() and not result.stopped:
            # The function rebuilds every key; the proof's keys count once.
            result.path = BackfillRun.RollupPath.FUNCTION
            result.keys_total = 0
            result.slices = [dataclasses.replace(piece, keys=0) for piece in result.slices]
            progress("rollup_path", path=result.path, reason=result.path_reason)
            function.rebuild(run_ids, queued=source.queued)
    except RollupError as exc:
        exc.result = result
        raise
    finally:
        function.finish()
        result.seconds = time.monotonic() - started
    return result
