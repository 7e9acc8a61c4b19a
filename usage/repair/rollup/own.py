"""Running the own path: the keys table, the proof on the run's first keys, slices of bucket hours
(an hour too big in parts of its agents), the fallback to the function; and the rollup's entry
point, ``rebuild_keys``, on the run's path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.conf import settings

from usage.db import drop_temp_table
from usage.eligibility import compose
from usage.events import Progress
from usage.models import BackfillRun
from usage.repair.rollup import recompute
from usage.repair.rollup.function import (
    ANALYZE_JOURNAL_SQL,
    MICROSECOND,
    FunctionPath,
    Plan,
    call_function,
    from_run_rows,
)
from usage.repair.rollup.slices import (
    TARGET_LOCK_FRACTION,
    Bound,
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
from usage.repair.rollup.versions import DefinitionChanged, PathChoice, check_definition

logger = logging.getLogger("usage.rollup")

# A slice probes its tasks when it reads fewer rows than this share of the task table's.
PROBE_BELOW = 0.1
# Spans of hours a proof may read; more, and it is halved.
MAX_SPANS = 24
# Stamps of the proof's keys; the first slice's usage rows; the prior rows per second.
PROOF_KEYS_COUNT = 50
FIRST_SLICE_ROWS = 20_000
PRIOR_ROWS_PER_SECOND = 200_000.0
# Rounds of parts and checks for moved tasks before the hour counts as done; the first part's rows.
MAX_ROUNDS = 3
FIRST_PART_ROWS = 20_000


@dataclass(frozen=True)
class KeySource:
    """How a rebuild's keys table is made, its own slices' statement, and whether it is queued."""

    create: str = recompute.CREATE_KEYS_SQL
    write: str = recompute.WRITE_SQL
    queued: bool = False


RUN_KEYS = KeySource()
REVERT_KEYS = KeySource(recompute.CREATE_REVERT_KEYS_SQL, recompute.DRAIN_SQL, queued=True)


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


class OwnRebuild:
    """The own path, for the keys of some runs or of the revert's batches; ``function``, its
    fallback, keeps the slices' count and the neighbours' room."""

    def __init__(
        self, choice: PathChoice, function: FunctionPath, run_ids: Sequence[int], source: KeySource
    ) -> None:
        assert choice.version is not None
        self.function, self.limits, self.result = function, function.limits, function.result
        self.run_ids, self.source = list(run_ids), source
        self.recompute = own = recompute.Recompute(choice.version)
        self.slice_sql = own.statement(source.write, recompute.SLICE_KEYS)
        self.probed_sql = own.statement(source.write, recompute.SLICE_KEYS, recompute.SPAN_TASKS)
        self.part_sql = own.statement(source.write, recompute.PART_KEYS, recompute.PART_TASKS)
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
        create, set_aside, compare = self.recompute.proof(len(spans))

        def work(cursor: Any, bound: Bound) -> tuple[int, list[Any], tuple[int, dict[str, int]]]:
            cursor.execute(recompute.DROP_PROOF_SQL)
            cursor.execute(recompute.OWN_SETTINGS_SQL)
            bound()
            cursor.execute(create, recompute.span_params(spans, last=last))
            cursor.execute(compose(recompute.SET_ASIDE_TABLE_SQL))
            cursor.execute(set_aside, {"last": last, "to": window[1]})
            called = call_function(cursor, bound, Plan.NESTLOOP, window)
            cursor.execute(compose(recompute.PUT_BACK_SQL))
            bound()
            cursor.execute(compare)
            differing = cursor.fetchall()
            cursor.execute("SELECT count(*) FROM pg_temp.codex_rollup_proof")
            keys = int(cursor.fetchone()[0])
            cursor.execute(recompute.DROP_PROOF_SQL)
            check_definition(cursor, self.fingerprint)
            return keys, differing, called

        done = run_locked(self.limits, work, repeatable_read=True)
        keys, differing, (rollup_rows, scans) = done.value
        piece = done.piece(*window, rollup_rows, keys=keys, plan=Plan.NESTLOOP, **scans)
        self.function.settled(piece)
        if differing:
            self._to_function(
                recompute.difference(differing, keys, self.recompute.version.columns)
            )
        else:
            equal = f"the own recompute equals the function on the first {keys} keys"
            logger.info("rollup path: %s", equal)
        one(recompute.MARK_PROOF_DONE_SQL, {"last": last})
        self.keys_done += keys
        what = f"rollup proof: {keys} keys both ways, {'different' if differing else 'equal'}"
        self.function.report(piece, what, self.keys_done)
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
                recompute.DROP_KEYS_SQL,
                recompute.DROP_HOURS_SQL,
                compose(ANALYZE_JOURNAL_SQL),
                (from_run_rows(self.source.create, ""), {"run_ids": self.run_ids}),
                recompute.ANALYZE_KEYS_SQL,
                f"SELECT count(*), count(stamp) FROM {recompute.KEYS_TABLE}",
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
                (recompute.CREATE_HOURS_SQL, dict(tables, schema=target)),
                f"ALTER TABLE {recompute.HOURS_TABLE} ADD PRIMARY KEY (seq)",
                recompute.NUMBER_KEYS_SQL,
                f"CREATE INDEX ON {recompute.KEYS_TABLE} (hour_seq)",
                recompute.ANALYZE_KEYS_SQL,
                f"ANALYZE {recompute.HOURS_TABLE}",
                (recompute.HOURS_TOTAL_SQL, tables),
            )
            self.probe_below = PROBE_BELOW * max(task_rows, 1)
            self._slices()
            return True
        except DefinitionChanged as exc:
            self._to_function(str(exc))
            return False
        finally:
            drop_temp_table(recompute.DROP_KEYS_SQL, "rollup keys table", logger)
            drop_temp_table(recompute.DROP_HOURS_SQL, "rollup hours table", logger)

    def _prove_first_keys(self) -> bool:
        """The first stamps' keys both ways (halved if cancelled); False if unequal or stopped."""
        count = PROOF_KEYS_COUNT
        while True:
            if not self.function.may_start():
                return False
            first, last = one(recompute.PROOF_BOUNDS_SQL, {"n": count})
            spans = recompute.spans_of(one(recompute.PROOF_HOURS_SQL, {"last": last}, every=True))
            if len(spans) > MAX_SPANS and count > 1:
                count = max(1, count // 2)
                continue
            stamp = last
            if self.source.queued:  # over the time the revert's keys were queued (draining them)
                first = stamp = one(recompute.QUEUED_WINDOW_SQL, {"last": last})[0]
            try:
                return self._prove(last, spans, (first, stamp + MICROSECOND))
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
            upto, keys, rows, start, end = one(recompute.NEXT_HOURS_SQL, params)
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
            self.function.report(piece, what, self.keys_done, last=self.done >= self.hours)

    def _hour_in_parts(self, span: Span) -> None:
        """In rounds of parts while tasks move agent (keys done again count once); through the
        function when one agent's rows do not fit a part."""
        unbounded(
            self.limits,
            recompute.DROP_HOUR_TASKS_SQL,
            (compose(recompute.CREATE_HOUR_TASKS_SQL), {"start": span.start, "end": span.end}),
            f"CREATE INDEX ON {recompute.HOUR_TASKS_TABLE} (agent_id)",
            f"ANALYZE {recompute.HOUR_TASKS_TABLE}",
        )
        keys, held = 0, 0.0
        try:
            for round_ in range(MAX_ROUNDS):
                done, round_held = self._parts(span)
                keys += 0 if round_ else done
                held += round_held
                if self.result.stopped:
                    break
                moved = (compose(recompute.MOVED_SQL), {"seq": span.upto})
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
            drop_temp_table(recompute.DROP_HOUR_TASKS_SQL, "rollup hour tasks table", logger)
        self.keys_done += keys
        if not self.result.stopped:
            self.done = span.upto

    def _parts(self, span: Span) -> tuple[int, float]:
        """One part after another until every key of the hour still to do is done."""
        agents = one(recompute.AGENT_ROWS_SQL, {"seq": span.upto}, every=True)
        keys, held, failed = 0, 0.0, 0
        while agents:
            if not self.function.may_start():
                break
            part, rows = take(agents, self.part_rate.limit(FIRST_PART_ROWS))
            params = recompute.span_params([(span.start, span.end)], seq=span.upto, agents=part)
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
            one(recompute.MARK_PART_DONE_SQL, {"seq": span.upto, "agents": part})
            del agents[: len(part)]
            self.part_rate.add(max(rows, 1), done.held)
            piece = done.piece(span.start, span.end, wrote, keys=part_keys, plan="own", rows=rows)
            self.function.settled(piece)
            held += done.held
            keys += part_keys
            what = f"rollup part: {len(part)} agents of an hour, {part_keys} keys"
            self.function.report(piece, what, self.keys_done + keys)
        return keys, held

    def _slice_work(self, span: Span) -> Callable[[Any, Bound], Any]:
        params = recompute.span_params([(span.start, span.end)], after=span.after, upto=span.upto)
        statement = self.probed_sql if span.cost < self.probe_below else self.slice_sql
        return self._work(statement, params)

    def part_work(self, params: dict[str, Any]) -> Callable[[Any, Bound], Any]:
        return self._work(self.part_sql, params)

    def _work(self, statement: str, params: dict[str, Any]) -> Callable[[Any, Bound], Any]:
        """One own statement, kept only while the installed definition is the proven one."""

        def work(cursor: Any, bound: Bound) -> Any:
            cursor.execute(recompute.OWN_SETTINGS_SQL)
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
    should_stop: ShouldStop,
    progress: Progress,
    source: KeySource,
) -> RollupResult:
    """Every hourly key of the rows the runs changed (or of ``source``), each once, on
    ``choice``'s path (after a failed proof, the function's)."""
    started = time.monotonic()
    result = RollupResult(path=choice.path)
    function = FunctionPath(limits, result, should_stop, progress)
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
