"""Deterministic target dataset generator for the task_usage repair tool.

``generate_dataset`` fills an already-created target schema (see
``sandbox/target_schema.sql``) with agents, issues, tasks and ``task_usage``
rows shaped like the hosted database described in
``shared/docs/target-database.md``.  Everything runs server-side as set-based
``INSERT ... SELECT`` over ``generate_series``; no row ever travels to the
client, so client memory stays constant and a million rows load in well under
a minute (the big tables' keys and indexes are rebuilt after the load).

Every value is derived from series indexes through hash functions (``md5``
for the uuids, ``hashint8extended`` for the rest) and integer arithmetic, and
every timestamp is ``DatasetSpec.cutoff`` plus or minus a whole number of
seconds or milliseconds (never days, whose length depends on the session time
zone): the same spec always produces byte-identical rows (uuids included),
whatever the server clock, session time zone or random seed.

Shape of the data:

* many workspaces, each with a couple of runtimes, a few projects and issues;
* many ordinary agents with tens of tasks, plus a few "heavy" agents with
  thousands of tasks each (about 3,300 at the default share, as in the doc's
  production measurement);
* about 5 percent of the tasks without a runtime (never rolled up), 70 percent
  linked to an issue, a fifth of the issues without a project;
* 1 to 3 usage rows per task, each with a distinct (provider, model): about
  55 percent 'codex', 27.5 percent 'claude', 10 percent 'gemini', the rest
  'opencode' and the legacy empty provider;
* ``created_at`` spread over ``history_days`` before the cutoff, plus about
  10 percent of the tasks within ``after_days`` after it;
* the oldest sixth of the history (about 15 percent of the rows) is legacy:
  ``updated_at`` NULL; other rows have ``updated_at`` a few seconds after
  ``created_at``;
* about 5 percent of the pre-cutoff codex rows were rewritten after the cutoff
  (``updated_at`` > cutoff, cache > 0, input already normalized: not eligible);
* codex rows written before the cutoff carry the bug
  (``input_tokens`` includes ``cache_read_tokens``); about 10 percent have no
  cache read, about 3 percent are "clamped" (0 < input < cache read) and
  0.5 percent have zero input;
* ``cost_usd_ticks`` is NULL on about 8 percent of the rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

__all__ = [
    "DEMO_SPEC",
    "DatasetSpec",
    "DatasetStats",
    "HOURLY_SUMS",
    "generate_dataset",
    "mark_rolled_up",
    "populate_hourly",
]


class Cursor(Protocol):
    """The DB-API subset used here (psycopg 3 cursor or Django cursor wrapper)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate.  ``None`` sizes are derived from ``rows``.

    ``rows`` is exact.  ``cutoff`` is the (aware) ingestion-fix deployment
    time; all timestamps are placed relative to it.  ``agents`` counts all
    agents, the first ``heavy_agents`` of which share ``heavy_task_share`` of
    the tasks between them.
    """

    rows: int
    cutoff: datetime
    workspaces: int | None = None
    agents: int | None = None
    heavy_agents: int | None = None
    heavy_task_share: float = 0.05
    issues_per_workspace: int = 25
    projects_per_workspace: int = 4
    history_days: int = 60
    after_days: int = 7

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError("rows must be >= 0")
        if self.cutoff.tzinfo is None or self.cutoff.utcoffset() is None:
            raise ValueError("cutoff must be a timezone-aware datetime")
        if not 0.0 <= self.heavy_task_share <= 1.0:
            raise ValueError("heavy_task_share must be within [0, 1]")
        for name in ("workspaces", "agents"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.heavy_agents is not None and self.heavy_agents < 0:
            raise ValueError("heavy_agents must be >= 0")
        for name in ("issues_per_workspace", "projects_per_workspace", "history_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.after_days < 1:
            raise ValueError("after_days must be >= 1")
        plan = _plan(self)
        if plan.agents <= plan.heavy_agents:
            raise ValueError("agents must exceed heavy_agents")


@dataclass(frozen=True)
class DatasetStats:
    """Counts read back from the database after generation.

    ``eligible`` counts the rows the repair must rewrite (codex, cache read
    and input above zero, ``coalesce(updated_at, created_at) < cutoff``),
    ``clamped`` those of them with input below cache read, and ``legacy`` the
    rows with ``updated_at`` NULL.
    """

    rows: int
    agents: int
    tasks: int
    workspaces: int
    eligible: int
    clamped: int
    legacy: int


# Usage rows of one task take consecutive entries of this wheel (from a
# per-task offset), so the row-level mix is the entry mix, and no three
# cyclically consecutive entries repeat a pair: (task_id, provider, model)
# stays unique for tasks of up to _MAX_ROWS_PER_TASK rows.
_CODEX = ("codex", "gpt-5-codex"), ("codex", "gpt-5.1-codex"), ("codex", "gpt-5.1-codex-mini")
_CLAUDE = (
    ("claude", "claude-sonnet-4-5"),
    ("claude", "claude-opus-4-1"),
    ("claude", "claude-haiku-4-5"),
)
_OTHER = (
    ("gemini", "gemini-2.5-pro"),
    ("gemini", "gemini-2.5-flash"),
    ("opencode", "qwen3-coder"),
    ("", "unknown"),
)
_PAIRS = _CODEX + _CLAUDE + _OTHER
_WHEEL_ORDER = (
    0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 1, 2, 0, 1, 3, 0, 1, 2, 3, 4,
    5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
)  # fmt: skip
_WHEEL = tuple(_PAIRS[i] for i in _WHEEL_ORDER)
_MAX_ROWS_PER_TASK = 3


def _wheel_is_safe() -> bool:
    size = len(_WHEEL)
    return all(
        len({_WHEEL[(i + j) % size] for j in range(_MAX_ROWS_PER_TASK)}) == _MAX_ROWS_PER_TASK
        for i in range(size)
    )


if not _wheel_is_safe():
    raise RuntimeError("provider/model wheel would violate (task_id, provider, model)")


@dataclass(frozen=True)
class _Plan:
    workspaces: int
    agents: int
    heavy_agents: int
    heavy_permille: int


def _plan(spec: DatasetSpec) -> _Plan:
    heavy = spec.heavy_agents if spec.heavy_agents is not None else max(1, spec.rows // 100_000)
    workspaces = spec.workspaces if spec.workspaces is not None else max(1, spec.rows // 500)
    agents = spec.agents if spec.agents is not None else heavy + max(1, spec.rows // 50)
    permille = round(spec.heavy_task_share * 1000) if heavy > 0 else 0
    return _Plan(workspaces, agents, heavy, permille)


def _hash(key: str, seed: int) -> str:
    """SQL for an unsigned 32-bit hash of the bigint ``key`` under ``seed``.

    ``hashint8extended`` is the function behind hash partitioning, so its
    results are stable across PostgreSQL releases; it is far cheaper than
    md5, which is kept for the uuids.
    """
    return f"(hashint8extended({key}, {seed}) & 4294967295)"


def _runtime(workspace_no: str, slot: str) -> str:
    """SQL for the uuid of runtime ``slot`` (0 or 1) of workspace ``workspace_no``."""
    return f"md5('runtime-' || ({workspace_no}) || '-' || ({slot}))::uuid"


_DROP_TASKS = "DROP TABLE IF EXISTS pg_temp._dataset_task"

_CREATE_TASKS = """
CREATE TEMP TABLE _dataset_task (
    t bigint NOT NULL,
    k integer NOT NULL,
    first_row bigint NOT NULL,
    wheel_base integer NOT NULL,
    id uuid NOT NULL,
    agent_id uuid NOT NULL,
    runtime_id uuid NULL,
    issue_id uuid NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL
)
"""

# Agent a lives in workspace w = 1 + (a - 1) mod W and runs on runtime slot
# r = ((a - 1) / W) mod 2 of it, except every 29th agent, which has none.
_INSERT_AGENTS = f"""
INSERT INTO agent (id, workspace_id, name, runtime_id, created_at)
SELECT md5('agent-' || a)::uuid,
       md5('workspace-' || w)::uuid,
       CASE WHEN a <= %(heavy_agents)s THEN 'heavy-agent-' ELSE 'agent-' END || a,
       CASE WHEN mod(a, 29) = 0 THEN NULL ELSE {_runtime("w", "r")} END,
       %(cutoff)s::timestamptz - (120 * 86400 - a) * interval '1 second'
FROM (
    SELECT a,
           mod(a - 1, %(workspaces)s) + 1 AS w,
           mod((a - 1) / %(workspaces)s, 2) AS r
    FROM generate_series(1, %(agents)s::bigint) AS a
) AS s
ORDER BY a
"""

# Issue j belongs to workspace 1 + (j - 1) mod W; a fifth have no project.
_INSERT_ISSUES = f"""
INSERT INTO issue (id, workspace_id, project_id)
SELECT md5('issue-' || j)::uuid,
       md5('workspace-' || w)::uuid,
       CASE WHEN mod(h, 100) < 20 THEN NULL
            ELSE md5('project-' || w || '-' || mod(h / 100, %(projects)s))::uuid END
FROM (
    SELECT j, mod(j - 1, %(workspaces)s) + 1 AS w, {_hash("j", 201)} AS h
    FROM generate_series(1, %(workspaces)s::bigint * %(issues_per_workspace)s) AS j
) AS s
ORDER BY j
"""

# Tasks: candidate task t gets k in {1, 2, 3} usage rows (60/30/10); a
# running sum places its rows at first_row + 0 .. k - 1, and the candidates
# whose first row lies beyond spec.rows are dropped (k >= 1, so ``rows``
# candidates always suffice).  Each "OFFSET 0" keeps the planner from
# flattening a layer into its parent, which would evaluate its expressions
# once per reference instead of once per row.  The agent, runtime and issue
# uuids are looked up in arrays built once (md5 is the costly part).
_INSERT_TASKS = f"""
INSERT INTO pg_temp._dataset_task
SELECT p.t,
       p.k,
       p.first_row,
       mod(p.hw, {len(_WHEEL)})::integer,
       md5('task-' || p.t)::uuid,
       (
           (SELECT array_agg(md5('agent-' || a)::uuid ORDER BY a)
            FROM generate_series(1, %(agents)s::bigint) AS a)
       )[p.agent_no],
       CASE WHEN mod(p.hr, 100) < 5 THEN NULL
            ELSE (
                (SELECT array_agg({_runtime("w", "slot")} ORDER BY w, slot)
                 FROM generate_series(1, %(workspaces)s::bigint) AS w
                 CROSS JOIN generate_series(0, 1) AS slot)
            )[2 * p.w - 1 + CASE WHEN mod(p.hr, 100) < 12 THEN 1 - p.own_slot
                                 ELSE p.own_slot END]
       END,
       (
           (SELECT array_agg(md5('issue-' || j)::uuid ORDER BY j)
            FROM generate_series(1, %(workspaces)s::bigint * %(issues_per_workspace)s) AS j)
       )[p.issue_no],
       CASE WHEN mod(p.hm / 1000, 100) < 90 THEN 'completed'
            WHEN mod(p.hm / 1000, 100) < 96 THEN 'failed'
            ELSE 'cancelled' END,
       CASE WHEN mod(p.hr / 10000, 1000) < 100
            THEN %(cutoff)s::timestamptz
                 + mod(p.ht, %(after_seconds)s) * interval '1 second'
                 + mod(p.hm, 1000) * interval '1 millisecond'
            ELSE %(cutoff)s::timestamptz - %(history_seconds)s * interval '1 second'
                 + mod(p.ht, %(history_seconds)s) * interval '1 second'
                 + mod(p.hm, 1000) * interval '1 millisecond'
       END
FROM (
    SELECT a.*,
           mod(a.agent_no - 1, %(workspaces)s) + 1 AS w,
           CASE WHEN mod(a.agent_no, 29) = 0 THEN 0
                ELSE mod((a.agent_no - 1) / %(workspaces)s, 2) END AS own_slot,
           CASE WHEN mod(a.hr / 100, 100) < 70
                THEN mod(a.agent_no - 1, %(workspaces)s) + 1
                     + %(workspaces)s::bigint * mod(a.hm / 100000, %(issues_per_workspace)s)
           END AS issue_no
    FROM (
        SELECT h.*,
               CASE WHEN mod(h.ha, 1000) < %(heavy_permille)s
                    THEN 1 + mod(h.ha / 1000, greatest(%(heavy_agents)s, 1))
                    ELSE %(heavy_agents)s + 1 + mod(h.ha / 1000, %(regular_agents)s)
               END AS agent_no
        FROM (
            SELECT c.t, c.k, c.first_row,
                   {_hash("c.t", 102)} AS ha, {_hash("c.t", 103)} AS hr,
                   {_hash("c.t", 104)} AS ht, {_hash("c.t", 105)} AS hm,
                   {_hash("c.t", 106)} AS hw
            FROM (
                SELECT s.t, s.k,
                       sum(s.k) OVER (ORDER BY s.t ROWS UNBOUNDED PRECEDING) - s.k AS first_row
                FROM (
                    SELECT t,
                           CASE WHEN mod({_hash("t", 101)}, 100) < 60 THEN 1
                                WHEN mod({_hash("t", 101)}, 100) < 90 THEN 2
                                ELSE 3 END AS k
                    FROM generate_series(1, %(rows)s::bigint) AS t
                ) AS s
            ) AS c
            WHERE c.first_row < %(rows)s
            OFFSET 0
        ) AS h
        OFFSET 0
    ) AS a
    OFFSET 0
) AS p
"""

# Physical order follows created_at, as in a table filled by ingestion.
_INSERT_TASK_QUEUE = """
INSERT INTO agent_task_queue (id, agent_id, runtime_id, issue_id, status, created_at)
SELECT id, agent_id, runtime_id, issue_id, status, created_at
FROM pg_temp._dataset_task
ORDER BY created_at, id
"""

# Usage rows, built in layers: (r) row number n, slot and task; (u) hashes
# u1..u8 of n; (b) provider, model and created_at; (c) the "rewritten after
# the cutoff" flag; (d) updated_at and token bases; (e) cache read and whether
# the buggy ingestion wrote the row.  "OFFSET 0" as above.
_INSERT_USAGE = f"""
INSERT INTO task_usage (
    id, task_id, provider, model, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, created_at, updated_at, cost_usd_ticks
)
SELECT md5('usage-' || e.n)::uuid,
       e.task_id,
       e.provider,
       e.model,
       CASE WHEN NOT e.buggy OR e.provider <> 'codex' OR e.cache_read = 0 THEN e.fresh
            WHEN mod(e.u8, 1000) < 30 THEN 1 + mod(e.fresh, e.cache_read - 1)
            WHEN mod(e.u8, 1000) < 35 THEN 0
            ELSE e.fresh + e.cache_read
       END,
       e.output,
       e.cache_read,
       e.cache_write,
       e.created_at,
       e.updated_at,
       CASE WHEN mod(e.u5 / 10000, 100) < 8 THEN NULL
            ELSE e.fresh * 3 + e.output * 12 + e.cache_read * 3 / 10 + e.cache_write * 4
       END
FROM (
SELECT d.*,
       CASE WHEN d.provider = 'codex' AND (d.rewritten OR mod(d.u7, 100) >= 10)
                THEN 1000 + mod(d.u6, 400000)
            WHEN d.provider = 'claude' AND mod(d.u7, 100) >= 25 THEN mod(d.u6, 200000)
            WHEN d.provider = 'gemini' AND mod(d.u7, 100) >= 50 THEN mod(d.u6, 100000)
            ELSE 0
       END AS cache_read,
       coalesce(d.updated_at, d.created_at) < %(cutoff)s::timestamptz AS buggy
FROM (
SELECT c.*,
       CASE WHEN c.rewritten
                THEN %(cutoff)s::timestamptz + interval '1 hour'
                     + mod(c.u3, 5 * 86400) * interval '1 second'
            WHEN c.created_at < %(legacy_before)s::timestamptz THEN NULL
            ELSE c.created_at + (1000 + mod(c.u3, 29000)) * interval '1 millisecond'
       END AS updated_at,
       200 + mod(c.u4, 40000) AS fresh,
       50 + mod(c.u5, 8000) AS output,
       CASE WHEN c.provider = 'claude' THEN mod(c.u6 / 400000, 30000) ELSE 0 END
           AS cache_write
FROM (
SELECT b.*,
       b.provider = 'codex'
           AND b.created_at < %(cutoff)s::timestamptz
           AND mod(b.u2, 100) < 5 AS rewritten
FROM (
SELECT u.*,
       (%(wheel_providers)s::text[])[1 + mod(u.wheel_base + u.slot, {len(_WHEEL)})]
           AS provider,
       (%(wheel_models)s::text[])[1 + mod(u.wheel_base + u.slot, {len(_WHEEL)})] AS model,
       u.task_at + u.slot * interval '47 seconds'
           + mod(u.u1, 20000) * interval '1 millisecond' AS created_at
FROM (
SELECT r.*,
       {_hash("r.n", 1)} AS u1, {_hash("r.n", 2)} AS u2,
       {_hash("r.n", 3)} AS u3, {_hash("r.n", 4)} AS u4,
       {_hash("r.n", 5)} AS u5, {_hash("r.n", 6)} AS u6,
       {_hash("r.n", 7)} AS u7, {_hash("r.n", 8)} AS u8
FROM (
SELECT t.id AS task_id,
       t.created_at AS task_at,
       t.wheel_base,
       s.slot,
       t.first_row + s.slot + 1 AS n
FROM pg_temp._dataset_task AS t
JOIN generate_series(0, {_MAX_ROWS_PER_TASK - 1}) AS s (slot) ON s.slot < t.k
WHERE t.first_row + s.slot < %(rows)s
OFFSET 0
) AS r
OFFSET 0
) AS u
OFFSET 0
) AS b
OFFSET 0
) AS c
OFFSET 0
) AS d
) AS e
ORDER BY e.created_at, e.n
"""

# Bulk load, as PostgreSQL's "Populating a Database" advises: the keys,
# foreign keys and other indexes of the two big tables (and foreign keys
# pointing at them) are dropped for the load and re-created afterwards from
# their catalog definitions, under the same names, in the same transaction.
_SAVE_DDL = """
CREATE TEMP TABLE _dataset_ddl AS
WITH rel AS (
    SELECT 'agent_task_queue'::regclass::oid AS oid
    UNION ALL
    SELECT 'task_usage'::regclass::oid
)
SELECT CASE c.contype WHEN 'f' THEN 1 ELSE 2 END AS drop_order,
       CASE c.contype WHEN 'f' THEN 3 ELSE 1 END AS create_order,
       'ALTER TABLE ' || c.conrelid::regclass::text
           || ' DROP CONSTRAINT ' || quote_ident(c.conname) AS drop_sql,
       'ALTER TABLE ' || c.conrelid::regclass::text
           || ' ADD CONSTRAINT ' || quote_ident(c.conname)
           || ' ' || pg_get_constraintdef(c.oid) AS create_sql
FROM pg_constraint AS c
WHERE (c.contype IN ('p', 'u') AND c.conrelid IN (SELECT oid FROM rel))
   OR (c.contype = 'f' AND (c.conrelid IN (SELECT oid FROM rel)
                            OR c.confrelid IN (SELECT oid FROM rel)))
UNION ALL
SELECT 3, 2,
       'DROP INDEX ' || i.indexrelid::regclass::text,
       pg_get_indexdef(i.indexrelid)
FROM pg_index AS i
WHERE i.indrelid IN (SELECT oid FROM rel)
  AND NOT EXISTS (
      SELECT 1 FROM pg_constraint AS c
      WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid
  )
"""

_RUN_DROPS = """
DO $dataset$
DECLARE
    stmt text;
BEGIN
    FOR stmt IN SELECT drop_sql FROM pg_temp._dataset_ddl ORDER BY drop_order, drop_sql LOOP
        EXECUTE stmt;
    END LOOP;
END
$dataset$
"""

_RUN_CREATES = """
DO $dataset$
DECLARE
    stmt text;
BEGIN
    FOR stmt IN SELECT create_sql FROM pg_temp._dataset_ddl ORDER BY create_order, create_sql
    LOOP
        EXECUTE stmt;
    END LOOP;
END
$dataset$
"""

_DROP_DDL = "DROP TABLE IF EXISTS pg_temp._dataset_ddl"

_XACT_ID = "SELECT pg_current_xact_id()::text"

# Transaction-local settings for the load, restored before returning: no JIT
# compilation (it costs seconds and gains nothing here) and sort and
# index-build memory for a million rows.
_SETTINGS = (("jit", "off"), ("work_mem", "64MB"), ("maintenance_work_mem", "256MB"))
_GET_SETTINGS = "SELECT " + ", ".join(f"current_setting('{name}')" for name, _ in _SETTINGS)
_SET_SETTINGS = "SELECT " + ", ".join(f"set_config('{name}', %s, true)" for name, _ in _SETTINGS)

# The state the rollup function reaches from scratch (sums over every row of each key; rows
# of tasks without a runtime excluded), built in one set-based pass: calling the function
# over all time costs its production-like per-key price, hours at a million rows. The
# columns are those the hourly table has: the cost ones only since the platform's
# migration 213 (see sandbox.target). The benchmark's floor sums the same way.
HOURLY_SUMS = {
    "input_tokens": "sum(tu.input_tokens)",
    "output_tokens": "sum(tu.output_tokens)",
    "cache_read_tokens": "sum(tu.cache_read_tokens)",
    "cache_write_tokens": "sum(tu.cache_write_tokens)",
    "cost_usd_ticks": "coalesce(sum(tu.cost_usd_ticks), 0)",
    "uncosted_input_tokens": (
        "coalesce(sum(tu.input_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)"
    ),
    "uncosted_output_tokens": (
        "coalesce(sum(tu.output_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)"
    ),
    "uncosted_cache_read_tokens": (
        "coalesce(sum(tu.cache_read_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)"
    ),
    "uncosted_cache_write_tokens": (
        "coalesce(sum(tu.cache_write_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL), 0)"
    ),
    "task_count": "count(DISTINCT tu.task_id)",
    "event_count": "count(*)",
}
_HOURLY_COLUMNS = """
SELECT attname FROM pg_attribute
WHERE attrelid = 'task_usage_hourly'::regclass AND attnum > 0 AND NOT attisdropped"""
_POPULATE = """
WITH inserted AS (
    INSERT INTO task_usage_hourly (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model, {columns}
    )
    SELECT date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           a.workspace_id, q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model,
           {sums}
    FROM task_usage tu
    JOIN agent_task_queue q ON q.id = tu.task_id
    JOIN agent a ON a.id = q.agent_id
    LEFT JOIN issue i ON i.id = q.issue_id
    WHERE q.runtime_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    RETURNING 1
)
SELECT count(*) FROM inserted"""

_ANALYZE = "ANALYZE agent, issue, agent_task_queue, task_usage"

_STATS = """
SELECT (SELECT count(*) FROM task_usage),
       (SELECT count(*) FROM agent),
       (SELECT count(*) FROM agent_task_queue),
       (SELECT count(DISTINCT workspace_id) FROM agent),
       count(*) FILTER (WHERE eligible),
       count(*) FILTER (WHERE eligible AND input_tokens < cache_read_tokens),
       (SELECT count(*) FROM task_usage WHERE updated_at IS NULL)
FROM (
    SELECT tu.input_tokens,
           tu.cache_read_tokens,
           tu.provider = 'codex'
               AND tu.cache_read_tokens > 0
               AND tu.input_tokens > 0
               AND coalesce(tu.updated_at, tu.created_at) < %(cutoff)s::timestamptz
               AS eligible
    FROM task_usage AS tu
    WHERE tu.provider = 'codex'
) AS s
"""


def _params(spec: DatasetSpec) -> dict[str, Any]:
    plan = _plan(spec)
    history_seconds = spec.history_days * 86400
    return {
        "rows": spec.rows,
        "cutoff": spec.cutoff,
        "workspaces": plan.workspaces,
        "agents": plan.agents,
        "heavy_agents": plan.heavy_agents,
        "regular_agents": plan.agents - plan.heavy_agents,
        "heavy_permille": plan.heavy_permille,
        "issues_per_workspace": spec.issues_per_workspace,
        "projects": spec.projects_per_workspace,
        "history_seconds": history_seconds,
        "after_seconds": spec.after_days * 86400,
        # The oldest sixth of the history predates the updated_at column.
        "legacy_before": spec.cutoff - timedelta(seconds=history_seconds * 5 // 6),
        "wheel_providers": [provider for provider, _ in _WHEEL],
        "wheel_models": [model for _, model in _WHEEL],
    }


def generate_dataset(cursor: Cursor, spec: DatasetSpec, *, bulk_load: bool = True) -> DatasetStats:
    """Fill the (empty) target schema on ``cursor``'s search_path from ``spec``.

    Runs a handful of set-based statements, ANALYZEs the tables and reads the
    counts back.  Inside a transaction (a psycopg connection without
    autocommit, a Django ``atomic`` block) nothing is committed here; on an
    autocommit connection the whole load runs in one transaction of its own,
    so a failure never leaves a half-built schema.  ``task_usage_hourly`` is
    left empty: call :func:`populate_hourly` for the initial rollup.

    With ``bulk_load`` (the default) the primary keys, unique constraints,
    foreign keys and indexes of ``agent_task_queue`` and ``task_usage`` are
    dropped during the load and re-created from their catalog definitions,
    under the same names, before returning: about three times faster at a
    million rows.  It needs ownership of those tables and takes ACCESS
    EXCLUSIVE locks on them; ``bulk_load=False`` inserts through the live
    indexes and constraints instead.
    """
    own_transaction = not _in_transaction(cursor)
    if own_transaction:
        cursor.execute("BEGIN")
    try:
        stats = _generate(cursor, spec, bulk_load)
    except BaseException:
        if own_transaction:
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
        raise
    if own_transaction:
        cursor.execute("COMMIT")
    return stats


def _in_transaction(cursor: Cursor) -> bool:
    """Whether two consecutive statements share one transaction (no autocommit)."""
    cursor.execute(_XACT_ID)
    first = cursor.fetchone()[0]
    cursor.execute(_XACT_ID)
    return bool(cursor.fetchone()[0] == first)


def _generate(cursor: Cursor, spec: DatasetSpec, bulk_load: bool) -> DatasetStats:
    params = _params(spec)
    cursor.execute(_GET_SETTINGS)
    saved = [str(value) for value in cursor.fetchone()]
    cursor.execute(_SET_SETTINGS, [value for _, value in _SETTINGS])
    if bulk_load:
        cursor.execute(_DROP_DDL)
        cursor.execute(_SAVE_DDL)
        cursor.execute(_RUN_DROPS)
    cursor.execute(_DROP_TASKS)
    cursor.execute(_CREATE_TASKS)
    cursor.execute(_INSERT_AGENTS, params)
    cursor.execute(_INSERT_ISSUES, params)
    cursor.execute(_INSERT_TASKS, params)
    cursor.execute(_INSERT_TASK_QUEUE)
    cursor.execute(_INSERT_USAGE, params)
    cursor.execute(_DROP_TASKS)
    if bulk_load:
        cursor.execute(_RUN_CREATES)
        cursor.execute(_DROP_DDL)
    cursor.execute(_ANALYZE)
    cursor.execute(_SET_SETTINGS, saved)
    cursor.execute(_STATS, {"cutoff": spec.cutoff})
    row = cursor.fetchone()
    rows, agents, tasks, workspaces, eligible, clamped, legacy = (int(v) for v in row)
    return DatasetStats(
        rows=rows,
        agents=agents,
        tasks=tasks,
        workspaces=workspaces,
        eligible=eligible,
        clamped=clamped,
        legacy=legacy,
    )


def populate_hourly(cursor: Cursor) -> int:
    """Build ``task_usage_hourly`` from scratch, as the rollup function would; return its rows.

    Expects an empty hourly table (a freshly generated dataset). The tests check that the
    result equals a from-scratch recompute and what the rollup function itself produces.
    """
    cursor.execute(_HOURLY_COLUMNS)
    present = {str(name) for (name,) in cursor.fetchall()}
    columns = [name for name in HOURLY_SUMS if name in present]
    cursor.execute(
        _POPULATE.format(
            columns=", ".join(columns), sums=", ".join(HOURLY_SUMS[name] for name in columns)
        )
    )
    row = cursor.fetchone()
    return int(row[0])


# The platform's cron tick as if it had rolled up everything written (the hour after the last
# write) and its scheduler had stopped five minutes later: deterministic for a given dataset.
_MARK_ROLLED_UP = """
UPDATE task_usage_hourly_rollup_state
SET watermark_at = m.watermark,
    last_run_started_at = m.watermark + interval '5 minutes',
    last_run_finished_at = m.watermark + interval '5 minutes',
    last_run_rows = (SELECT count(*) FROM task_usage_hourly),
    last_error = NULL
FROM (
    SELECT date_trunc('hour', max(coalesce(updated_at, created_at))) + interval '1 hour'
               AS watermark
    FROM task_usage
) m
WHERE id = 1 AND m.watermark IS NOT NULL
RETURNING watermark_at"""


def mark_rolled_up(cursor: Cursor) -> Any:
    """Set the cron tick's state as if it had rolled up the whole dataset; return the watermark.

    Call after :func:`populate_hourly`. Without it the state says the tick never ran, and the
    repair stamps rows with its own time (see ``usage.cron``).
    """
    cursor.execute(_MARK_ROLLED_UP)
    row = cursor.fetchone()
    return row[0] if row else None


# Seeds a sandbox database; the cutoff is the day the fix landed upstream.
DEMO_SPEC = DatasetSpec(rows=5000, cutoff=datetime(2026, 6, 13, 8, 0, tzinfo=UTC))
