"""Deterministic target dataset generator for the task_usage repair tool.

``generate_dataset`` fills an already-created target schema (see
``usage/sql/target_schema.sql``) with agents, issues, tasks and ``task_usage``
rows shaped like the hosted database described in
``shared/docs/target-database.md``.  Everything runs server-side as set-based
``INSERT ... SELECT`` over ``generate_series``; no row ever travels to the
client, so a million rows take seconds and constant client memory.

Every value is derived from series indexes through ``md5`` and integer
arithmetic, and every timestamp is relative to ``DatasetSpec.cutoff``: the
same spec always produces byte-identical rows (uuids included), whatever the
server clock, session time zone or random seed.

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

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

__all__ = [
    "DEMO_SPEC",
    "DatasetSpec",
    "DatasetStats",
    "generate_dataset",
    "populate_hourly",
]


class Cursor(Protocol):
    """The DB-API subset used here (psycopg 3 cursor or Django cursor wrapper)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...


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
    """Counts read back from the database after generation."""

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


assert _wheel_is_safe(), "provider/model wheel would violate (task_id, provider, model)"


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


def _h32(md5_expr: str, part: int) -> str:
    """SQL for the ``part``-th (0..3) unsigned 32-bit slice of an md5 hex string."""
    return f"('x' || substr({md5_expr}, {8 * part + 1}, 8))::bit(32)::bigint"


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

_INSERT_AGENTS = f"""
INSERT INTO agent (id, workspace_id, name, runtime_id, created_at)
SELECT md5('agent-' || a)::uuid,
       md5('workspace-' || w)::uuid,
       CASE WHEN a <= %(heavy_agents)s THEN 'heavy-agent-' ELSE 'agent-' END || a,
       CASE WHEN mod(a, 29) = 0 THEN NULL
            ELSE {_runtime("w", "mod((a - 1) / %(workspaces)s, 2)")} END,
       %(cutoff)s::timestamptz - interval '120 days' + a * interval '1 second'
FROM (
    SELECT a, mod(a - 1, %(workspaces)s) + 1 AS w
    FROM generate_series(1, %(agents)s::bigint) AS a
) AS s
"""

_INSERT_ISSUES = f"""
INSERT INTO issue (id, workspace_id, project_id)
SELECT md5('issue-' || j)::uuid,
       md5('workspace-' || w)::uuid,
       CASE WHEN mod(h, 100) < 20 THEN NULL
            ELSE md5('project-' || w || '-' || mod(h / 100, %(projects)s))::uuid END
FROM (
    SELECT j, mod(j - 1, %(workspaces)s) + 1 AS w, {_h32("md5('issue-attr-' || j)", 0)} AS h
    FROM generate_series(1, %(workspaces)s::bigint * %(issues_per_workspace)s) AS j
) AS s
"""

# Tasks: candidate task t gets k in {1, 2, 3} usage rows (60/30/10); a
# running sum places its rows at first_row + 0 .. k - 1, and the candidates
# whose first row lies beyond spec.rows are dropped (k >= 1, so ``rows``
# candidates always suffice).
_INSERT_TASKS = f"""
INSERT INTO pg_temp._dataset_task
SELECT p.t,
       p.k,
       p.first_row,
       mod(p.h2 / 1000, {len(_WHEEL)})::integer,
       md5('task-' || p.t)::uuid,
       md5('agent-' || p.agent_no)::uuid,
       CASE WHEN mod(p.h3, 100) < 5 THEN NULL
            WHEN mod(p.h3, 100) < 12 THEN {_runtime("p.w", "1 - p.r")}
            ELSE {_runtime("p.w", "CASE WHEN mod(p.agent_no, 29) = 0 THEN 0 ELSE p.r END")}
       END,
       CASE WHEN mod(p.h3 / 100000, 100) < 70
            THEN md5('issue-' || (p.w + %(workspaces)s::bigint
                                  * mod(p.h5 / 100000, %(issues_per_workspace)s)))::uuid
       END,
       CASE WHEN mod(p.h5 / 1000, 100) < 90 THEN 'completed'
            WHEN mod(p.h5 / 1000, 100) < 96 THEN 'failed'
            ELSE 'cancelled' END,
       CASE WHEN mod(p.h3 / 100, 1000) < 100
            THEN %(cutoff)s::timestamptz
                 + mod(p.h4, %(after_seconds)s) * interval '1 second'
                 + mod(p.h6, 1000) * interval '1 millisecond'
            ELSE %(cutoff)s::timestamptz - %(history_seconds)s * interval '1 second'
                 + mod(p.h4, %(history_seconds)s) * interval '1 second'
                 + mod(p.h6, 1000) * interval '1 millisecond'
       END
FROM (
    SELECT s.*,
           mod(s.agent_no - 1, %(workspaces)s) + 1 AS w,
           mod((s.agent_no - 1) / %(workspaces)s, 2) AS r,
           sum(s.k) OVER (ORDER BY s.t ROWS UNBOUNDED PRECEDING) - s.k AS first_row
    FROM (
        SELECT h.*,
               CASE WHEN mod(h.h1, 100) < 60 THEN 1
                    WHEN mod(h.h1, 100) < 90 THEN 2
                    ELSE 3 END AS k,
               CASE WHEN mod(h.h1 / 100, 1000) < %(heavy_permille)s
                    THEN 1 + mod(h.h2, greatest(%(heavy_agents)s, 1))
                    ELSE %(heavy_agents)s + 1 + mod(h.h2, %(regular_agents)s)
               END AS agent_no
        FROM (
            SELECT t,
                   {_h32("m1", 0)} AS h1, {_h32("m1", 1)} AS h2,
                   {_h32("m1", 2)} AS h3, {_h32("m1", 3)} AS h4,
                   {_h32("m2", 0)} AS h5, {_h32("m2", 1)} AS h6
            FROM (
                SELECT t, md5('task-a-' || t) AS m1, md5('task-b-' || t) AS m2
                FROM generate_series(1, %(rows)s::bigint) AS t
            ) AS g
        ) AS h
    ) AS s
) AS p
WHERE p.first_row < %(rows)s
"""

_INSERT_TASK_QUEUE = """
INSERT INTO agent_task_queue (id, agent_id, runtime_id, issue_id, status, created_at)
SELECT id, agent_id, runtime_id, issue_id, status, created_at
FROM pg_temp._dataset_task
ORDER BY t
"""

# Usage rows, built in layers: (r) row number n, slot and task; (u) hash
# slices u1..u8 of two md5s of n; (b) provider, model and created_at; (c) the
# "rewritten after the cutoff" flag; (d) updated_at and token bases; (e) cache
# read and whether the buggy ingestion wrote the row.
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
       {_h32("r.m1", 0)} AS u1, {_h32("r.m1", 1)} AS u2,
       {_h32("r.m1", 2)} AS u3, {_h32("r.m1", 3)} AS u4,
       {_h32("r.m2", 0)} AS u5, {_h32("r.m2", 1)} AS u6,
       {_h32("r.m2", 2)} AS u7, {_h32("r.m2", 3)} AS u8
FROM (
SELECT t.id AS task_id,
       t.created_at AS task_at,
       t.wheel_base,
       s.slot,
       t.first_row + s.slot + 1 AS n,
       md5('usage-a-' || (t.first_row + s.slot + 1)) AS m1,
       md5('usage-b-' || (t.first_row + s.slot + 1)) AS m2
FROM pg_temp._dataset_task AS t
JOIN generate_series(0, {_MAX_ROWS_PER_TASK - 1}) AS s (slot) ON s.slot < t.k
WHERE t.first_row + s.slot < %(rows)s
) AS r
) AS u
) AS b
) AS c
) AS d
) AS e
ORDER BY e.n
"""

_POPULATE = "SELECT rollup_task_usage_hourly_window('-infinity', 'infinity')"

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


def generate_dataset(cursor: Cursor, spec: DatasetSpec) -> DatasetStats:
    """Fill the (empty) target schema on ``cursor``'s search_path from ``spec``.

    Runs a handful of set-based statements on the caller's connection and
    transaction (nothing is committed here), then ANALYZEs the tables and
    reads the counts back.  ``task_usage_hourly`` is left empty: call
    :func:`populate_hourly` for the initial rollup.
    """
    params = _params(spec)
    cursor.execute(_DROP_TASKS)
    cursor.execute(_CREATE_TASKS)
    cursor.execute(_INSERT_AGENTS, params)
    cursor.execute(_INSERT_ISSUES, params)
    cursor.execute(_INSERT_TASKS, params)
    cursor.execute(_INSERT_TASK_QUEUE)
    cursor.execute(_INSERT_USAGE, params)
    cursor.execute(_DROP_TASKS)
    cursor.execute(_ANALYZE)
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
    """Build ``task_usage_hourly`` from scratch with the schema's rollup function.

    Calls ``rollup_task_usage_hourly_window('-infinity', 'infinity')`` and
    returns its result (hourly rows upserted plus deleted).  Its cost follows
    the function's production-like per-key cost, so it is the slow step of
    seeding a large dataset.
    """
    cursor.execute(_POPULATE)
    row = cursor.fetchone()
    return int(row[0])


# Seeds a sandbox database; the cutoff is the day the fix landed upstream.
DEMO_SPEC = DatasetSpec(rows=5000, cutoff=datetime(2026, 6, 13, 8, 0, tzinfo=UTC))
