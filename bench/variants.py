"""What the benchmark measures that is not the tool itself: the floor, the original algorithm,
the platform's default rollup call, state digests, sizes, and a watcher that sees lock 4246
from the server side.

All SQL is built from ``usage.eligibility`` (``compose`` and its fragments), so the floor and
the aggregate query select exactly the rows the tool repairs. The one exception is the original
tool's batch statement, reproduced as the Go command ran it: it is the baseline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from sandbox.dataset import HOURLY_SUMS
from usage.cron import ROLLUP_LOCK_ID
from usage.eligibility import COUNT_ELIGIBLE_SQL, compose, eligible_params
from usage.repair.backfill import CREATE_WORK_TABLE_SQL, INDEX_WORK_TABLE_SQL, WORK_TABLE
from usage.repair.rollup.function import ROLLUP_CALL_SQL

logger = logging.getLogger("bench.variants")

# (a) The floor: every eligible row in one set-based UPDATE, one transaction, no journal.
FLOOR_UPDATE_SQL = """
UPDATE {task_usage} AS tu
SET input_tokens = {corrected_input}, updated_at = now()
FROM {agent_task_queue} q
    JOIN {agent} a ON a.id = q.agent_id
WHERE q.id = tu.task_id
  AND {eligible_where}"""

# (u) The journalled floor: the tool's journal entry for every candidate (as its batches write
# it: old and new values, one stamp), then one set-based UPDATE of the rows it journalled, in
# one statement. Nested loops are off: the check that a candidate has no entry yet, a nested
# loop over the journal the statement is filling, would read it whole per candidate. The run
# the entries belong to is a row of the run table with every column that has no default set
# to its type's zero (made outside the timing).
RUN_COLUMNS_SQL = """
SELECT column_name, data_type FROM information_schema.columns
WHERE table_schema = %(schema)s AND table_name = 'backfill_run'
  AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'"""
ZERO_OF_TYPE = {
    "jsonb": "'{{}}'",
    "timestamp with time zone": "now()",
    "integer": "0",
    "bigint": "0",
    "double precision": "0",
}
INSERT_RUN_SQL = "INSERT INTO {run} ({columns}) VALUES ({values}) RETURNING id"
JOURNALLED_FLOOR_SQL = """
WITH journaled AS (
    INSERT INTO {journal} (
        run_id, usage_id, old_input_tokens, old_updated_at,
        new_input_tokens, cache_read_tokens, new_updated_at, repaired_at
    )
    SELECT %(run_id)s, tu.id, tu.input_tokens, tu.updated_at,
           {corrected_input}, tu.cache_read_tokens, now(), now()
    FROM {eligible_from}
    WHERE {eligible_where}
    RETURNING usage_id, new_input_tokens, new_updated_at
)
UPDATE {task_usage} AS tu
SET input_tokens = j.new_input_tokens, updated_at = j.new_updated_at
FROM journaled j
WHERE tu.id = j.usage_id"""
NO_NESTED_LOOPS_SQL = "SET LOCAL enable_nestloop = off"

# (a) The floor of the rollup: the same sums as the platform's function for every key the
# floor's UPDATE touched, in one aggregate-first statement (every usage row joined to its
# task, agent and issue and grouped by the seven key columns, then kept for the touched
# keys), upserted in every column the hourly table has, with the sums the dataset's initial
# rollup uses (sandbox.dataset.HOURLY_SUMS), not the tool's: what its own recompute is
# measured against.
HOURLY_COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"""
FLOOR_KEY = "bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model"
FLOOR_RECOMPUTE_SQL = """
WITH touched AS MATERIALIZED (
    SELECT DISTINCT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id,
           q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id
    LEFT JOIN {issue} i ON i.id = q.issue_id
    WHERE tu.updated_at >= %(since)s AND q.runtime_id IS NOT NULL
),
sums AS (
    SELECT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id, q.runtime_id,
           q.agent_id, i.project_id, tu.provider, tu.model, {sums}
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id
    LEFT JOIN {issue} i ON i.id = q.issue_id
    WHERE q.runtime_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)
INSERT INTO {task_usage_hourly} AS h ({key}, {columns}, updated_at)
SELECT {s_key}, {s_columns}, now()
FROM touched t JOIN sums s
  ON s.bucket_hour = t.bucket_hour AND s.workspace_id = t.workspace_id
 AND s.runtime_id = t.runtime_id AND s.agent_id = t.agent_id
 AND s.project_id IS NOT DISTINCT FROM t.project_id
 AND s.provider = t.provider AND s.model = t.model
ON CONFLICT ({key}) DO UPDATE SET {set_columns}, updated_at = EXCLUDED.updated_at"""
FLOOR_WORK_MEM_SQL = "SET LOCAL work_mem = '64MB'"

# (b) The original Go tool's batch statement, verbatim but for the placeholders: every batch
# re-finds and re-sorts all remaining candidates. Unqualified names, as the Go tool used them.
ORIGINAL_BATCH_SQL = """
WITH candidates AS (
SELECT
tu.id,
(tu.input_tokens - GREATEST(tu.input_tokens - tu.cache_read_tokens, 0))::bigint AS removed_tokens
FROM task_usage tu
JOIN agent_task_queue atq ON atq.id = tu.task_id
JOIN agent a ON a.id = atq.agent_id
WHERE tu.provider = 'codex'
AND tu.cache_read_tokens > 0
AND tu.input_tokens > 0
AND COALESCE(tu.updated_at, tu.created_at) < %(cutoff)s
AND (NULLIF(%(workspace)s, '')::uuid IS NULL OR a.workspace_id = NULLIF(%(workspace)s, '')::uuid)
ORDER BY COALESCE(tu.updated_at, tu.created_at), tu.id
LIMIT %(limit)s
FOR UPDATE OF tu SKIP LOCKED
),
updated AS (
UPDATE task_usage tu
SET input_tokens = GREATEST(tu.input_tokens - tu.cache_read_tokens, 0),
updated_at = now()
FROM candidates c
WHERE tu.id = c.id
RETURNING c.removed_tokens
)
SELECT COUNT(*)::bigint, COALESCE(SUM(removed_tokens), 0)::bigint FROM updated"""

SET_SEARCH_PATH_SQL = "SELECT set_config('search_path', %s, false)"
TAKE_SESSION_ROLLUP_LOCK_SQL = "SELECT pg_advisory_lock(%s)"
RELEASE_SESSION_ROLLUP_LOCK_SQL = "SELECT pg_advisory_unlock(%s)"
NO_STATEMENT_TIMEOUT_SQL = "SET LOCAL statement_timeout = 0"

# (e) The reference for the dry run: one plain aggregate over the same rows.
PLAIN_AGGREGATE_SQL = """
SELECT count(*),
       coalesce(sum(tu.input_tokens), 0),
       coalesce(sum({corrected_input}), 0),
       count(*) FILTER (WHERE {is_clamped})
FROM {eligible_from}
WHERE {eligible_where}"""

# The original tool's dry-run query, verbatim but for the placeholders: grouped by workspace
# and UTC day like ours, without the rollup-key count. An informational second reference.
ORIGINAL_SUMMARY_SQL = """
SELECT
a.workspace_id::text AS workspace_id,
(tu.created_at AT TIME ZONE 'UTC')::date::text AS date_utc,
COUNT(*)::bigint AS rows,
COALESCE(SUM(tu.input_tokens), 0)::bigint AS input_before,
COALESCE(SUM(GREATEST(tu.input_tokens - tu.cache_read_tokens, 0)), 0)::bigint AS input_after,
COALESCE(SUM(tu.input_tokens - GREATEST(tu.input_tokens - tu.cache_read_tokens, 0)), 0)::bigint
    AS overcount,
COUNT(*) FILTER (WHERE tu.input_tokens < tu.cache_read_tokens)::bigint AS clamped_rows,
MIN(tu.created_at) AS min_created_at,
MAX(tu.created_at) AS max_created_at
FROM task_usage tu
JOIN agent_task_queue atq ON atq.id = tu.task_id
JOIN agent a ON a.id = atq.agent_id
WHERE tu.provider = 'codex'
AND tu.cache_read_tokens > 0
AND tu.input_tokens > 0
AND COALESCE(tu.updated_at, tu.created_at) < %(cutoff)s
AND (NULLIF(%(workspace)s, '')::uuid IS NULL OR a.workspace_id = NULLIF(%(workspace)s, '')::uuid)
GROUP BY a.workspace_id, (tu.created_at AT TIME ZONE 'UTC')::date
ORDER BY a.workspace_id, date_utc"""

# End states. Only (id, input_tokens) is compared: updated_at is now() of whoever wrote it.
TASK_USAGE_DIGEST_SQL = """
SELECT count(*), md5(string_agg(tu.id::text || ':' || tu.input_tokens::text, ',' ORDER BY tu.id))
FROM {task_usage} tu"""

HOURLY_DIGEST_SQL = """
SELECT count(*),
       md5(string_agg(
           concat_ws(':', h.bucket_hour, h.workspace_id, h.runtime_id, h.agent_id,
                     coalesce(h.project_id::text, '-'), h.provider, h.model, h.input_tokens,
                     h.output_tokens, h.cache_read_tokens, h.cache_write_tokens,
                     h.cost_usd_ticks, h.task_count, h.event_count),
           ',' ORDER BY h.bucket_hour, h.workspace_id, h.runtime_id, h.agent_id, h.project_id,
                        h.provider, h.model))
FROM {task_usage_hourly} h"""

LATEST_RUN_SQL = """
SELECT id, status, rows_planned, rows_updated, rows_remaining, started_at, finished_at,
       rollup_from, rollup_to, (SELECT count(*) FROM {journal} j WHERE j.run_id = r.id),
       rollup_state, rollup_keys, rollup_slices, rollup_hash_slices, rollup_seconds,
       rollup_max_lock_seconds, rollup_cron_waits, stamp, rollup_cron_wait_seconds,
       rollup_path
FROM {run} r ORDER BY id DESC LIMIT 1"""

# (d) The hourly keys of a run's rows, and a call of the platform's function over them with
# its default settings, as the cron tick would make it once its window covered the rows.
RUN_KEYS_SQL = """
SELECT DISTINCT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id, q.runtime_id,
       q.agent_id, i.project_id, tu.provider, tu.model
FROM {journal} j
JOIN {task_usage} tu ON tu.id = j.usage_id
JOIN {agent_task_queue} q ON q.id = tu.task_id
JOIN {agent} a ON a.id = q.agent_id
LEFT JOIN {issue} i ON i.id = q.issue_id
WHERE j.run_id = %(run_id)s AND q.runtime_id IS NOT NULL"""
COUNT_RUN_KEYS_SQL = f"SELECT count(*) FROM ({RUN_KEYS_SQL}) keys"
SEED_SQL = "SELECT setseed(0.4246)"
QUEUE_RUN_KEYS_SQL = f"""
WITH picked AS (
    SELECT * FROM ({RUN_KEYS_SQL}) keys ORDER BY random() LIMIT %(sample)s
),
queued AS (
    INSERT INTO {{task_usage_hourly_dirty}} AS d (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
        enqueued_at)
    SELECT bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
           clock_timestamp()
    FROM picked
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)
    RETURNING d.enqueued_at
)
SELECT count(*), max(enqueued_at) FROM queued"""

# The cron tick's state of a live platform: its watermark five minutes back, a tick just run.
LIVE_CRON_STATE_SQL = """
UPDATE {task_usage_hourly_rollup_state}
SET watermark_at = now() - interval '5 minutes', last_run_started_at = now()
WHERE id = 1"""

# Sizes and WAL for the capacity figures.
WAL_LSN_SQL = "SELECT pg_current_wal_lsn()"
WAL_BYTES_SQL = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint"
JOURNAL_BYTES_SQL = "SELECT pg_total_relation_size(%s::regclass)"
WORK_TABLE_BYTES_SQL = f"SELECT pg_total_relation_size('{WORK_TABLE}'::regclass)"

# Lock 4246 as the server sees it: one row per holder. A session-level hold keeps its
# (pid, NULL xact_start) identity while idle; each transaction-level hold has its own start.
LOCK_HOLDERS_SQL = """
SELECT l.pid, s.xact_start
FROM pg_locks l
LEFT JOIN pg_stat_activity s ON s.pid = l.pid
WHERE l.locktype = 'advisory' AND l.database = %s AND l.granted
  AND l.classid = 0 AND l.objid = %s AND l.objsubid = 1"""


@dataclass(frozen=True)
class Timed:
    seconds: float
    rows: int
    detail: dict[str, Any] = field(default_factory=dict)


def count_eligible(conn: psycopg.Connection, cutoff: datetime) -> int:
    with conn.cursor() as cur:
        cur.execute(compose(COUNT_ELIGIBLE_SQL), eligible_params(cutoff, None))
        return int(cur.fetchone()[0])


def floor_update(conn: psycopg.Connection, cutoff: datetime) -> Timed:
    """(a) One UPDATE of all eligible rows in one transaction, timed to its commit.

    ``detail["since"]`` is the time it wrote into the rows (its transaction's ``now()``).
    """
    started = time.monotonic()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(NO_STATEMENT_TIMEOUT_SQL)
        cur.execute("SELECT now()")
        (since,) = cur.fetchone()
        cur.execute(compose(FLOOR_UPDATE_SQL), eligible_params(cutoff, None))
        rows = cur.rowcount
    return Timed(time.monotonic() - started, rows, {"since": since})


def journalled_floor(conn: psycopg.Connection, cutoff: datetime) -> Timed:
    """(u) The journal INSERT of every candidate, then the UPDATE, one transaction, timed to
    its commit."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(RUN_COLUMNS_SQL, {"schema": compose("{run}").split(".")[0].strip('"')})
        columns = dict(cur.fetchall())
        values = [ZERO_OF_TYPE.get(kind, "''") for kind in columns.values()]
        insert = INSERT_RUN_SQL.format(
            run="{run}", columns=", ".join(columns), values=", ".join(values)
        )
        cur.execute(compose(insert))
        (run_id,) = cur.fetchone()
    params = dict(eligible_params(cutoff, None), run_id=run_id)
    started = time.monotonic()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(NO_STATEMENT_TIMEOUT_SQL)
        cur.execute(NO_NESTED_LOOPS_SQL)
        cur.execute(compose(JOURNALLED_FLOOR_SQL), params)
        rows = cur.rowcount
    return Timed(time.monotonic() - started, rows)


def floor_recompute(conn: psycopg.Connection, since: datetime) -> Timed:
    """(a) The rollup's floor after the floor's UPDATE: one aggregate-first statement over
    the keys of the rows it wrote (``since``), every column upserted, timed to its commit."""
    with conn.cursor() as cur:
        cur.execute(HOURLY_COLUMNS_SQL, [compose("{task_usage_hourly}")])
        present = {name for (name,) in cur.fetchall()}
    columns = [name for name in HOURLY_SUMS if name in present]
    statement = compose(
        FLOOR_RECOMPUTE_SQL,
        key=FLOOR_KEY,
        s_key=", ".join(f"s.{name}" for name in FLOOR_KEY.split(", ")),
        sums=", ".join(f"{HOURLY_SUMS[name]}::bigint AS {name}" for name in columns),
        columns=", ".join(columns),
        s_columns=", ".join(f"s.{name}" for name in columns),
        set_columns=", ".join(f"{name} = EXCLUDED.{name}" for name in columns),
    )
    started = time.monotonic()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(NO_STATEMENT_TIMEOUT_SQL)
        cur.execute(FLOOR_WORK_MEM_SQL)
        cur.execute(statement, {"since": since})
        keys = cur.rowcount
    return Timed(time.monotonic() - started, keys)


def original_loop(
    conn: psycopg.Connection, lock_conn: psycopg.Connection, cutoff: datetime, batch_size: int
) -> Timed:
    """(b) The Go tool's execute phase: lock 4246 for the session, then batches until 0.

    Each batch is its own autocommit statement, as pgx ran it.
    """
    conn.autocommit = True
    conn.execute(SET_SEARCH_PATH_SQL, (_target_schema(),))
    params = {"cutoff": cutoff, "workspace": "", "limit": batch_size}
    batch_seconds: list[float] = []
    total = removed = 0
    started = time.monotonic()
    lock_conn.execute(TAKE_SESSION_ROLLUP_LOCK_SQL, (ROLLUP_LOCK_ID,))
    try:
        while True:
            batch_started = time.monotonic()
            rows, tokens = conn.execute(ORIGINAL_BATCH_SQL, params).fetchone()
            batch_seconds.append(time.monotonic() - batch_started)
            if rows == 0:
                break
            total += rows
            removed += tokens
            if len(batch_seconds) % 50 == 0:
                logger.info("  original loop: %d batches, %d rows", len(batch_seconds), total)
    finally:
        lock_conn.execute(RELEASE_SESSION_ROLLUP_LOCK_SQL, (ROLLUP_LOCK_ID,))
    seconds = time.monotonic() - started
    return Timed(
        seconds,
        total,
        {
            "batches": len(batch_seconds) - 1,
            "first_batch_seconds": round(batch_seconds[0], 4),
            "last_full_batch_seconds": round(batch_seconds[-2], 4)
            if len(batch_seconds) > 1
            else None,
            "input_tokens_removed": int(removed),
        },
    )


def default_rollup_call(conn: psycopg.Connection, run_id: int, sample: int) -> Timed:
    """(d) ``sample`` random keys of the run's rows (all of them, at most) queued, then one
    call of the platform's function with its default settings; rolled back afterwards."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        cur.execute(NO_STATEMENT_TIMEOUT_SQL)
        cur.execute(SEED_SQL)
        cur.execute(compose(QUEUE_RUN_KEYS_SQL), {"run_id": run_id, "sample": sample})
        keys, latest = cur.fetchone()
        started = time.monotonic()
        cur.execute(
            compose(ROLLUP_CALL_SQL), {"from": latest, "to": latest + timedelta(microseconds=1)}
        )
        rows = int(cur.fetchone()[0] or 0)
        seconds = time.monotonic() - started
    return Timed(seconds, int(keys), {"rollup_rows": rows})


def count_run_keys(conn: psycopg.Connection, run_id: int) -> int:
    with conn.cursor() as cur:
        cur.execute(compose(COUNT_RUN_KEYS_SQL), {"run_id": run_id})
        return int(cur.fetchone()[0])


def snapshot_bytes(conn: psycopg.Connection, cutoff: datetime) -> int:
    """The temp space of the execute's snapshot of the candidates (its table and key)."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        cur.execute(compose(CREATE_WORK_TABLE_SQL), eligible_params(cutoff, None))
        cur.execute(INDEX_WORK_TABLE_SQL)
        cur.execute(WORK_TABLE_BYTES_SQL)
        return int(cur.fetchone()[0])


def task_usage_digest(conn: psycopg.Connection) -> tuple[int, str]:
    with conn.cursor() as cur:
        cur.execute(compose(TASK_USAGE_DIGEST_SQL))
        count, digest = cur.fetchone()
    return int(count), str(digest)


def hourly_digest(conn: psycopg.Connection) -> tuple[int, str]:
    with conn.cursor() as cur:
        cur.execute(compose(HOURLY_DIGEST_SQL))
        count, digest = cur.fetchone()
    return int(count), str(digest or "")


def latest_run(conn: psycopg.Connection) -> dict[str, Any]:
    with conn.cursor() as cur:
        cur.execute(compose(LATEST_RUN_SQL))
        row = cur.fetchone()
    keys = (
        "id",
        "status",
        "rows_planned",
        "rows_updated",
        "rows_remaining",
        "started_at",
        "finished_at",
        "rollup_from",
        "rollup_to",
        "journal_rows",
        "rollup_state",
        "rollup_keys",
        "rollup_slices",
        "rollup_hash_slices",
        "rollup_seconds",
        "rollup_max_lock_seconds",
        "rollup_cron_waits",
        "stamp",
        "rollup_cron_wait_seconds",
        "rollup_path",
    )
    return dict(zip(keys, row, strict=True))


def _target_schema() -> str:
    from django.conf import settings

    return settings.CODEX_TARGET_SCHEMA


class LockWatcher:
    """Poll pg_locks for lock 4246 in one database and record how long each hold lasted.

    An independent, server-side cross-check of the client's own timings, at the resolution
    of the poll interval: a hold is seen from its first to its last sample, so it may have
    lasted up to one interval longer. A hold ends when its backend is seen without the lock
    or holding it in another transaction (samples taken while a transaction commits show no
    transaction start, and are counted with the hold they end).
    """

    def __init__(self, conn: psycopg.Connection, database_oid: int, interval: float = 0.02):
        self.conn = conn
        self.database_oid = database_oid
        self.interval = interval
        self.holds: list[float] = []
        self._open: dict[int, list[Any]] = {}  # pid -> [first, last, xact_start]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="lock-4246-watcher", daemon=True)

    def __enter__(self) -> LockWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid in list(self._open):
            self._close(pid)

    def _close(self, pid: int) -> None:
        first, last, _ = self._open.pop(pid)
        self.holds.append(last - first)

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            rows = self.conn.execute(
                LOCK_HOLDERS_SQL, (self.database_oid, ROLLUP_LOCK_ID)
            ).fetchall()
            seen = set()
            for pid, xact_start in rows:
                seen.add(pid)
                hold = self._open.get(pid)
                if (
                    hold is not None
                    and None not in (xact_start, hold[2])
                    and xact_start != hold[2]
                ):
                    self._close(pid)
                    hold = None
                if hold is None:
                    self._open[pid] = [now, now, xact_start]
                else:
                    hold[1] = now
                    hold[2] = xact_start or hold[2]
            for pid in set(self._open) - seen:
                self._close(pid)
            self._stop.wait(self.interval)

    @property
    def max_hold_seconds(self) -> float:
        return max(self.holds, default=0.0)

    @property
    def hold_count(self) -> int:
        return len(self.holds)
