"""The statements of a bucket hour too big for one slice of the own path, recomputed in parts
of its agents, each part one slice reading only its agents' tasks' rows (docs/design.md)."""

from __future__ import annotations

from typing import Any

# The hour's tasks with their agent and rows, listed once per hour outside the lock.
HOUR_TASKS_TABLE = "pg_temp.codex_rollup_hour_tasks"
CREATE_HOUR_TASKS_SQL = """
CREATE TEMP TABLE codex_rollup_hour_tasks ON COMMIT PRESERVE ROWS AS
SELECT t.task_id, q.agent_id, t.rows
FROM (SELECT tu.task_id, count(*) AS rows FROM {task_usage} tu
      WHERE tu.created_at >= %(start)s AND tu.created_at < %(end)s GROUP BY tu.task_id) t
JOIN {agent_task_queue} q ON q.id = t.task_id"""
INDEX_HOUR_TASKS_SQL = f"CREATE INDEX ON {HOUR_TASKS_TABLE} (agent_id)"
ANALYZE_HOUR_TASKS_SQL = f"ANALYZE {HOUR_TASKS_TABLE}"
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
# Tasks moved to another agent since they were listed: listed again, and the keys of both
# agents of the hour done again.
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
# Rounds of parts and checks for moved tasks before the hour counts as done.
MAX_ROUNDS = 3
# The first part's rows.
FIRST_PART_ROWS = 20_000


class HourTooBig(Exception):
    """One agent's rows of the hour did not fit a slice, twice: the function rebuilds it."""


def take(agents: list[tuple[Any, int]], limit: float) -> tuple[list[Any], int]:
    """The first agents whose rows fit ``limit`` (at least one), and their rows."""
    part: list[Any] = []
    rows = 0
    for agent, agent_rows in agents:
        if part and rows + agent_rows > limit:
            break
        part.append(agent)
        rows += int(agent_rows)
    return part, rows
