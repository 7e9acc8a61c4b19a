"""The repair itself: rewrite eligible Codex rows once, in short batches, with a journal.

How it stays linear and safe on a live database:

* One set-based snapshot of the candidates' ids goes into a session temp table, numbered in
  hourly-key order. Batches then walk that numbering by range (a keyset), so no batch ever
  re-scans or re-sorts the remaining candidates.
* Each batch is one short transaction with ``lock_timeout``/``statement_timeout`` set locally.
  It locks its rows with ``SKIP LOCKED`` (ingestion keeps writing), re-checks the row's own
  eligibility under the lock (the workspace scope cannot change), writes the journal entry
  and the update in one statement, and adds its counts to the run record: an update never
  exists without its journal entry.
* Rows skipped because a writer held them are retried after the pass; rows still locked at
  the end are reported and the run does not succeed.
* A timeout rolls the batch back whole and retries it smaller, a bounded number of times.
* Signals are honoured between batches; the rollup is then rebuilt for what was done.
* The hourly rollup is rebuilt afterwards, key by key in short lock slices
  (``usage.repair.rollup.rebuild_keys``), also for the rows of earlier runs that died before
  rebuilding theirs.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import F

from usage import cron, privileges, render
from usage.db import (
    check_target,
    database_now,
    drop_temp_table,
    error_text,
    reconnect_if_dead,
    set_local_timeouts,
)
from usage.eligibility import COUNT_ELIGIBLE_SQL, compose, eligible_params
from usage.events import log_event
from usage.models import BackfillRun
from usage.repair import rollup, runs
from usage.repair.batching import (
    BatchTimeoutError,
    BatchWords,
    Halving,
    RunError,
    RunLimits,
    describe_failure,
    retry_locked,
)
from usage.repair.progress import Progress, no_progress
from usage.repair.summary import ensure_cutoff_in_past

logger = logging.getLogger("usage.backfill")

# How the repair's messages name its batches.
WORDS = BatchWords(
    batch="a batch",
    unit="rows",
    kept="the work done so far is kept: re-run later",
    retrying="batch timed out (%(kind)s); rolled back, retrying with %(size)d rows",
)
# After a failure or a stop, counting the rows still eligible may take this long at most.
REMAINING_COUNT_TIMEOUT_SECONDS = 60.0

WORK_TABLE = "pg_temp.codex_backfill_work"

DROP_WORK_TABLE_SQL = f"DROP TABLE IF EXISTS {WORK_TABLE}"

# The snapshot: the candidates numbered in their physical order (``ctid``), so that a batch
# locks and rewrites a few neighbouring heap pages rather than a page a row (measured at
# 1,000,000 rows: 35 s of batches instead of 48 s, for the same WAL), and so that a batch's
# rows, which ingestion wrote in time order, fall in a few bucket hours (the revert's rebuild
# reads those hours). Each row also gets its hourly key's rank in the key order (the keys of
# one bucket hour together): the rank decides the row's updated_at stamp (see STAMP), so that
# a range of keys is a range of time, and a window of stamps falls in a few bucket hours (the
# own rollup's proof reads them). Created by CREATE TABLE AS, whose query may use parallel
# workers (an INSERT's may not), and indexed once it is full.
SNAPSHOT_KEY_ORDER = "{bucket_hour}, q.agent_id, q.runtime_id, i.project_id, tu.provider, tu.model"
CREATE_WORK_TABLE_SQL = f"""
CREATE TEMP TABLE codex_backfill_work (seq, id, tid, rank) ON COMMIT PRESERVE ROWS AS
SELECT row_number() OVER (ORDER BY tu.ctid),
       tu.id,
       tu.ctid,
       dense_rank() OVER (ORDER BY {SNAPSHOT_KEY_ORDER})
FROM {{eligible_from}}
LEFT JOIN {{issue}} i ON i.id = q.issue_id
WHERE {{eligible_where}}"""
INDEX_WORK_TABLE_SQL = f"ALTER TABLE {WORK_TABLE} ADD PRIMARY KEY (seq)"
# The hourly keys of the snapshot (the highest rank): the stamp policy spreads them.
WORK_TABLE_KEYS_SQL = f"SELECT coalesce(max(rank), 0) FROM {WORK_TABLE}"

ANALYZE_WORK_TABLE_SQL = f"ANALYZE {WORK_TABLE}"


# The updated_at a batch writes (see usage.cron.StampPolicy): the run's top stamp (just below
# the platform rollup's watermark, or the start of the run when no watermark is usable) less
# the row's key rank spread over the microseconds there are, always strictly after the cutoff.
# The journal's repaired_at keeps the true time of the repair.
STAMP = (
    "%(stamp_top)s - ((w.rank - 1) * %(stamp_slots)s / %(stamp_keys)s) * interval '1 microsecond'"
)

# One batch: lock, re-check, journal and update in one statement. ``{selector}`` picks the
# batch's rows from the snapshot (a seq range, or the next still-eligible rows on a retry;
# see RANGE_BATCH and RETRY_BATCH), ``{find}`` how each is found in task_usage.
# The re-check under the lock is the row's own part of the eligibility (what a concurrent
# writer can change); the snapshot already applied the workspace scope, which cannot change.
BATCH_SQL = f"""
WITH locked AS (
    SELECT tu.id, tu.input_tokens, tu.cache_read_tokens, tu.updated_at, {STAMP} AS stamp
    FROM {WORK_TABLE} w
    JOIN {{task_usage}} tu ON {{find}}
    WHERE {{selector}}
      AND {{row_eligible_where}}
    ORDER BY w.seq
    {{limit}}
    FOR NO KEY UPDATE OF tu SKIP LOCKED
),
journaled AS (
    INSERT INTO {{journal}} (
        run_id, usage_id, old_input_tokens, old_updated_at,
        new_input_tokens, cache_read_tokens, new_updated_at, repaired_at
    )
    SELECT %(run_id)s, l.id, l.input_tokens, l.updated_at,
           greatest(l.input_tokens - l.cache_read_tokens, 0), l.cache_read_tokens, l.stamp, now()
    FROM locked l
    RETURNING usage_id
),
updated AS (
    UPDATE {{task_usage}} tu
    SET input_tokens = {{corrected_input}}, updated_at = l.stamp
    FROM locked l
    WHERE tu.id = l.id
    RETURNING least(l.input_tokens, l.cache_read_tokens) AS removed,
              l.input_tokens < l.cache_read_tokens AS clamped,
              l.stamp
)
SELECT (SELECT count(*) FROM journaled),
       count(*),
       coalesce(sum(removed), 0)::bigint,
       count(*) FILTER (WHERE clamped),
       min(stamp),
       max(stamp)
FROM updated"""

# The two kinds of batch, as the parts of BATCH_SQL that differ: a range of the snapshot's
# numbering, or (a retry) the next rows of the snapshot that are still eligible.
# A range batch finds its rows where the snapshot saw them (``ctid``: no index descent), and
# checks the id: a row written since has moved, is not found, and counts as not updated, so
# the retry after the pass (by id, through the primary key) takes it if it is still eligible.
RANGE_BATCH = {
    "selector": "w.seq > %(after)s AND w.seq <= %(upto)s",
    "limit": "",
    "find": "tu.ctid = w.tid AND tu.id = w.id",
}
RETRY_BATCH = {"selector": "TRUE", "limit": "LIMIT %(limit)s", "find": "tu.id = w.id"}

REMAINING_IN_WORK_SQL = f"""
SELECT count(*)
FROM {WORK_TABLE} w
JOIN {{task_usage}} tu ON tu.id = w.id
WHERE {{row_eligible_where}}"""


class BackfillError(RunError):
    """The repair stopped; the message says what to do. The run record says what was done."""

    result: ExecuteResult | None


@dataclass(frozen=True)
class ExecuteOptions(RunLimits):
    cutoff: datetime
    workspace_id: uuid.UUID | None = None
    sleep_between_batches: float = 0.0
    rebuild_rollup: bool = True
    max_replication_lag: float | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    # A saved plan's check (``usage.plan``): called under the run lock once the snapshot is
    # taken and before the run record exists; it raises to refuse the run (nothing written)
    # and returns fields for the run record.
    check_snapshot: Callable[[], dict[str, Any]] | None = None


@dataclass(frozen=True)
class BatchResult:
    number: int
    rows: int
    input_tokens_removed: int
    clamped_rows: int
    batch_size: int
    seconds: float
    first_stamp: datetime | None
    last_stamp: datetime | None
    retry: bool = False


@dataclass
class ExecuteResult:
    run: BackfillRun
    rows_planned: int = 0
    rows_updated: int = 0
    input_tokens_removed: int = 0
    clamped_rows: int = 0
    rows_remaining: int = 0
    batches: int = 0
    stopped: bool = False
    stale_runs: list[int] = field(default_factory=list)
    recovered_runs: list[int] = field(default_factory=list)
    rollup: rollup.RollupResult | None = None
    update_seconds: float = 0.0
    stamp: cron.StampPolicy | None = None
    path: rollup.PathChoice | None = None
    # The earliest and the latest updated_at the run wrote.
    stamp_first: datetime | None = None
    stamp_last: datetime | None = None

    def add(self, batch: BatchResult) -> None:
        self.batches += 1
        self.rows_updated += batch.rows
        self.input_tokens_removed += batch.input_tokens_removed
        self.clamped_rows += batch.clamped_rows
        if batch.first_stamp is not None:
            self.stamp_first = min(filter(None, (self.stamp_first, batch.first_stamp)))
        if batch.last_stamp is not None:
            self.stamp_last = max(filter(None, (self.stamp_last, batch.last_stamp)))


class StopRequests(threading.Event):
    """A stop flag that counts its requests (signals).

    The first request stops the batches, and the rollup is still rebuilt for what was done;
    a request that arrives once the rollup has begun stops the rollup between slices.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def set(self) -> None:
        self.count += 1
        super().set()


class Backfill:
    """One execute run. Use ``execute_backfill``; this class only keeps its state together."""

    def __init__(self, options: ExecuteOptions, stop: threading.Event, progress: Progress) -> None:
        self.options = options
        self.stop = stop
        self.progress = progress
        self.params = eligible_params(options.cutoff, options.workspace_id)
        self.halving = Halving(options.batch_size, WORDS, logger)
        self.result: ExecuteResult | None = None
        # Snapshot rows a range batch did not update (locked by a writer, or no longer
        # eligible). While it is 0 every row walked so far was repaired, and counting what
        # is left of the snapshot (a pass over all of it) can be skipped.
        self.range_shortfall = 0
        self.snapshot_rows = 0

    # -- the run -------------------------------------------------------------------------

    def run(self) -> ExecuteResult:
        check_target()
        ensure_cutoff_in_past(self.options.cutoff, database_now())
        path = self._check_privileges()
        with runs.run_lock():
            try:
                self.snapshot_rows, keys = self._snapshot()
                checked = self.options.check_snapshot() if self.options.check_snapshot else {}
            except BaseException:
                self._drop_work_table()
                raise
            stale = runs.mark_stale_runs()
            state = cron.read_state()
            policy = (
                cron.choose_stamp(self.options.cutoff, state, keys)
                if self.options.rebuild_rollup
                else cron.stamp_for_the_tick(self.options.cutoff, state, keys)
            )
            self.params.update(policy.params())
            run = runs.start_run(
                arguments=self.options.arguments,
                cutoff=self.options.cutoff,
                workspace_id=self.options.workspace_id,
                batch_size=self.options.batch_size,
                rollup_state=(
                    BackfillRun.RollupState.PENDING
                    if self.options.rebuild_rollup
                    else BackfillRun.RollupState.SKIPPED
                ),
                stamp=policy.stamp,
                stamp_base=policy.top,
                watermark_at_start=policy.watermark_at,
                rows_planned=self.snapshot_rows,
                **_path_fields(path),
                **checked,
            )
            self.result = ExecuteResult(run=run, stale_runs=stale, stamp=policy, path=path)
            log_event(logger, logging.INFO, "start", f"run {run.pk} started", run_id=run.pk)
            self.progress("started", run=run)
            log_event(
                logger,
                logging.INFO,
                "stamp",
                policy.reason,
                run_id=run.pk,
                stamp=policy.stamp,
                watermark_at=policy.watermark_at,
                first=policy.first,
                top=policy.top,
                keys=policy.keys,
            )
            self.progress("stamping", policy=policy)
            if path is not None:
                log_event(
                    logger,
                    logging.INFO,
                    "rollup_path",
                    path.reason,
                    run_id=run.pk,
                    path=path.path,
                    function=path.function,
                    fingerprint=path.fingerprint,
                )
                self.progress(
                    "rollup_path",
                    path=path.path,
                    function=path.function,
                    fingerprint=path.fingerprint,
                    reason=path.reason,
                )
            try:
                self._update_phase()
            except BatchTimeoutError as exc:
                message = str(exc) + self._count_remaining()
                self._rebuild_rollup_quietly()
                self._finish(BackfillRun.Status.FAILED, message)
                raise BackfillError(message, self.result) from None
            except BaseException as exc:
                message = describe_failure(exc) + self._count_remaining()
                self._finish_after_error(message)
                raise BackfillError(message, self.result) from exc
            finally:
                self._drop_work_table()
            return self._finish_normally()

    def _check_privileges(self) -> rollup.PathChoice | None:
        """The rollup's path, and every privilege the run needs to finish, before it writes.

        A role that could repair the rows but not rebuild their keys (no EXECUTE on the
        function, say) would leave keys no cron tick ever fixes: refused here, in one line.
        """
        path = (
            rollup.choose_path(self.options.rollup_path) if self.options.rebuild_rollup else None
        )
        with connection.cursor() as cursor:
            needs = privileges.requirements(
                rebuild_rollup=self.options.rebuild_rollup,
                security_definer=privileges.function_runs_as_owner(cursor),
                own_path=path is not None and path.own,
            )
            privileges.refuse_missing(cursor, needs, "the repair")
        return path

    def _update_phase(self) -> None:
        assert self.result is not None
        started = time.monotonic()
        planned = self.snapshot_rows
        self.result.rows_planned = planned
        BackfillRun.objects.filter(pk=self.result.run.pk).update(rollup_from=database_now())
        log_event(
            logger,
            logging.INFO,
            "planned",
            f"run {self.result.run.pk}: {planned} candidate rows",
            run_id=self.result.run.pk,
            rows_planned=planned,
        )
        self.progress("planned", rows=planned)
        after = 0
        while after < planned and not self.stop.is_set():
            upto = min(after + self.halving.size, planned)
            self._batch(RANGE_BATCH, {"after": after, "upto": upto})
            after = upto
            if after < planned:
                self._pause_between_batches()
        remaining = 0
        if self.range_shortfall and not self.stop.is_set():
            remaining = self._retry_locked_rows()
        self.result.rows_remaining = remaining
        if self.stop.is_set():
            self.result.stopped = True
            self._count_remaining()
        BackfillRun.objects.filter(pk=self.result.run.pk).update(
            rollup_to=database_now(),
            rows_remaining=self.result.rows_remaining,
            stamp_first=self.result.stamp_first,
            stamp_last=self.result.stamp_last,
        )
        if self.result.stamp_first is not None:
            log_event(
                logger,
                logging.INFO,
                "stamped",
                f"run {self.result.run.pk} wrote stamps from "
                f"{render.timestamp(self.result.stamp_first, microseconds=True)} to "
                f"{render.timestamp(self.result.stamp_last, microseconds=True)}",
                run_id=self.result.run.pk,
                first=self.result.stamp_first,
                last=self.result.stamp_last,
            )
            self.progress("stamped", first=self.result.stamp_first, last=self.result.stamp_last)
        self.result.update_seconds = time.monotonic() - started

    def _pause_between_batches(self) -> None:
        """The operator's throttle, then wait while replicas lag too far behind."""
        seconds = self.options.sleep_between_batches
        if seconds > 0:
            log_event(
                logger,
                logging.DEBUG,
                "pause",
                f"pause {seconds:.3f}s",
                reason="sleep",
                seconds=seconds,
            )
            self.progress("paused", reason="sleep between batches", seconds=seconds)
            self.stop.wait(seconds)
        if self.options.max_replication_lag is not None and not self.stop.is_set():
            from usage import replication

            def on_lag(reason: str) -> None:
                log_event(
                    logger,
                    logging.INFO,
                    "pause",
                    f"paused: {reason}",
                    reason="replication_lag",
                    detail=reason,
                )
                self.progress("paused", reason=reason, seconds=None)

            replication.wait_for_replicas(self.options.max_replication_lag, self.stop, on_lag)

    def _snapshot(self) -> tuple[int, int]:
        """Number the candidates into the session's work table; its rows and hourly keys."""
        with connection.cursor() as cursor:
            cursor.execute(DROP_WORK_TABLE_SQL)
            with transaction.atomic():
                set_local_timeouts(cursor, self.options.lock_timeout, 0)
                cursor.execute(compose(CREATE_WORK_TABLE_SQL), self.params)
                planned = cursor.rowcount
                cursor.execute(INDEX_WORK_TABLE_SQL)
            cursor.execute(ANALYZE_WORK_TABLE_SQL)
            cursor.execute(WORK_TABLE_KEYS_SQL)
            keys = int(cursor.fetchone()[0])
        return planned, keys

    def _batch(self, kind: dict[str, str], selector: dict[str, int]) -> BatchResult:
        """Run one batch, halving it on a timeout; return what it did."""
        assert self.result is not None
        while True:
            started = time.monotonic()
            done = self.halving.attempt(functools.partial(self._batch_statement, kind, selector))
            if done is None:
                continue  # timed out and rolled back: the same rows, fewer at a time
            params, size, (rows, removed, clamped, first_stamp, last_stamp) = done
            if "upto" in selector:
                self.range_shortfall += params["upto"] - params["after"] - rows
            batch = BatchResult(
                number=self.result.batches + 1,
                rows=rows,
                input_tokens_removed=removed,
                clamped_rows=clamped,
                batch_size=size,
                seconds=time.monotonic() - started,
                first_stamp=first_stamp,
                last_stamp=last_stamp,
                retry=kind is RETRY_BATCH,
            )
            self.result.add(batch)
            log_event(
                logger,
                logging.DEBUG,
                "batch",
                f"batch {batch.number}: {rows} rows, {removed} input tokens removed, "
                f"{clamped} clamped, {batch.seconds:.3f}s",
                run_id=self.result.run.pk,
                batch=batch.number,
                rows=rows,
                input_tokens_removed=removed,
                clamped_rows=clamped,
                batch_size=size,
                seconds=round(batch.seconds, 6),
                rows_done=self.result.rows_updated,
                rows_planned=self.result.rows_planned,
                retry=batch.retry,
            )
            self.progress("batch", batch=batch, result=self.result)
            if "upto" in selector and params["upto"] < selector["upto"]:
                # A timeout shrank the batch: finish the rest of the range in smaller pieces.
                selector = {"after": params["upto"], "upto": selector["upto"]}
                continue
            return batch

    def _batch_statement(
        self, kind: dict[str, str], selector: dict[str, int], size: int
    ) -> tuple[dict[str, Any], int, tuple[int, int, int, Any, Any]]:
        """One batch's statement, in its own transaction; its parameters, size and figures."""
        assert self.result is not None
        params = dict(self.params, run_id=self.result.run.pk, limit=size, **selector)
        if "upto" in selector:
            params["upto"] = min(selector["upto"], selector["after"] + size)
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.options.lock_timeout, self.options.statement_timeout)
            cursor.execute(compose(BATCH_SQL, **kind), params)
            journaled, rows, removed, clamped, first_stamp, last_stamp = cursor.fetchone()
            if journaled != rows:
                raise RuntimeError(
                    f"journal wrote {journaled} entries for {rows} updated rows; batch rolled back"
                )
            if rows:
                BackfillRun.objects.filter(pk=self.result.run.pk).update(
                    rows_updated=F("rows_updated") + rows,
                    input_tokens_removed=F("input_tokens_removed") + removed,
                    clamped_rows=F("clamped_rows") + clamped,
                )
        return params, size, (rows, removed, clamped, first_stamp, last_stamp)

    def _retry_locked_rows(self) -> int:
        """Give rows skipped for a writer's lock a few more chances once it lets go.

        Returns how many rows of the snapshot are still eligible (still locked) at the end.
        """

        def retry_pass() -> None:
            while not self.stop.is_set():
                if self._batch(RETRY_BATCH, {}).rows == 0:
                    break

        return retry_locked(
            self.options.lock_retry_delays,
            self.stop,
            self._remaining_in_work,
            retry_pass,
            logger,
        )

    def _remaining_in_work(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute(compose(REMAINING_IN_WORK_SQL), self.params)
            return cursor.fetchone()[0]

    # -- rollup and the end of the run ---------------------------------------------------

    def _rebuild_rollup(self) -> None:
        """Rebuild the hourly keys of this run's rows and of earlier runs that died first."""
        assert self.result is not None
        run = self.result.run
        pending = [r.pk for r in _runs_with_pending_rollup(exclude=run.pk)]
        run_ids = [*pending, run.pk] if self.result.rows_updated else pending
        if not run_ids:
            BackfillRun.objects.filter(pk=run.pk).update(rollup_state=BackfillRun.RollupState.DONE)
            self.result.rollup = rollup.RollupResult()
            return
        try:
            result = rollup.rebuild_keys(
                run_ids,
                choice=self.result.path,
                max_lock_seconds=self.options.max_rollup_lock_seconds,
                lock_timeout=self.options.lock_timeout,
                statement_timeout=self.options.statement_timeout,
                neighbours=rollup.NeighbourOptions(tick_interval=self.options.cron_tick_interval),
                should_stop=self._rollup_stop_check(),
                progress=self.progress,
            )
        except rollup.RollupError as exc:
            if exc.result is not None:  # what it did, its longest hold included, is recorded
                self.result.rollup = exc.result
                self._record_rollup(exc.result)
            raise
        self.result.rollup = result
        if not result.stopped:
            BackfillRun.objects.filter(pk__in=[*pending, run.pk]).update(
                rollup_state=BackfillRun.RollupState.DONE
            )
            self.result.recovered_runs.extend(pending)
        self._record_rollup(result)

    def _record_rollup(self, result: rollup.RollupResult) -> None:
        """The rollup's figures on the run record; the path too, when a failed proof changed
        it."""
        assert self.result is not None
        run = self.result.run
        fields: dict[str, Any] = {}
        if self.result.path is not None and result.path != self.result.path.path:
            # The own path's proof failed: the function rebuilt the keys; the record says why.
            fields = {"rollup_path": result.path, "rollup_path_reason": result.path_reason}
            log_event(
                logger,
                logging.WARNING,
                "rollup_path",
                result.path_reason,
                run_id=run.pk,
                path=result.path,
            )
        BackfillRun.objects.filter(pk=run.pk).update(
            rollup_slices=len(result.slices),
            rollup_rows=result.rollup_rows,
            rollup_max_lock_seconds=result.max_lock_held_seconds,
            rollup_keys=result.keys_done,
            rollup_seconds=result.seconds,
            rollup_hash_slices=result.hash_slices,
            rollup_cron_waits=result.cron_waits,
            rollup_cron_wait_seconds=result.cron_wait_seconds,
            **fields,
        )

    def _rollup_stop_check(self) -> Callable[[], bool]:
        """Whether a stop request arrived after the rollup began (see ``StopRequests``)."""
        count = getattr(self.stop, "count", None)
        if count is not None:
            return lambda: self.stop.count > count  # type: ignore[attr-defined]
        if self.stop.is_set():
            return lambda: False
        return self.stop.is_set

    def _rebuild_rollup_quietly(self) -> None:
        if not self.options.rebuild_rollup:
            return
        try:
            self._rebuild_rollup()
        except Exception as exc:  # noqa: BLE001 - the run's own failure is what is reported
            logger.warning("rollup rebuild failed (%s); the next run rebuilds it", error_text(exc))

    def _finish_normally(self) -> ExecuteResult:
        assert self.result is not None
        if self.options.rebuild_rollup:
            try:
                self._rebuild_rollup()
            except (rollup.RollupError, DatabaseError) as exc:
                message = f"rows repaired, but the rollup rebuild failed: {describe_failure(exc)}"
                self._finish_after_error(message)
                raise BackfillError(message, self.result) from exc
        rollup_result = self.result.rollup
        if rollup_result is not None and rollup_result.stopped:
            self._finish(
                BackfillRun.Status.INTERRUPTED,
                f"stopped by a signal during the rollup rebuild ({rollup_result.keys_done} of "
                f"{rollup_result.keys_total} hourly keys rebuilt); re-running the same command "
                "rebuilds the rest",
            )
        elif self.result.stopped:
            self._finish(
                BackfillRun.Status.INTERRUPTED,
                "stopped by a signal; re-running the same command resumes",
            )
        elif self.result.rows_remaining:
            self._finish(
                BackfillRun.Status.FAILED,
                f"{self.result.rows_remaining} eligible rows stayed locked by other writers",
            )
        else:
            self._finish(BackfillRun.Status.SUCCEEDED, "")
        return self.result

    def _count_remaining(self) -> str:
        """Count the rows still eligible after a failure or a stop; never assume them.

        On a fresh connection if the run's own died. Returns "" once counted, else a note
        for the error text (the record then keeps the upper bound, planned less updated).
        """
        assert self.result is not None
        try:
            reconnect_if_dead()
            with transaction.atomic(), connection.cursor() as cursor:
                set_local_timeouts(
                    cursor, self.options.lock_timeout, REMAINING_COUNT_TIMEOUT_SECONDS
                )
                cursor.execute(compose(COUNT_ELIGIBLE_SQL), self.params)
                self.result.rows_remaining = cursor.fetchone()[0]
            return ""
        except Exception as exc:  # noqa: BLE001 - the run's own failure is what is reported
            bound = max(self.result.rows_planned - self.result.rows_updated, 0)
            self.result.rows_remaining = bound
            return f"; rows remaining not counted ({error_text(exc)}): at most {bound}"

    def _finish(self, status: str, error: str) -> None:
        assert self.result is not None
        runs.finish_run(
            self.result.run, status, error=error, rows_remaining=self.result.rows_remaining
        )
        r = self.result
        log_event(
            logger,
            logging.INFO if status == BackfillRun.Status.SUCCEEDED else logging.WARNING,
            "end",
            f"run {r.run.pk} {status}: {r.rows_updated} rows updated, "
            f"{r.rows_remaining} remaining",
            run_id=r.run.pk,
            status=status,
            rows_planned=r.rows_planned,
            rows_updated=r.rows_updated,
            rows_remaining=r.rows_remaining,
            input_tokens_removed=r.input_tokens_removed,
            clamped_rows=r.clamped_rows,
            error=error,
        )

    def _finish_after_error(self, message: str) -> None:
        assert self.result is not None
        status = (
            BackfillRun.Status.INTERRUPTED if self.stop.is_set() else BackfillRun.Status.FAILED
        )
        try:
            self._finish(status, message)
        except Exception as exc:  # noqa: BLE001 - the run's own failure is what is reported
            logger.warning(
                "could not record the end of run %d: %s", self.result.run.pk, error_text(exc)
            )

    def _drop_work_table(self) -> None:
        drop_temp_table(DROP_WORK_TABLE_SQL, "work table", logger)


def _path_fields(path: rollup.PathChoice | None) -> dict[str, str]:
    """The run record's fields for the rollup's path (none with --no-rebuild-rollup)."""
    if path is None:
        return {}
    return {
        "rollup_path": path.path,
        "rollup_function": path.function,
        "rollup_fingerprint": path.fingerprint,
        "rollup_path_reason": path.reason,
    }


def execute_backfill(
    options: ExecuteOptions,
    *,
    stop: threading.Event | None = None,
    progress: Progress = no_progress,
) -> ExecuteResult:
    """Repair the eligible rows and rebuild their rollup; see the module docstring.

    ``progress`` is called with each event of the run (see ``batching.Progress``).
    """
    return Backfill(options, stop or StopRequests(), progress).run()


def _runs_with_pending_rollup(exclude: int) -> list[BackfillRun]:
    return list(
        BackfillRun.objects.filter(rollup_state=BackfillRun.RollupState.PENDING)
        .exclude(pk=exclude)
        .exclude(status__in=[BackfillRun.Status.RUNNING, BackfillRun.Status.REVERTED])
        .order_by("pk")
    )
