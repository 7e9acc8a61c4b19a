"""The rollup's entry points, the repair's ``rebuild_keys`` and the revert's ``RevertDrains``,
on the run's path: ``OwnRebuild`` or ``FunctionPath``, two strategies with one interface.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime

from django.db import connection

from usage.db import drop_temp_table
from usage.eligibility import compose, key_table
from usage.models import BackfillRun
from usage.repair.progress import Progress, no_progress
from usage.repair.rollup.recompute import REVERT_KEYS_TABLE, OwnRebuild
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    MAX_SLICE_GROWTH,
    NeighbourOptions,
    RollupError,
    RollupResult,
    RollupSlice,
    ShouldStop,
    SliceLimits,
)
from usage.repair.rollup.stamps import FunctionPath
from usage.repair.rollup.versions import PathChoice, choose_path

logger = logging.getLogger("usage.rollup")

CREATE_REVERT_KEYS = key_table("codex_revert_keys")
CLEAR_REVERT_KEYS_SQL = f"TRUNCATE {REVERT_KEYS_TABLE}"
DROP_REVERT_KEYS_SQL = f"DROP TABLE IF EXISTS {REVERT_KEYS_TABLE}"
# Every key the revert's drains rebuilt, once: a key restored by two batches counts once.
CREATE_SEEN_KEYS = key_table("codex_revert_seen")
SEEN_KEYS_UNIQUE_SQL = (
    "CREATE UNIQUE INDEX IF NOT EXISTS codex_revert_seen_key ON pg_temp.codex_revert_seen "
    "({key_columns}) NULLS NOT DISTINCT"
)
CLEAR_SEEN_KEYS_SQL = "TRUNCATE pg_temp.codex_revert_seen"
NOTE_SEEN_KEYS_SQL = (
    f"INSERT INTO pg_temp.codex_revert_seen SELECT DISTINCT * FROM {REVERT_KEYS_TABLE} "
    "ON CONFLICT DO NOTHING"
)
DROP_SEEN_KEYS_SQL = "DROP TABLE IF EXISTS pg_temp.codex_revert_seen"


# A path's strategy: ``rebuild`` (False: its proof failed), ``drain`` and ``batch_entries``.
RollupPath = OwnRebuild | FunctionPath


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
    """Rebuild every hourly key of the rows the given runs changed, each key once, on
    ``choice``'s path (``choose_path()`` when not given; a failed proof: the function's).

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
        path = _strategy(choice, function)
        if not path.rebuild(run_ids, stop, on_slice, on_wait) and not result.stopped:
            # The function rebuilds every key; the proof's keys count once.
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
    """Rebuilds the keys each revert batch restored (and noted in ``REVERT_KEYS_TABLE``) in
    one slice a batch, on the revert's path; ``next_entries`` sizes the batches to fit."""

    def __init__(
        self, choice: PathChoice, limits: SliceLimits, neighbours: NeighbourOptions
    ) -> None:
        self.result = RollupResult(path=choice.path, distinct_keys=0)
        self.function = FunctionPath(limits, neighbours, label="revert drain", result=self.result)
        self.path = _strategy(choice, self.function)
        with connection.cursor() as cursor:
            cursor.execute(CREATE_REVERT_KEYS)
            cursor.execute(CLEAR_REVERT_KEYS_SQL)
            cursor.execute(CREATE_SEEN_KEYS)
            cursor.execute(compose(SEEN_KEYS_UNIQUE_SQL))
            cursor.execute(CLEAR_SEEN_KEYS_SQL)

    def drain(self, enqueued_until: datetime, keys: int, tasks: int) -> RollupSlice:
        """Rebuild the keys the batches queued up to ``enqueued_until``."""
        return self._cleared(self.path.drain(enqueued_until, keys, tasks))

    def drain_queue(self, enqueued_until: datetime, keys: int, tasks: int) -> RollupSlice:
        """Rebuild everything queued up to ``enqueued_until`` through the function (what an
        earlier revert that stopped left queued: its keys are not known any more)."""
        piece = self._cleared(self.function.drain(enqueued_until, keys, tasks))
        self.result.distinct_keys = self.result.keys_done + piece.keys
        return piece

    def _cleared(self, piece: RollupSlice) -> RollupSlice:
        with connection.cursor() as cursor:
            cursor.execute(NOTE_SEEN_KEYS_SQL)
            self.result.distinct_keys = self.result.keys_done + max(cursor.rowcount, 0)
            cursor.execute(CLEAR_REVERT_KEYS_SQL)
        return piece

    def next_entries(self, entries: int, keys: int, tasks: int, current: int) -> int:
        """How many journal entries the next batch may take (before the operator's cap)."""
        wanted = self.path.batch_entries(entries, keys, tasks)
        return max(1, int(min(wanted, current * MAX_SLICE_GROWTH)))

    def close(self) -> None:
        self.function.finish()
        drop_temp_table(DROP_REVERT_KEYS_SQL, "revert keys table", logger)
        drop_temp_table(DROP_SEEN_KEYS_SQL, "revert seen keys table", logger)
