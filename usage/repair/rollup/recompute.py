"""The own path's statements: hourly keys recomputed aggregate-first from the usage rows (the
sums each known definition computes), the keys and hours tables, the proof against the function
on a run's first keys (both ways in one snapshot; docs/design.md), and an hour's parts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql

from usage.eligibility import KEY_COLUMNS, format_sql, key_columns, same_key
from usage.repair.rollup.function import REVERT_KEYS_TABLE
from usage.repair.rollup.slices import NEXT_SPAN_SQL
from usage.repair.rollup.versions import TOKEN_COLUMNS, FunctionVersion

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


def spans_of(rows: Sequence[tuple[datetime]]) -> list[tuple[datetime, datetime]]:
    """Rows of a bucket hour each (sorted) as the fewest ranges ``[from, to)`` that cover them."""
    spans: list[tuple[datetime, datetime]] = []
    for (hour,) in rows:
        start = spans.pop()[0] if spans and spans[-1][1] == hour else hour
        spans.append((start, hour + timedelta(hours=1)))
    return spans


def span_params(spans: Sequence[tuple[datetime, datetime]], **more: Any) -> dict[str, Any]:
    params = dict(more)
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
        self, template: str, keys_sql: str, probed: dict[str, str] | None = None, spans: int = 1
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

    def proof(self, spans: int) -> tuple[str, str, str]:
        """The proof's statements: its keys recomputed apart, the others' queued keys set
        aside, and the comparison with what the function wrote."""
        proof_keys = sql.SQL(PROOF_KEYS.format(keys=", ".join(KEY_COLUMNS)))
        set_aside = format_sql(SET_ASIDE_SQL, proof_keys=proof_keys, same=same_key("k", "d"))
        compare = format_sql(COMPARE_PROOF_SQL, **self.parts).as_string()
        create = self.statement(CREATE_PROOF_SQL, PROOF_KEYS, spans=spans)
        return create, set_aside.as_string(), compare


def _shown(value: Any) -> str:
    return "no row" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def difference(rows: Sequence[Any], keys: int, names: Sequence[str]) -> str:
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
