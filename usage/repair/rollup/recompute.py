"""The own path: hourly keys recomputed aggregate-first, for function definitions the tool knows.

The platform's ``rollup_task_usage_hourly_window`` joins each dirty key to every task of its
agent and runtime *before* it groups (facts 6 and 7 of the target database): its cost
follows keys x tasks per agent, or, hashed, the whole table once per call. The same sums
computed the other way round (read the usage rows of each touched hour once, through the
``created_at`` index, join them to their task, agent and issue, group by the seven key
columns, and only then keep the touched keys) cost what reading those hours costs. A slice of
the rebuild is a range of bucket hours: it recomputes every touched key of its hours,
upserts them and deletes the touched keys left with no rows, as the function does, in one
statement under lock 4246, sized by its measured rows per second.

Used only where it provably writes what the function writes:

* **Recognised definitions** (``usage.repair.rollup.versions``): the platform's own, this
  project's fixture, or one the operator declared; each names the hourly columns it writes.
  Any other definition, a role that may not write ``task_usage_hourly`` itself, or
  ``--rollup-path function`` take the function path (``usage.repair.rollup.function``).
* **A proof per run** (``prove``). Before relying on its own recompute, each run computes its
  first keys both ways in one REPEATABLE READ transaction under lock 4246: its own sums into
  a temporary table, then the function's call (which writes them), then a comparison of every
  column the version writes. A difference puts the rest of the run on the function path and
  is reported; the keys of the proof are the function's either way.
* **The platform's queue** is the cron tick's: the own path never drains keys others queued
  (the tick drains them once its window passes their time, recomputing them from scratch, so
  a key both queued and rebuilt by the tool is merely rebuilt twice). The revert queues its
  keys as the platform's writers do (so a crash leaves them to the tick); once it has
  recomputed them it removes exactly the queue rows it saw in the recompute's snapshot
  (same row version, ``xmin``), so the tick does not recompute them again in one long hold,
  and a key someone queued again meanwhile stays queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from usage.db import drop_temp_table, set_local_timeouts
from usage.eligibility import compose
from usage.repair.rollup.function import (
    Plan,
    call_function,
    log_slice,
    rebuild_by_function,
    set_plan,
)
from usage.repair.rollup.slices import (
    MAX_SLICE_GROWTH,
    Bound,
    NeighbourOptions,
    RollupResult,
    RollupSlice,
    SliceCancelled,
    SliceLimits,
    Slicer,
    run_locked,
)
from usage.repair.rollup.versions import FunctionVersion, PathChoice

logger = logging.getLogger("usage.rollup")

KEY_COLUMNS = ("bucket_hour", "workspace_id", "runtime_id", "agent_id", "project_id", "provider")
KEY_COLUMNS += ("model",)


# -- the recompute --------------------------------------------------------------------------

# Each column's sum, as the known definitions compute it (never shared with usage.repair.verify,
# which checks the result with SQL of its own).
OWN_SUMS = {
    "input_tokens": "sum(tu.input_tokens)::bigint",
    "output_tokens": "sum(tu.output_tokens)::bigint",
    "cache_read_tokens": "sum(tu.cache_read_tokens)::bigint",
    "cache_write_tokens": "sum(tu.cache_write_tokens)::bigint",
    "cost_usd_ticks": "coalesce(sum(tu.cost_usd_ticks), 0)::bigint",
    "uncosted_input_tokens": (
        "coalesce(sum(tu.input_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
    ),
    "uncosted_output_tokens": (
        "coalesce(sum(tu.output_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
    ),
    "uncosted_cache_read_tokens": (
        "coalesce(sum(tu.cache_read_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
    ),
    "uncosted_cache_write_tokens": (
        "coalesce(sum(tu.cache_write_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
    ),
    "task_count": "count(DISTINCT tu.task_id)",
    "event_count": "count(*)",
}
KEYS = ", ".join(KEY_COLUMNS)
# A key of one relation equal to the same key of another: project_id may be NULL.
SAME_KEY = " AND ".join(
    f"{{a}}.{name} IS NOT DISTINCT FROM {{b}}.{name}"
    if name == "project_id"
    else f"{{a}}.{name} = {{b}}.{name}"
    for name in KEY_COLUMNS
)

# The recompute of the keys of ``keys``: every usage row created in some spans of time (bound
# ranges of created_at, so the planner estimates their rows from its statistics and reads
# them through the created_at index) joined to its task, agent and issue and grouped by its
# key, then kept for the touched keys (``found`` is false for a key with no rows left).
RECOMPUTE_CTES = """
sums AS (
    SELECT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id, q.runtime_id,
           q.agent_id, i.project_id, tu.provider, tu.model, {sums}
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id
    LEFT JOIN {issue} i ON i.id = q.issue_id
    WHERE ({spans}) AND q.runtime_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
),
recomputed AS (
    SELECT {k_keys}, s.bucket_hour IS NOT NULL AS found, {s_columns}
    FROM keys k LEFT JOIN sums s ON {same_k_s}
)"""
SPAN = "(tu.created_at >= %(span_from_{n})s AND tu.created_at < %(span_to_{n})s)"
# ... written as the function writes it: upserted, or deleted when no row is left.
WRITE_CTES = """
upserted AS (
    INSERT INTO {task_usage_hourly} AS h ({keys}, {columns}, updated_at)
    SELECT {r_keys}, {r_columns}, now() FROM recomputed r WHERE r.found
    ON CONFLICT ({keys}) DO UPDATE SET {set_columns}, updated_at = EXCLUDED.updated_at
    RETURNING 1
),
deleted AS (
    DELETE FROM {task_usage_hourly} h USING recomputed r
    WHERE NOT r.found AND {same_h_r}
    RETURNING 1
)"""
# An own slice's statements are short: JIT compilation would cost more than it saves (seen:
# 1.4 s of a 2.3 s slice), and the sorts and hashes of tens of thousands of rows fit memory.
OWN_SETTINGS_SQL = (
    "SELECT set_config('jit', 'off', true), set_config('work_mem', %(work_mem)s, true)"
)
OWN_WORK_MEM = "64MB"

# The touched keys of some runs: every key of a row a run changed and did not revert,
# attributed as its task is now (a row rewritten since included), with the smallest stamp of
# its rows that still carry their run's stamp (a call of the function over a window of stamps
# rebuilds the keys stamped in it: the proof's).
KEYS_TABLE = "pg_temp.codex_rollup_keys"
CREATE_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_keys ON COMMIT PRESERVE ROWS AS
SELECT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, a.workspace_id, q.runtime_id,
       q.agent_id, i.project_id, tu.provider, tu.model,
       min(j.new_updated_at) FILTER (WHERE tu.updated_at = j.new_updated_at) AS stamp,
       0::bigint AS hour_seq, false AS done
FROM {journal} j
JOIN {task_usage} tu ON tu.id = j.usage_id
JOIN {agent_task_queue} q ON q.id = tu.task_id
JOIN {agent} a ON a.id = q.agent_id
LEFT JOIN {issue} i ON i.id = q.issue_id
WHERE j.run_id = ANY(%(run_ids)s) AND j.reverted_at IS NULL AND q.runtime_id IS NOT NULL
GROUP BY 1, 2, 3, 4, 5, 6, 7"""
DROP_KEYS_SQL = f"DROP TABLE IF EXISTS {KEYS_TABLE}"

# The touched hours in time order, each with its keys, its usage rows and the rows between it
# and the touched hour before it (read too when a slice spans both), as the planner's
# statistics of task_usage.created_at estimate them (an hour has at least as many rows as
# keys), and their running totals: a slice is a range of hours within a budget of rows.
HOURS_TABLE = "pg_temp.codex_rollup_hours"
CREATE_HOURS_SQL = f"""
CREATE TEMP TABLE codex_rollup_hours ON COMMIT PRESERVE ROWS AS
WITH hours AS (
    SELECT bucket_hour, count(*) AS keys,
           coalesce(lag(bucket_hour) OVER (ORDER BY bucket_hour) + interval '1 hour',
                    bucket_hour) AS gap_from
    FROM {KEYS_TABLE} WHERE NOT done GROUP BY bucket_hour
),
histogram AS MATERIALIZED (
    SELECT s.histogram_bounds::text::timestamptz[] AS bounds, greatest(c.reltuples, 0) AS rows
    FROM pg_stats s, pg_class c
    WHERE s.schemaname = %(schema)s AND s.tablename = 'task_usage' AND s.attname = 'created_at'
      AND c.oid = %(table)s::regclass
),
buckets AS MATERIALIZED (
    SELECT b.bounds[n] AS lo, b.bounds[n + 1] AS hi,
           b.rows / (cardinality(b.bounds) - 1) / nullif(extract(epoch FROM b.bounds[n + 1]
                                                           - b.bounds[n]), 0) AS per_second
    FROM histogram b, generate_series(1, cardinality(b.bounds) - 1) AS n
),
estimated AS (
    SELECT h.bucket_hour, h.keys,
           greatest(h.keys, coalesce(sum(bk.per_second * extract(epoch FROM
               least(bk.hi, h.bucket_hour + interval '1 hour') - greatest(bk.lo, h.bucket_hour)))
               FILTER (WHERE bk.hi > h.bucket_hour), 0))::bigint AS rows,
           coalesce(sum(bk.per_second * extract(epoch FROM
               least(bk.hi, h.bucket_hour) - greatest(bk.lo, h.gap_from)))
               FILTER (WHERE bk.lo < h.bucket_hour AND bk.hi > h.gap_from), 0)::bigint AS gap
    FROM hours h
    LEFT JOIN buckets bk ON bk.lo < h.bucket_hour + interval '1 hour' AND bk.hi > h.gap_from
    GROUP BY h.bucket_hour, h.keys
)
SELECT row_number() OVER w AS seq, bucket_hour, keys, rows, gap,
       sum(gap + rows) OVER (w ROWS UNBOUNDED PRECEDING)::bigint AS rows_to,
       sum(keys) OVER (w ROWS UNBOUNDED PRECEDING)::bigint AS keys_to
FROM estimated
WINDOW w AS (ORDER BY bucket_hour)"""
INDEX_HOURS_SQL = f"ALTER TABLE {HOURS_TABLE} ADD PRIMARY KEY (seq)"
DROP_HOURS_SQL = f"DROP TABLE IF EXISTS {HOURS_TABLE}"
NUMBER_KEYS_SQL = f"""
UPDATE {KEYS_TABLE} k SET hour_seq = h.seq
FROM {HOURS_TABLE} h WHERE h.bucket_hour = k.bucket_hour AND NOT k.done"""
INDEX_KEYS_SQL = f"CREATE INDEX ON {KEYS_TABLE} (hour_seq)"
ANALYZE_SQL = "ANALYZE {table}"
KEYS_TOTAL_SQL = f"SELECT count(*), count(stamp) FROM {KEYS_TABLE}"
HOURS_TOTAL_SQL = f"SELECT count(*) FROM {HOURS_TABLE}"
# The next slice: from the hour after ``after`` to the last one within ``limit`` estimated
# rows (the first hour's gap is not read; at least one hour), with its rows, keys and span.
NEXT_HOURS_SQL = f"""
SELECT s.seq, s.rows_to - f.rows_to + f.rows, s.keys_to - f.keys_to + f.keys,
       f.bucket_hour, s.bucket_hour + interval '1 hour'
FROM {HOURS_TABLE} s, {HOURS_TABLE} f
WHERE f.seq = %(after)s + 1
  AND s.seq = greatest(
      %(after)s + 1,
      coalesce((SELECT n.seq - 1 FROM {HOURS_TABLE} n
                WHERE n.seq > %(after)s AND n.rows_to - f.rows_to + f.rows > %(limit)s
                ORDER BY n.seq LIMIT 1), %(total)s))"""

# One slice of the repair's rebuild: the keys of hours (after, upto] not done yet,
# recomputed from the rows created in their span, and written.
SLICE_KEYS = f"""
SELECT {KEYS} FROM {KEYS_TABLE}
WHERE hour_seq > %(after)s AND hour_seq <= %(upto)s AND NOT done"""
WRITE_SQL = """
WITH keys AS MATERIALIZED ({keys_sql}),
{recompute},
{write}
SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted),
       (SELECT count(*) FROM keys)"""

# The proof's keys: those of the first ``n`` stamps in time order (and every key sharing the
# last of them), the window of stamps whose call of the function rebuilds them, and their
# hours. The repair ranks keys hour by hour (usage.repair.backfill), so they are few.
PROOF_BOUNDS_SQL = f"""
WITH probe AS (
    SELECT stamp FROM {KEYS_TABLE} WHERE stamp IS NOT NULL ORDER BY stamp LIMIT %(n)s
)
SELECT min(stamp), max(stamp) FROM probe"""
PROOF_KEYS = f"SELECT {KEYS} FROM {KEYS_TABLE} WHERE stamp <= %(last)s"
PROOF_HOURS_SQL = (
    f"SELECT DISTINCT bucket_hour FROM {KEYS_TABLE} WHERE stamp <= %(last)s ORDER BY 1"
)
MARK_PROOF_DONE_SQL = f"UPDATE {KEYS_TABLE} SET done = true WHERE stamp <= %(last)s"

# The proof: the own recompute of some keys kept aside (the function writes them next), then
# compared with what the function wrote, column by column.
PROOF_TABLE = "pg_temp.codex_rollup_proof"
CREATE_PROOF_SQL = """
CREATE TEMP TABLE codex_rollup_proof ON COMMIT DROP AS
WITH keys AS MATERIALIZED ({keys_sql}),
{recompute}
SELECT * FROM recomputed"""
COMPARE_PROOF_SQL = f"""
SELECT {{p_keys}}, p.found, h.bucket_hour IS NOT NULL, {{pairs}}
FROM {PROOF_TABLE} p
LEFT JOIN {{task_usage_hourly}} h ON {{same_h_p}}
WHERE p.found IS DISTINCT FROM (h.bucket_hour IS NOT NULL)
   OR (p.found AND ({{p_columns}}) IS DISTINCT FROM ({{h_columns}}))"""
PROOF_COUNT_SQL = f"SELECT count(*) FROM {PROOF_TABLE}"
DROP_PROOF_SQL = f"DROP TABLE IF EXISTS {PROOF_TABLE}"

# The revert's keys: each batch adds the keys of the rows it restored (and queues them, as the
# platform's writers do, so that a crash leaves them to the cron tick); a drain rebuilds them.
REVERT_KEYS_TABLE = "pg_temp.codex_revert_keys"
CREATE_REVERT_KEYS_SQL = """
CREATE TEMP TABLE IF NOT EXISTS codex_revert_keys (
    bucket_hour timestamptz NOT NULL,
    workspace_id uuid NOT NULL,
    runtime_id uuid NOT NULL,
    agent_id uuid NOT NULL,
    project_id uuid,
    provider text NOT NULL,
    model text NOT NULL
) ON COMMIT PRESERVE ROWS"""
CLEAR_REVERT_KEYS_SQL = f"TRUNCATE {REVERT_KEYS_TABLE}"
DROP_REVERT_KEYS_SQL = f"DROP TABLE IF EXISTS {REVERT_KEYS_TABLE}"
REVERT_KEYS = f"SELECT DISTINCT {KEYS} FROM {REVERT_KEYS_TABLE}"
REVERT_HOURS_SQL = f"SELECT DISTINCT bucket_hour FROM {REVERT_KEYS_TABLE} ORDER BY 1"
# One revert drain on the own path: its keys recomputed and written, then their queue rows
# removed, but only the row versions the recompute's snapshot saw (``xmin``): a key queued
# again meanwhile (an upsert makes a new row version) stays queued for the cron tick.
DRAIN_SQL = """
WITH keys AS MATERIALIZED ({keys_sql}),
{recompute},
{write},
seen AS MATERIALIZED (
    SELECT d.ctid AS row_id, d.xmin AS row_xmin
    FROM {task_usage_hourly_dirty} d JOIN keys k ON {same_d_k}
),
drained AS (
    DELETE FROM {task_usage_hourly_dirty} d USING seen s
    WHERE d.ctid = s.row_id AND d.xmin = s.row_xmin
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted),
       (SELECT count(*) FROM keys), (SELECT count(*) FROM drained)"""
# A revert drain reads at most this many separate spans of hours (its batch's rows were
# written in time order, so they fall in a few); more, and the function drains it.
MAX_SPANS = 24

# Names compose() qualifies; the fragments keep them for it.
_NAMES = (
    "task_usage",
    "agent_task_queue",
    "agent",
    "issue",
    "task_usage_hourly",
    "task_usage_hourly_dirty",
    "bucket_hour",
)


def spans_of(hours: Sequence[datetime]) -> list[tuple[datetime, datetime]]:
    """Bucket hours (sorted) as the fewest ranges ``[from, to)`` that cover them."""
    spans: list[tuple[datetime, datetime]] = []
    for hour in hours:
        if spans and spans[-1][1] == hour:
            spans[-1] = (spans[-1][0], hour + HOUR)
        else:
            spans.append((hour, hour + HOUR))
    return spans


def span_params(spans: Sequence[tuple[datetime, datetime]]) -> dict[str, datetime]:
    params: dict[str, datetime] = {}
    for n, (start, end) in enumerate(spans):
        params[f"span_from_{n}"], params[f"span_to_{n}"] = start, end
    return params


class Recompute:
    """The own recompute's statements for one known version of the function."""

    def __init__(self, version: FunctionVersion) -> None:
        self.version = version
        columns = version.columns

        def listed(prefix: str) -> str:
            return ", ".join(f"{prefix}{name}" for name in columns)

        self.parts = {
            "sums": ", ".join(f"{OWN_SUMS[name]} AS {name}" for name in columns),
            "columns": ", ".join(columns),
            "s_columns": listed("s."),
            "r_columns": listed("r."),
            "p_columns": listed("p."),
            "h_columns": listed("h."),
            "set_columns": ", ".join(f"{name} = EXCLUDED.{name}" for name in columns),
            "pairs": ", ".join(f"p.{name}, h.{name}" for name in columns),
            "keys": KEYS,
            "k_keys": ", ".join(f"k.{name}" for name in KEY_COLUMNS),
            "r_keys": ", ".join(f"r.{name}" for name in KEY_COLUMNS),
            "p_keys": ", ".join(f"p.{name}" for name in KEY_COLUMNS),
            "same_k_s": SAME_KEY.format(a="s", b="k"),
            "same_h_r": SAME_KEY.format(a="h", b="r"),
            "same_h_p": SAME_KEY.format(a="h", b="p"),
            "same_d_k": SAME_KEY.format(a="d", b="k"),
        }

    def statement(self, template: str, keys_sql: str, spans: int = 1) -> str:
        """``template`` (WRITE_SQL, CREATE_PROOF_SQL or DRAIN_SQL) over ``spans`` spans."""
        names = {name: "{" + name + "}" for name in _NAMES}
        spans_sql = " OR ".join(SPAN.format(n=n) for n in range(spans))
        fill = dict(self.parts, **names, spans=spans_sql)
        return compose(
            template,
            keys_sql=keys_sql,
            recompute=RECOMPUTE_CTES.format(**fill),
            write=WRITE_CTES.format(**fill),
            same_d_k=self.parts["same_d_k"],
        )

    def compare_sql(self) -> str:
        used = {k: v for k, v in self.parts.items() if "{" + k + "}" in COMPARE_PROOF_SQL}
        return compose(COMPARE_PROOF_SQL, **used)


def own_settings(cursor: Any) -> None:
    cursor.execute(OWN_SETTINGS_SQL, {"work_mem": OWN_WORK_MEM})


# -- the proof -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnDifference:
    column: str
    own: Any
    function: Any


@dataclass(frozen=True)
class KeyDifference:
    key: tuple[Any, ...]
    columns: tuple[ColumnDifference, ...]


@dataclass
class Proof:
    """Some keys computed both ways in one snapshot: equal, or how they differ."""

    keys: int = 0
    differences: list[KeyDifference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def describe(self) -> str:
        """One line: what differed (the first key and its columns), or that nothing did."""
        if self.ok:
            return f"the own recompute equals the function on the first {self.keys} keys"
        first = self.differences[0]
        columns = "; ".join(
            f"{c.column}: function {_shown(c.function)}, own {_shown(c.own)}"
            for c in first.columns
        )
        hour = first.key[0].strftime("%Y-%m-%dT%H:%MZ")
        return (
            f"the own recompute differs from the function on {len(self.differences)} of "
            f"the first {self.keys} keys (first: {hour}, agent {first.key[3]}, "
            f"{first.key[5]}/{first.key[6]}: {columns})"
        )


def _shown(value: Any) -> str:
    return "no row" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def prove(
    recompute: Recompute,
    cursor: Any,
    bound: Bound,
    keys_sql: str,
    params: dict[str, Any],
    spans: Sequence[tuple[datetime, datetime]],
    call: Callable[[Any, Bound], tuple[int, int, int]],
) -> tuple[Proof, tuple[int, int, int]]:
    """In the caller's REPEATABLE READ slice: the own sums of ``keys_sql``'s keys (from the
    rows of ``spans``) set aside, then ``call`` (the function, which writes them), then the
    two compared column by column."""
    cursor.execute(DROP_PROOF_SQL)
    own_settings(cursor)
    bound()
    cursor.execute(
        recompute.statement(CREATE_PROOF_SQL, keys_sql, len(spans)),
        dict(params, **span_params(spans)),
    )
    called = call(cursor, bound)
    bound()
    cursor.execute(recompute.compare_sql())
    rows = cursor.fetchall()
    cursor.execute(PROOF_COUNT_SQL)
    proof = Proof(keys=int(cursor.fetchone()[0]))
    width = len(KEY_COLUMNS)
    for row in rows:
        key = tuple(row[:width])
        own_found, function_found = row[width], row[width + 1]
        values = row[width + 2 :]
        if own_found != function_found:
            columns: tuple[ColumnDifference, ...] = (
                ColumnDifference(
                    "row", "present" if own_found else None, "present" if function_found else None
                ),
            )
        else:
            columns = tuple(
                ColumnDifference(name, own, function)
                for name, own, function in zip(
                    recompute.version.columns, values[0::2], values[1::2], strict=True
                )
                if own != function
            )
        proof.differences.append(KeyDifference(key, columns))
    cursor.execute(DROP_PROOF_SQL)
    return proof, called


# -- the repair's rebuild --------------------------------------------------------------------

# The proof runs on this many keys (the first of the first touched hour): few enough that the
# function rebuilds them within the budget whatever its plan costs a key.
PROOF_KEYS_COUNT = 50
# The first hour slice reads about this many usage rows, to measure the rate.
FIRST_SLICE_ROWS = 20_000
# Prior rate of the recompute, in usage rows read per second, until a slice measured it.
PRIOR_ROWS_PER_SECOND = 200_000.0
RATE_SLOWER_WEIGHT = 1.0
RATE_FASTER_WEIGHT = 0.3
HOUR = timedelta(hours=1)


@dataclass
class RowRate:
    """The recompute's measured speed, in (estimated) usage rows per second of hold.

    A slowdown is believed at once, a speed-up gradually; a slice grows at most
    ``MAX_SLICE_GROWTH``-fold, and a cancelled one halves the ceiling.
    """

    target: float
    rate: float = PRIOR_ROWS_PER_SECOND
    measured: bool = False
    largest: float = 0.0
    ceiling: float | None = None

    def limit(self) -> float:
        if not self.measured:
            wanted = float(FIRST_SLICE_ROWS)
        else:
            wanted = self.target * self.rate
            if self.largest:
                wanted = min(wanted, self.largest * MAX_SLICE_GROWTH)
        if self.ceiling is not None:
            wanted = min(wanted, self.ceiling)
        return max(1.0, wanted)

    def add(self, rows: float, held: float) -> None:
        rate = rows / max(held, 1e-3)
        if not self.measured:
            self.rate = rate
        else:
            weight = RATE_SLOWER_WEIGHT if rate < self.rate else RATE_FASTER_WEIGHT
            self.rate += weight * (rate - self.rate)
        self.measured = True
        self.largest = max(self.largest, rows)

    def cancelled(self, rows: float) -> None:
        self.ceiling = max(1.0, rows / 2)
        self.rate = min(self.rate, rows / 2 / self.target)


@dataclass(frozen=True)
class _Hours:
    """Touched hours (after, upto]: their estimated rows, their keys, and their span."""

    after: int
    upto: int
    rows: int
    keys: int
    start: datetime
    end: datetime

    @property
    def hours(self) -> int:
        return self.upto - self.after


class OwnRebuild(Slicer):
    """The own path for the keys of some runs: the proof, then slices of hours.

    ``run`` returns False when the proof failed (the caller then takes the function path for
    every key; ``result.path_reason`` says why).
    """

    def __init__(
        self,
        choice: PathChoice,
        limits: SliceLimits,
        neighbours: NeighbourOptions,
        result: RollupResult,
    ) -> None:
        super().__init__(limits, neighbours, result)
        assert choice.version is not None
        self.recompute = Recompute(choice.version)
        self.slice_sql = self.recompute.statement(WRITE_SQL, SLICE_KEYS)
        self.rate = RowRate(target=limits.target)
        self.hours = 0
        self.done = self.rows_done = self.keys_done = 0
        self.run_ids: list[int] = []

    def run(
        self,
        run_ids: Sequence[int],
        should_stop: Callable[[], bool],
        on_slice: Callable[[RollupSlice, int, int], None] | None,
        on_wait: Callable[[str, float], None] | None,
    ) -> bool:
        self.run_ids = list(run_ids)
        try:
            keys, stamped = self._touched(run_ids)
            if not keys:
                return True
            self.result.keys_total += keys
            if not stamped:
                self.result.path_reason = (
                    "no key of the run still carries its stamp to prove the own recompute on "
                    "(ingestion rewrote every row since): the function rebuilds them"
                )
                return False
            proof = self._prove(should_stop, on_wait, on_slice)
            if proof is None:
                return True  # stopped first: the next run rebuilds every key
            if not proof.ok:
                self.result.path_reason = proof.describe() + ": the rest on the function path"
                logger.warning("rollup path: %s", self.result.path_reason)
                return False
            logger.info("rollup path: %s", proof.describe())
            self.hours = self._hours()
            self._slices(should_stop, on_slice, on_wait)
            return True
        finally:
            self.finish()
            drop_temp_table(DROP_KEYS_SQL, "rollup keys table", logger)
            drop_temp_table(DROP_HOURS_SQL, "rollup hours table", logger)

    def _touched(self, run_ids: Sequence[int]) -> tuple[int, int]:
        """The touched keys, in a temporary table: how many, and how many still carry a
        stamp."""
        # One pass over the runs' journal, as long as it takes (it holds no lock another
        # writer waits for): the session's statement_timeout would end it at scale.
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.limits.lock_timeout, 0)
            cursor.execute(DROP_KEYS_SQL)
            cursor.execute(DROP_HOURS_SQL)
            cursor.execute(compose("ANALYZE {journal}"))
            cursor.execute(compose(CREATE_KEYS_SQL), {"run_ids": list(run_ids)})
            cursor.execute(ANALYZE_SQL.format(table=KEYS_TABLE))
            cursor.execute(KEYS_TOTAL_SQL)
            keys, stamped = cursor.fetchone()
        return int(keys), int(stamped)

    def _hours(self) -> int:
        """The hours of the keys the proof left, numbered, with their estimated rows."""
        target = settings.CODEX_TARGET_SCHEMA
        with transaction.atomic(), connection.cursor() as cursor:
            set_local_timeouts(cursor, self.limits.lock_timeout, 0)
            cursor.execute(CREATE_HOURS_SQL, {"schema": target, "table": f"{target}.task_usage"})
            cursor.execute(INDEX_HOURS_SQL)
            cursor.execute(NUMBER_KEYS_SQL)
            cursor.execute(INDEX_KEYS_SQL)
            cursor.execute(ANALYZE_SQL.format(table=KEYS_TABLE))
            cursor.execute(ANALYZE_SQL.format(table=HOURS_TABLE))
            cursor.execute(HOURS_TOTAL_SQL)
            return int(cursor.fetchone()[0])

    def _prove(
        self,
        should_stop: Callable[[], bool],
        on_wait: Callable[[str, float], None] | None,
        on_slice: Callable[[RollupSlice, int, int], None] | None,
    ) -> Proof | None:
        """The first keys both ways, in one slice; a cancelled proof is tried on fewer keys.

        The keys are those of the first stamps: the function's call over their window of
        stamps rebuilds exactly them (and keys others queued before it ends: none, normally,
        since the stamps are below the cron's watermark and its tick drains what was queued
        before that).
        """
        count = PROOF_KEYS_COUNT
        while True:
            if not self.may_start(should_stop, on_wait):
                return None
            with connection.cursor() as cursor:
                cursor.execute(PROOF_BOUNDS_SQL, {"n": count})
                first, last = cursor.fetchone()
                cursor.execute(PROOF_HOURS_SQL, {"last": last})
                spans = spans_of([hour for (hour,) in cursor.fetchall()])
            if len(spans) > MAX_SPANS and count > 1:
                count = max(1, count // 2)
                continue
            window = (first, last + MICROSECOND)
            params = {"last": last}
            try:
                done = run_locked(
                    self.limits, self._proof_work(params, spans, window), repeatable_read=True
                )
            except SliceCancelled as exc:
                self.cancelled(exc, f"proof of the own recompute on {count} stamps' keys")
                count = max(1, count // 2)
                continue
            proof, (rollup_rows, seq_scans, index_scans) = done.value
            with connection.cursor() as cursor:
                cursor.execute(MARK_PROOF_DONE_SQL, params)
            piece = RollupSlice(
                window_from=window[0],
                window_to=window[1],
                rollup_rows=rollup_rows,
                lock_wait_seconds=done.waited,
                lock_held_seconds=done.held,
                keys=proof.keys,
                plan=Plan.NESTLOOP,
                seq_scans=seq_scans,
                index_scans=index_scans,
            )
            self.settled(piece)
            self.keys_done += proof.keys
            if on_slice is not None:
                on_slice(piece, self.keys_done, self.result.keys_total)
            log_slice(
                piece,
                f"rollup proof: {proof.keys} keys both ways, "
                f"{'equal' if proof.ok else 'different'}",
                self.keys_done,
                self.result.keys_total,
            )
            self.leave_a_gap()
            return proof

    def _proof_work(
        self,
        params: dict[str, Any],
        spans: list[tuple[datetime, datetime]],
        window: tuple[datetime, datetime],
    ) -> Callable[[Any, Bound], tuple[Proof, tuple[int, int, int]]]:
        """The proof's slice: the probe keys' own sums aside, the function called over their
        stamps (with its default plan), the two compared."""

        def call(cursor: Any, bound: Bound) -> tuple[int, int, int]:
            set_plan(cursor, Plan.NESTLOOP)
            return call_function(cursor, bound, *window)

        def work(cursor: Any, bound: Bound) -> tuple[Proof, tuple[int, int, int]]:
            return prove(self.recompute, cursor, bound, PROOF_KEYS, params, spans, call)

        return work

    def _slices(
        self,
        should_stop: Callable[[], bool],
        on_slice: Callable[[RollupSlice, int, int], None] | None,
        on_wait: Callable[[str, float], None] | None,
    ) -> None:
        """Slices of hours, each sized by the measured rate to hold the lock ``target``."""
        total = self.result.keys_total
        while self.done < self.hours:
            if not self.may_start(should_stop, on_wait):
                break
            span = self._span(self.rate.limit())
            try:
                done = run_locked(self.limits, self._slice_work(span))
            except SliceCancelled as exc:
                self.rate.cancelled(span.rows)
                if span.hours == 1 and self.cancelled_in_a_row >= 1:
                    # One hour's rows are more than a slice can read: its keys go through
                    # the function, a window of stamps at a time, and the rest goes on.
                    self.result.cancelled_holds.append(exc.held)
                    self._hour_by_function(span, should_stop, on_slice, on_wait)
                    continue
                self.cancelled(
                    exc,
                    f"slice of {span.hours} bucket hours (about {span.rows:,} usage rows, "
                    f"{span.keys:,} keys)",
                )
                continue
            rollup_rows, keys = done.value
            piece = RollupSlice(
                window_from=span.start,
                window_to=span.end,
                rollup_rows=rollup_rows,
                lock_wait_seconds=done.waited,
                lock_held_seconds=done.held,
                keys=keys,
                plan="own",
                rows=span.rows,
            )
            self.rate.add(span.rows, done.held)
            self.settled(piece)
            self.done, self.rows_done = span.upto, self.rows_done + span.rows
            self.keys_done += keys
            if on_slice is not None:
                on_slice(piece, self.keys_done, total)
            log_slice(
                piece,
                f"rollup slice: {span.hours} hours, {keys} keys ({self.keys_done}/{total})",
                self.keys_done,
                total,
            )
            if self.done < self.hours:
                self.leave_a_gap()

    def _hour_by_function(
        self,
        span: _Hours,
        should_stop: Callable[[], bool],
        on_slice: Callable[[RollupSlice, int, int], None] | None,
        on_wait: Callable[[str, float], None] | None,
    ) -> None:
        """The own path's fallback for an hour too big for one of its slices."""
        logger.warning(
            "bucket hour %s (about %s usage rows) does not fit one slice of the own "
            "recompute: the platform's function rebuilds its keys",
            f"{span.start:%Y-%m-%d %H:00}",
            f"{span.rows:,}",
        )
        counted = self.result.keys_total
        rebuild_by_function(
            self.run_ids,
            self.limits,
            self.neighbours,
            self.result,
            should_stop,
            on_slice,
            on_wait,
            hour=span.start,
        )
        self.result.keys_total = counted  # its keys were counted with the run's
        self.cancelled_in_a_row = 0
        if not self.result.stopped:
            self.done, self.rows_done = span.upto, self.rows_done + span.rows
            self.keys_done += span.keys

    def _slice_work(self, span: _Hours) -> Callable[[Any, Bound], tuple[int, int]]:
        params = dict(span_params([(span.start, span.end)]), after=span.after, upto=span.upto)

        def work(cursor: Any, bound: Bound) -> tuple[int, int]:
            own_settings(cursor)
            bound()
            cursor.execute(self.slice_sql, params)
            rollup_rows, keys = cursor.fetchone()
            return int(rollup_rows), int(keys)

        return work

    def _span(self, limit: float) -> _Hours:
        with connection.cursor() as cursor:
            cursor.execute(
                NEXT_HOURS_SQL, {"after": self.done, "limit": int(limit), "total": self.hours}
            )
            upto, rows, keys, start, end = cursor.fetchone()
        return _Hours(self.done, int(upto), int(rows), int(keys), start, end)


MICROSECOND = timedelta(microseconds=1)
