"""The function path's calls of ``rollup_task_usage_hourly_window``, each planned (nested loops
or hashed) by a measured cost model (``SlicePlanner``)."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection

from usage.eligibility import compose
from usage.repair.rollup.slices import (
    SLICE_GAP_SECONDS,
    Bound,
    Rate,
    RollupSlice,
    SliceLimits,
    run_locked,
)

logger = logging.getLogger("usage.rollup")

# The cost model's measured constants and priors (docs/design.md): keys of a plan's first
# slice, a key's cost in tasks beside its agent's, task units a second, a page's scan.
FIRST_SLICE_KEYS = 50
KEY_BASE_COST = {"nestloop": 60, "hash": 5000}
PRIOR_RATE = {"nestloop": 150_000.0, "hash": 20_000_000.0}
PRIOR_SCAN_SECONDS_PER_PAGE = 40e-6


class Plan(enum.StrEnum):
    NESTLOOP = "nestloop"
    HASH = "hash"


# A plan's settings; force_custom_plan, or the function reuses its cached plan (docs/design.md).
SET_PLAN_SQL = (
    "SELECT set_config('enable_nestloop', %s, true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
ENABLE_NESTLOOP = {Plan.NESTLOOP: "on", Plan.HASH: "off"}
# The transaction's scans of task_usage so far: a hash plan scans it whole.
SCANS_SQL = """
SELECT coalesce(sum(seq_scan), 0), coalesce(sum(idx_scan), 0)
FROM pg_stat_xact_user_tables WHERE schemaname = %s AND relname = 'task_usage'"""
# The 8 kB pages a whole-scan plan reads.
SCANNED_PAGES_SQL = "SELECT (pg_relation_size(%s::regclass) + pg_relation_size(%s::regclass))/8192"

ROLLUP_CALL_SQL = "SELECT {rollup_task_usage_hourly_window}(%(from)s, %(to)s)"
MICROSECOND = timedelta(microseconds=1)


@dataclass
class SlicePlanner:
    """Each slice's plan and size, to hold the lock ``target`` seconds: a ``Rate`` a plan."""

    target: float
    scan_seconds: float
    gap: float = SLICE_GAP_SECONDS
    usable: set[Plan] = field(default_factory=lambda: {Plan.NESTLOOP, Plan.HASH})
    rates: dict[Plan, Rate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = {
            Plan.NESTLOOP: Rate(self.target, PRIOR_RATE[Plan.NESTLOOP]),
            Plan.HASH: Rate(self.target, PRIOR_RATE[Plan.HASH], self.scan_seconds, scans=True),
        }
        if self.scan_seconds > self.target:
            self.usable.discard(Plan.HASH)

    @property
    def nestloop_rate(self) -> float:
        return self.rates[Plan.NESTLOOP].rate

    def seconds(self, plan: Plan, units: float) -> float:
        return self.rates[plan].seconds(units)

    def limit(
        self, plan: Plan, probe_units: float, backlog_units: float, *, grow: bool = True
    ) -> float:
        return self.rates[plan].limit(probe_units, backlog_units, grow=grow)

    def next_to_probe(self) -> Plan | None:
        for plan in (Plan.NESTLOOP, Plan.HASH):
            if plan in self.usable and not self.rates[plan].measured:
                return plan
        return None

    def measured(self, plan: Plan, units: float, held: float) -> None:
        self.rates[plan].add(units, held)

    def cancelled(self, plan: Plan, units: float, keys: int, *, smallest: bool = False) -> None:
        """Drop the plan when the slice could not be smaller or was a hash plan's first."""
        if smallest or keys <= 1 or (plan == Plan.HASH and not self.rates[plan].measured):
            self.usable.discard(plan)
            return
        self.rates[plan].cancelled(units)

    def best(self, speed: Callable[[Plan], float]) -> Plan:
        probe = self.next_to_probe()
        return probe or max(sorted(self.usable), key=speed, default=Plan.NESTLOOP)


def probe_units(plan: Plan, mean_tasks: float) -> float:
    """The cost of the first slice of ``plan``, the one that measures it."""
    return FIRST_SLICE_KEYS * (mean_tasks + KEY_BASE_COST[plan])


def slice_units(
    plan: Plan, keys: int, tasks: int, backlog: int = 0, mean_tasks: float = 0.0
) -> float:
    """A slice's cost in task units: its keys, and the queued keys its call drains too."""
    base = KEY_BASE_COST[plan]
    return tasks + base * keys + backlog * (mean_tasks + base)


def predict_scan_seconds() -> float:
    """A hash slice's whole scans, predicted from the size of the tables they read."""
    schema = settings.CODEX_TARGET_SCHEMA
    tables = [f"{schema}.task_usage", f"{schema}.agent_task_queue"]
    with connection.cursor() as cursor:
        cursor.execute(SCANNED_PAGES_SQL, tables)
        pages = cursor.fetchone()[0] or 0
    return float(pages) * PRIOR_SCAN_SECONDS_PER_PAGE


def call_function(
    cursor: Any, bound: Bound, plan: Plan, window: tuple[datetime, datetime]
) -> tuple[int, dict[str, int]]:
    """One call in the caller's slice: the hourly rows it wrote, its scans of task_usage."""
    cursor.execute(SET_PLAN_SQL, [ENABLE_NESTLOOP[plan]])
    cursor.execute(SCANS_SQL, [settings.CODEX_TARGET_SCHEMA])
    seq_before, idx_before = cursor.fetchone()
    bound()
    cursor.execute(compose(ROLLUP_CALL_SQL), {"from": window[0], "to": window[1]})
    rollup_rows = cursor.fetchone()[0] or 0
    cursor.execute(SCANS_SQL, [settings.CODEX_TARGET_SCHEMA])
    seq_after, idx_after = cursor.fetchone()
    scans = {"seq_scans": int(seq_after - seq_before), "index_scans": int(idx_after - idx_before)}
    return rollup_rows, scans


def run_slice(
    plan: Plan, limits: SliceLimits, window_from: datetime, window_to: datetime, **more: int
) -> RollupSlice:
    """One slice around one call over ``[from, to)`` (``more``: its keys, tasks, backlog)."""
    window = (window_from, window_to)
    done = run_locked(limits, lambda cursor, bound: call_function(cursor, bound, plan, window))
    rollup_rows, scans = done.value
    return done.piece(window_from, window_to, rollup_rows, plan=plan, **scans, **more)


def plan_applied(piece: RollupSlice) -> bool:
    """Whether the slice ran the plan it asked for: a hash plan scans task_usage whole."""
    return piece.plan != Plan.HASH or piece.seq_scans > 0


def checked(piece: RollupSlice, planner: SlicePlanner) -> RollupSlice:
    """The slice as it ran: a hash plan with no whole scan was nested loops (a ``SET`` clause
    on the function keeps the settings out), and the planner drops it."""
    if plan_applied(piece):
        return piece
    planner.usable.discard(Plan(piece.plan))
    logger.warning(
        "enable_nestloop = off did not reach the rollup function's statements (no whole "
        "scan of task_usage); using its default plan from now on"
    )
    return dataclasses.replace(piece, plan=Plan.NESTLOOP)
