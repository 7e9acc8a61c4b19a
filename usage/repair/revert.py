"""Undoing one execute run, the chunk engine's backward direction: its journal walked by id,
a row restored only while still exactly what the run left; then its keys rebuilt once each."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min
from django.db.models.functions import Now

from usage.db import check_target, drop_temp_table
from usage.eligibility import compose, key_table
from usage.events import log_event
from usage.models import BackfillJournal, BackfillRun
from usage.repair import batching, rollup, runs
from usage.repair.rollup import REVERT_KEYS_TABLE

logger = logging.getLogger("usage.revert")

DEFAULT_SHOW_CHANGED = 20

# "Still exactly what the run left" (false, never NULL, when the row is gone).
UNCHANGED = """(tu.id IS NOT NULL
        AND tu.input_tokens = j.new_input_tokens
        AND tu.updated_at IS NOT DISTINCT FROM j.new_updated_at)"""

# The distinct keys the batches restored (and queued), for the rebuild after them.
CREATE_KEYS_SQL = key_table("codex_revert_keys")
UNIQUE_KEYS_SQL = (
    "CREATE UNIQUE INDEX IF NOT EXISTS codex_revert_keys_key ON pg_temp.codex_revert_keys "
    "({key_columns}) NULLS NOT DISTINCT"
)
CLEAR_KEYS_SQL = f"TRUNCATE {REVERT_KEYS_TABLE}"
DROP_KEYS_SQL = f"DROP TABLE IF EXISTS {REVERT_KEYS_TABLE}"
# An earlier revert of the run stopped before its rebuild: the keys of the rows it restored.
EARLIER_KEYS_SQL = f"""
INSERT INTO {REVERT_KEYS_TABLE}
SELECT DISTINCT {{row_key}}
FROM {{journal}} j JOIN {{task_usage}} tu ON tu.id = j.usage_id {{key_joins}}
WHERE j.run_id = %(run_id)s AND j.reverted_at IS NOT NULL AND {{has_key}}
ON CONFLICT DO NOTHING"""
KEYS_COUNT_SQL = f"SELECT count(*) FROM {REVERT_KEYS_TABLE}"

# One batch: lock, re-check, restore, mark the journal and queue the keys in one statement.
BATCH_SQL = f"""
WITH batch AS MATERIALIZED (
    SELECT j.id, j.usage_id, j.old_input_tokens, j.old_updated_at,
           j.new_input_tokens, j.new_updated_at
    FROM {{journal}} j
    WHERE {{selector}} AND j.run_id = %(run_id)s AND j.reverted_at IS NULL
),
locked AS MATERIALIZED (
    SELECT j.id AS journal_id, tu.id AS usage_id, j.old_input_tokens, j.old_updated_at
    FROM batch j JOIN {{task_usage}} tu ON tu.id = j.usage_id
    WHERE {UNCHANGED}
    FOR NO KEY UPDATE OF tu SKIP LOCKED
),
restored AS (
    UPDATE {{task_usage}} tu SET input_tokens = l.old_input_tokens, updated_at = l.old_updated_at
    FROM locked l WHERE tu.id = l.usage_id
    RETURNING l.journal_id, tu.task_id, tu.provider, tu.model, tu.created_at
),
marked AS (
    UPDATE {{journal}} j SET reverted_at = now() FROM restored r WHERE j.id = r.journal_id
    RETURNING j.id
),
restored_keys AS (
    SELECT DISTINCT {{row_key}} FROM restored tu {{key_joins}} WHERE {{has_key}}
),
noted AS (
    -- The keys the rebuild after the batches rebuilds, each once.
    INSERT INTO {REVERT_KEYS_TABLE} SELECT * FROM restored_keys ON CONFLICT DO NOTHING
),
enqueued AS (
    -- An upsert, as every platform writer queues keys (the later of the two times).
    INSERT INTO {{task_usage_hourly_dirty}} AS d ({{key_columns}}, enqueued_at)
    SELECT {{key_columns}}, now() FROM restored_keys
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)
    RETURNING 1
),
skipped AS (
    -- Unchanged in our snapshot but not locked by us: a writer holds the row. (NOT IN: a
    -- hashed subplan; NOT EXISTS was planned as a nested loop, quadratic in the batch.)
    SELECT j.id FROM batch j LEFT JOIN {{task_usage}} tu ON tu.id = j.usage_id
    WHERE {UNCHANGED} AND j.id NOT IN (SELECT l.journal_id FROM locked l)
)
SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM batch),
       (SELECT count(*) FROM restored), (SELECT count(*) FROM enqueued),
       (SELECT coalesce(array_agg(id ORDER BY id), '{{{{}}}}') FROM skipped)"""

FIGURES = ("marked", "entries", "rows", "keys_enqueued", "skipped")
# The two kinds of batch: an id range of the run's journal, or the ids a writer held.
RANGE_BATCH = {"selector": "j.id > %(after)s AND j.id <= %(upto)s"}
RETRY_BATCH = {"selector": "j.id = ANY(%(ids)s)"}

# Where the run's active entries stand now: restorable, changed since, and their rollup keys.
CLASSIFY_SQL = f"""
SELECT count(*) FILTER (WHERE {UNCHANGED}),
       count(*) FILTER (WHERE NOT {UNCHANGED}),
       count(DISTINCT {{rollup_key}}) FILTER (WHERE {UNCHANGED} AND q.runtime_id IS NOT NULL)
FROM {{journal}} j
LEFT JOIN {{task_usage}} tu ON tu.id = j.usage_id
LEFT JOIN {{agent_task_queue}} q ON q.id = tu.task_id
LEFT JOIN {{issue}} i ON i.id = q.issue_id
WHERE j.run_id = %(run_id)s AND j.reverted_at IS NULL"""

CHANGED_ROWS_SQL = f"""
SELECT j.id, j.usage_id, j.new_input_tokens, j.new_updated_at,
       tu.input_tokens, tu.updated_at, tu.id IS NULL
FROM {{journal}} j
LEFT JOIN {{task_usage}} tu ON tu.id = j.usage_id
WHERE j.run_id = %(run_id)s AND j.reverted_at IS NULL AND NOT {UNCHANGED}
ORDER BY j.id
LIMIT %(limit)s"""


class RevertError(batching.RunError):
    """The revert cannot start, or stopped; the message says what to do."""


@dataclass(frozen=True)
class RevertOptions(batching.RunLimits):
    run_id: int
    show_changed: int = DEFAULT_SHOW_CHANGED


@dataclass(frozen=True)
class ChangedRow:
    """A row the run repaired that someone else rewrote (or deleted) since: left alone."""

    journal_id: int
    usage_id: uuid.UUID
    expected_input_tokens: int
    expected_updated_at: datetime
    current_input_tokens: int | None
    current_updated_at: datetime | None
    deleted: bool


@dataclass(kw_only=True)
class RevertResult(batching.RunResult):
    """What a revert found (dry run) or did (``executed``) with the run's active entries;
    ``changed`` lists the first rows changed by others since (left alone)."""

    executed: bool = True
    entries: int = 0
    rows_restorable: int = 0
    rows_restored: int = 0
    rows_changed: int = 0
    rollup_keys: int = 0
    changed: list[ChangedRow] = field(default_factory=list)
    owner_gone: bool = False
    rollup: rollup.RollupResult = field(default_factory=rollup.RollupResult)
    seconds: float = 0.0

    @property
    def reverted(self) -> bool:
        return self.run.status == BackfillRun.Status.REVERTED

    def add(self, batch: batching.Batch) -> None:
        self.rows_restored += batch.rows


def plan_revert(run_id: int, *, show_changed: int = DEFAULT_SHOW_CHANGED) -> RevertResult:
    """The dry run: what a revert of ``run_id`` would restore, in one read-only transaction."""
    check_target()
    started = time.monotonic()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        run = _revertable_run(run_id)
        owner_gone = run.status == BackfillRun.Status.RUNNING  # no live owner holds the lock
        result = RevertResult(run=run, executed=False, owner_gone=owner_gone)
        _classify(result, show_changed)
    result.seconds = time.monotonic() - started
    return result


class Revert(batching.Chunks[RevertOptions, RevertResult]):
    """One execute revert, the engine's backward direction."""

    logger, error = logger, RevertError
    timed_out = (
        "a revert batch timed out {times} times, down to {size} entries ({error}); the rows "
        "restored so far stay restored: run the same revert again later"
    )
    retrying = "revert batch timed out; retrying with %(size)d entries"
    unequal = "marked %d journal entries for %d restored rows"
    shown = {"started", "batch"}
    sql, figures, range_batch, retry_batch = BATCH_SQL, FIGURES, RANGE_BATCH, RETRY_BATCH

    def run(self) -> RevertResult:
        check_target()
        started = time.monotonic()
        self.skipped: list[int] = []  # journal entries a writer held
        path = self.checked_path("the revert")
        with runs.run_lock():
            stale = runs.mark_stale_runs()
            run = _revertable_run(self.options.run_id)
            self.result = result = RevertResult(run=run, stale_runs=stale, path=path)
            _classify(result, 0)
            self.events("started", result=result)
            # The rows earlier reverts of the run restored.
            self.restored_before = BackfillJournal.objects.filter(
                run=run, reverted_at__isnull=False
            ).count()
            Rollup = BackfillRun.RollupState
            state = Rollup.SKIPPED if run.rollup_state == Rollup.SKIPPED else Rollup.PENDING
            # Until the rebuild after the batches is done, the run's rollup is pending (its
            # keys wait in the platform's queue for the cron tick, or the same revert again).
            self.record(
                revert_state=BackfillRun.RevertState.RUNNING,
                revert_started_at=Now(),
                revert_finished_at=None,
                revert_error="",
                rows_restored=self.restored_before,
                rollup_state=state,
            )
            try:
                self.guard(self._restore_phase)
            finally:
                drop_temp_table(DROP_KEYS_SQL, "revert keys table", logger)
            self._finish()
        result.seconds = time.monotonic() - started
        return result

    def _restore_phase(self) -> None:
        """The batches, then the rebuild of their keys (and those an earlier revert left)."""
        run = self.result.run
        with connection.cursor() as cursor:
            for statement in (CREATE_KEYS_SQL, compose(UNIQUE_KEYS_SQL), CLEAR_KEYS_SQL):
                cursor.execute(statement)
            if self.restored_before and run.rollup_state == BackfillRun.RollupState.PENDING:
                cursor.execute(compose(EARLIER_KEYS_SQL), {"run_id": run.pk})
        entries = BackfillJournal.objects.filter(run=run, reverted_at__isnull=True)
        first, last = entries.aggregate(first=Min("id"), last=Max("id")).values()
        if first is not None:
            self.walk(first - 1, last)
            self.result.stopped = self.stop.is_set()
        if self.result.stopped:
            return
        # The restored rows' keys, each once; the run's rollup is then as it was before it.
        try:
            rebuilt = self.rebuild_keys([], self.stop.is_set, rollup.REVERT_KEYS)
        except rollup.RollupError as exc:
            self.result.rollup = exc.result
            raise
        self.result.rollup = rebuilt
        self.result.stopped = rebuilt.stopped
        if not rebuilt.stopped:
            with connection.cursor() as cursor:
                cursor.execute(KEYS_COUNT_SQL)
                (rebuilt.distinct_keys,) = cursor.fetchone()
            self.record(rollup_state=self.result.run.rollup_state)

    def settle(self, batch: batching.Batch, selector: dict[str, Any]) -> None:
        """Record the rows restored (their keys wait in the queue for the rebuild)."""
        self.skipped.extend(batch.skipped)
        if batch.rows:
            self.record(rows_restored=self.restored_before + self.result.rows_restored)

    def log_view(self, event: str, /, **d: Any) -> None:
        """The revert's events in its log: plain lines, and each batch as an event."""
        r = self.result
        if event == "started":
            message = (
                "revert of run %d: %d active journal entries, %d restorable, %d changed since"
            )
            logger.info(message, r.run.pk, r.entries, r.rows_restorable, r.rows_changed)
        elif event == "batch":  # an event: the JSON log has its figures
            b = d["batch"]
            message = (
                f"revert batch {b.number}: {b.entries} entries, {b.rows} rows restored, "
                f"{b.keys_enqueued} hourly keys queued, {len(b.skipped)} locked, {b.seconds:.3f}s"
            )
            fields = {"run_id": r.run.pk, "batch": b.number, "entries": b.entries}
            fields.update(rows_restored=b.rows, keys_queued=b.keys_enqueued)
            fields.update(rows_skipped_locked=len(b.skipped), batch_size=b.batch_size)
            fields.update(seconds=round(b.seconds, 6), retry=b.retry, rows_done=r.rows_restored)
            log_event(logger, logging.INFO, "batch", message, **fields)
        elif event == "end" and r.reverted:
            message = "run %d reverted: %d rows restored, %d left as changed since"
            logger.info(message, r.run.pk, r.rows_restored, r.rows_changed)
        elif event == "end":
            message = "revert of run %d incomplete: %d rows restored, %d remaining%s"
            signal = ", stopped by a signal" if r.stopped else ""
            logger.info(message, r.run.pk, r.rows_restored, r.rows_remaining, signal)

    def locked(self) -> int:
        return len(self.skipped)

    def retry_pass(self) -> None:
        pending, self.skipped = self.skipped, []
        while pending and not self.stop.is_set():
            chunk = pending[: self.size]
            if self.batch({"ids": chunk}, retry=True) is not None:
                pending = pending[len(chunk) :]

    def ended(self, message: str, *, salvage: bool, timed_out: bool) -> str:
        if salvage and not timed_out:
            message = (
                f"revert of run {self.result.run.pk} stopped: {message}; the rows restored so "
                "far stay restored: run the same revert again to finish"
            )
        self.failed(message)
        return message

    def failed(self, message: str) -> None:
        self._record_end(BackfillRun.RevertState.FAILED, message)

    def _record_end(self, state: str, error: str) -> None:
        """How the revert ended, when it did not finish (failed, stopped or incomplete)."""
        restored = self.restored_before + self.result.rows_restored
        fields = {"revert_finished_at": Now(), "revert_error": error, "rows_restored": restored}
        record = functools.partial(self.record, revert_state=state, **fields)
        warning = "could not record how the revert of run %d ended: %s"
        self.quietly(record, warning, self.result.run.pk)

    def _finish(self) -> None:
        """Count what is left; mark the run reverted unless rows stayed locked or we stopped."""
        result = self.result
        restored = result.rows_restored
        _classify(result, self.options.show_changed)
        result.rows_remaining = result.rows_restorable
        result.rows_restorable = restored + result.rows_remaining
        State, Rollup = BackfillRun.RevertState, BackfillRun.RollupState
        if result.stopped:
            self._record_end(State.STOPPED, f"stopped by a signal after {restored} rows restored")
        elif result.rows_remaining:
            locked = f"{result.rows_remaining} rows stayed locked by other writers"
            self._record_end(State.INCOMPLETE, locked)
        if result.stopped or result.rows_remaining:
            self.events("end")
            return
        run = result.run
        if run.rollup_state == Rollup.PENDING:
            # Its own rollup never finished: rebuild the keys of the rows the revert leaves too.
            failed = (
                f"run {run.pk}'s rows are restored, but the hourly keys of the rows changed "
                "since it (its own rollup never finished) could not be rebuilt: {}; run the "
                "same revert again to finish"
            )
            rebuild = functools.partial(self.rebuild_keys, [run.pk], self.stop.is_set)
            rebuilt = self.rebuild_after_rows(rebuild, failed)
            result.rollup.slices.extend(rebuilt.slices)
            result.rollup.cancelled_holds.extend(rebuilt.cancelled_holds)
            if rebuilt.stopped:
                result.stopped = True
                self._record_end(State.STOPPED, "stopped before the rollup was rebuilt")
                return
        fields: dict[str, object] = {
            "status": BackfillRun.Status.REVERTED,
            "reverted_at": Now(),
            "revert_state": State.DONE,
            "revert_finished_at": Now(),
            "rows_restored": self.restored_before + restored,
            "rollup_state": Rollup.SKIPPED if run.rollup_state == Rollup.SKIPPED else Rollup.DONE,
        }
        if result.rows_changed:
            note = (
                f"reverted; {result.rows_changed} rows changed by others since the run were "
                "left as they are (their journal entries stay active)"
            )
            fields["error"] = f"{note}; {result.run.error}" if result.run.error else note
        self.record(**fields)
        result.run.refresh_from_db()
        self.events("end")


# Restore the run's unchanged rows and rebuild their rollup (the same revert again finishes a
# revert that stopped or left rows locked).
execute_revert = Revert.execute


def _revertable_run(run_id: int) -> BackfillRun:
    """The run, or the reason it cannot be reverted; a dry run may plan a ``running`` run whose
    owner died (no one holds the run lock: an execute, holding it, has marked it interrupted)."""
    run = BackfillRun.objects.filter(pk=run_id).first()
    if run is None:
        raise RevertError(
            f"run {run_id} not found in {settings.CODEX_REPAIR_SCHEMA}.backfill_run; give the "
            "number printed as 'Run N' by backfill_codex_usage_cache --execute"
        )
    if run.status == BackfillRun.Status.REVERTED:
        when = run.reverted_at.strftime("%Y-%m-%d %H:%M:%S UTC") if run.reverted_at else "-"
        raise RevertError(
            f"run {run.pk} was already reverted at {when}; its restored rows are eligible "
            "again, so nothing is left to revert"
        )
    if run.status == BackfillRun.Status.RUNNING:
        if (pid := runs.run_lock_holder()) is not None:
            raise RevertError(
                f"run {run.pk} is still running (started {run.started_at:%Y-%m-%d %H:%M:%S} "
                f"UTC by {run.os_user}@{run.client_host}, database backend pid {pid}); wait "
                "for it to finish, or stop it, before reverting it"
            )
    elif run.status not in (BackfillRun.Status.SUCCEEDED, *runs.UNFINISHED):
        raise RevertError(f"run {run.pk} has status {run.status!r}, which cannot be reverted")
    return run


def _classify(result: RevertResult, show_changed: int) -> None:
    """Fill the counts of the run's active entries, and list the first changed rows."""
    params = {"run_id": result.run.pk, "limit": show_changed}
    with connection.cursor() as cursor:
        cursor.execute(compose(CLASSIFY_SQL), params)
        result.rows_restorable, result.rows_changed, result.rollup_keys = cursor.fetchone()
        result.changed = []
        if result.rows_changed and show_changed > 0:
            cursor.execute(compose(CHANGED_ROWS_SQL), params)
            result.changed = [ChangedRow(*row) for row in cursor.fetchall()]
    result.entries = result.entries or result.rows_restorable + result.rows_changed
