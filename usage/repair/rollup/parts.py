"""A bucket hour too big for one slice of the own path, recomputed in parts of its agents,
each part one slice reading only its agents' tasks' rows (docs/design.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import connection

from usage.db import drop_temp_table
from usage.eligibility import compose
from usage.repair.rollup.proof import span_params
from usage.repair.rollup.slices import (
    Bound,
    Rate,
    SliceCancelled,
    Slicer,
    Span,
    run_locked,
    unbounded,
)

logger = logging.getLogger("usage.rollup")

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


# ``OwnRebuild.part_work``.
PartWork = Callable[[dict[str, Any]], Callable[[Any, Bound], Any]]


class HourTooBig(Exception):
    """One agent's rows of the hour did not fit a slice, twice: the function rebuilds it."""


class HourParts:
    """The parts of one bucket hour, each a slice of ``part_work`` sized by the parts' ``rate``."""

    def __init__(
        self, slicer: Slicer, span: Span, rate: Rate, part_work: PartWork, keys_done: int
    ) -> None:
        self.slicer, self.span, self.rate = slicer, span, rate
        self.part_work, self.keys_done = part_work, keys_done
        self.seq = span.upto
        self.held = 0.0  # by all the hour's parts together

    def run(self) -> int:
        """Every key of the hour, in parts (those done again count once); or ``HourTooBig``."""
        hour = {"start": self.span.start, "end": self.span.end}
        limits = self.slicer.limits
        unbounded(
            limits,
            DROP_HOUR_TASKS_SQL,
            (compose(CREATE_HOUR_TASKS_SQL), hour),
            INDEX_HOUR_TASKS_SQL,
            ANALYZE_HOUR_TASKS_SQL,
        )
        keys = 0
        try:
            for round_ in range(MAX_ROUNDS):
                done = self._round()
                keys += 0 if round_ else done
                if self.slicer.result.stopped:
                    return keys
                relisted, again = unbounded(limits, (compose(MOVED_SQL), {"seq": self.seq}))
                if not relisted:
                    break
                logger.info("%d tasks of the hour moved agent: %d keys again", relisted, again)
        finally:
            drop_temp_table(DROP_HOUR_TASKS_SQL, "rollup hour tasks table", logger)
        return keys

    def _round(self) -> int:
        """One part after another until every key of the hour still to do is done."""
        slicer, span = self.slicer, self.span
        with connection.cursor() as cursor:
            cursor.execute(AGENT_ROWS_SQL, {"seq": self.seq})
            agents = cursor.fetchall()
        keys = failed = 0
        while agents:
            if not slicer.may_start():
                break
            part, rows = _take(agents, self.rate.limit(FIRST_PART_ROWS))
            params = dict(span_params([(span.start, span.end)]), seq=self.seq, agents=part)
            try:
                done = run_locked(slicer.limits, self.part_work(params))
            except SliceCancelled as exc:
                self.rate.cancelled(max(rows, 1))
                failed = failed + 1 if len(part) == 1 else 0
                if failed >= 2:
                    raise HourTooBig from exc
                slicer.cancelled(exc, f"part of {len(part)} agents ({rows:,} rows)")
                continue
            failed = 0
            rollup_rows, part_keys = (int(value) for value in done.value[:2])
            with connection.cursor() as cursor:
                cursor.execute(MARK_PART_DONE_SQL, {"seq": self.seq, "agents": part})
            del agents[: len(part)]
            self.rate.add(max(rows, 1), done.held)
            piece = done.piece(
                span.start, span.end, rollup_rows, keys=part_keys, plan="own", rows=rows
            )
            slicer.settled(piece)
            self.held += done.held
            keys += part_keys
            what = f"rollup part: {len(part)} agents of an hour, {part_keys} keys"
            slicer.report(piece, what, self.keys_done + keys)
            slicer.leave_a_gap()
        return keys


def _take(agents: list[tuple[Any, int]], limit: float) -> tuple[list[Any], int]:
    """The first agents whose rows fit ``limit`` (at least one), and their rows."""
    part: list[Any] = []
    rows = 0
    for agent, agent_rows in agents:
        if part and rows + agent_rows > limit:
            break
        part.append(agent)
        rows += int(agent_rows)
    return part, rows
