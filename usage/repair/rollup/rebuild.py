"""The rollup's entry points: the repair's ``rebuild_keys`` and the revert's ``RevertDrains``.
Both take the run's path (``versions.choose_path``): the own recompute (``OwnRebuild``) or the
platform's function (``FunctionPath``), two strategies with one interface; a failed proof puts
the rest of the work on the function (``result.path`` and ``result.path_reason`` say so).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from django.db import connection

from usage.db import drop_temp_table
from usage.models import BackfillRun
from usage.repair.progress import Progress, no_progress
from usage.repair.rollup.recompute import (
    CLEAR_REVERT_KEYS_SQL,
    CREATE_REVERT_KEYS,
    DROP_REVERT_KEYS_SQL,
    OwnRebuild,
)
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    MAX_SLICE_GROWTH,
    NeighbourOptions,
    OnSlice,
    OnWait,
    RollupError,
    RollupResult,
    RollupSlice,
    ShouldStop,
    SliceLimits,
)
from usage.repair.rollup.stamps import FunctionPath
from usage.repair.rollup.versions import PathChoice, choose_path

logger = logging.getLogger("usage.rollup")


class RollupPath(Protocol):
    """A path's strategy (``OwnRebuild`` or ``FunctionPath``): the repair's rebuild of some
    runs' keys (False: its proof failed), the revert's drains and the size of its batches."""

    def rebuild(
        self, run_ids: Sequence[int], should_stop: ShouldStop, on_slice: OnSlice, on_wait: OnWait
    ) -> bool: ...

    def drain(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: ShouldStop | None = None,
        on_wait: OnWait = None,
    ) -> RollupSlice: ...

    def batch_entries(self, entries: int, keys: int, tasks: int) -> float: ...


def _strategy(choice: PathChoice, function: FunctionPath) -> RollupPath:
    """The run's path; ``function`` is the function path, and the own path's fallback."""
    return OwnRebuild(choice, function) if choice.own and choice.version else function


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
) -> RollupResult:
    """Rebuild every hourly key of the rows the given runs changed, each key once.

    On ``choice``'s path (``choose_path()`` when not given); an own path whose proof fails
    goes on through the function. Stops between slices when ``should_stop()`` says so
    (``result.stopped``; the keys left are rebuilt by the next run). Reports each slice
    (``rollup_slice``), each wait for the platform's cron tick (``paused``) and a change of
    path (``rollup_path``) to ``progress``.
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
        path = _strategy(choice, function)
        if not path.rebuild(run_ids, stop, on_slice, on_wait) and not result.stopped:
            # The function rebuilds every key; the proof's keys (the function's already)
            # count once.
            result.path = BackfillRun.RollupPath.FUNCTION
            result.keys_total = 0
            result.slices = [dataclasses.replace(piece, keys=0) for piece in result.slices]
            progress("rollup_path", path=result.path, reason=result.path_reason)
            function.rebuild(run_ids, stop, on_slice, on_wait)
    except RollupError as exc:
        exc.result = result
        raise
    finally:
        function.finish()
        result.seconds = time.monotonic() - started
    return result


class RevertDrains:
    """Rebuilds the keys each revert batch restored, on the revert's path.

    A batch restores rows, queues their keys (as the platform's writers do) and adds them to
    ``REVERT_KEYS_TABLE``; ``drain`` then rebuilds them in one slice, and ``next_entries``
    sizes the next batch so its drain fits the lock budget.
    """

    def __init__(
        self, choice: PathChoice, limits: SliceLimits, neighbours: NeighbourOptions
    ) -> None:
        self.result = RollupResult(path=choice.path)
        self.limits = limits
        self.function = FunctionPath(limits, neighbours, label="revert drain", result=self.result)
        self.path = _strategy(choice, self.function)
        with connection.cursor() as cursor:
            cursor.execute(CREATE_REVERT_KEYS)
            cursor.execute(CLEAR_REVERT_KEYS_SQL)

    def drain(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: ShouldStop | None = None,
        on_wait: OnWait = None,
    ) -> RollupSlice:
        """Rebuild the keys the batches queued up to ``enqueued_until``."""
        return self._cleared(self.path.drain(enqueued_until, keys, tasks, should_stop, on_wait))

    def drain_queue(self, enqueued_until: datetime, keys: int, tasks: int) -> RollupSlice:
        """Rebuild everything queued up to ``enqueued_until`` through the function (what an
        earlier revert that stopped left queued: its keys are not known any more)."""
        return self._cleared(self.function.drain(enqueued_until, keys, tasks))

    def _cleared(self, piece: RollupSlice) -> RollupSlice:
        with connection.cursor() as cursor:
            cursor.execute(CLEAR_REVERT_KEYS_SQL)
        return piece

    def next_entries(self, entries: int, keys: int, tasks: int, current: int) -> int:
        """How many journal entries the next batch may take (before the operator's cap)."""
        wanted = self.path.batch_entries(entries, keys, tasks)
        return max(1, int(min(wanted, current * MAX_SLICE_GROWTH)))

    def close(self) -> None:
        self.function.finish()
        drop_temp_table(DROP_REVERT_KEYS_SQL, "revert keys table", logger)
