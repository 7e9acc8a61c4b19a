"""The pre-flight's checks: is this database ready for the repair, judged read-only.

``run_preflight`` (``usage.preflight.run``) runs every check of ``CHECKS`` inside one
``READ ONLY`` transaction that it always rolls back, each check in its own savepoint, so a
failing or cancelled query fails only its own check and nothing can ever be written. Each
check returns a ``CheckResult`` that says what was found and, when it is not fine, what the
operator should do. The same results back the ``preflight_codex_usage_backfill`` command and
``pytest -m preflight`` (tests/test_preflight.py), which the runbook names.

Checks are judged the way the tool uses the database: tables, columns and types it reads
or writes; indexes by their leading column (never by name); privileges by
``has_*_privilege`` for the role actually connected. The candidate checks build on the
shared eligibility fragments (``usage.eligibility``), never on a second definition.

The "still looks un-normalized" heuristic (``after_cutoff``): Codex reports cached input
*inside* ``input_tokens``, so a row written by the buggy ingestion always has
``input_tokens >= cache_read_tokens``. After the fix, ``input_tokens`` is the uncached part
alone, which for Codex is usually smaller than the cached part. One row proves nothing, but
a population does: among Codex rows with cached input last written in the week after the
cutoff, a share of "un-normalized looking" rows as high as before the fix means the fix was
probably deployed later than ``--cutoff`` (those rows are not eligible and would stay
double-counted); conversely, many rows before the cutoff with ``input < cache read`` mean
the cutoff is probably too late (the repair would clamp already-normalized rows). Both are
warnings, not failures: legitimate data can look either way, and the operator decides.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from usage import cron, privileges, replication
from usage.db import (
    MISSING_OBJECTS_SQL,
    QUEUE_CONSTRAINT,
    REQUIRED_TARGET_TABLES,
    REQUIRED_TOOL_TABLES,
    ROLLUP_FUNCTION_SIGNATURE,
)
from usage.eligibility import (
    CODEX_WITH_CACHED_INPUT,
    NOT_REPAIRED,
    SCOPE_WHERE,
    compose,
    eligible_params,
)
from usage.events import json_default
from usage.render import short_hash
from usage.repair.rollup import choose_path
from usage.repair.rollup.versions import DECLARE_SETTING, PathChoice
from usage.repair.summary import CutoffError, ensure_cutoff_in_past

logger = logging.getLogger("usage.preflight")

MIN_SERVER_VERSION_NUM = 150000
# Every statement is bounded: the pre-flight may run on a busy production primary.
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 60.0
LOCK_TIMEOUT_SECONDS = 5.0
# Candidate counts stop here; the dry run gives exact numbers.
CANDIDATE_COUNT_CAP = 10_000
# The cutoff heuristic samples rows last written this close to the cutoff, on each side.
NEIGHBOURHOOD = timedelta(days=7)
SAMPLE_ROWS = 10_000
MIN_SAMPLE_ROWS = 20
# After the cutoff, this share (or more) of rows with input >= cache read looks unfixed.
AFTER_UNNORMALIZED_WARN_SHARE = 0.9
# Before the cutoff, this share (or more) of eligible rows with input < cache read looks fixed.
BEFORE_NORMALIZED_WARN_SHARE = 0.2
# The ingestion fix landed upstream on this date; no hosted deployment predates it.
FIX_LANDED_UPSTREAM = datetime.fromisoformat("2026-06-13T00:00:00+00:00")

# All tables the repair and the rollup function touch; the dirty queue is read by the latter.
PREFLIGHT_TARGET_TABLES = tuple(dict.fromkeys((*REQUIRED_TARGET_TABLES, "issue")))

_TIMESTAMPTZ = "timestamp with time zone"
# The queue's key, in the order of its unique constraint.
QUEUE_KEY_COLUMNS = (
    ("bucket_hour", _TIMESTAMPTZ),
    ("workspace_id", "uuid"),
    ("runtime_id", "uuid"),
    ("agent_id", "uuid"),
    ("project_id", "uuid"),
    ("provider", "text"),
    ("model", "text"),
)
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
# Table -> the columns the tool (or the rollup it calls) reads or writes, with their types.
EXPECTED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "task_usage": (
        ("id", "uuid"),
        ("task_id", "uuid"),
        ("provider", "text"),
        ("model", "text"),
        *((name, "bigint") for name in _TOKENS),
        ("created_at", _TIMESTAMPTZ),
        ("updated_at", _TIMESTAMPTZ),
        ("cost_usd_ticks", "bigint"),
    ),
    "agent_task_queue": (
        ("id", "uuid"),
        ("agent_id", "uuid"),
        ("runtime_id", "uuid"),
        ("issue_id", "uuid"),
    ),
    "agent": (("id", "uuid"), ("workspace_id", "uuid")),
    "issue": (("id", "uuid"), ("project_id", "uuid")),
    "task_usage_hourly": (
        ("bucket_hour", _TIMESTAMPTZ),
        ("workspace_id", "uuid"),
        ("runtime_id", "uuid"),
        ("agent_id", "uuid"),
        ("project_id", "uuid"),
        ("provider", "text"),
        ("model", "text"),
        *((name, "bigint") for name in _TOKENS),
        ("cost_usd_ticks", "bigint"),
        ("task_count", "bigint"),
        ("event_count", "bigint"),
    ),
    "task_usage_hourly_dirty": (
        *((name, expected) for name, expected in QUEUE_KEY_COLUMNS),
        ("enqueued_at", _TIMESTAMPTZ),
    ),
    "task_usage_hourly_rollup_state": (
        ("id", "smallint"),
        ("watermark_at", _TIMESTAMPTZ),
        ("last_run_started_at", _TIMESTAMPTZ),
    ),
}
# Types that behave the same for the tool's queries.
_EQUIVALENT_TYPES = {"text": ("text", "character varying")}
# The run record and the journal are inserted into and updated (finish, revert).


@dataclass(frozen=True)
class IndexNeed:
    """An index the tool relies on, judged by its leading key column."""

    table: str
    column: str
    unique: bool
    why: str


REQUIRED_INDEXES = (
    IndexNeed("task_usage", "id", True, "batches update rows by primary key"),
    IndexNeed("task_usage", "task_id", False, "the rollup probes usage rows per task"),
    IndexNeed("task_usage", "created_at", False, "legacy rows are found by created_at"),
    IndexNeed("task_usage", "updated_at", False, "the rollup window selects by updated_at"),
    IndexNeed("agent_task_queue", "id", True, "usage rows join their task"),
    IndexNeed("agent", "id", True, "tasks join their agent"),
    IndexNeed("issue", "id", True, "tasks join their issue for the project"),
)

READ_ONLY_SQL = "SET TRANSACTION READ ONLY"

# The queue's unique constraint the tool's upserts name, and its shape.
QUEUE_CONSTRAINT_SQL = """
SELECT c.contype, i.indnullsnotdistinct,
       array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             ORDER BY k.n)
FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
WHERE c.conrelid = %(table)s::regclass AND c.conname = %(name)s"""
# Columns of the queue an insert of the key and enqueued_at alone would leave NULL.
QUEUE_REQUIRED_COLUMNS_SQL = """
SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
  AND a.attname <> ALL(%(columns)s::text[])"""
PENDING_ROLLUPS_SQL = """
SELECT id FROM {run}
WHERE rollup_state = 'pending' AND status NOT IN ('running', 'reverted')
ORDER BY id"""
CRON_STATE_SQL = """
SELECT s.watermark_at, s.last_run_started_at, s.last_error, now(),
       to_regprocedure(%(cron)s) IS NOT NULL
FROM (SELECT 1) one LEFT JOIN {task_usage_hourly_rollup_state} s ON s.id = 1"""
# Transaction-local (third argument true): they end with the pre-flight's transaction.
TIMEOUTS_SQL = """
SELECT set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('lock_timeout', %(lock_timeout)s, true)"""

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

ROLLUP_FUNCTION_DETAILS_SQL = """
SELECT p.oid IS NOT NULL, format_type(p.prorettype, NULL), p.prosecdef
FROM (SELECT to_regprocedure(%(signature)s) AS oid) f
LEFT JOIN pg_proc p ON p.oid = f.oid"""

ROLLUP_FUNCTION_OVERLOADS_SQL = """
SELECT p.oid::regprocedure::text
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND p.proname = %(name)s
ORDER BY 1"""

# One row per index of the listed tables: its leading key column and whether it is usable.
INDEXES_SQL = """
SELECT t.relname, ic.relname, a.attname,
       i.indisunique, i.indnkeyatts, i.indisvalid AND i.indisready, i.indpred IS NOT NULL,
       am.amname
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] AND i.indkey[0] <> 0
WHERE n.nspname = %(schema)s AND t.relname = ANY(%(tables)s::text[])"""

APPLIED_MIGRATIONS_SQL = "SELECT app, name FROM {tool_schema}.django_migrations"

DATABASE_NOW_SQL = "SELECT now()"

WORKSPACE_HAS_AGENTS_SQL = "SELECT EXISTS (SELECT 1 FROM {agent} WHERE workspace_id = %s)"

COUNT_CANDIDATES_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM {eligible_from} WHERE {eligible_where} LIMIT %(cap)s
) capped"""

JOURNALED_SQL = "SELECT EXISTS (SELECT 1 FROM {journal} WHERE reverted_at IS NULL)"

# The eligibility definition with its cutoff comparison turned around, from the same named
# parts: Codex rows with cached input, last written in [cutoff, window end), not repaired by
# this tool. Written so that the updated_at index and the legacy created_at index serve it.
_AFTER_CUTOFF_TEST = """(
        (tu.updated_at >= %(cutoff)s AND tu.updated_at < %(window_end)s)
        OR (tu.updated_at IS NULL
            AND tu.created_at >= %(cutoff)s AND tu.created_at < %(window_end)s))"""
_BEFORE_WINDOW_TEST = """(
        tu.updated_at >= %(window_start)s
        OR (tu.updated_at IS NULL AND tu.created_at >= %(window_start)s))"""
WRITTEN_AFTER_CUTOFF_WHERE = f"""{CODEX_WITH_CACHED_INPUT}
    AND {_AFTER_CUTOFF_TEST}
    AND {NOT_REPAIRED}
    AND {SCOPE_WHERE}"""

CUTOFF_NEIGHBOURHOOD_SQL = f"""
WITH before_cutoff AS (
    SELECT tu.input_tokens >= tu.cache_read_tokens AS looks_unnormalized
    FROM {{eligible_from}}
    WHERE {{eligible_where}} AND {_BEFORE_WINDOW_TEST}
    LIMIT %(sample)s
), after_cutoff AS (
    SELECT tu.input_tokens >= tu.cache_read_tokens AS looks_unnormalized
    FROM {{eligible_from}}
    WHERE {WRITTEN_AFTER_CUTOFF_WHERE}
    LIMIT %(sample)s
)
SELECT (SELECT count(*) FROM before_cutoff),
       (SELECT count(*) FROM before_cutoff WHERE looks_unnormalized),
       (SELECT count(*) FROM after_cutoff),
       (SELECT count(*) FROM after_cutoff WHERE looks_unnormalized)"""

MIGRATE_FIX = (
    "run `python manage.py migrate` against this database (same DATABASE_URL; unset for the "
    "sandbox): it creates only the tool's schema {schema!r}"
)
TARGET_FIX = (
    "point DATABASE_URL at the application database, or set CODEX_TARGET_SCHEMA to the "
    "schema that holds its tables"
)


@dataclass(frozen=True)
class CheckResult:
    """One line of the checklist: what was found and, unless fine, what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False
    skipped: bool = False
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """``ok``, ``warn`` (passes, but read the fix), ``fail``, or ``skip`` (not checked)."""
        if self.skipped:
            return "skip"
        if not self.ok:
            return "fail"
        return "warn" if self.warning else "ok"


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

    @cached_property
    def path(self) -> PathChoice:
        """The rollup's path and the definition it recognised, read once for the checks
        that name them (the function, the path, the privileges)."""
        return choose_path(cursor=self.cursor)


@dataclass(frozen=True)
class Check:
    """A named check; ``requires`` names checks that must pass before this one can run."""

    name: str
    title: str
    run: Callable[[Context], CheckResult]
    requires: tuple[str, ...] = ()


def passed(detail: str) -> CheckResult:
    return CheckResult("", True, detail)


def failed(detail: str, fix: str) -> CheckResult:
    return CheckResult("", False, detail, fix)


def warned(detail: str, fix: str) -> CheckResult:
    return CheckResult("", True, detail, fix, warning=True)


# -- the checks -----------------------------------------------------------------------------


def check_server_version(ctx: Context) -> CheckResult:
    number, text = ctx.one(SERVER_VERSION_SQL)
    if number >= MIN_SERVER_VERSION_NUM:
        return passed(f"PostgreSQL {text}")
    return failed(
        f"PostgreSQL {text} is older than 15",
        "run the repair against PostgreSQL 15 or newer (the hourly rollup key relies on "
        "UNIQUE NULLS NOT DISTINCT); upgrade the server first",
    )


def check_primary(ctx: Context) -> CheckResult:
    in_recovery, default_read_only = ctx.one(PRIMARY_SQL)
    if in_recovery:
        return failed(
            "the server is a standby (in recovery): the repair cannot write here",
            "point DATABASE_URL at the primary, not at a read replica",
        )
    if default_read_only == "on":
        return failed(
            "default_transaction_read_only is on for this role or database",
            "use a role whose transactions may write (ALTER ROLE ... SET "
            "default_transaction_read_only = off), or connect to the primary",
        )
    return passed("primary server, writable sessions")


def check_tables(ctx: Context) -> CheckResult:
    rows = ctx.all(
        MISSING_OBJECTS_SQL,
        {"tables": list(PREFLIGHT_TARGET_TABLES), "schema": ctx.target_schema},
    )
    missing = [row[0] for row in rows]
    if missing:
        return failed(f"missing in schema {ctx.target_schema!r}: {', '.join(missing)}", TARGET_FIX)
    return passed(f"{len(PREFLIGHT_TARGET_TABLES)} tables found in schema {ctx.target_schema!r}")


def _type_matches(actual: str, expected: str) -> bool:
    return any(
        actual == name or actual.startswith(name + "(")
        for name in _EQUIVALENT_TYPES.get(expected, (expected,))
    )


def check_columns(ctx: Context) -> CheckResult:
    rows = ctx.all(COLUMNS_SQL, {"schema": ctx.target_schema, "tables": list(EXPECTED_COLUMNS)})
    found = {(table, column): column_type for table, column, column_type in rows}
    problems = []
    for table, columns in EXPECTED_COLUMNS.items():
        for column, expected in columns:
            actual = found.get((table, column))
            if actual is None:
                problems.append(f"{table}.{column} is missing")
            elif not _type_matches(actual, expected):
                problems.append(f"{table}.{column} is {actual}, expected {expected}")
    if problems:
        return failed(
            "; ".join(problems),
            "this is not the schema the tool was written for: check DATABASE_URL and "
            "CODEX_TARGET_SCHEMA; if the application renamed or retyped these columns, the "
            "tool must be updated before it runs",
        )
    count = sum(len(columns) for columns in EXPECTED_COLUMNS.values())
    return passed(f"{count} columns with the expected types")


def check_rollup_function(ctx: Context) -> CheckResult:
    signature = f"{ctx.target_schema}.{ROLLUP_FUNCTION_SIGNATURE}"
    exists, returns, security_definer = ctx.one(
        ROLLUP_FUNCTION_DETAILS_SQL, {"signature": signature}
    )
    fix = (
        "deploy the application migration that creates "
        f"{ROLLUP_FUNCTION_SIGNATURE} returning bigint in schema {ctx.target_schema!r} "
        "(the repair and the platform's cron both call it), or fix CODEX_TARGET_SCHEMA"
    )
    if not exists:
        others = [
            row[0]
            for row in ctx.all(
                ROLLUP_FUNCTION_OVERLOADS_SQL,
                {"schema": ctx.target_schema, "name": ROLLUP_FUNCTION_SIGNATURE.split("(")[0]},
            )
        ]
        found = f"; found only {', '.join(others)}" if others else ""
        return failed(f"{signature} not found{found}", fix)
    if returns != "bigint":
        return failed(f"{signature} returns {returns}, expected bigint", fix)
    mode = "security definer" if security_definer else "runs with the caller's privileges"
    return passed(
        f"{signature} returns bigint ({mode}); its definition: {ctx.path.function} "
        f"(fingerprint {short_hash(ctx.path.fingerprint)})"
    )


def check_indexes(ctx: Context) -> CheckResult:
    tables = sorted({need.table for need in REQUIRED_INDEXES})
    rows = ctx.all(INDEXES_SQL, {"schema": ctx.target_schema, "tables": tables})
    problems, fixes = [], []
    for need in REQUIRED_INDEXES:
        leading = [row for row in rows if row[0] == need.table and row[2] == need.column]
        usable = [
            row
            for row in leading
            if row[5]
            and not row[6]
            and row[7] == "btree"
            and (not need.unique or (row[3] and row[4] == 1))
        ]
        if usable:
            continue
        target = f"{need.table}({need.column})"
        invalid = [row[1] for row in leading if not row[5]]
        if invalid:
            problems.append(f"index {invalid[0]} on {target} is INVALID ({need.why})")
            fixes.append(f"REINDEX INDEX CONCURRENTLY {ctx.target_schema}.{invalid[0]};")
        else:
            kind = "unique index (primary key)" if need.unique else "index"
            problems.append(f"no usable {kind} on {target} ({need.why})")
            create = "CREATE UNIQUE INDEX" if need.unique else "CREATE INDEX"
            fixes.append(
                f"{create} CONCURRENTLY ON {ctx.target_schema}.{need.table} ({need.column});"
            )
    if problems:
        return failed(
            "; ".join(problems),
            "restore the application's indexes before running (off-peak, without blocking "
            "writers): " + " ".join(fixes),
        )
    return passed(
        f"{len(REQUIRED_INDEXES)} indexes found by leading column: "
        + ", ".join(f"{n.table}({n.column})" for n in REQUIRED_INDEXES[:4])
        + " and the joined tables' primary keys"
    )


def check_rollup_path(ctx: Context) -> CheckResult:
    """How the repair will rebuild the hourly rollup: its own recompute, or the function."""
    choice = ctx.path
    if choice.own:
        return passed(f"{choice.function}: {choice.reason}")
    fix = (
        "the repair still works, through the platform's function: slower on a large table "
        "(its cost grows with the tasks of each key's agent), never less safe"
    )
    if choice.version is None:
        fix += (
            "; if this definition computes what one of the platform's versions computes "
            "(compare its body with migration 102's or 213's), declare it and rerun the "
            f"pre-flight: {DECLARE_SETTING}={choice.fingerprint}=213 (or =102); every run "
            "still proves it on its first keys"
        )
    return warned(choice.reason, fix)


def check_privileges(ctx: Context) -> CheckResult:
    choice = ctx.path
    needs = privileges.requirements(
        security_definer=privileges.function_runs_as_owner(ctx.cursor), own_path=choice.own
    )
    missing = privileges.find_missing(ctx.cursor, needs)
    if missing.needs:
        return failed(
            f"role {missing.role} lacks {missing.described()}",
            "grant them (as the owner or a superuser), or connect as another role: "
            + missing.grants(),
        )
    return passed(f"role {missing.role} has the {len(needs)} privileges the repair uses")


def check_tool_schema(ctx: Context) -> CheckResult:
    fix = MIGRATE_FIX.format(schema=ctx.tool_schema)
    missing = [
        row[0]
        for row in ctx.all(
            MISSING_OBJECTS_SQL,
            {"tables": [*REQUIRED_TOOL_TABLES, "django_migrations"], "schema": ctx.tool_schema},
        )
    ]
    if missing:
        return failed(
            f"schema {ctx.tool_schema!r} lacks {', '.join(missing)}: the tool is not migrated",
            fix,
        )
    applied = {tuple(row) for row in ctx.all(compose(APPLIED_MIGRATIONS_SQL))}
    pending = sorted(f"{app}.{name}" for app, name in expected_migrations() - applied)
    if pending:
        shown = ", ".join(pending[:5]) + (
            f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        )
        return failed(f"unapplied migrations: {shown}", fix)
    return passed(f"schema {ctx.tool_schema!r} migrated ({len(applied)} migrations applied)")


def expected_migrations() -> set[tuple[str, str]]:
    """The migrations on disk for the installed apps (no database access)."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    return {key for key, migration in loader.disk_migrations.items() if not migration.replaces}


def check_cutoff(ctx: Context) -> CheckResult:
    (database_now,) = ctx.one(DATABASE_NOW_SQL)
    try:
        ensure_cutoff_in_past(ctx.cutoff, database_now)
    except CutoffError as exc:
        return failed(str(exc), "give --cutoff the hosted deployment time of the Codex fix")
    age = database_now - ctx.cutoff
    detail = f"{json_default(ctx.cutoff)} is {_describe_age(age)} before the database's clock"
    if ctx.cutoff < FIX_LANDED_UPSTREAM:
        return warned(
            detail
            + f", but earlier than the fix landed upstream ({FIX_LANDED_UPSTREAM:%Y-%m-%d})",
            "use the time the fix was deployed on this installation, not an earlier date",
        )
    return passed(detail)


def _describe_age(age: timedelta) -> str:
    if age >= timedelta(days=2):
        return f"{age.days} days"
    hours = age.total_seconds() / 3600
    return f"{hours:.1f} hours" if hours >= 1 else f"{age.total_seconds():.0f} seconds"


def check_candidates(ctx: Context) -> CheckResult:
    if ctx.workspace_id is not None:
        (known,) = ctx.one(compose(WORKSPACE_HAS_AGENTS_SQL), [str(ctx.workspace_id)])
        if not known:
            return failed(
                f"no agent belongs to workspace {ctx.workspace_id}",
                "check --workspace-id (a workspace id, not an agent or task id)",
            )
    params = {**eligible_params(ctx.cutoff, ctx.workspace_id), "cap": CANDIDATE_COUNT_CAP}
    (count,) = ctx.one(compose(COUNT_CANDIDATES_SQL), params)
    if count:
        shown = f"at least {count:,}" if count >= CANDIDATE_COUNT_CAP else f"{count:,}"
        return passed(
            f"{shown} eligible Codex rows before the cutoff (the dry run gives the exact figures)"
        )
    (journaled,) = ctx.one(compose(JOURNALED_SQL))
    if journaled:
        return passed("no eligible rows left: earlier runs repaired them (see the journal)")
    return failed(
        "no eligible Codex rows before the cutoff and nothing repaired yet",
        "check --cutoff (the hosted deployment time of the fix, not an earlier date) and "
        "that DATABASE_URL names the application database with the historical rows",
    )


def _share(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({100 * part / whole:.0f}%)" if whole else "none"


def _shifted(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, held within Python's years 1 to 9999 (a cutoff may be near them)."""
    try:
        return moment + delta
    except OverflowError:
        return (datetime.min if delta < timedelta(0) else datetime.max).replace(tzinfo=UTC)


def check_after_cutoff(ctx: Context) -> CheckResult:
    params = {
        **eligible_params(ctx.cutoff, ctx.workspace_id),
        "window_start": _shifted(ctx.cutoff, -NEIGHBOURHOOD),
        "window_end": _shifted(ctx.cutoff, NEIGHBOURHOOD),
        "sample": SAMPLE_ROWS,
    }
    before, before_unfixed, after, after_unfixed = ctx.one(
        compose(CUTOFF_NEIGHBOURHOOD_SQL), params
    )
    # Is the cutoff the fix's deployment? Before it most rows should still count the cache
    # in their input; after it, few.
    detail = (
        f"Codex rows with cached input, last written within {NEIGHBOURHOOD.days} days of the "
        f"cutoff, whose input still includes the cache (input_tokens >= cache_read_tokens): "
        f"before the cutoff {_share(before_unfixed, before)}, after it "
        f"{_share(after_unfixed, after)}"
    )
    if after >= MIN_SAMPLE_ROWS and after_unfixed >= AFTER_UNNORMALIZED_WARN_SHARE * after:
        return warned(
            detail + "; rows written after the cutoff still look un-normalized",
            "the fix was probably deployed later than --cutoff: those rows are not eligible "
            "and would stay double-counted; confirm the deployment time and pass it as "
            "--cutoff",
        )
    before_fixed = before - before_unfixed
    if before >= MIN_SAMPLE_ROWS and before_fixed >= BEFORE_NORMALIZED_WARN_SHARE * before:
        return warned(
            detail + "; many rows before the cutoff already look normalized",
            "the fix was probably deployed earlier than --cutoff: the repair would subtract "
            "cached input a second time (they show as clamped in the dry run); confirm the "
            "deployment time and pass it as --cutoff",
        )
    return passed(detail)


def check_rollup_queue(ctx: Context) -> CheckResult:
    """The queue's key is unique NULLS NOT DISTINCT under the name the upserts use."""
    table = compose("{task_usage_hourly_dirty}")
    key = [name for name, _ in QUEUE_KEY_COLUMNS]
    fix = (
        "the repair queues hourly keys as the platform does (INSERT ... ON CONFLICT ON "
        f"CONSTRAINT {QUEUE_CONSTRAINT}); deploy the application migration that gives "
        f"task_usage_hourly_dirty that constraint: UNIQUE NULLS NOT DISTINCT ({', '.join(key)})"
    )
    row = ctx.one(QUEUE_CONSTRAINT_SQL, {"table": table, "name": QUEUE_CONSTRAINT})
    if row is None:
        return failed(f"task_usage_hourly_dirty has no constraint {QUEUE_CONSTRAINT}", fix)
    kind, nulls_not_distinct, columns = row
    if kind != "u" or not nulls_not_distinct or list(columns) != key:
        shape = (
            f"{'UNIQUE' if kind == 'u' else 'not UNIQUE'}"
            f"{' NULLS NOT DISTINCT' if nulls_not_distinct else ''} ({', '.join(columns)})"
        )
        return failed(f"{QUEUE_CONSTRAINT} is {shape}", fix)
    extra = [
        r[0]
        for r in ctx.all(
            QUEUE_REQUIRED_COLUMNS_SQL, {"table": table, "columns": [*key, "enqueued_at"]}
        )
    ]
    if extra:
        return failed(
            f"task_usage_hourly_dirty has NOT NULL column(s) without a default: "
            f"{', '.join(extra)}; queueing a key with its seven columns would fail",
            "this is not the queue the tool was written for: check DATABASE_URL and "
            "CODEX_TARGET_SCHEMA",
        )
    return passed(
        f"task_usage_hourly_dirty keys are unique NULLS NOT DISTINCT ({QUEUE_CONSTRAINT})"
    )


def check_rollup_cron(ctx: Context) -> CheckResult:
    """Where the platform's cron tick stands: how the repair will stamp its rows."""
    watermark, last_started, last_error, now, has_cron = ctx.one(
        compose(CRON_STATE_SQL),
        {"cron": f"{ctx.target_schema}.rollup_task_usage_hourly()"},
    )
    if watermark is None:
        return failed(
            "task_usage_hourly_rollup_state has no row (id = 1)",
            "the platform's rollup state is missing: check DATABASE_URL and CODEX_TARGET_SCHEMA",
        )
    policy = cron.choose_stamp(ctx.cutoff, cron.CronState(watermark, last_started, now), None)
    notes = []
    stopped = False
    if last_started is not None:
        age = now - last_started
        # As the repair judges it (usage.cron): a tick this late means a stopped scheduler.
        limit = cron.STALE_AFTER_INTERVALS * cron.DEFAULT_TICK_INTERVAL_SECONDS
        stopped = age.total_seconds() > limit
        if not stopped:
            notes.append(f"last cron tick started {_describe_age(age)} ago")
    elif "never ran" not in policy.reason:
        notes.append("the cron tick never ran")
    if last_error:
        notes.append(f"its last error: {' '.join(str(last_error).split())[:200]}")
    if not has_cron:
        notes.append("rollup_task_usage_hourly() not found")
    detail = policy.reason + (f" ({'; '.join(notes)})" if notes else "")
    if stopped:
        # What matters first: the scheduler looks stopped.
        detail = (
            f"the platform's scheduler looks stopped: its last cron tick started "
            f"{_describe_age(now - last_started)} ago; {detail}"
        )
        return warned(
            detail,
            "the platform's scheduler looks stopped (no tick for more than "
            f"{cron.STALE_AFTER_INTERVALS} intervals of "
            f"{cron.DEFAULT_TICK_INTERVAL_SECONDS / 60:g} minutes): the repair does not wait "
            "for its ticks, and the hourly rows of new usage stay stale until it runs again; "
            "ask the platform's operators to restart it",
        )
    if not policy.below_watermark:
        return warned(
            detail,
            "the repair still works; to spare the platform one long re-roll, let its cron "
            "tick catch up past the cutoff first (or accept that re-roll)",
        )
    return passed(detail)


def check_pending_rollups(ctx: Context) -> CheckResult:
    """Runs whose rollup did not finish: their rows are below the cron's watermark."""
    pending = [row[0] for row in ctx.all(compose(PENDING_ROLLUPS_SQL))]
    if not pending:
        return passed("no run has its rollup pending")
    return warned(
        f"the rollup of run(s) {', '.join(map(str, pending))} did not finish: their rows' "
        "hourly keys are not rebuilt yet, and the platform's cron tick will not rebuild them",
        "run backfill_codex_usage_cache --execute with the same cutoff (with nothing left to "
        "repair it only rebuilds them), or see the runbook's section on the cron tick",
    )


def check_replication(ctx: Context) -> CheckResult:
    replicas = replication.replica_states(ctx.cursor)
    if not replicas:
        return passed("no streaming replicas connected")
    hidden = [r for r in replicas if r.hidden]
    if hidden:
        return warned(
            f"{len(replicas)} replica(s) connected, lag of {len(hidden)} hidden from this role",
            "--max-replication-lag would pause until it can see the lag: "
            "GRANT pg_monitor TO the repair's role, or run without the option",
        )
    lags = [r.replay_lag_seconds for r in replicas if r.replay_lag_seconds is not None]
    worst = f", worst replay lag {max(lags):.1f}s" if lags else ", all caught up"
    return passed(f"{len(replicas)} replica(s) connected, lag visible{worst}")


CHECKS: tuple[Check, ...] = (
    Check("server_version", "PostgreSQL 15 or newer", check_server_version),
    Check("primary", "a writable primary, not a standby", check_primary),
    Check("tables", "the application's tables", check_tables),
    Check("columns", "the columns and types the tool uses", check_columns, ("tables",)),
    Check("rollup_function", "the hourly rollup function and signature", check_rollup_function),
    Check(
        "rollup_path",
        "how the repair rebuilds the hourly rollup",
        check_rollup_path,
        ("tables", "rollup_function"),
    ),
    Check(
        "rollup_queue",
        "the rollup queue's unique key the repair upserts into",
        check_rollup_queue,
        ("tables",),
    ),
    Check(
        "rollup_cron",
        "the platform's cron tick and its watermark",
        check_rollup_cron,
        ("tables",),
    ),
    Check("indexes", "the indexes the tool relies on", check_indexes, ("tables",)),
    Check("tool_schema", "the tool's own schema is migrated", check_tool_schema),
    Check(
        "privileges",
        "the privileges the repair needs",
        check_privileges,
        ("tables", "rollup_function", "tool_schema"),
    ),
    Check("cutoff", "the cutoff is in the database's past", check_cutoff),
    Check(
        "candidates",
        "eligible rows exist before the cutoff",
        check_candidates,
        ("tables", "columns", "tool_schema"),
    ),
    Check(
        "after_cutoff",
        "rows on both sides of the cutoff look as expected",
        check_after_cutoff,
        ("tables", "columns", "tool_schema"),
    ),
    Check(
        "pending_rollups",
        "no earlier run left its rollup unfinished",
        check_pending_rollups,
        ("tool_schema",),
    ),
    Check("replication", "replica lag is visible for --max-replication-lag", check_replication),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)
