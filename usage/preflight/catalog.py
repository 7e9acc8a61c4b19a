"""What the pre-flight expects of the database (tables, columns and their types, indexes,
the queue's key), the read-only queries that look (values always bound parameters), and what
a check is given (``Context``) and reports (``passed``, ``warned``, ``failed``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, partial
from typing import Any

from usage import db, eligibility
from usage.repair.rollup import choose_path
from usage.repair.rollup.versions import PathChoice


@dataclass(frozen=True)
class CheckResult:
    """One line of the checklist: what was found and, unless fine, what to do."""

    name: str
    status: str  # ok, warn (passes, but read the fix), fail, or skip (not checked)
    detail: str
    fix: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "warn")

    @property
    def warning(self) -> bool:
        return self.status == "warn"


@dataclass(frozen=True)
class Context:
    """What every check may use: a cursor inside the read-only transaction and the options."""

    cursor: Any
    cutoff: datetime
    workspace_id: uuid.UUID | None
    target_schema: str
    tool_schema: str

    def one(self, query: str, params: Any = None) -> Any:
        self.cursor.execute(query, params)
        return self.cursor.fetchone()

    def all(self, query: str, params: Any = None) -> list[Any]:
        self.cursor.execute(query, params)
        return self.cursor.fetchall()

    def column(self, query: str, params: Any = None) -> list[Any]:
        return [row[0] for row in self.all(query, params)]

    @cached_property
    def path(self) -> PathChoice:
        """The rollup's path and the definition it recognised, read once for the checks."""
        return choose_path(cursor=self.cursor)


@dataclass(frozen=True)
class Check:
    """A named check; ``requires`` names checks that must pass before this one can run."""

    name: str
    title: str
    run: Callable[[Context], CheckResult]
    requires: tuple[str, ...] = ()


# A check's result, named by the runner: passed(detail), warned(detail, fix), failed(detail, fix).
passed = partial(CheckResult, "", "ok")
warned = partial(CheckResult, "", "warn")
failed = partial(CheckResult, "", "fail")


# All tables the repair and the rollup function touch; the dirty queue is read by the latter.
PREFLIGHT_TARGET_TABLES = tuple(dict.fromkeys((*db.REQUIRED_TARGET_TABLES, "issue")))

_KEY = " ".join(eligibility.KEY_COLUMNS)
_TOKENS = "input_tokens output_tokens cache_read_tokens cache_write_tokens"
# Table -> the columns the tool (or the rollup it calls) reads or writes; their types follow
# from their names (``expected_type``).
EXPECTED_COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(columns.split())
    for table, columns in {
        "task_usage": f"id task_id provider model {_TOKENS} created_at updated_at cost_usd_ticks",
        "agent_task_queue": "id agent_id runtime_id issue_id",
        "agent": "id workspace_id",
        "issue": "id project_id",
        "task_usage_hourly": f"{_KEY} {_TOKENS} cost_usd_ticks task_count event_count",
        "task_usage_hourly_dirty": f"{_KEY} enqueued_at",
        "task_usage_hourly_rollup_state": "id watermark_at last_run_started_at",
    }.items()
}


def expected_type(table: str, column: str) -> str:
    if table == "task_usage_hourly_rollup_state" and column == "id":
        return "smallint"
    if column == "id" or column.endswith("_id"):
        return "uuid"
    if column == "bucket_hour" or column.endswith("_at"):
        return "timestamp with time zone"
    return "text" if column in ("provider", "model") else "bigint"


def type_matches(actual: str, expected: str) -> bool:
    # character varying behaves as text for the tool's queries.
    names = ("text", "character varying") if expected == "text" else (expected,)
    return any(actual == name or actual.startswith(name + "(") for name in names)


# The indexes the tool relies on, by leading key column: (table, column, unique, why).
REQUIRED_INDEXES = (
    ("task_usage", "id", True, "batches update rows by primary key"),
    ("task_usage", "task_id", False, "the rollup probes usage rows per task"),
    ("task_usage", "created_at", False, "legacy rows are found by created_at"),
    ("task_usage", "updated_at", False, "the rollup window selects by updated_at"),
    ("agent_task_queue", "id", True, "usage rows join their task"),
    ("agent", "id", True, "tasks join their agent"),
    ("issue", "id", True, "tasks join their issue for the project"),
)

# Columns of the queue an insert of the key and enqueued_at alone would leave NULL.
QUEUE_REQUIRED_COLUMNS_SQL = """
SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
  AND a.attname <> ALL(%(columns)s::text[])"""
CRON_STATE_SQL = """
SELECT s.watermark_at, s.last_run_started_at, s.last_error, now(),
       to_regprocedure(%(cron)s) IS NOT NULL
FROM (SELECT 1) one LEFT JOIN {task_usage_hourly_rollup_state} s ON s.id = 1"""
SERVER_VERSION_SQL = (
    "SELECT current_setting('server_version_num')::int, current_setting('server_version')"
)
PRIMARY_SQL = "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"
COLUMNS_SQL = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])
  AND a.attnum > 0 AND NOT a.attisdropped"""
ROLLUP_FUNCTION_OVERLOADS_SQL = """
SELECT p.oid::regprocedure::text
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND p.proname = %(name)s
ORDER BY 1"""
# One row per index of the listed tables: its leading key column, whether it is valid, usable
# (a whole btree) and a key of that column alone.
INDEXES_SQL = """
SELECT t.relname, ic.relname, a.attname, i.indisvalid AND i.indisready,
       i.indisvalid AND i.indisready AND i.indpred IS NULL AND am.amname = 'btree',
       i.indisunique AND i.indnkeyatts = 1
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] AND i.indkey[0] <> 0
WHERE n.nspname = %(schema)s AND t.relname = ANY(%(tables)s::text[])"""
COUNT_CANDIDATES_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM {eligible_from} WHERE {eligible_where} LIMIT %(cap)s
) capped"""
JOURNALED_SQL = "SELECT EXISTS (SELECT 1 FROM {journal} WHERE reverted_at IS NULL)"

# Rows last written within the window, sampled on each side of the cutoff. After it: the
# eligibility definition with its cutoff comparison turned around, from the same named parts
# (Codex rows with cached input, last written in [cutoff, window end), not repaired by this
# tool), written so that the updated_at index and the legacy created_at index serve it.
CUTOFF_NEIGHBOURHOOD_SQL = f"""
WITH before_cutoff AS (
    SELECT tu.input_tokens >= tu.cache_read_tokens AS looks_unnormalized
    FROM {{eligible_from}}
    WHERE {{eligible_where}} AND (
        tu.updated_at >= %(window_start)s
        OR (tu.updated_at IS NULL AND tu.created_at >= %(window_start)s))
    LIMIT %(sample)s
), after_cutoff AS (
    SELECT tu.input_tokens >= tu.cache_read_tokens AS looks_unnormalized
    FROM {{eligible_from}}
    WHERE {eligibility.CODEX_WITH_CACHED_INPUT}
    AND ((tu.updated_at >= %(cutoff)s AND tu.updated_at < %(window_end)s)
        OR (tu.updated_at IS NULL
            AND tu.created_at >= %(cutoff)s AND tu.created_at < %(window_end)s))
    AND {eligibility.NOT_REPAIRED}
    AND {eligibility.SCOPE_WHERE}
    LIMIT %(sample)s
)
SELECT (SELECT count(*) FROM before_cutoff),
       (SELECT count(*) FROM before_cutoff WHERE looks_unnormalized),
       (SELECT count(*) FROM after_cutoff),
       (SELECT count(*) FROM after_cutoff WHERE looks_unnormalized)"""
