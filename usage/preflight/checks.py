"""The pre-flight's checks, read-only, registered in ``CHECKS`` by ``@check`` in the
checklist's order; each returns ``passed``, ``warned`` or ``failed``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from usage import cron, db, privileges, replication
from usage.eligibility import KEY_COLUMNS, compose, eligible_params
from usage.events import json_default
from usage.preflight import catalog
from usage.preflight.catalog import Check, CheckResult, Context, failed, passed, warned
from usage.render import short_hash
from usage.repair import runs
from usage.repair.rollup.versions import DECLARE_SETTING
from usage.repair.summary import WORKSPACE_HAS_AGENTS_SQL, CutoffError, ensure_cutoff_in_past

MIN_SERVER_VERSION_NUM = 150000
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

WRONG_SCHEMA_FIX = "check DATABASE_URL and CODEX_TARGET_SCHEMA"


_REGISTERED: list[Check] = []


def check(title: str, requires: str = "") -> Callable[[Callable], Callable]:
    def register(run: Callable[[Context], CheckResult]) -> Callable[[Context], CheckResult]:
        name = run.__name__.removeprefix("check_")
        _REGISTERED.append(Check(name, title, run, tuple(requires.split())))
        return run

    return register


@check("PostgreSQL 15 or newer")
def check_server_version(ctx: Context) -> CheckResult:
    number, text = ctx.one(catalog.SERVER_VERSION_SQL)
    if number >= MIN_SERVER_VERSION_NUM:
        return passed(f"PostgreSQL {text}")
    return failed(
        f"PostgreSQL {text} is older than 15",
        "run the repair against PostgreSQL 15 or newer (the hourly rollup key relies on "
        "UNIQUE NULLS NOT DISTINCT); upgrade the server first",
    )


@check("a writable primary, not a standby")
def check_primary(ctx: Context) -> CheckResult:
    in_recovery, default_read_only = ctx.one(catalog.PRIMARY_SQL)
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


@check("the application's tables")
def check_tables(ctx: Context) -> CheckResult:
    missing = db.missing_tables(ctx.cursor, catalog.PREFLIGHT_TARGET_TABLES, ctx.target_schema)
    if missing:
        return failed(
            f"missing in schema {ctx.target_schema!r}: {', '.join(missing)}",
            "point DATABASE_URL at the application database, or set CODEX_TARGET_SCHEMA to the "
            "schema that holds its tables",
        )
    return passed(
        f"{len(catalog.PREFLIGHT_TARGET_TABLES)} tables found in schema {ctx.target_schema!r}"
    )


@check("the columns and types the tool uses", requires="tables")
def check_columns(ctx: Context) -> CheckResult:
    params = {"schema": ctx.target_schema, "tables": list(catalog.EXPECTED_COLUMNS)}
    found = {(table, column): kind for table, column, kind in ctx.all(catalog.COLUMNS_SQL, params)}
    problems = []
    for table, columns in catalog.EXPECTED_COLUMNS.items():
        for column in columns:
            actual, expected = found.get((table, column)), catalog.expected_type(table, column)
            if actual is None:
                problems.append(f"{table}.{column} is missing")
            elif not catalog.type_matches(actual, expected):
                problems.append(f"{table}.{column} is {actual}, expected {expected}")
    if problems:
        return failed(
            "; ".join(problems),
            f"this is not the schema the tool was written for: {WRONG_SCHEMA_FIX}; if the "
            "application renamed or retyped these columns, the tool must be updated before it "
            "runs",
        )
    count = sum(len(columns) for columns in catalog.EXPECTED_COLUMNS.values())
    return passed(f"{count} columns with the expected types")


@check("the hourly rollup function and signature")
def check_rollup_function(ctx: Context) -> CheckResult:
    signature = f"{ctx.target_schema}.{db.ROLLUP_FUNCTION_SIGNATURE}"
    exists, returns, definer = db.rollup_function(ctx.cursor)[:3]
    fix = (
        "deploy the application migration that creates "
        f"{db.ROLLUP_FUNCTION_SIGNATURE} returning bigint in schema {ctx.target_schema!r} "
        "(the repair and the platform's cron both call it), or fix CODEX_TARGET_SCHEMA"
    )
    if not exists:
        name = db.ROLLUP_FUNCTION_SIGNATURE.split("(")[0]
        others = ctx.column(
            catalog.ROLLUP_FUNCTION_OVERLOADS_SQL, {"schema": ctx.target_schema, "name": name}
        )
        found = f"; found only {', '.join(others)}" if others else ""
        return failed(f"{signature} not found{found}", fix)
    if returns != "bigint":
        return failed(f"{signature} returns {returns}, expected bigint", fix)
    mode = "security definer" if definer else "runs with the caller's privileges"
    return passed(
        f"{signature} returns bigint ({mode}); its definition: {ctx.path.function} "
        f"(fingerprint {short_hash(ctx.path.fingerprint)})"
    )


@check("how the repair rebuilds the hourly rollup", requires="tables rollup_function")
def check_rollup_path(ctx: Context) -> CheckResult:
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


@check("the rollup queue's unique key the repair upserts into", requires="tables")
def check_rollup_queue(ctx: Context) -> CheckResult:
    key = list(KEY_COLUMNS)
    fix = (
        "the repair queues hourly keys as the platform does (INSERT ... ON CONFLICT ON "
        f"CONSTRAINT {db.QUEUE_CONSTRAINT}); deploy the application migration that gives "
        f"task_usage_hourly_dirty that constraint: UNIQUE NULLS NOT DISTINCT ({', '.join(key)})"
    )
    row = db.queue_constraint(ctx.cursor)
    if row is None:
        return failed(f"task_usage_hourly_dirty has no constraint {db.QUEUE_CONSTRAINT}", fix)
    kind, nulls_not_distinct, columns = row
    if kind != "u" or not nulls_not_distinct or list(columns) != key:
        shape = (
            f"{'UNIQUE' if kind == 'u' else 'not UNIQUE'}"
            f"{' NULLS NOT DISTINCT' if nulls_not_distinct else ''} ({', '.join(columns)})"
        )
        return failed(f"{db.QUEUE_CONSTRAINT} is {shape}", fix)
    params = {"table": compose("{task_usage_hourly_dirty}"), "columns": [*key, "enqueued_at"]}
    extra = ctx.column(catalog.QUEUE_REQUIRED_COLUMNS_SQL, params)
    if extra:
        return failed(
            f"task_usage_hourly_dirty has NOT NULL column(s) without a default: "
            f"{', '.join(extra)}; queueing a key with its seven columns would fail",
            f"this is not the queue the tool was written for: {WRONG_SCHEMA_FIX}",
        )
    return passed(
        f"task_usage_hourly_dirty keys are unique NULLS NOT DISTINCT ({db.QUEUE_CONSTRAINT})"
    )


@check("the platform's cron tick and its watermark", requires="tables")
def check_rollup_cron(ctx: Context) -> CheckResult:
    watermark, last_started, last_error, now, has_cron = ctx.one(
        compose(catalog.CRON_STATE_SQL),
        {"cron": f"{ctx.target_schema}.rollup_task_usage_hourly()"},
    )
    if watermark is None:
        return failed(
            "task_usage_hourly_rollup_state has no row (id = 1)",
            f"the platform's rollup state is missing: {WRONG_SCHEMA_FIX}",
        )
    state = cron.CronState(watermark, last_started, now)
    policy = cron.choose_stamp(ctx.cutoff, state, None)
    notes = []
    stopped = state.stopped(cron.DEFAULT_TICK_INTERVAL_SECONDS)
    if last_started is not None and not stopped:
        notes.append(f"last cron tick started {_describe_age(now - last_started)} ago")
    elif last_started is None and "never ran" not in policy.reason:
        notes.append("the cron tick never ran")
    if last_error:
        notes.append(f"its last error: {' '.join(str(last_error).split())[:200]}")
    if not has_cron:
        notes.append("rollup_task_usage_hourly() not found")
    detail = policy.reason + (f" ({'; '.join(notes)})" if notes else "")
    if stopped:
        # What matters first: the scheduler looks stopped.
        return warned(
            f"the platform's scheduler looks stopped: its last cron tick started "
            f"{_describe_age(now - last_started)} ago; {detail}",
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


@check("the indexes the tool relies on", requires="tables")
def check_indexes(ctx: Context) -> CheckResult:
    tables = sorted({table for table, *_ in catalog.REQUIRED_INDEXES})
    rows = ctx.all(catalog.INDEXES_SQL, {"schema": ctx.target_schema, "tables": tables})
    problems, fixes = [], []
    for table, column, unique, why in catalog.REQUIRED_INDEXES:
        leading = [row for row in rows if row[0] == table and row[2] == column]
        if any(row[4] and (row[5] or not unique) for row in leading):
            continue
        target = f"{table}({column})"
        invalid = [row[1] for row in leading if not row[3]]
        if invalid:
            problems.append(f"index {invalid[0]} on {target} is INVALID ({why})")
            fixes.append(f"REINDEX INDEX CONCURRENTLY {ctx.target_schema}.{invalid[0]};")
            continue
        kind = "unique index (primary key)" if unique else "index"
        problems.append(f"no usable {kind} on {target} ({why})")
        create = "CREATE UNIQUE INDEX" if unique else "CREATE INDEX"
        fixes.append(f"{create} CONCURRENTLY ON {ctx.target_schema}.{table} ({column});")
    if problems:
        return failed(
            "; ".join(problems),
            "restore the application's indexes before running (off-peak, without blocking "
            "writers): " + " ".join(fixes),
        )
    return passed(
        f"{len(catalog.REQUIRED_INDEXES)} indexes found by leading column: "
        + ", ".join(f"{table}({column})" for table, column, *_ in catalog.REQUIRED_INDEXES[:4])
        + " and the joined tables' primary keys"
    )


@check("the tool's own schema is migrated")
def check_tool_schema(ctx: Context) -> CheckResult:
    fix = (
        "run `python manage.py migrate` against this database (same DATABASE_URL; unset for the "
        f"sandbox): it creates only the tool's schema {ctx.tool_schema!r}"
    )
    tables = [*db.REQUIRED_TOOL_TABLES, "django_migrations"]
    missing = db.missing_tables(ctx.cursor, tables, ctx.tool_schema)
    if missing:
        return failed(
            f"schema {ctx.tool_schema!r} lacks {', '.join(missing)}: the tool is not migrated",
            fix,
        )
    applied, unapplied = db.migrations(ctx.cursor)
    pending = [f"{app}.{name}" for app, name in unapplied]
    if pending:
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        return failed(f"unapplied migrations: {', '.join(pending[:5])}{more}", fix)
    return passed(f"schema {ctx.tool_schema!r} migrated ({len(applied)} migrations applied)")


@check("the privileges the repair needs", requires="tables rollup_function tool_schema")
def check_privileges(ctx: Context) -> CheckResult:
    needs = privileges.requirements(
        security_definer=privileges.function_runs_as_owner(ctx.cursor), own_path=ctx.path.own
    )
    missing = privileges.find_missing(ctx.cursor, needs)
    if missing.needs:
        return failed(
            f"role {missing.role} lacks {missing.described()}",
            "grant them (as the owner or a superuser), or connect as another role: "
            + missing.grants(),
        )
    return passed(f"role {missing.role} has the {len(needs)} privileges the repair uses")


@check("the cutoff is in the database's past")
def check_cutoff(ctx: Context) -> CheckResult:
    (database_now,) = ctx.one("SELECT now()")
    try:
        ensure_cutoff_in_past(ctx.cutoff, database_now)
    except CutoffError as exc:
        return failed(str(exc), "give --cutoff the hosted deployment time of the Codex fix")
    age = _describe_age(database_now - ctx.cutoff)
    detail = f"{json_default(ctx.cutoff)} is {age} before the database's clock"
    if ctx.cutoff < FIX_LANDED_UPSTREAM:
        return warned(
            f"{detail}, but earlier than the fix landed upstream ({FIX_LANDED_UPSTREAM:%Y-%m-%d})",
            "use the time the fix was deployed on this installation, not an earlier date",
        )
    return passed(detail)


def _describe_age(age: timedelta) -> str:
    if age >= timedelta(days=2):
        return f"{age.days} days"
    hours = age.total_seconds() / 3600
    return f"{hours:.1f} hours" if hours >= 1 else f"{age.total_seconds():.0f} seconds"


@check("eligible rows exist before the cutoff", requires="tables columns tool_schema")
def check_candidates(ctx: Context) -> CheckResult:
    if ctx.workspace_id is not None:
        (known,) = ctx.one(compose(WORKSPACE_HAS_AGENTS_SQL), [str(ctx.workspace_id)])
        if not known:
            return failed(
                f"no agent belongs to workspace {ctx.workspace_id}",
                "check --workspace-id (a workspace id, not an agent or task id)",
            )
    params = {**eligible_params(ctx.cutoff, ctx.workspace_id), "cap": CANDIDATE_COUNT_CAP}
    (count,) = ctx.one(compose(catalog.COUNT_CANDIDATES_SQL), params)
    if count:
        shown = f"at least {count:,}" if count >= CANDIDATE_COUNT_CAP else f"{count:,}"
        return passed(
            f"{shown} eligible Codex rows before the cutoff (the dry run gives the exact figures)"
        )
    if ctx.one(compose(catalog.JOURNALED_SQL))[0]:
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


@check("rows on both sides of the cutoff look as expected", requires="tables columns tool_schema")
def check_after_cutoff(ctx: Context) -> CheckResult:
    """Is the cutoff the fix's deployment? Codex counted cached input inside input_tokens
    before the fix, so most rows before it should still look so, and few after it."""
    params = {
        **eligible_params(ctx.cutoff, ctx.workspace_id),
        "window_start": _shifted(ctx.cutoff, -NEIGHBOURHOOD),
        "window_end": _shifted(ctx.cutoff, NEIGHBOURHOOD),
        "sample": SAMPLE_ROWS,
    }
    before, before_unfixed, after, after_unfixed = ctx.one(
        compose(catalog.CUTOFF_NEIGHBOURHOOD_SQL), params
    )
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


@check("no earlier run left its rollup unfinished", requires="tool_schema")
def check_pending_rollups(ctx: Context) -> CheckResult:
    """Runs whose rollup did not finish: their rows are below the cron's watermark."""
    pending = ctx.column(compose(runs.PENDING_ROLLUPS_SQL))
    if not pending:
        return passed("no run has its rollup pending")
    return warned(
        f"the rollup of run(s) {', '.join(map(str, pending))} did not finish: their rows' "
        "hourly keys are not rebuilt yet, and the platform's cron tick will not rebuild them",
        "run backfill_codex_usage_cache --execute with the same cutoff (with nothing left to "
        "repair it only rebuilds them), or see the runbook's section on the cron tick",
    )


@check("replica lag is visible for --max-replication-lag")
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


CHECKS: tuple[Check, ...] = tuple(_REGISTERED)
CHECK_NAMES = tuple(c.name for c in CHECKS)
