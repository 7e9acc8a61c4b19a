"""Undoing one execute run from its journal: rows back as they were, rollup rebuilt for them.

A journal entry says what the run changed: ``old_input_tokens``/``old_updated_at`` (what the
row was) and ``new_input_tokens``/``new_updated_at`` (what the run wrote). A row is restored
only while it is still exactly what the run left (same ``input_tokens`` and ``updated_at``);
a row that someone else rewrote (ingestion's UPSERT sets ``updated_at = now()``) or deleted
since is left alone, listed, and its journal entry stays active, so the repair never touches
it again either.

How it stays safe on a live database, like the repair itself:

* The run's journal is walked by ``id`` range (a keyset: its entries were written in one
  sequence, one run at a time), each batch one short transaction with ``lock_timeout`` and
  ``statement_timeout`` set locally. One statement locks the rows (``SKIP LOCKED``),
  re-checks them under the lock, restores them, stamps their journal entries
  ``reverted_at = now()`` and queues their hourly keys in ``task_usage_hourly_dirty``: a row
  is never restored without its journal entry saying so, nor without its key queued.
* Restored rows get their *old* ``updated_at`` back, so no time window of the rollup would
  find them; the platform's own invalidation queue does. After each batch the queue is
  drained by one ``rollup_task_usage_hourly_window`` call under lock 4246 (transaction-level,
  only around that call) over a one-microsecond window just after the batch's enqueue time:
  it rebuilds the queued keys and hardly anything else. The cron tick only drains keys queued
  more than five minutes ago, so it never meets a large backlog of ours. Batches start at
  ``INITIAL_BATCH_SIZE`` entries and are then sized from the measured rollup cost, so that a
  drain holds the lock for about half of ``max_rollup_lock_seconds`` (the journal is in
  hourly-key order, so neighbouring entries share keys).
* Rows skipped because a writer held their lock are retried after the pass; rows still locked
  at the end are reported and the run is not marked reverted (re-running finishes it).
* The run is marked ``reverted`` once every entry was either restored or found changed by
  someone else; those are listed, and noted in the run record. Reverted entries no longer
  count in the eligibility definition, so the restored rows are eligible again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Max, Min
from django.db.models.functions import Now

from usage import privileges
from usage.db import (
    check_target,
    drop_temp_table,
    error_text,
    reconnect_if_dead,
    set_local_timeouts,
)
from usage.eligibility import compose
from usage.models import BackfillJournal, BackfillRun
from usage.repair import batching, rollup, runs
from usage.repair.progress import Progress, no_progress
from usage.repair.rollup.recompute import REVERT_KEYS_TABLE

logger = logging.getLogger("usage.revert")

DEFAULT_SHOW_CHANGED = 20
# The first batch is this small (or the operator's --batch-size, if smaller); later ones are
# sized from the measured rollup cost.
INITIAL_BATCH_SIZE = 100
# How the revert's messages name its batches.
WORDS = batching.BatchWords(
    batch="a revert batch",
    unit="entries",
    kept="the rows restored so far stay restored: run the same revert again later",
    retrying="revert batch timed out; retrying with %(size)d entries",
)
REVERTABLE_STATUSES = (
    BackfillRun.Status.SUCCEEDED,
    BackfillRun.Status.FAILED,
    BackfillRun.Status.INTERRUPTED,
)


# "Still exactly what the run left" (false, never NULL, when the row is gone).
UNCHANGED = """(tu.id IS NOT NULL
        AND tu.input_tokens = j.new_input_tokens
        AND tu.updated_at IS NOT DISTINCT FROM j.new_updated_at)"""

# The task count of every agent the run's rows belong to: a key's rollup cost grows with it.
AGENT_TASKS_TABLE = "pg_temp.codex_revert_agent_tasks"
CREATE_AGENT_TASKS_SQL = """
CREATE TEMP TABLE codex_revert_agent_tasks ON COMMIT PRESERVE ROWS AS
SELECT q.agent_id, count(*) AS tasks
FROM {agent_task_queue} q
WHERE q.agent_id IN (
    SELECT uq.agent_id
    FROM {journal} j
    JOIN {task_usage} tu ON tu.id = j.usage_id
    JOIN {agent_task_queue} uq ON uq.id = tu.task_id
    WHERE j.run_id = %(run_id)s AND j.reverted_at IS NULL
)
GROUP BY q.agent_id"""
DROP_AGENT_TASKS_SQL = f"DROP TABLE IF EXISTS {AGENT_TASKS_TABLE}"
# What is queued now (an earlier revert of the run may have stopped before its drain).
QUEUED_SQL = f"""
SELECT count(*), coalesce(sum(t.tasks), 0)::bigint, max(d.enqueued_at)
FROM {{task_usage_hourly_dirty}} d LEFT JOIN {AGENT_TASKS_TABLE} t ON t.agent_id = d.agent_id"""

# One batch. ``{selector}`` picks the run's active journal entries (an id range, or the ids
# skipped for a writer's lock on an earlier try).
BATCH_SQL = f"""
WITH batch AS MATERIALIZED (
    SELECT j.id, j.usage_id, j.old_input_tokens, j.old_updated_at,
           j.new_input_tokens, j.new_updated_at
    FROM {{journal}} j
    WHERE {{selector}}
      AND j.run_id = %(run_id)s
      AND j.reverted_at IS NULL
),
locked AS MATERIALIZED (
    SELECT j.id AS journal_id, tu.id AS usage_id, j.old_input_tokens, j.old_updated_at
    FROM batch j
    JOIN {{task_usage}} tu ON tu.id = j.usage_id
    WHERE {UNCHANGED}
    FOR NO KEY UPDATE OF tu SKIP LOCKED
),
restored AS (
    UPDATE {{task_usage}} tu
    SET input_tokens = l.old_input_tokens, updated_at = l.old_updated_at
    FROM locked l
    WHERE tu.id = l.usage_id
    RETURNING l.journal_id, tu.task_id, tu.provider, tu.model, tu.created_at
),
marked AS (
    UPDATE {{journal}} j
    SET reverted_at = now()
    FROM restored r
    WHERE j.id = r.journal_id
    RETURNING j.id
),
restored_keys AS (
    SELECT DISTINCT {{bucket_hour}} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id,
           q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model
    FROM restored tu
    JOIN {{agent_task_queue}} q ON q.id = tu.task_id
    JOIN {{agent}} a ON a.id = q.agent_id
    LEFT JOIN {{issue}} i ON i.id = q.issue_id
    WHERE q.runtime_id IS NOT NULL
),
noted AS (
    -- The keys this batch's drain rebuilds (usage.repair.rollup.RevertDrains).
    INSERT INTO {REVERT_KEYS_TABLE} SELECT * FROM restored_keys RETURNING 1
),
enqueued AS (
    -- An upsert, as every platform writer queues keys: a key the platform queued already is
    -- no conflict, and keeps the later of the two times.
    INSERT INTO {{task_usage_hourly_dirty}} AS d (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
        enqueued_at
    )
    SELECT bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model, now()
    FROM restored_keys
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)
    RETURNING d.agent_id, d.enqueued_at
),
skipped AS (
    -- Unchanged in our snapshot but not locked by us: a writer holds the row.
    SELECT j.id
    FROM batch j
    LEFT JOIN {{task_usage}} tu ON tu.id = j.usage_id
    WHERE {UNCHANGED}
      AND NOT EXISTS (SELECT 1 FROM locked l WHERE l.journal_id = j.id)
)
SELECT (SELECT count(*) FROM batch),
       (SELECT count(*) FROM restored),
       (SELECT count(*) FROM marked),
       (SELECT count(*) FROM enqueued),
       (SELECT coalesce(sum(t.tasks), 0)::bigint
        FROM enqueued e LEFT JOIN {AGENT_TASKS_TABLE} t ON t.agent_id = e.agent_id),
       (SELECT coalesce(array_agg(id ORDER BY id), '{{{{}}}}') FROM skipped),
       coalesce((SELECT max(enqueued_at) FROM enqueued), now())"""

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

# Who holds the run lock (a bigint advisory lock shows as classid = high, objid = low half).
# Advisory locks belong to one database; pg_locks lists every database of the server.
RUN_LOCK_HOLDER_SQL = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = %(high)s::bigint::oid AND objid = %(low)s::bigint::oid AND objsubid = 1
LIMIT 1"""


class RevertError(batching.RunError):
    """The revert cannot start or stopped; the message says what to do."""

    result: RevertResult | None


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


@dataclass(frozen=True)
class RevertBatch:
    number: int
    entries: int
    rows_restored: int
    keys_enqueued: int
    rows_skipped_locked: int
    batch_size: int
    seconds: float
    stamp: datetime
    retry: bool = False


@dataclass
class RevertResult:
    """What a revert found (dry run) or did (execute).

    Counts of the run's journal entries that were active (not reverted) when it started:
    ``rows_restorable`` could be restored (dry run: would be), ``rows_restored`` were,
    ``rows_changed`` were changed or deleted by someone else and are left alone
    (``changed`` lists the first of them), ``rows_remaining`` could be restored but were not
    (locked by writers through every retry, or not reached because the revert was stopped).
    """

    run: BackfillRun
    executed: bool
    entries: int = 0
    rows_restorable: int = 0
    rows_restored: int = 0
    rows_changed: int = 0
    rows_remaining: int = 0
    rollup_keys: int = 0
    changed: list[ChangedRow] = field(default_factory=list)
    batches: int = 0
    stopped: bool = False
    stale_runs: list[int] = field(default_factory=list)
    owner_gone: bool = False
    rollup: rollup.RollupResult = field(default_factory=rollup.RollupResult)
    path: rollup.PathChoice | None = None
    seconds: float = 0.0

    @property
    def reverted(self) -> bool:
        return self.run.status == BackfillRun.Status.REVERTED


def plan_revert(run_id: int, *, show_changed: int = DEFAULT_SHOW_CHANGED) -> RevertResult:
    """The dry run: what a revert of ``run_id`` would restore, in one read-only transaction."""
    check_target()
    started = time.monotonic()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        run = _load_run(run_id)
        owner_gone = False
        if run.status == BackfillRun.Status.RUNNING:
            holder = _run_lock_holder()
            if holder is not None:
                raise RevertError(_still_running(run, holder))
            owner_gone = True
        else:
            _ensure_revertable(run)
        result = RevertResult(run=run, executed=False, owner_gone=owner_gone)
        _classify(result, show_changed)
    result.seconds = time.monotonic() - started
    return result


def execute_revert(
    options: RevertOptions,
    *,
    stop: threading.Event | None = None,
    progress: Progress = no_progress,
) -> RevertResult:
    """Restore the run's unchanged rows and rebuild their rollup; see the module docstring.

    Holds the run lock throughout (``runs.RunLockError`` when another run or revert has it).
    Returns the result; ``result.rows_remaining`` or ``result.stopped`` mean the run is not
    reverted yet and running the same revert again finishes it. ``progress`` is called with
    ``started`` (``result``: what is to restore) and each ``batch`` (``batch``, ``result``).
    """
    return _Revert(options, stop or threading.Event(), progress).run()


class _Revert:
    """One execute revert. Use ``execute_revert``; this class only keeps its state together."""

    def __init__(self, options: RevertOptions, stop: threading.Event, progress: Progress) -> None:
        self.options = options
        self.stop = stop
        self.progress = progress
        self.halving = batching.Halving(min(options.batch_size, INITIAL_BATCH_SIZE), WORDS, logger)
        self.result: RevertResult | None = None
        self.restored_before = 0  # rows earlier reverts of the run restored
        self.drains: rollup.RevertDrains | None = None
        self.path: rollup.PathChoice | None = None

    def run(self) -> RevertResult:
        check_target()
        started = time.monotonic()
        self._check_privileges()
        with runs.run_lock():
            stale = runs.mark_stale_runs()
            run = _load_run(self.options.run_id)
            _ensure_revertable(run)
            self.result = result = RevertResult(
                run=run, executed=True, stale_runs=stale, path=self.path
            )
            _classify(result, 0)
            logger.info(
                "revert of run %d: %d active journal entries, %d restorable, %d changed since",
                run.pk,
                result.entries,
                result.rows_restorable,
                result.rows_changed,
            )
            self.progress("started", result=result)
            self.restored_before = BackfillJournal.objects.filter(
                run=run, reverted_at__isnull=False
            ).count()
            self._record(
                revert_state=BackfillRun.RevertState.RUNNING,
                revert_started_at=Now(),
                revert_finished_at=None,
                revert_error="",
                rows_restored=self.restored_before,
            )
            try:
                self._prepare()
                if self.restored_before:
                    # An earlier revert of this run stopped; drain whatever it left queued.
                    self._drain_queued()
                self._restore_phase()
            except batching.BatchTimeoutError as exc:
                self._drain_quietly()
                self._record_end(BackfillRun.RevertState.FAILED, str(exc))
                raise RevertError(str(exc), result) from None
            except RevertError as exc:
                self._record_end(BackfillRun.RevertState.FAILED, str(exc))
                raise
            except BaseException as exc:
                self._drain_quietly()
                message = (
                    f"revert of run {run.pk} stopped: {batching.describe_failure(exc)}; the rows "
                    "restored so far stay restored: run the same revert again to finish"
                )
                self._record_end(BackfillRun.RevertState.FAILED, message)
                raise RevertError(message, result) from exc
            finally:
                self._drop_agent_tasks()
                if self.drains is not None:
                    self.drains.close()
            self._finish()
        result.seconds = time.monotonic() - started
        return result

    def _check_privileges(self) -> None:
        """The rollup's path, and every privilege the revert needs to finish, before it writes."""
        self.path = rollup.choose_path(self.options.rollup_path)
        with connection.cursor() as cursor:
            needs = privileges.requirements(
                security_definer=privileges.function_runs_as_owner(cursor),
                revert=True,
                own_path=self.path.own,
            )
            privileges.refuse_missing(cursor, needs, "the revert")

    def _limits(self) -> rollup.SliceLimits:
        return rollup.SliceLimits(
            self.options.max_rollup_lock_seconds,
            self.options.lock_timeout,
            max(self.options.statement_timeout, 0),
        )

    def _neighbours(self) -> rollup.NeighbourOptions:
        return rollup.NeighbourOptions(tick_interval=self.options.cron_tick_interval)

    def _prepare(self) -> None:
        """The agents' task counts (the function path's cost model) and the drains."""
        assert self.result is not None and self.path is not None
        with connection.cursor() as cursor:
            cursor.execute(DROP_AGENT_TASKS_SQL)
            cursor.execute(compose(CREATE_AGENT_TASKS_SQL), {"run_id": self.result.run.pk})
        self.drains = rollup.RevertDrains(self.path, self._limits(), self._neighbours())
        self.result.rollup = self.drains.result

    # -- restoring -------------------------------------------------------------------------

    def _restore_phase(self) -> None:
        assert self.result is not None
        bounds = BackfillJournal.objects.filter(
            run=self.result.run, reverted_at__isnull=True
        ).aggregate(first=Min("id"), last=Max("id"))
        if bounds["first"] is None:
            return
        after, last = bounds["first"] - 1, bounds["last"]
        skipped: list[int] = []
        while after < last and not self.stop.is_set():
            upto = min(after + self.halving.size, last)
            batch = self._batch(RANGE_BATCH, {"after": after, "upto": upto}, retry=False)
            if batch is None:
                continue  # timed out: same range, smaller
            skipped.extend(batch[1])
            after = upto

        def retry_pass() -> None:
            pending = skipped[:]
            skipped.clear()
            while pending and not self.stop.is_set():
                chunk = pending[: self.halving.size]
                batch = self._batch(RETRY_BATCH, {"ids": chunk}, retry=True)
                if batch is None:
                    continue
                skipped.extend(batch[1])
                pending = pending[len(chunk) :]

        batching.retry_locked(
            self.options.lock_retry_delays, self.stop, lambda: len(skipped), retry_pass, logger
        )
        self.result.stopped = self.stop.is_set()

    def _batch(
        self, kind: dict[str, str], selector: dict[str, object], *, retry: bool
    ) -> tuple[RevertBatch, list[int]] | None:
        """One batch and its drain; None when it timed out and was rolled back (size halved)."""
        assert self.result is not None
        started = time.monotonic()
        params = dict(selector, run_id=self.result.run.pk)
        size = self.halving.size
        done = self.halving.attempt(lambda _size: self._batch_statement(kind, params))
        if done is None:
            return None
        entries, restored, marked, enqueued, tasks, skipped, stamp = done
        batch = RevertBatch(
            number=self.result.batches + 1,
            entries=entries,
            rows_restored=restored,
            keys_enqueued=enqueued,
            rows_skipped_locked=len(skipped),
            batch_size=size,
            seconds=time.monotonic() - started,
            stamp=stamp,
            retry=retry,
        )
        self.result.batches += 1
        self.result.rows_restored += restored
        if restored:
            self._record(rows_restored=self.restored_before + self.result.rows_restored)
        logger.info(
            "revert batch %d: %d entries, %d rows restored, %d hourly keys queued, "
            "%d locked, %.3fs",
            batch.number,
            entries,
            restored,
            enqueued,
            len(skipped),
            batch.seconds,
        )
        if enqueued:
            self._drain(stamp, enqueued, tasks)
            self._adapt(entries, enqueued, tasks)
        else:
            self.halving.size = max(1, min(self.options.batch_size, size * 4))
        self.progress("batch", batch=batch, result=self.result)
        return batch, list(skipped)

    def _batch_statement(self, kind: dict[str, str], params: dict[str, object]) -> tuple:
        """One batch's statement, in its own transaction: what it restored, queued, skipped."""
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.options.lock_timeout, self.options.statement_timeout)
            cursor.execute(compose(BATCH_SQL, **kind), params)
            done = cursor.fetchone()
            entries, restored, marked, *_ = done
            if marked != restored:
                raise RuntimeError(
                    f"marked {marked} journal entries for {restored} restored rows; "
                    "batch rolled back"
                )
        return done

    # -- the rollup ------------------------------------------------------------------------

    def _drain(self, enqueued_until: datetime, keys: int, tasks: int) -> None:
        """Rebuild the keys queued up to ``enqueued_until`` in one lock-4246 slice."""
        assert self.result is not None and self.drains is not None
        try:
            piece = self.drains.drain(enqueued_until, keys, tasks)
        except rollup.RollupError as exc:
            raise RevertError(str(exc), self.result) from exc
        rebuilt = self.drains.result
        self.progress(
            "rollup_slice", piece=piece, done=rebuilt.keys_done, total=self.result.rollup_keys
        )

    def _drain_queued(self) -> None:
        """Drain whatever is queued now: what an earlier, stopped revert of the run left."""
        assert self.result is not None and self.drains is not None
        with connection.cursor() as cursor:
            cursor.execute(compose(QUEUED_SQL))
            keys, tasks, latest = cursor.fetchone()
        if keys:
            try:
                self.drains.drain_queue(latest, keys, tasks)
            except rollup.RollupError as exc:
                raise RevertError(str(exc), self.result) from exc

    def _adapt(self, entries: int, keys: int, tasks: int) -> None:
        """Size the next batch so its keys' rebuild fits the slice the planner allows.

        Grows at most ``MAX_SLICE_GROWTH``-fold per batch and never above the operator's
        ``--batch-size``: the journal is in the repair's walking order (physical, so time
        order), so neighbouring entries share hours and keys, and the ratios carry over.
        """
        assert self.drains is not None
        wanted = self.drains.next_entries(entries, keys, tasks, self.halving.size)
        self.halving.size = max(1, min(self.options.batch_size, wanted))

    def _drain_quietly(self) -> None:
        try:
            reconnect_if_dead()
            if self.drains is not None:
                self._drain_queued()
        except Exception as exc:  # noqa: BLE001 - the revert's own failure is what is reported
            logger.warning(
                "rollup drain failed (%s); the queued keys stay in task_usage_hourly_dirty",
                error_text(exc),
            )

    def _drop_agent_tasks(self) -> None:
        drop_temp_table(DROP_AGENT_TASKS_SQL, "agent task counts", logger)

    # -- the end ---------------------------------------------------------------------------

    def _record(self, **fields: object) -> None:
        """The revert's progress in its run's record, as it goes (the admin shows it)."""
        assert self.result is not None
        BackfillRun.objects.filter(pk=self.result.run.pk).update(**fields)

    def _record_end(self, state: str, error: str) -> None:
        """How the revert ended, when it did not finish; never masks the revert's own error
        (the connection may be the thing that failed: then a fresh one records it)."""
        assert self.result is not None
        try:
            reconnect_if_dead()
            self._record(
                revert_state=state,
                revert_finished_at=Now(),
                revert_error=error,
                rows_restored=self.restored_before + self.result.rows_restored,
            )
        except Exception as exc:  # noqa: BLE001 - the revert's own error is the one reported
            logger.warning(
                "could not record how the revert of run %d ended: %s",
                self.result.run.pk,
                error_text(exc),
            )

    def _finish(self) -> None:
        """Count what is left; mark the run reverted unless rows stayed locked or we stopped."""
        assert self.result is not None
        result = self.result
        restored = result.rows_restored
        _classify(result, self.options.show_changed)
        result.rows_remaining = result.rows_restorable
        result.rows_restorable = restored + result.rows_remaining
        result.rows_restored = restored
        if result.stopped or result.rows_remaining:
            self._record_end(
                BackfillRun.RevertState.STOPPED
                if result.stopped
                else BackfillRun.RevertState.INCOMPLETE,
                f"stopped by a signal after {restored} rows restored"
                if result.stopped
                else f"{result.rows_remaining} rows stayed locked by other writers",
            )
            # The command shows the outcome; as a log line it is a detail.
            logger.info(
                "revert of run %d incomplete: %d rows restored, %d remaining%s",
                result.run.pk,
                restored,
                result.rows_remaining,
                ", stopped by a signal" if result.stopped else "",
            )
            return
        if not self._rebuild_pending_rollup():
            self._record_end(
                BackfillRun.RevertState.STOPPED, "stopped before the rollup was rebuilt"
            )
            return
        fields: dict[str, object] = {
            "status": BackfillRun.Status.REVERTED,
            "reverted_at": Now(),
            "revert_state": BackfillRun.RevertState.DONE,
            "revert_finished_at": Now(),
            "rows_restored": self.restored_before + restored,
            "rollup_state": (
                BackfillRun.RollupState.SKIPPED
                if result.run.rollup_state == BackfillRun.RollupState.SKIPPED
                else BackfillRun.RollupState.DONE
            ),
        }
        if result.rows_changed:
            note = (
                f"reverted; {result.rows_changed} rows changed by others since the run were "
                "left as they are (their journal entries stay active)"
            )
            fields["error"] = f"{note}; {result.run.error}" if result.run.error else note
        BackfillRun.objects.filter(pk=result.run.pk).update(**fields)
        result.run.refresh_from_db()
        logger.info(
            "run %d reverted: %d rows restored, %d left as changed since",
            result.run.pk,
            restored,
            result.rows_changed,
        )

    def _rebuild_pending_rollup(self) -> bool:
        """A run whose own rollup never finished (killed, stopped): rebuild the keys of its
        rows the revert leaves (changed by others since), which nobody rebuilt yet.

        The restored rows' keys were rebuilt by the drains; these are the rest, so that every
        key of the run is right once it is reverted. False when a stop came first (the run
        stays as it is, and the same revert finishes it).
        """
        assert self.result is not None and self.path is not None
        run = self.result.run
        if run.rollup_state != BackfillRun.RollupState.PENDING:
            return True
        try:
            rebuilt = rollup.rebuild_keys(
                [run.pk],
                choice=self.path,
                max_lock_seconds=self.options.max_rollup_lock_seconds,
                lock_timeout=self.options.lock_timeout,
                statement_timeout=max(self.options.statement_timeout, 0),
                neighbours=self._neighbours(),
                should_stop=self.stop.is_set,
                progress=self.progress,
            )
        except (rollup.RollupError, DatabaseError) as exc:
            message = (
                f"run {run.pk}'s rows are restored, but the hourly keys of the rows changed "
                f"since it (its own rollup never finished) could not be rebuilt: "
                f"{batching.describe_failure(exc)}; run the same revert again to finish"
            )
            self._record_end(BackfillRun.RevertState.FAILED, message)
            raise RevertError(message, self.result) from exc
        self.result.rollup.slices.extend(rebuilt.slices)
        self.result.rollup.cancelled_holds.extend(rebuilt.cancelled_holds)
        if rebuilt.stopped:
            self.result.stopped = True
            return False
        return True


def _load_run(run_id: int) -> BackfillRun:
    run = BackfillRun.objects.filter(pk=run_id).first()
    if run is None:
        raise RevertError(
            f"run {run_id} not found in {settings.CODEX_REPAIR_SCHEMA}.backfill_run; give the "
            "number printed as 'Run N' by backfill_codex_usage_cache --execute"
        )
    return run


def _ensure_revertable(run: BackfillRun) -> None:
    if run.status == BackfillRun.Status.REVERTED:
        when = run.reverted_at.strftime("%Y-%m-%d %H:%M:%S UTC") if run.reverted_at else "-"
        raise RevertError(
            f"run {run.pk} was already reverted at {when}; its restored rows are eligible "
            "again, so nothing is left to revert"
        )
    if run.status == BackfillRun.Status.RUNNING:
        raise RevertError(_still_running(run, run.backend_pid))
    if run.status not in REVERTABLE_STATUSES:
        raise RevertError(f"run {run.pk} has status {run.status!r}, which cannot be reverted")


def _still_running(run: BackfillRun, backend_pid: int | None) -> str:
    return (
        f"run {run.pk} is still running (started {run.started_at:%Y-%m-%d %H:%M:%S} UTC by "
        f"{run.os_user}@{run.client_host}, database backend pid {backend_pid}); wait for it "
        "to finish, or stop it, before reverting it"
    )


def _run_lock_holder() -> int | None:
    """The backend holding the run lock, if any: read from pg_locks, never by taking it."""
    with connection.cursor() as cursor:
        cursor.execute(
            RUN_LOCK_HOLDER_SQL,
            {"high": runs.RUN_LOCK_ID >> 32, "low": runs.RUN_LOCK_ID & 0xFFFFFFFF},
        )
        row = cursor.fetchone()
    return row[0] if row else None


def _classify(result: RevertResult, show_changed: int) -> None:
    """Fill the counts of the run's active entries, and list the first changed rows."""
    params = {"run_id": result.run.pk, "limit": show_changed}
    with connection.cursor() as cursor:
        cursor.execute(compose(CLASSIFY_SQL), params)
        restorable, changed, keys = cursor.fetchone()
        listed: Sequence[tuple] = []
        if changed and show_changed > 0:
            cursor.execute(compose(CHANGED_ROWS_SQL), params)
            listed = cursor.fetchall()
    if not result.entries:
        result.entries = restorable + changed
    result.rows_restorable = restorable
    result.rows_changed = changed
    result.rollup_keys = keys
    result.changed = [ChangedRow(*row) for row in listed]
