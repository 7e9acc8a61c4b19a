"""The two callers of the rollup: the repair's rebuild of its runs' keys, the revert's drains.

Both take the run's path (``versions.choose_path``): the own recompute, proven on the first
keys before it is relied on, or the platform's function. A failed proof puts the rest of the
work on the function; ``result.path`` and ``result.path_reason`` say so.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection

from usage.db import drop_temp_table
from usage.models import BackfillRun
from usage.repair.progress import Progress, no_progress
from usage.repair.rollup.function import (
    Plan,
    QueueDrainer,
    call_function,
    log_slice,
    rebuild_by_function,
    set_plan,
)
from usage.repair.rollup.recompute import (
    CLEAR_REVERT_KEYS_SQL,
    CREATE_REVERT_KEYS_SQL,
    DRAIN_SQL,
    DROP_REVERT_KEYS_SQL,
    MAX_SPANS,
    REVERT_HOURS_SQL,
    REVERT_KEYS,
    OwnRebuild,
    Proof,
    Recompute,
    own_settings,
    prove,
    span_params,
    spans_of,
)
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    MAX_SLICE_GROWTH,
    Bound,
    NeighbourOptions,
    RollupError,
    RollupResult,
    RollupSlice,
    SliceCancelled,
    SliceLimits,
    run_locked,
)
from usage.repair.rollup.versions import PathChoice, choose_path

logger = logging.getLogger("usage.rollup")


def rebuild_keys(
    run_ids: Sequence[int],
    *,
    choice: PathChoice | None = None,
    max_lock_seconds: float = DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    lock_timeout: float = 5.0,
    statement_timeout: float = 600.0,
    neighbours: NeighbourOptions | None = None,
    should_stop: Callable[[], bool] | None = None,
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
    neighbours = neighbours or NeighbourOptions()
    limits = SliceLimits(max_lock_seconds, lock_timeout, statement_timeout)
    stop = should_stop or (lambda: False)
    result = RollupResult(path=choice.path)
    try:
        if choice.own:
            own = OwnRebuild(choice, limits, neighbours, result)
            if not own.run(run_ids, stop, on_slice, on_wait) and not result.stopped:
                # The function rebuilds every key; the proof's keys (the function's already)
                # count once.
                result.path = BackfillRun.RollupPath.FUNCTION
                result.keys_total = 0
                result.slices = [dataclasses.replace(piece, keys=0) for piece in result.slices]
                progress("rollup_path", path=result.path, reason=result.path_reason)
        if result.path == BackfillRun.RollupPath.FUNCTION and not result.stopped:
            rebuild_by_function(run_ids, limits, neighbours, result, stop, on_slice, on_wait)
    except RollupError as exc:
        exc.result = result
        raise
    finally:
        result.seconds = time.monotonic() - started
    return result


class RevertDrains:
    """Rebuilds the keys each revert batch restored, on the revert's path.

    A batch restores rows, queues their keys (as the platform's writers do) and adds them to
    ``REVERT_KEYS_TABLE``; ``drain`` then rebuilds them in one slice. On the function path that
    is a call over a window just after the batch's enqueue time (``QueueDrainer``); on the own
    path the first drain is the proof (both ways, compared), and later ones recompute the
    keys aggregate-first and remove the queue rows they saw. ``next_entries`` sizes the next
    batch so its drain fits the lock budget.
    """

    def __init__(
        self, choice: PathChoice, limits: SliceLimits, neighbours: NeighbourOptions
    ) -> None:
        self.result = RollupResult(path=choice.path)
        self.limits = limits
        self.function = QueueDrainer(limits, neighbours, label="revert drain", result=self.result)
        self.recompute = Recompute(choice.version) if choice.own and choice.version else None
        self.proven = False
        self.last_held = 0.0
        with connection.cursor() as cursor:
            cursor.execute(CREATE_REVERT_KEYS_SQL)
            cursor.execute(CLEAR_REVERT_KEYS_SQL)

    def drain(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: Callable[[], bool] | None = None,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> RollupSlice:
        """Rebuild the keys the batches queued up to ``enqueued_until``."""
        if self.recompute is None:
            piece = self.function.drain(enqueued_until, keys, tasks, should_stop, on_wait)
        elif not self.proven:
            piece = self._prove(enqueued_until, keys, tasks, should_stop, on_wait)
        else:
            piece = self._own_drain(enqueued_until, keys, tasks, should_stop, on_wait)
        self.last_held = piece.lock_held_seconds
        with connection.cursor() as cursor:
            cursor.execute(CLEAR_REVERT_KEYS_SQL)
        return piece

    def drain_queue(self, enqueued_until: datetime, keys: int, tasks: int) -> RollupSlice:
        """Rebuild everything queued up to ``enqueued_until`` through the function (what an
        earlier revert that stopped left queued: its keys are not known any more)."""
        piece = self.function.drain(enqueued_until, keys, tasks)
        with connection.cursor() as cursor:
            cursor.execute(CLEAR_REVERT_KEYS_SQL)
        return piece

    def next_entries(self, entries: int, keys: int, tasks: int, current: int) -> int:
        """How many journal entries the next batch may take (before the operator's cap)."""
        if self.recompute is None or not self.proven:
            wanted = self.function.next_keys(tasks / keys) * entries / keys
        else:
            wanted = entries * self.limits.target / max(self.last_held, 1e-3)
        return max(1, int(min(wanted, current * MAX_SLICE_GROWTH)))

    def close(self) -> None:
        self.function.finish()
        drop_temp_table(DROP_REVERT_KEYS_SQL, "revert keys table", logger)

    def _prove(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: Callable[[], bool] | None,
        on_wait: Callable[[str, float], None] | None,
    ) -> RollupSlice:
        """The first drain both ways: the function's call, and the own recompute compared."""
        assert self.recompute is not None
        recompute = self.recompute
        spans = self._spans()
        if len(spans) > MAX_SPANS:
            return self.function.drain(enqueued_until, keys, tasks, should_stop, on_wait)
        self.function.ticks.wait_if_due(should_stop or (lambda: False), on_wait)
        window = (enqueued_until, enqueued_until + timedelta(microseconds=1))

        def call(cursor: Any, bound: Bound) -> tuple[int, int, int]:
            set_plan(cursor, Plan.NESTLOOP)
            return call_function(cursor, bound, *window)

        def work(cursor: Any, bound: Bound) -> tuple[Proof, tuple[int, int, int]]:
            return prove(recompute, cursor, bound, REVERT_KEYS, {}, spans, call)

        try:
            done = run_locked(self.limits, work, repeatable_read=True)
        except SliceCancelled as exc:
            # Too big to do twice in one slice: the function alone drains it, and proves later.
            self.function.cancelled(exc, f"proof of the own recompute on {keys} revert keys")
            return self.function.drain(enqueued_until, keys, tasks, should_stop, on_wait)
        proof, (rollup_rows, seq_scans, index_scans) = done.value
        piece = RollupSlice(
            window_from=window[0],
            window_to=window[1],
            rollup_rows=rollup_rows,
            lock_wait_seconds=done.waited,
            lock_held_seconds=done.held,
            keys=keys,
            plan=Plan.NESTLOOP,
            seq_scans=seq_scans,
            index_scans=index_scans,
        )
        self.function.settled(piece)
        log_slice(piece, f"revert proof: {proof.keys} keys both ways", keys, keys)
        if proof.ok:
            self.proven = True
            logger.info("rollup path: %s", proof.describe())
        else:
            self.recompute = None
            self.result.path = BackfillRun.RollupPath.FUNCTION
            self.result.path_reason = proof.describe() + ": the rest on the function path"
            logger.warning("rollup path: %s", self.result.path_reason)
        self.function.leave_a_gap()
        return piece

    def _spans(self) -> list[tuple[datetime, datetime]]:
        """The spans of hours of the keys waiting in the revert's keys table."""
        with connection.cursor() as cursor:
            cursor.execute(REVERT_HOURS_SQL)
            return spans_of([hour for (hour,) in cursor.fetchall()])

    def _own_drain(
        self,
        enqueued_until: datetime,
        keys: int,
        tasks: int,
        should_stop: Callable[[], bool] | None,
        on_wait: Callable[[str, float], None] | None,
    ) -> RollupSlice:
        """One own-path drain; too scattered, or cancelled at the cap, the function drains
        the batch instead."""
        assert self.recompute is not None
        spans = self._spans()
        if len(spans) > MAX_SPANS:
            return self.function.drain(enqueued_until, keys, tasks, should_stop, on_wait)
        sql = self.recompute.statement(DRAIN_SQL, REVERT_KEYS, len(spans))
        params = span_params(spans)
        self.function.ticks.wait_if_due(should_stop or (lambda: False), on_wait)

        def work(cursor: Any, bound: Bound) -> tuple[int, int, int]:
            own_settings(cursor)
            bound()
            cursor.execute(sql, params)
            return cursor.fetchone()

        try:
            done = run_locked(self.limits, work)
        except SliceCancelled as exc:
            self.function.cancelled(exc, f"revert drain of {keys} keys on the own path")
            return self.function.drain(enqueued_until, keys, tasks, should_stop, on_wait)
        rollup_rows, recomputed, drained = done.value
        piece = RollupSlice(
            window_from=spans[0][0] if spans else None,
            window_to=spans[-1][1] if spans else None,
            rollup_rows=int(rollup_rows),
            lock_wait_seconds=done.waited,
            lock_held_seconds=done.held,
            keys=int(recomputed),
            plan="own",
        )
        self.function.settled(piece)
        log_slice(piece, f"revert drain: {recomputed} keys, {drained} queue rows", keys, keys)
        self.function.leave_a_gap()
        return piece
