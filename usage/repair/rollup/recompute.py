"""The own path: hourly keys recomputed aggregate-first, a range of touched bucket hours a
slice, after each run proved it equal to the function on its first keys (docs/design.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection

from usage.db import drop_temp_table
from usage.eligibility import compose, key_columns, same_key
from usage.models import BackfillRun
from usage.render import short_hash
from usage.repair.rollup.function import (
    ANALYZE_JOURNAL_SQL,
    MICROSECOND,
    REVERT_KEYS_TABLE,
    FunctionPath,
    Plan,
    from_run_rows,
)
from usage.repair.rollup.proof import (
    OWN_SETTINGS_SQL,
    PART_TASKS,
    PROBE_BELOW,
    SPAN_TASKS,
    WRITE_SQL,
    Proof,
    Recompute,
    prove,
    span_params,
    spans_of,
)
from usage.repair.rollup.slices import (
    NEXT_SPAN_SQL,
    TARGET_LOCK_FRACTION,
    Bound,
    Rate,
    RollupSlice,
    SliceCancelled,
    Span,
    run_locked,
    unbounded,
)
from usage.repair.rollup.versions import PathChoice, installed_fingerprint, recognise

logger = logging.getLogger("usage.rollup")

# The runs' touched keys, attributed as their tasks are now, with their smallest kept stamp.
KEYS_TABLE = "pg_temp.codex_rollup_keys"
CREATE_KEYS_SQL = """
CREATE TEMP TABLE codex_rollup_keys ON COMMIT PRESERVE ROWS AS
SELECT {row_key}, min(j.new_updated_at) FILTER (WHERE tu.updated_at = j.new_updated_at) AS stamp,
       0::bigint AS hour_seq, false AS done
FROM {run_rows}
GROUP BY 1, 2, 3, 4, 5, 6, 7"""
DROP_KEYS_SQL = f"DROP TABLE IF EXISTS {KEYS_TABLE}"

# The touched hours with their keys and estimated rows (and the gap's since the hour before),
# in running totals (docs/design.md).
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
ANALYZE_KEYS_SQL = f"ANALYZE {KEYS_TABLE}"
ANALYZE_HOURS_SQL = f"ANALYZE {HOURS_TABLE}"
KEYS_TOTAL_SQL = f"SELECT count(*), count(stamp) FROM {KEYS_TABLE}"
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
PROOF_HOURS_SQL = (
    f"SELECT DISTINCT bucket_hour FROM {KEYS_TABLE} WHERE stamp <= %(last)s ORDER BY 1"
)
MARK_PROOF_DONE_SQL = f"UPDATE {KEYS_TABLE} SET done = true WHERE stamp <= %(last)s"

# The revert's keys, numbered in the order they were queued (``stamp``), with the time each was
# (``queued_at``; none when the tick drained it).
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
    """How a rebuild's keys table is made, an own slice's statement, and whether the keys are in
    the platform's queue (the revert's)."""

    create: str = CREATE_KEYS_SQL
    write: str = WRITE_SQL
    queued: bool = False


RUN_KEYS = KeySource()
REVERT_KEYS = KeySource(CREATE_REVERT_KEYS_SQL, DRAIN_SQL, queued=True)


# An hour too big for one slice goes in parts of its agents, each one slice reading only its
# agents' tasks' rows (docs/design.md); its tasks with their agent and rows are listed once.
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
# Rounds of parts and checks for moved tasks before the hour counts as done; the first part's rows.
MAX_ROUNDS = 3
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
    ) -> tuple[Proof, RollupSlice]:
        """``prove`` in one REPEATABLE READ slice; a failed proof puts the rest on the function."""

        def work(cursor: Any, bound: Bound) -> tuple[Proof, tuple[int, dict[str, int]]]:
            proved = prove(self.recompute, cursor, bound, last, spans, window)
            check_definition(cursor, self.fingerprint)
            return proved

        done = run_locked(self.limits, work, repeatable_read=True)
        proof, (rollup_rows, scans) = done.value
        piece = done.piece(*window, rollup_rows, keys=proof.keys, plan=Plan.NESTLOOP, **scans)
        self.function.settled(piece)
        if proof.ok:
            logger.info("rollup path: %s", proof.describe())
        else:
            self._to_function(proof.describe())
        return proof, piece

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
                KEYS_TOTAL_SQL,
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
            where = {"schema": target, "table": f"{target}.task_usage"}
            tasks = {"tasks": f"{target}.agent_task_queue"}
            self.hours, task_rows = unbounded(
                self.limits,
                (CREATE_HOURS_SQL, where),
                INDEX_HOURS_SQL,
                NUMBER_KEYS_SQL,
                INDEX_KEYS_SQL,
                ANALYZE_KEYS_SQL,
                ANALYZE_HOURS_SQL,
                (HOURS_TOTAL_SQL, tasks),
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
        """The keys of the first stamps both ways (halved when cancelled); False when it failed
        or a stop came first."""
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
            if self.source.queued:  # over the time the revert's keys were queued (draining them)
                with connection.cursor() as cursor:
                    cursor.execute(QUEUED_WINDOW_SQL, {"last": last})
                    first = stamp = cursor.fetchone()[0]
            else:
                stamp = last
            window = (first, stamp + MICROSECOND)
            try:
                proof, piece = self._prove(last, spans, window)
            except SliceCancelled as exc:
                # Halved down to one stamp's keys before a cancellation counts against the run.
                stamps = f"{count} stamps'" if count > 1 else "one stamp's"
                what = f"proof of the own recompute on {stamps} keys"
                self.function.cancelled(exc, what, counts=count == 1)
                count = max(1, count // 2)
                continue
            with connection.cursor() as cursor:
                cursor.execute(MARK_PROOF_DONE_SQL, {"last": last})
            self.keys_done += proof.keys
            outcome = "equal" if proof.ok else "different"
            what = f"rollup proof: {proof.keys} keys both ways, {outcome}"
            self.function.report(piece, what, self.keys_done)
            self.function.leave_a_gap()
            return proof.ok

    def _slices(self) -> None:
        while self.done < self.hours:
            if not self.function.may_start():
                break
            limit = self.rate.limit(FIRST_SLICE_ROWS)
            with connection.cursor() as cursor:
                params = {"after": self.done, "limit": int(limit), "total": self.hours}
                cursor.execute(NEXT_HOURS_SQL, params)
                upto, keys, rows, start, end = cursor.fetchone()
            span = Span(self.done, int(upto), int(keys), int(rows), start, end)
            # An hour alone that would hold the lock past the budget goes in parts.
            if span.count == 1 and span.keys > 1 and span.cost * TARGET_LOCK_FRACTION > limit:
                self._hour_in_parts(span)
                continue
            try:
                done = run_locked(self.limits, self._slice_work(span))
            except SliceCancelled as exc:
                self.rate.cancelled(span.cost)  # an hour alone goes in parts next
                self.function.cancelled(
                    exc,
                    f"slice of {span.count} bucket hours (about {span.cost:,} usage rows, "
                    f"{span.keys:,} keys)",
                )
                continue
            rollup_rows, keys = (int(value) for value in done.value[:2])
            piece = done.piece(
                span.start, span.end, rollup_rows, keys=keys, plan="own", rows=span.cost
            )
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
        """In parts; through the function when one agent's rows do not fit a part."""
        try:
            keys, held = self._rounds_of_parts(span)
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
            if not self.result.stopped:
                self.done = span.upto
                self.keys_done += span.keys
            return
        # What the hour cost in all sizes the next slices (else every later hour in parts).
        self.rate.add(span.cost, held)
        self.keys_done += keys
        if not self.result.stopped:
            self.done = span.upto

    def _rounds_of_parts(self, span: Span) -> tuple[int, float]:
        """Every key of the hour (those done again count once), and the lock its parts held."""
        unbounded(
            self.limits,
            DROP_HOUR_TASKS_SQL,
            (compose(CREATE_HOUR_TASKS_SQL), {"start": span.start, "end": span.end}),
            INDEX_HOUR_TASKS_SQL,
            ANALYZE_HOUR_TASKS_SQL,
        )
        keys = 0
        held = 0.0
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
        finally:
            drop_temp_table(DROP_HOUR_TASKS_SQL, "rollup hour tasks table", logger)
        return keys, held

    def _parts(self, span: Span) -> tuple[int, float]:
        """One part after another until every key of the hour still to do is done."""
        slicer = self.function
        held = 0.0
        with connection.cursor() as cursor:
            cursor.execute(AGENT_ROWS_SQL, {"seq": span.upto})
            agents = cursor.fetchall()
        keys = failed = 0
        while agents:
            if not slicer.may_start():
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
                slicer.cancelled(exc, f"part of {len(part)} agents ({rows:,} rows)")
                continue
            failed = 0
            rollup_rows, part_keys = (int(value) for value in done.value[:2])
            with connection.cursor() as cursor:
                cursor.execute(MARK_PART_DONE_SQL, {"seq": span.upto, "agents": part})
            del agents[: len(part)]
            self.part_rate.add(max(rows, 1), done.held)
            piece = done.piece(
                span.start, span.end, rollup_rows, keys=part_keys, plan="own", rows=rows
            )
            slicer.settled(piece)
            held += done.held
            keys += part_keys
            what = f"rollup part: {len(part)} agents of an hour, {part_keys} keys"
            slicer.report(piece, what, self.keys_done + keys)
            slicer.leave_a_gap()
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
