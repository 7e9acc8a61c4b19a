"""The repair, the chunk engine's forward direction: the candidates numbered in a temp table,
batches that journal and update them, then the rebuild of the hourly keys the run touched."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models.functions import Now

from usage import cron, db, render, replication
from usage.db import check_target, database_now, error_text, set_local_timeouts
from usage.eligibility import COUNT_ELIGIBLE_SQL, compose, eligible_params
from usage.events import log_event, pick
from usage.models import BackfillRun
from usage.options import MAX_BATCH_SIZE
from usage.repair import batching, rollup, runs
from usage.repair.summary import ensure_cutoff_in_past

logger = logging.getLogger("usage.backfill")

REMAINING_COUNT_TIMEOUT_SECONDS = 60.0  # counting what is left after a failure or a stop
# Batches are sized for a time, not a count (docs/design.md, "How a run works", 4).
FIRST_BATCH_SIZE = 1000
DEFAULT_BATCH_SECONDS = 0.5

WORK_TABLE = "pg_temp.codex_backfill_work"
DROP_WORK_TABLE_SQL = f"DROP TABLE IF EXISTS {WORK_TABLE}"

# The candidates in physical order (a batch rewrites neighbouring heap pages: 35 s instead of
# 48 s at 1,000,000 rows) with their key's rank (the stamp's). CREATE TABLE AS may run parallel.
SNAPSHOT_KEY_ORDER = "{bucket_hour}, q.agent_id, q.runtime_id, i.project_id, tu.provider, tu.model"
CREATE_WORK_TABLE_SQL = f"""
CREATE TEMP TABLE codex_backfill_work (seq, id, tid, rank) ON COMMIT PRESERVE ROWS AS
SELECT row_number() OVER (ORDER BY tu.ctid), tu.id, tu.ctid,
       dense_rank() OVER (ORDER BY {SNAPSHOT_KEY_ORDER})
FROM {{task_usage}} tu {{key_joins}}
WHERE {{eligible_where}}"""
INDEX_WORK_TABLE_SQL = f"ALTER TABLE {WORK_TABLE} ADD PRIMARY KEY (seq)"
ANALYZE_WORK_TABLE_SQL = f"ANALYZE {WORK_TABLE}"
WORK_TABLE_KEYS_SQL = f"SELECT coalesce(max(rank), 0) FROM {WORK_TABLE}"

# The updated_at a batch writes (usage.cron.StampPolicy), by the key's rank.
STAMP = (
    "%(stamp_top)s - ((w.rank - 1) * %(stamp_slots)s / %(stamp_keys)s) * interval '1 microsecond'"
)

# One batch: lock, re-check the row's own eligibility, journal and update, and add the counts
# to the run record, in one statement (an update never exists without its journal entry).
BATCH_SQL = f"""
WITH locked AS (
    SELECT tu.id, tu.input_tokens, tu.cache_read_tokens, tu.updated_at, {STAMP} AS stamp
    FROM {WORK_TABLE} w JOIN {{task_usage}} tu ON {{find}}
    WHERE {{selector}} AND {{row_eligible_where}}
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
    FROM locked l RETURNING usage_id
),
updated AS (
    UPDATE {{task_usage}} tu SET input_tokens = {{corrected_input}}, updated_at = l.stamp
    FROM locked l WHERE tu.id = l.id
    RETURNING least(l.input_tokens, l.cache_read_tokens) AS removed,
              l.input_tokens < l.cache_read_tokens AS clamped,
              l.stamp
),
totals AS (
    SELECT count(*) AS rows, coalesce(sum(removed), 0)::bigint AS removed,
           count(*) FILTER (WHERE clamped) AS clamped, min(stamp) AS first, max(stamp) AS last
    FROM updated
),
recorded AS (
    UPDATE {{run}} r SET rows_updated = r.rows_updated + t.rows,
        input_tokens_removed = r.input_tokens_removed + t.removed,
        clamped_rows = r.clamped_rows + t.clamped
    FROM totals t WHERE r.id = %(run_id)s AND t.rows > 0
)
SELECT (SELECT count(*) FROM journaled), rows, removed, clamped, first, last FROM totals"""

FIGURES = ("journal", "rows", "input_tokens_removed", "clamped_rows", "first_stamp", "last_stamp")
# A range of the snapshot, found by a TID scan of its ctids (a row written since has moved:
# the retry finds it), or (a retry) the next rows of the snapshot still eligible, found by id.
RANGE_BATCH = {
    "selector": "w.seq > %(after)s AND w.seq <= %(upto)s",
    "limit": "",
    "find": f"""tu.id = w.id AND tu.ctid = ANY (ARRAY(
        SELECT r.tid FROM {WORK_TABLE} r WHERE r.seq > %(after)s AND r.seq <= %(upto)s))""",
}
RETRY_BATCH = {"selector": "TRUE", "limit": "LIMIT %(limit)s", "find": "tu.id = w.id"}

REMAINING_IN_WORK_SQL = f"""
SELECT count(*) FROM {WORK_TABLE} w JOIN {{task_usage}} tu ON tu.id = w.id
WHERE {{row_eligible_where}}"""


class BackfillError(batching.RunError):
    """The repair stopped; the message says what to do."""


@dataclass(frozen=True)
class ExecuteOptions(batching.RunLimits):
    cutoff: datetime
    batch_size: int = field(default=MAX_BATCH_SIZE, kw_only=True)  # the most rows a batch takes
    batch_seconds: float = DEFAULT_BATCH_SECONDS  # the time a batch is sized for
    workspace_id: uuid.UUID | None = None
    sleep_between_batches: float = 0.0
    rebuild_rollup: bool = True
    max_replication_lag: float | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    # A saved plan's check (``usage.plan``) of the snapshot: it raises, or returns record fields.
    check_snapshot: Callable[[], dict[str, Any]] | None = None


@dataclass(kw_only=True)
class ExecuteResult(batching.RunResult):
    rows_planned: int = 0
    rows_updated: int = 0
    input_tokens_removed: int = 0
    clamped_rows: int = 0
    recovered_runs: list[int] = field(default_factory=list)
    rollup: rollup.RollupResult | None = None
    stamp: cron.StampPolicy | None = None
    stamp_first: datetime | None = None
    stamp_last: datetime | None = None

    def add(self, batch: batching.Batch) -> None:
        self.rows_updated += batch.rows
        self.input_tokens_removed += batch.input_tokens_removed
        self.clamped_rows += batch.clamped_rows
        if batch.first_stamp is not None:  # and the last: both None when it updated none
            self.stamp_first = min(filter(None, (self.stamp_first, batch.first_stamp)))
            self.stamp_last = max(filter(None, (self.stamp_last, batch.last_stamp)))


class Repair(batching.Chunks[ExecuteOptions, ExecuteResult]):
    """One execute run, the engine's forward direction."""

    logger, error = logger, BackfillError
    timed_out = (
        "a batch timed out {times} times, down to {size} rows ({error}); the work done so far "
        "is kept: re-run later"
    )
    retrying = "batch timed out (%(kind)s); rolled back, retrying with %(size)d rows"
    unequal = "journal wrote %d entries for %d updated rows"
    shown = {"started", "stamping", "rollup_path", "planned", "batch", "paused", "stamped"}
    sql, figures, range_batch, retry_batch = BATCH_SQL, FIGURES, RANGE_BATCH, RETRY_BATCH

    def run(self) -> ExecuteResult:
        check_target()
        options = self.options
        self.size = min(options.batch_size, FIRST_BATCH_SIZE)
        self.params = eligible_params(options.cutoff, options.workspace_id)
        self.range_shortfall = 0  # snapshot rows a range batch did not update
        ensure_cutoff_in_past(options.cutoff, database_now())
        path = self.checked_path("the repair", options.rebuild_rollup)
        details = {} if path is None else pick(path, "path", "function", "fingerprint", "reason")
        with runs.run_lock():
            try:
                planned, keys = self._snapshot()
                checked = options.check_snapshot() if options.check_snapshot else {}
                stale = runs.mark_stale_runs()
                choose = cron.choose_stamp if options.rebuild_rollup else cron.stamp_for_the_tick
                policy = choose(options.cutoff, cron.read_state(), keys)
                self.params.update(policy.params())
                State = BackfillRun.RollupState
                run = runs.start_run(
                    **pick(options, "arguments", "cutoff", "workspace_id", "batch_size"),
                    rollup_state=State.PENDING if options.rebuild_rollup else State.SKIPPED,
                    stamp=policy.stamp,
                    stamp_base=policy.top,
                    watermark_at_start=policy.watermark_at,
                    rows_planned=planned,
                    rollup_path=details.get("path", ""),
                    rollup_function=details.get("function", ""),
                    rollup_fingerprint=details.get("fingerprint", ""),
                    rollup_path_reason=details.get("reason", ""),
                    **checked,
                )
                self.result = ExecuteResult(
                    run=run, stale_runs=stale, stamp=policy, path=path, rows_planned=planned
                )
                self.events("started", run=run)
                self.events("stamping", policy=policy)
                if path is not None:
                    self.events("rollup_path", **details)
                self.guard(self._update_phase)
            finally:
                db.drop_temp_table(DROP_WORK_TABLE_SQL, "work table", logger)
            return self._finish_normally()

    def _snapshot(self) -> tuple[int, int]:
        """Number the candidates into the work table; its rows and hourly keys."""
        with connection.cursor() as cursor:
            cursor.execute(DROP_WORK_TABLE_SQL)
            with transaction.atomic():
                set_local_timeouts(cursor, self.options.lock_timeout, 0)
                cursor.execute(compose(CREATE_WORK_TABLE_SQL), self.params)
                planned = cursor.rowcount
                cursor.execute(INDEX_WORK_TABLE_SQL)
            cursor.execute(ANALYZE_WORK_TABLE_SQL)
            cursor.execute(WORK_TABLE_KEYS_SQL)
            return planned, int(cursor.fetchone()[0])

    def _update_phase(self) -> None:
        result = self.result
        self.record(rollup_from=database_now())
        self.events("planned", rows=result.rows_planned)
        result.rows_remaining = self.walk(0, result.rows_planned)
        if self.stop.is_set():
            result.stopped = True
            self._count_remaining()
        stamps = pick(result, "rows_remaining", "stamp_first", "stamp_last")
        self.record(rollup_to=database_now(), **stamps)
        if result.stamp_first is not None:
            self.events("stamped", first=result.stamp_first, last=result.stamp_last)

    def settle(self, batch: batching.Batch, selector: dict[str, Any]) -> None:
        """Count the range's rows left behind; size the next batch for the target time."""
        if not batch.retry:
            self.range_shortfall += selector["upto"] - selector["after"] - batch.rows
        pace = min(2.0, max(0.5, self.options.batch_seconds / max(batch.seconds, 0.001)))
        self.size = max(1, min(self.options.batch_size, int(batch.batch_size * pace)))

    def log_view(self, event: str, /, **d: Any) -> None:
        """The repair's events in its log: records with their JSON line's name and fields."""
        result = self.result
        run_id = result.run.pk
        level, name, fields = logging.INFO, event, {"run_id": run_id}
        if event == "started":
            name, message = "start", f"run {run_id} started"
        elif event == "stamping":
            name, message = "stamp", d["policy"].reason
            fields.update(pick(d["policy"], "stamp", "watermark_at", "first", "top", "keys"))
        elif event in ("rollup_path", "path_changed"):
            level = logging.INFO if event == "rollup_path" else logging.WARNING
            name, message = "rollup_path", d.pop("reason")
            fields.update(d)
        elif event == "planned":
            message = f"run {run_id}: {d['rows']} candidate rows"
            fields["rows_planned"] = d["rows"]
        elif event == "batch":
            b = d["batch"]
            level = logging.DEBUG
            message = (
                f"batch {b.number}: {b.rows} rows, {b.input_tokens_removed} input tokens "
                f"removed, {b.clamped_rows} clamped, {b.seconds:.3f}s"
            )
            counts = pick(b, "rows", "input_tokens_removed", "clamped_rows", "batch_size")
            fields.update(batch=b.number, **counts, seconds=round(b.seconds, 6))
            fields.update(rows_done=result.rows_updated, rows_planned=result.rows_planned)
            fields["retry"] = b.retry
        elif event == "paused" and d["seconds"] is not None:
            level, name, message = logging.DEBUG, "pause", f"pause {d['seconds']:.3f}s"
            fields = {"reason": "sleep", "seconds": d["seconds"]}
        elif event == "paused":
            name, message = "pause", f"paused: {d['reason']}"
            fields = {"reason": "replication_lag", "detail": d["reason"]}
        elif event == "stamped":
            first, last = (render.timestamp(d[k], microseconds=True) for k in ("first", "last"))
            message = f"run {run_id} wrote stamps from {first} to {last}"
            fields.update(d)
        else:  # "end": every event the repair sends is one of these
            if d["status"] != BackfillRun.Status.SUCCEEDED:
                level = logging.WARNING
            message = (
                f"run {run_id} {d['status']}: {result.rows_updated} rows updated, "
                f"{result.rows_remaining} remaining"
            )
            counts = ("rows_planned", "rows_updated", "rows_remaining")
            figures = pick(result, *counts, "input_tokens_removed", "clamped_rows")
            fields.update(status=d["status"], **figures, error=d["error"])
        log_event(logger, level, name, message, **fields)

    def locked(self) -> int:
        """The snapshot's rows still eligible (none while every range batch was whole)."""
        if not self.range_shortfall:
            return 0
        with connection.cursor() as cursor:
            cursor.execute(compose(REMAINING_IN_WORK_SQL), self.params)
            return cursor.fetchone()[0]

    def retry_pass(self) -> None:
        while not self.stop.is_set():
            batch = self.batch({}, retry=True)
            if batch is not None and batch.rows == 0:
                break

    def pause(self) -> None:
        """The operator's throttle, then wait while replicas lag too far behind."""
        seconds = self.options.sleep_between_batches
        if seconds > 0:
            self.events("paused", reason="sleep between batches", seconds=seconds)
            self.stop.wait(seconds)
        lag = self.options.max_replication_lag
        if lag is not None and not self.stop.is_set():
            replication.wait_for_replicas(
                lag, self.stop, lambda reason: self.events("paused", reason=reason, seconds=None)
            )

    def ended(self, message: str, *, salvage: bool, timed_out: bool) -> str:
        message += self._count_remaining()
        if timed_out:  # the rows repaired so far get their keys rebuilt
            if self.options.rebuild_rollup:
                warning = "rollup rebuild failed (%s); the next run rebuilds it"
                self.quietly(self._rebuild_rollup, warning)
            self._finish(BackfillRun.Status.FAILED, message)
        else:
            self.failed(message)
        return message

    def _rebuild_rollup(self) -> None:
        """Rebuild the hourly keys of this run's rows and of earlier runs that died first."""
        result, run = self.result, self.result.run
        with connection.cursor() as cursor:  # this run is running: not among them
            cursor.execute(compose(runs.PENDING_ROLLUPS_SQL))
            pending = [pk for (pk,) in cursor.fetchall()]
        run_ids = [*pending, run.pk] if result.rows_updated else pending
        if not run_ids:
            self.record(rollup_state=BackfillRun.RollupState.DONE)
            result.rollup = rollup.RollupResult()
            return
        # A stop before the rollup began does not stop it: the rows repaired need their keys.
        should_stop = (lambda: False) if self.stop.is_set() else self.stop.is_set
        try:
            result.rollup = self.rebuild_keys(run_ids, should_stop)
        except rollup.RollupError as exc:
            result.rollup = exc.result  # what it did, its longest hold included, is recorded
            self._record_rollup(exc.result)
            raise
        if not result.rollup.stopped:
            BackfillRun.objects.filter(pk__in=[*pending, run.pk]).update(
                rollup_state=BackfillRun.RollupState.DONE
            )
            result.recovered_runs.extend(pending)
        self._record_rollup(result.rollup)

    def _record_rollup(self, done: rollup.RollupResult) -> None:
        fields: dict[str, Any] = {}
        if self.result.path is not None and done.path != self.result.path.path:
            fields = {"rollup_path": done.path, "rollup_path_reason": done.path_reason}
            self.events("path_changed", path=done.path, reason=done.path_reason)
        self.record(**done.figures(), **fields)

    def _finish_normally(self) -> ExecuteResult:
        result = self.result
        if self.options.rebuild_rollup:
            failed = "rows repaired, but the rollup rebuild failed: {}"
            self.rebuild_after_rows(self._rebuild_rollup, failed)
        status, error = BackfillRun.Status.INTERRUPTED, ""
        if result.rollup is not None and result.rollup.stopped:
            error = (
                f"stopped by a signal during the rollup rebuild ({result.rollup.keys_done} of "
                f"{result.rollup.keys_total} hourly keys rebuilt); re-running the same command "
                "rebuilds the rest"
            )
        elif result.stopped:
            error = "stopped by a signal; re-running the same command resumes"
        elif result.rows_remaining:
            status = BackfillRun.Status.FAILED
            error = f"{result.rows_remaining} eligible rows stayed locked by other writers"
        else:
            status = BackfillRun.Status.SUCCEEDED
        self._finish(status, error)
        return result

    def _count_remaining(self) -> str:
        """Count the rows still eligible after a failure or a stop; "" or why not."""
        result = self.result
        try:
            db.reconnect_if_dead()
            with transaction.atomic(), connection.cursor() as cursor:
                timeout = REMAINING_COUNT_TIMEOUT_SECONDS
                set_local_timeouts(cursor, self.options.lock_timeout, timeout)
                cursor.execute(compose(COUNT_ELIGIBLE_SQL), self.params)
                result.rows_remaining = cursor.fetchone()[0]
            return ""
        except Exception as exc:  # noqa: BLE001 - the run's own failure is what is reported
            bound = max(result.rows_planned - result.rows_updated, 0)
            result.rows_remaining = bound
            return f"; rows remaining not counted ({error_text(exc)}): at most {bound}"

    def _finish(self, status: str, error: str) -> None:
        remaining = self.result.rows_remaining
        db.reconnect_if_dead()
        self.record(status=status, finished_at=Now(), error=error, rows_remaining=remaining)
        self.result.run.refresh_from_db()
        self.events("end", status=status, error=error)

    def failed(self, message: str) -> None:
        stopped = self.stop.is_set()
        status = BackfillRun.Status.INTERRUPTED if stopped else BackfillRun.Status.FAILED
        finish = functools.partial(self._finish, status, message)
        self.quietly(finish, "could not record the end of run %d: %s", self.result.run.pk)


# Repair the eligible rows and rebuild their rollup.
execute_backfill = Repair.execute
