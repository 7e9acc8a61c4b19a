"""The own recompute's statements for a known version of the platform's function, and the proof
that they write what the function writes (some keys computed both ways in one snapshot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql

from usage.eligibility import KEY_COLUMNS, compose, format_sql, key_columns, same_key
from usage.repair.rollup.function import Plan, call_function
from usage.repair.rollup.slices import Bound
from usage.repair.rollup.versions import TOKEN_COLUMNS, FunctionVersion

HOUR = timedelta(hours=1)

# Each column's sum, as the known definitions compute it.
UNCOSTED = "coalesce(sum(tu.{}) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)::bigint"
OWN_SUMS = {
    **{name: f"sum(tu.{name})::bigint" for name in TOKEN_COLUMNS},
    **{f"uncosted_{name}": UNCOSTED.format(name) for name in TOKEN_COLUMNS},
    "cost_usd_ticks": "coalesce(sum(tu.cost_usd_ticks), 0)::bigint",
    "task_count": "count(DISTINCT tu.task_id)",
    "event_count": "count(*)",
}

# The keys of ``keys`` recomputed from the usage rows of some spans of created_at; agents and
# issues looked up per task (memoized), never hashed whole (docs/design.md).
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
# The same sums with each task looked up by its primary key, where the planner would hash the
# whole task table: a slice that reads few rows (``SPAN_TASKS``), or a part of an hour, which
# reads its agents' listed tasks, looked up again, and their rows by ``task_id`` (``PART_TASKS``).
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

# The proof's keys (those of its stamps, up to ``last``): the own recompute set aside, then
# compared with what the function wrote.
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
# Others' keys queued before the proof's window ends, which its call would drain: set aside
# and put back before it commits (docs/design.md).
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

PROOF_COUNT_SQL = "SELECT count(*) FROM pg_temp.codex_rollup_proof"
DROP_PROOF_SQL = "DROP TABLE IF EXISTS pg_temp.codex_rollup_proof"


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
                sql.SQL("{} AS {}").format(sql.SQL(OWN_SUMS[name]), sql.Identifier(name))
                for name in columns
            ),
            "columns": _joined("{}", columns),
            "set_columns": _joined("{} = EXCLUDED.{}", columns),
            "pairs": _joined("p.{}, h.{}", columns),
            "keys": key_columns(),
        }
        for alias in "srph":
            self.parts[f"{alias}_columns"] = _joined(alias + ".{}", columns)
        for alias in "krp":
            self.parts[f"{alias}_keys"] = key_columns(alias)
        for a, b in ("ks", "hr", "hp", "dk"):
            self.parts[f"same_{a}_{b}"] = same_key(a, b)

    def statement(
        self, template: str, keys_sql: str, spans: int = 1, probed: dict[str, str] | None = None
    ) -> str:
        """``template`` over ``spans`` spans, its tasks joined by the planner, or looked up one
        by one (``probed``: SPAN_TASKS or PART_TASKS)."""
        parts = dict(self.parts)
        parts["spans"] = sql.SQL("({})").format(
            sql.SQL(" OR ").join(
                sql.SQL("(tu.created_at >= {} AND tu.created_at < {})").format(
                    sql.Placeholder(f"span_from_{n}"), sql.Placeholder(f"span_to_{n}")
                )
                for n in range(spans)
            )
        )
        parts["task_lookups"] = format_sql(TASK_LOOKUPS)
        for name, piece in (probed or {}).items():
            parts[name] = format_sql(piece, **parts)
        parts["sums_ctes"] = format_sql(PROBED_SUMS if probed else SPAN_SUMS, **parts)
        parts["keys_sql"] = format_sql(keys_sql, **parts)
        parts["recompute"] = format_sql(RECOMPUTE_CTES, **parts)
        parts["write"] = format_sql(WRITE_CTES, **parts)
        return format_sql(template, **parts).as_string()


@dataclass
class Proof:
    """Some keys computed both ways in one snapshot: how many, how many differ, the first."""

    keys: int = 0
    differing: int = 0
    first: str = ""

    @property
    def ok(self) -> bool:
        return not self.differing

    def describe(self) -> str:
        if self.ok:
            return f"the own recompute equals the function on the first {self.keys} keys"
        return (
            f"the own recompute differs from the function on {self.differing} of "
            f"the first {self.keys} keys ({self.first})"
        )


def _shown(value: Any) -> str:
    return "no row" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _difference(row: Sequence[Any], names: Sequence[str]) -> str:
    """A row of ``COMPARE_PROOF_SQL``: its key, and the columns that differ."""
    n = len(KEY_COLUMNS)
    key, (own_found, function_found), values = row[:n], row[n : n + 2], row[n + 2 :]
    if own_found != function_found:
        pairs = [("row", "present" if own_found else None, "present" if function_found else None)]
    else:
        pairs = [
            (name, own, function)
            for name, own, function in zip(names, values[0::2], values[1::2], strict=True)
            if own != function
        ]
    columns = "; ".join(f"{name}: function {_shown(f)}, own {_shown(o)}" for name, o, f in pairs)
    return f"first: {key[0]:%Y-%m-%dT%H:%MZ}, agent {key[3]}, {key[5]}/{key[6]}: {columns}"


def prove(
    recompute: Recompute,
    cursor: Any,
    bound: Bound,
    last: Any,
    spans: Sequence[tuple[datetime, datetime]],
    window: tuple[datetime, datetime],
) -> tuple[Proof, tuple[int, dict[str, int]]]:
    """In the caller's REPEATABLE READ slice: the own sums set aside, the function called
    over ``window`` (which writes them), then the two compared."""
    cursor.execute(DROP_PROOF_SQL)
    cursor.execute(OWN_SETTINGS_SQL)
    bound()
    statement = recompute.statement(CREATE_PROOF_SQL, PROOF_KEYS, len(spans))
    cursor.execute(statement, dict(span_params(spans), last=last))
    proof_keys = sql.SQL(PROOF_KEYS.format(keys=", ".join(KEY_COLUMNS)))
    set_aside = format_sql(SET_ASIDE_SQL, proof_keys=proof_keys, same=same_key("k", "d"))
    cursor.execute(compose(SET_ASIDE_TABLE_SQL))
    cursor.execute(set_aside.as_string(), {"last": last, "to": window[1]})
    called = call_function(cursor, bound, Plan.NESTLOOP, window)
    cursor.execute(compose(PUT_BACK_SQL))
    bound()
    cursor.execute(format_sql(COMPARE_PROOF_SQL, **recompute.parts).as_string())
    rows = cursor.fetchall()
    cursor.execute(PROOF_COUNT_SQL)
    proof = Proof(keys=int(cursor.fetchone()[0]), differing=len(rows))
    if rows:
        proof.first = _difference(rows[0], recompute.version.columns)
    cursor.execute(DROP_PROOF_SQL)
    return proof, called
