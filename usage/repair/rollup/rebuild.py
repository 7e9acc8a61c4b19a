"""The rollup's entry point (the repair's and the revert's), on the run's path: ``OwnRebuild``,
or ``FunctionPath`` (its fallback too)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from usage.models import BackfillRun
from usage.repair.progress import Progress
from usage.repair.rollup.function import FunctionPath
from usage.repair.rollup.recompute import KeySource, OwnRebuild
from usage.repair.rollup.slices import (
    NeighbourOptions,
    RollupError,
    RollupResult,
    ShouldStop,
    SliceLimits,
)
from usage.repair.rollup.versions import PathChoice


def rebuild_keys(
    run_ids: Sequence[int],
    choice: PathChoice,
    limits: SliceLimits,
    neighbours: NeighbourOptions,
    should_stop: ShouldStop,
    progress: Progress,
    source: KeySource,
) -> RollupResult:
    """Every hourly key of the rows the runs changed (or of ``source``), each once, on
    ``choice``'s path (after a failed proof, the function's)."""
    started = time.monotonic()
    result = RollupResult(path=choice.path)
    function = FunctionPath(limits, neighbours, result, should_stop, progress)
    try:
        if not choice.own:
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
