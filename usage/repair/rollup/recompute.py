"""The own path: hourly keys recomputed aggregate-first, a range of touched bucket hours a
slice, after each run proved it equal to the function on its first keys (both ways in one
snapshot; docs/design.md); and the rollup's entry point, ``rebuild_keys``, on the run's path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from psycopg import sql

from usage.db import drop_temp_table
from usage.eligibility import KEY_COLUMNS, compose, format_sql, key_columns, same_key
from usage.models import BackfillRun
from usage.render import short_hash
from usage.repair.progress import Progress
from usage.repair.rollup.function import (
    ANALYZE_JOURNAL_SQL,
    MICROSECOND,
    REVERT_KEYS_TABLE,
    FunctionPath,
    Plan,
    call_function,
    from_run_rows,
)
from usage.repair.rollup.slices import (
    NEXT_SPAN_SQL,
    TARGET_LOCK_FRACTION,
    Bound,
    NeighbourOptions,
    Rate,
    RollupError,
    RollupResult,
    ShouldStop,
    SliceCancelled,
    SliceLimits,
    Span,
    one,
    run_locked,
    unbounded,
)
from usage.repair.rollup.versions import (
    TOKEN_COLUMNS,
    FunctionVersion,
    PathChoice,
    installed_fingerprint,
    recognise,
)

logger = logging.getLogger("usage.rollup")

# Each column's sum, as the known definitions compute it.
UNCOSTED = "coalesce(sum(tu.{}) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
OWN_SUMS = {
    **{name: f"sum(tu.{name})::bigint" for name in TOKEN_COLUMNS},
    **{f"uncosted_{name}": UNCOSTED.format(name) for name in TOKEN_COLUMNS},
    "cost_usd_ticks": "coalesce(sum(tu.cost_usd_ticks), 0)::bigint",
    "task_count": "count(DISTINCT tu.task_id)",
    "event_count": "count(*)",
}

# The keys of ``keys`` recomputed from the usage rows of some spans of created_at (docs/design.md).
SPAN_SUMS = """
sums AS (
    SELECT {row_key}, {sums}
    FROM {task_usage} tu
    JOIN {agent_task_queue} q ON q.id = tu.task_id
    {task_lookups}
    WHERE {spans} AND {has_key}
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)"""
TASK_LOOKUPS = """CROSS JOIN LATERAL (
        SELECT a.workspace_id FROM {agent} a WHERE a.id = q.agent_id OFFSET 0
    ) a
    LEFT JOIN LATERAL (
        SELECT i.project_id FROM {issue} i WHERE i.id = q.issue_id OFFSET 0
    ) i ON true"""
# The same sums, each task looked up by primary key where the planner would hash the task table:
# a slice of few rows (``SPAN_TASKS``), or a part of an hour by its listed tasks (``PART_TASKS``).
PROBED_SUMS = """
tasks AS MATERIALIZED (
    SELECT t.task_id, {task_key}
    FROM ({task_ids}) t
    CROSS JOIN LATERAL (
        SELECT q.agent_id, q.runtime_id, q.issue_id FROM {agent_task_queue} q
        WHERE q.id = t.task_id AND {has_key}{task_filter} OFFSET 0
    ) q
    {task_lookups}
),
sums AS (
    SELECT {bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour,
           t.workspace_id, t.runtime_id, t.agent_id, t.project_id, tu.provider, tu.model, {sums}
    FROM tasks t {task_rows}
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)"""
SPAN_TASKS = {
    "task_ids": "SELECT DISTINCT tu.task_id FROM {task_usage} tu WHERE {spans}",
    "task_filter": "",
    "task_rows": "JOIN {task_usage} tu ON tu.task_id = t.task_id AND {spans}",
}
PART_TASKS = {
    "task_ids": "SELECT task_id FROM pg_temp.codex_rollup_hour_tasks "
    "WHERE agent_id = ANY(%(agents)s)",
    "task_filter": " AND q.agent_id = ANY(%(agents)s)",
    "task_rows": """CROSS JOIN LATERAL (
        SELECT * FROM {task_usage} tu WHERE tu.task_id = t.task_id AND {spans} OFFSET 0
    ) tu""",
}
# A slice probes its tasks when it reads fewer rows than this share of the task table's.
PROBE_BELOW = 0.1
RECOMPUTE_CTES = """{sums_ctes},
recomputed AS (
    SELECT {k_keys}, s.bucket_hour IS NOT NULL AS found, {s_columns}
    FROM keys k LEFT JOIN sums s ON {same_k_s}
)"""
# ... written as the function writes it (``found`` is false for a key with no rows left).
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
WRITE_SQL = """
WITH keys AS MATERIALIZED ({keys_sql}),
{recompute},
{write}
SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted),
       (SELECT count(*) FROM keys)"""
# Short statements: no JIT, sorts in memory (docs/design.md).
OWN_SETTINGS_SQL = "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true)"

# The proof's keys (up to ``last``): the own recompute set aside, then compared to the function's.
PROOF_KEYS = "SELECT {keys} FROM pg_temp.codex_rollup_keys WHERE stamp <= %(last)s"
CREATE_PROOF_SQL = """
CREATE TEMP TABLE codex_rollup_proof ON COMMIT DROP AS
WITH keys AS MATERIALIZED ({keys_sql}),
{recompute}
SELECT * FROM recomputed"""
COMPARE_PROOF_SQL = """
SELECT {p_keys}, p.found, h.bucket_hour IS NOT NULL, {pairs}
FROM pg_temp.codex_rollup_proof p
LEFT JOIN {task_usage_hourly} h ON {same_h_p}
WHERE p.found IS DISTINCT FROM (h.bucket_hour IS NOT NULL)
   OR (p.found AND ({p_columns}) IS DISTINCT FROM ({h_columns}))"""
# Others' keys its call would drain, set aside and put back before it commits (docs/design.md).
SET_ASIDE_TABLE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS codex_proof_queue (LIKE {task_usage_hourly_dirty})
ON COMMIT DROP"""
SET_ASIDE_SQL = """
WITH gone AS (
    DELETE FROM {task_usage_hourly_dirty} d
    WHERE d.enqueued_at < %(to)s
      AND NOT EXISTS (SELECT 1 FROM ({proof_keys}) k WHERE {same})
    RETURNING d.*
)
INSERT INTO pg_temp.codex_proof_queue SELECT * FROM gone"""
PUT_BACK_SQL = """
INSERT INTO {task_usage_hourly_dirty} AS d SELECT * FROM pg_temp.codex_proof_queue
ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)"""
DROP_PROOF_SQL = "DROP TABLE IF EXISTS pg_temp.codex_rollup_proof"


def spans_of(hours: Sequence[datetime]) -> list[tuple[datetime, datetime]]:
    """Bucket hours (sorted) as the fewest ranges ``[from, to)`` that cover them."""
    spans: list[tuple[datetime, datetime]] = []
    for hour in hours:
        start = spans.pop()[0] if spans and spans[-1][1] == hour else hour
        spans.append((start, hour + timedelta(hours=1)))
    return spans


def span_params(spans: Sequence[tuple[datetime, datetime]]) -> dict[str, datetime]:
    params: dict[str, datetime] = {}
    for n, (start, end) in enumerate(spans):
        params[f"span_from_{n}"], params[f"span_to_{n}"] = start, end
    return params


def _joined(template: str, names: Sequence[str]) -> sql.Composed:
    """``template`` filled with each of ``names`` as an identifier, comma-separated."""
    return sql.SQL(", ").join(
        sql.SQL(template).format(*[sql.Identifier(name)] * template.count("{}")) for name in names
    )


class Recompute:
    """The own recompute's statements for one known version of the function."""

    def __init__(self, version: FunctionVersion) -> None:
        self.version = version
        columns = version.columns
        self.parts: dict[str, sql.Composable] = {
            "sums": sql.SQL(", ").join(
                sql.SQL(OWN_SUMS[name] + " AS {}").format(sql.Identifier(name)) for name in columns
            ),
            "columns": _joined("{}", columns),
            "set_columns": _joined("{} = EXCLUDED.{}", columns),
            "pairs": _joined("p.{}, h.{}", columns),
            "keys": key_columns(),
            **{f"{alias}_columns": _joined(alias + ".{}", columns) for alias in "srph"},
            **{f"{alias}_keys": key_columns(alias) for alias in "krp"},
            **{f"same_{a}_{b}": same_key(a, b) for a, b in ("ks", "hr", "hp", "dk")},
        }

    def statement(
        self, template: str, keys_sql: str, spans: int = 1, probed: dict[str, str] | None = None
    ) -> str:
        """``template`` over ``spans`` spans, its tasks joined by the planner, or looked up one
        by one (``probed``: SPAN_TASKS or PART_TASKS)."""
        parts = dict(self.parts)
        ranges = " OR ".join(
            f"(tu.created_at >= %(span_from_{n})s AND tu.created_at < %(span_to_{n})s)"
            for n in range(spans)
        )
        parts["spans"] = sql.SQL(f"({ranges})")
        parts["task_lookups"] = format_sql(TASK_LOOKUPS)
        for name, piece in (probed or {}).items():
            parts[name] = format_sql(piece, **parts)
        parts["sums_ctes"] = format_sql(PROBED_SUMS if probed else SPAN_SUMS, **parts)
        parts["keys_sql"] = format_sql(keys_sql, **parts)
        parts["recompute"] = format_sql(RECOMPUTE_CTES, **parts)
        parts["write"] = format_sql(WRITE_CTES, **parts)
        return format_sql(template, **parts).as_string()


def _shown(value: Any) -> str:
    return "no row" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _difference(rows: Sequence[Any], keys: int, names: Sequence[str]) -> str:
    """Rows of ``COMPARE_PROOF_SQL`` said: how many of ``keys``, the first's key and columns."""
    n = len(KEY_COLUMNS)
    key, (own_found, function_found), values = rows[0][:n], rows[0][n : n + 2], rows[0][n + 2 :]
    if own_found != function_found:
        pairs = [("row", "present" if own_found else None, "present" if function_found else None)]
    else:
        pairs = [
            (name, own, function)
            for name, own, function in zip(names, values[0::2], values[1::2], strict=True)
            if own != function
        ]
    columns = "; ".join(f"{name}: function {_shown(f)}, own {_shown(o)}" for name, o, f in pairs)
    return (
        f"the own recompute differs from the function on {len(rows)} of the first {keys} keys "
        f"(first: {key[0]:%Y-%m-%dT%H:%MZ}, agent {key[3]}, {key[5]}/{key[6]}: {columns})"
    )


# The runs' touched keys, attributed as their tasks are now, with their smallest kept stamp.
KEYS_TABLE = "pg_temp.codex_rollup_keys"
CREATE_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_keys ON COMMIT PRESERVE ROWS AS
SELECT {row_key}, min(j.new_updated_at) FILTER (WHERE tu.updated_at = j.new_updated_at) AS stamp,
       0::bigint AS hour_seq, false AS done
FROM {run_rows}
GROUP BY 1, 2, 3, 4, 5, 6, 7"""
DROP_KEYS_SQL = f"DROP TABLE IF EXISTS {KEYS_TABLE}"

# The touched hours: keys, estimated rows (and the gap's before), running totals (docs/design.md).
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
DROP_HOURS_SQL = f"DROP TABLE IF EXISTS {HOURS_TABLE}"
NUMBER_KEYS_SQL = f"""
UPDATE {KEYS_TABLE} k SET hour_seq = h.seq
FROM {HOURS_TABLE} h WHERE h.bucket_hour = k.bucket_hour AND NOT k.done"""
ANALYZE_KEYS_SQL = f"ANALYZE {KEYS_TABLE}"
# The touched hours, and the rows of the task table.
HOURS_TOTAL_SQL = f"""
SELECT count(*), (SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = %(tasks)s::regclass)
FROM {HOURS_TABLE}"""
# The next slice: the hours after ``after`` within ``limit`` estimated rows (at least one).
NEXT_HOURS_SQL = NEXT_SPAN_SQL.format(
    table=HOURS_TABLE,
    columns="s.keys_to - f.keys_to + f.keys, s.rows_to - f.rows_to + f.rows, f.bucket_hour, "
    "s.bucket_hour + interval '1 hour'",
    over="n.rows_to - f.rows_to + f.rows > %(limit)s",
)

SLICE_KEYS = f"""
SELECT {{keys}} FROM {KEYS_TABLE}
WHERE hour_seq > %(after)s AND hour_seq <= %(upto)s AND NOT done"""

# The proof's stamps: the first ``n``.
PROOF_BOUNDS_SQL = f"""
WITH probe AS (
    SELECT stamp FROM {KEYS_TABLE} WHERE stamp IS NOT NULL ORDER BY stamp LIMIT %(n)s
)
SELECT min(stamp), max(stamp) FROM probe"""
PROOF_HOURS_SQL = f"""
SELECT DISTINCT bucket_hour FROM {KEYS_TABLE} WHERE stamp <= %(last)s ORDER BY 1"""
MARK_PROOF_DONE_SQL = f"UPDATE {KEYS_TABLE} SET done = true WHERE stamp <= %(last)s"

# The revert's keys numbered as queued (``stamp``), with their time queued (none if drained).
CREATE_REVERT_KEYS_SQL = f"""
CREATE TEMP TABLE codex_rollup_keys ON COMMIT PRESERVE ROWS AS
SELECT {key_columns("k").as_string()},
       row_number() OVER (ORDER BY d.enqueued_at, k.agent_id) AS stamp, d.enqueued_at AS queued_at,
       0::bigint AS hour_seq, false AS done
FROM {REVERT_KEYS_TABLE} k
LEFT JOIN {{task_usage_hourly_dirty}} d ON {same_key("k", "d").as_string()}"""
QUEUED_WINDOW_SQL = f"""
SELECT coalesce(max(queued_at), statement_timestamp()) FROM {KEYS_TABLE} WHERE stamp <= %(last)s"""
# The revert's slice: its keys rewritten, then the queue rows its snapshot saw removed (same
# ``xmin``: a key queued again meanwhile stays queued).
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
# Spans of hours a proof may read; more, and it is halved.
MAX_SPANS = 24
# Stamps of the proof's keys; the first slice's usage rows; the prior rows per second.
PROOF_KEYS_COUNT = 50
FIRST_SLICE_ROWS = 20_000
PRIOR_ROWS_PER_SECOND = 200_000.0


@dataclass(frozen=True)
class KeySource:
    """How a rebuild's keys table is made, its own slices' statement, and whether it is queued."""

    create: str = CREATE_KEYS_SQL
    write: str = WRITE_SQL
    queued: bool = False


RUN_KEYS = KeySource()
REVERT_KEYS = KeySource(CREATE_REVERT_KEYS_SQL, DRAIN_SQL, queued=True)

# An hour too big for a slice goes in parts of its agents, its tasks listed once (docs/design.md).
HOUR_TASKS_TABLE = "pg_temp.codex_rollup_hour_tasks"
CREATE_HOUR_TASKS_SQL = """
CREATE TEMP TABLE codex_rollup_hour_tasks ON COMMIT PRESERVE ROWS AS
SELECT t.task_id, q.agent_id, t.rows
FROM (SELECT tu.task_id, count(*) AS rows FROM {task_usage} tu
      WHERE tu.created_at >= %(start)s AND tu.created_at < %(end)s GROUP BY tu.task_id) t
JOIN {agent_task_queue} q ON q.id = t.task_id"""
DROP_HOUR_TASKS_SQL = f"DROP TABLE IF EXISTS {HOUR_TASKS_TABLE}"
# The agents of the hour's keys still to do, in order, with their tasks' rows.
AGENT_ROWS_SQL = f"""
SELECT k.agent_id, coalesce((SELECT sum(t.rows) FROM {HOUR_TASKS_TABLE} t
                             WHERE t.agent_id = k.agent_id), 0)::bigint
FROM (SELECT DISTINCT agent_id FROM pg_temp.codex_rollup_keys
      WHERE hour_seq = %(seq)s AND NOT done) k
ORDER BY k.agent_id"""
PART_KEYS = """
SELECT {keys} FROM pg_temp.codex_rollup_keys
WHERE hour_seq = %(seq)s AND agent_id = ANY(%(agents)s) AND NOT done"""
MARK_PART_DONE_SQL = """
UPDATE pg_temp.codex_rollup_keys SET done = true
WHERE hour_seq = %(seq)s AND agent_id = ANY(%(agents)s)"""
# Tasks moved agent since listed: listed again, and the keys of both agents of the hour redone.
MOVED_SQL = """
WITH moved AS (
    SELECT t.task_id, t.agent_id AS left_agent, q.agent_id AS new_agent
    FROM pg_temp.codex_rollup_hour_tasks t JOIN {agent_task_queue} q ON q.id = t.task_id
    WHERE q.agent_id <> t.agent_id
),
relisted AS (
    UPDATE pg_temp.codex_rollup_hour_tasks t SET agent_id = m.new_agent
    FROM moved m WHERE t.task_id = m.task_id
    RETURNING 1
),
again AS (
    UPDATE pg_temp.codex_rollup_keys k SET done = false
    WHERE k.hour_seq = %(seq)s AND k.done AND k.agent_id IN (
        SELECT left_agent FROM moved UNION SELECT new_agent FROM moved)
    RETURNING 1
)
SELECT (SELECT count(*) FROM relisted), (SELECT count(*) FROM again)"""
# Rounds of parts and checks for moved tasks before the hour counts as done; the first part's rows.
MAX_ROUNDS = 3
FIRST_PART_ROWS = 20_000


class HourTooBig(Exception):
    """One agent's rows of the hour did not fit a slice, twice: the function rebuilds it."""


def take(agents: list[tuple[Any, int]], limit: float) -> tuple[list[Any], int]:
    """The first agents whose rows fit ``limit`` (at least one), and their rows."""
    part, rows = [], 0
    for agent, agent_rows in agents:
        if part and rows + agent_rows > limit:
            break
        part.append(agent)
        rows += int(agent_rows)
    return part, rows


class DefinitionChanged(Exception):
    """The rollup function was redefined since the run chose (and proved) its path."""


def check_definition(cursor: Any, fingerprint: str) -> None:
    now = installed_fingerprint(cursor)
    if now != fingerprint:
        version = recognise(now) if now else None
        named = version.name if version else "unknown"
        what = f"{named}, fingerprint {short_hash(now)}" if now else "gone"
        raise DefinitionChanged(
            f"the rollup function was redefined during the run (now {what}; the run chose "
            f"fingerprint {short_hash(fingerprint)})"
        )


class OwnRebuild:
    """The own path, for the keys of some runs or of the revert's batches; ``function``, its
    fallback, keeps the slices' count and the neighbours' room."""

    def __init__(
        self, choice: PathChoice, function: FunctionPath, run_ids: Sequence[int], source: KeySource
    ) -> None:
        assert choice.version is not None
        self.function, self.limits, self.result = function, function.limits, function.result
        self.run_ids, self.source = list(run_ids), source
        self.recompute = recompute = Recompute(choice.version)
        self.slice_sql = recompute.statement(source.write, SLICE_KEYS)
        self.probed_sql = recompute.statement(source.write, SLICE_KEYS, probed=SPAN_TASKS)
        self.part_sql = recompute.statement(source.write, PART_KEYS, probed=PART_TASKS)
        self.fingerprint = choice.fingerprint
        self.rate = Rate(self.limits.target, PRIOR_ROWS_PER_SECOND)
        self.part_rate = Rate(self.limits.target, PRIOR_ROWS_PER_SECOND)
        self.probe_below = 0.0
        self.hours = self.done = self.keys_done = 0

    def _prove(
        self, last: Any, spans: list[tuple[datetime, datetime]], window: tuple[datetime, datetime]
    ) -> bool:
        """The proof's keys both ways in one REPEATABLE READ slice (docs/design.md), marked done;
        whether they were equal (if not, the rest goes on the function)."""

        def work(cursor: Any, bound: Bound) -> tuple[int, list[Any], tuple[int, dict[str, int]]]:
            cursor.execute(DROP_PROOF_SQL)
            cursor.execute(OWN_SETTINGS_SQL)
            bound()
            statement = self.recompute.statement(CREATE_PROOF_SQL, PROOF_KEYS, len(spans))
            cursor.execute(statement, dict(span_params(spans), last=last))
            proof_keys = sql.SQL(PROOF_KEYS.format(keys=", ".join(KEY_COLUMNS)))
            set_aside = format_sql(SET_ASIDE_SQL, proof_keys=proof_keys, same=same_key("k", "d"))
            cursor.execute(compose(SET_ASIDE_TABLE_SQL))
            cursor.execute(set_aside.as_string(), {"last": last, "to": window[1]})
            called = call_function(cursor, bound, Plan.NESTLOOP, window)
            cursor.execute(compose(PUT_BACK_SQL))
            bound()
            cursor.execute(format_sql(COMPARE_PROOF_SQL, **self.recompute.parts).as_string())
            differing = cursor.fetchall()
            cursor.execute("SELECT count(*) FROM pg_temp.codex_rollup_proof")
            keys = int(cursor.fetchone()[0])
            cursor.execute(DROP_PROOF_SQL)
            check_definition(cursor, self.fingerprint)
            return keys, differing, called

        done = run_locked(self.limits, work, repeatable_read=True)
        keys, differing, (rollup_rows, scans) = done.value
        piece = done.piece(*window, rollup_rows, keys=keys, plan=Plan.NESTLOOP, **scans)
        self.function.settled(piece)
        if differing:
            self._to_function(_difference(differing, keys, self.recompute.version.columns))
        else:
            equal = f"the own recompute equals the function on the first {keys} keys"
            logger.info("rollup path: %s", equal)
        one(MARK_PROOF_DONE_SQL, {"last": last})
        self.keys_done += keys
        what = f"rollup proof: {keys} keys both ways, {'different' if differing else 'equal'}"
        self.function.report(piece, what, self.keys_done)
        self.function.leave_a_gap()
        return not differing

    def _to_function(self, why: str) -> None:
        """A failed proof, or a definition changed since: the rest on the function path."""
        self.result.path = BackfillRun.RollupPath.FUNCTION
        self.result.path_reason = why + ": the rest on the function path"
        logger.warning("rollup path: %s", self.result.path_reason)

    def rebuild(self) -> bool:
        """Every key; False when the proof failed (``result.path_reason``)."""
        try:
            keys, stamped = unbounded(
                self.limits,
                DROP_KEYS_SQL,
                DROP_HOURS_SQL,
                compose(ANALYZE_JOURNAL_SQL),
                (from_run_rows(self.source.create, ""), {"run_ids": self.run_ids}),
                ANALYZE_KEYS_SQL,
                f"SELECT count(*), count(stamp) FROM {KEYS_TABLE}",
            )
            if not keys:
                return True
            self.result.keys_total += keys
            if not stamped:
                self.result.path_reason = (
                    "no key of the run still carries its stamp to prove the own recompute on "
                    "(ingestion rewrote every row since): the function rebuilds them"
                )
                return False
            if not self._prove_first_keys():
                return bool(self.result.stopped)  # stopped first: the next run rebuilds all
            target = settings.CODEX_TARGET_SCHEMA
            tables = {"table": f"{target}.task_usage", "tasks": f"{target}.agent_task_queue"}
            self.hours, task_rows = unbounded(
                self.limits,
                (CREATE_HOURS_SQL, dict(tables, schema=target)),
                f"ALTER TABLE {HOURS_TABLE} ADD PRIMARY KEY (seq)",
                NUMBER_KEYS_SQL,
                f"CREATE INDEX ON {KEYS_TABLE} (hour_seq)",
                ANALYZE_KEYS_SQL,
                f"ANALYZE {HOURS_TABLE}",
                (HOURS_TOTAL_SQL, tables),
            )
            self.probe_below = PROBE_BELOW * max(task_rows, 1)
            self._slices()
            return True
        except DefinitionChanged as exc:
            self._to_function(str(exc))
            return False
        finally:
            drop_temp_table(DROP_KEYS_SQL, "rollup keys table", logger)
            drop_temp_table(DROP_HOURS_SQL, "rollup hours table", logger)

    def _prove_first_keys(self) -> bool:
        """The first stamps' keys both ways (halved if cancelled); False if unequal or stopped."""
        count = PROOF_KEYS_COUNT
        while True:
            if not self.function.may_start():
                return False
            with connection.cursor() as cursor:
                cursor.execute(PROOF_BOUNDS_SQL, {"n": count})
                first, last = cursor.fetchone()
                cursor.execute(PROOF_HOURS_SQL, {"last": last})
                spans = spans_of([hour for (hour,) in cursor.fetchall()])
            if len(spans) > MAX_SPANS and count > 1:
                count = max(1, count // 2)
                continue
            stamp = last
            if self.source.queued:  # over the time the revert's keys were queued (draining them)
                first = stamp = one(QUEUED_WINDOW_SQL, {"last": last})[0]
            window = (first, stamp + MICROSECOND)
            try:
                return self._prove(last, spans, window)
            except SliceCancelled as exc:
                # Halved down to one stamp's keys before a cancellation counts against the run.
                stamps = f"{count} stamps'" if count > 1 else "one stamp's"
                what = f"proof of the own recompute on {stamps} keys"
                self.function.cancelled(exc, what, counts=count == 1)
                count = max(1, count // 2)

    def _slices(self) -> None:
        while self.done < self.hours:
            if not self.function.may_start():
                break
            limit = self.rate.limit(FIRST_SLICE_ROWS)
            params = {"after": self.done, "limit": int(limit), "total": self.hours}
            upto, keys, rows, start, end = one(NEXT_HOURS_SQL, params)
            span = Span(self.done, int(upto), int(keys), int(rows), start, end)
            # An hour alone that would hold the lock past the budget goes in parts.
            if span.count == 1 and span.keys > 1 and span.cost * TARGET_LOCK_FRACTION > limit:
                self._hour_in_parts(span)
                continue
            try:
                done = run_locked(self.limits, self._slice_work(span))
            except SliceCancelled as exc:
                self.rate.cancelled(span.cost)  # an hour alone goes in parts next
                rows = f"about {span.cost:,} usage rows, {span.keys:,} keys"
                self.function.cancelled(exc, f"slice of {span.count} bucket hours ({rows})")
                continue
            wrote, keys = (int(value) for value in done.value[:2])
            piece = done.piece(span.start, span.end, wrote, keys=keys, plan="own", rows=span.cost)
            self.rate.add(span.cost, done.held)
            self.function.settled(piece)
            self.done = span.upto
            self.keys_done += keys
            total = self.result.keys_total
            what = f"rollup slice: {span.count} hours, {keys} keys ({self.keys_done}/{total})"
            self.function.report(piece, what, self.keys_done)
            if self.done < self.hours:
                self.function.leave_a_gap()

    def _hour_in_parts(self, span: Span) -> None:
        """In rounds of parts while tasks move agent (keys done again count once); through the
        function when one agent's rows do not fit a part."""
        unbounded(
            self.limits,
            DROP_HOUR_TASKS_SQL,
            (compose(CREATE_HOUR_TASKS_SQL), {"start": span.start, "end": span.end}),
            f"CREATE INDEX ON {HOUR_TASKS_TABLE} (agent_id)",
            f"ANALYZE {HOUR_TASKS_TABLE}",
        )
        keys, held = 0, 0.0
        try:
            for round_ in range(MAX_ROUNDS):
                done, round_held = self._parts(span)
                keys += 0 if round_ else done
                held += round_held
                if self.result.stopped:
                    break
                moved = (compose(MOVED_SQL), {"seq": span.upto})
                relisted, again = unbounded(self.limits, moved)
                if not relisted:
                    break
                logger.info("%d tasks of the hour moved agent: %d keys again", relisted, again)
        except HourTooBig:
            logger.warning(
                "one agent's rows of bucket hour %s do not fit one slice of the own recompute: "
                "the platform's function rebuilds the hour's keys",
                f"{span.start:%Y-%m-%d %H:00}",
            )
            counted = self.result.keys_total
            self.function.rebuild(self.run_ids, span.start, self.source.queued)
            self.result.keys_total = counted  # its keys were counted with the run's
            self.function.cancelled_in_a_row = 0
            keys = 0 if self.result.stopped else span.keys
        else:
            # What the hour cost in all sizes the next slices (else every later hour in parts).
            self.rate.add(span.cost, held)
        finally:
            drop_temp_table(DROP_HOUR_TASKS_SQL, "rollup hour tasks table", logger)
        self.keys_done += keys
        if not self.result.stopped:
            self.done = span.upto

    def _parts(self, span: Span) -> tuple[int, float]:
        """One part after another until every key of the hour still to do is done."""
        with connection.cursor() as cursor:
            cursor.execute(AGENT_ROWS_SQL, {"seq": span.upto})
            agents = cursor.fetchall()
        keys, held, failed = 0, 0.0, 0
        while agents:
            if not self.function.may_start():
                break
            part, rows = take(agents, self.part_rate.limit(FIRST_PART_ROWS))
            params = dict(span_params([(span.start, span.end)]), seq=span.upto, agents=part)
            try:
                done = run_locked(self.limits, self.part_work(params))
            except SliceCancelled as exc:
                self.part_rate.cancelled(max(rows, 1))
                failed = failed + 1 if len(part) == 1 else 0
                if failed >= 2:
                    raise HourTooBig from exc
                self.function.cancelled(exc, f"part of {len(part)} agents ({rows:,} rows)")
                continue
            failed = 0
            wrote, part_keys = (int(value) for value in done.value[:2])
            one(MARK_PART_DONE_SQL, {"seq": span.upto, "agents": part})
            del agents[: len(part)]
            self.part_rate.add(max(rows, 1), done.held)
            piece = done.piece(span.start, span.end, wrote, keys=part_keys, plan="own", rows=rows)
            self.function.settled(piece)
            held += done.held
            keys += part_keys
            what = f"rollup part: {len(part)} agents of an hour, {part_keys} keys"
            self.function.report(piece, what, self.keys_done + keys)
            self.function.leave_a_gap()
        return keys, held

    def _slice_work(self, span: Span) -> Callable[[Any, Bound], Any]:
        params = dict(span_params([(span.start, span.end)]), after=span.after, upto=span.upto)
        statement = self.probed_sql if span.cost < self.probe_below else self.slice_sql
        return self._work(statement, params)

    def part_work(self, params: dict[str, Any]) -> Callable[[Any, Bound], Any]:
        return self._work(self.part_sql, params)

    def _work(self, statement: str, params: dict[str, Any]) -> Callable[[Any, Bound], Any]:
        """One own statement, kept only while the installed definition is the proven one."""

        def work(cursor: Any, bound: Bound) -> Any:
            cursor.execute(OWN_SETTINGS_SQL)
            bound()
            cursor.execute(statement, params)
            row = cursor.fetchone()
            check_definition(cursor, self.fingerprint)
            return row

        return work


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
            result.slices = [replace(piece, keys=0) for piece in result.slices]
            progress("rollup_path", path=result.path, reason=result.path_reason)
            function.rebuild(run_ids, queued=source.queued)
    except RollupError as exc:
        exc.result = result
        raise
    finally:
        result.cron_waits += function.ticks.waits
        result.cron_wait_seconds += function.ticks.waited_seconds
        result.seconds = time.monotonic() - started
    return result
