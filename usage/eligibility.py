"""The one definition of an "eligible row", of a row's hourly rollup key, and the SQL naming
them, so the command, the admin, the rollup and the tests never disagree about a row or a key."""

from __future__ import annotations

import uuid
from datetime import datetime
from functools import cache
from typing import Any

from django.conf import settings
from psycopg import sql

# Qualified with the application's schema: the tables the tool cannot work without, and the
# rest it names.
REQUIRED_TARGET_TABLES = (
    "task_usage",
    "agent_task_queue",
    "agent",
    "task_usage_hourly",
    "task_usage_hourly_dirty",
    "task_usage_hourly_rollup_state",
)
TARGET_NAMES = (
    *REQUIRED_TARGET_TABLES,
    "issue",
    "rollup_task_usage_hourly_window",
    "rollup_task_usage_hourly",
)
# Qualified with the tool's schema.
TOOL_NAMES = {"journal": "backfill_journal", "run": "backfill_run"}

# A usage row ``tu`` joined to its task and agent (its scope), and to its issue (its key).
TASK_JOINS = """JOIN {agent_task_queue} q ON q.id = tu.task_id
    JOIN {agent} a ON a.id = q.agent_id"""

# A row's own eligibility: a Codex row whose input still counts cached input, last written
# before the cutoff (the deployment of the ingestion fix), not repaired by a run that was not
# reverted.
CODEX_WITH_CACHED_INPUT = """tu.provider = 'codex'
    AND tu.cache_read_tokens > 0
    AND tu.input_tokens > 0"""
NOT_REPAIRED = """NOT EXISTS (
        SELECT 1 FROM {journal} j WHERE j.usage_id = tu.id AND j.reverted_at IS NULL
    )"""
# What a concurrent writer can change, re-checked under the row lock (needs only ``tu``).
ROW_ELIGIBLE_WHERE = f"""{CODEX_WITH_CACHED_INPUT}
    AND coalesce(tu.updated_at, tu.created_at) < %(cutoff)s
    AND {NOT_REPAIRED}"""
# The workspace scope (a row's task, agent and workspace never change).
SCOPE_WHERE = "(%(workspace_id)s::uuid IS NULL OR a.workspace_id = %(workspace_id)s::uuid)"

# The seven columns of an hourly key (task_usage_hourly's and its queue's, in the order of
# the queue's unique constraint), with their types.
KEY_TYPES = (
    ("bucket_hour", "timestamptz NOT NULL"),
    ("workspace_id", "uuid NOT NULL"),
    ("runtime_id", "uuid NOT NULL"),
    ("agent_id", "uuid NOT NULL"),
    ("project_id", "uuid"),
    ("provider", "text NOT NULL"),
    ("model", "text NOT NULL"),
)
KEY_COLUMNS = tuple(name for name, _ in KEY_TYPES)

# Each may use the names and the fragments before it.
FRAGMENTS = {
    "eligible_from": f"{{task_usage}} tu\n    {TASK_JOINS}",
    "row_eligible_where": ROW_ELIGIBLE_WHERE,
    "eligible_where": "{row_eligible_where}\n    AND " + SCOPE_WHERE,
    # The repaired value, and what the repair removes (never more than the row's input).
    "corrected_input": "greatest(tu.input_tokens - tu.cache_read_tokens, 0)",
    "removed_input": "least(tu.input_tokens, tu.cache_read_tokens)",
    "is_clamped": "tu.input_tokens < tu.cache_read_tokens",
    "bucket_hour": "date_trunc('hour', tu.created_at AT TIME ZONE 'UTC')",
    # The hourly rollup key of a usage row (needs ``LEFT JOIN {issue} i ON i.id = q.issue_id``).
    "rollup_key": "({bucket_hour}, q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model)",
    # A task's part of a key (``q`` joined to ``a`` and ``i``).
    "task_key": "a.workspace_id, q.runtime_id, q.agent_id, i.project_id",
    # A row ``tu`` joined to what its key needs, its key as the seven columns, and whether it
    # has one (a task with no runtime has none).
    "key_joins": f"{TASK_JOINS}\n    LEFT JOIN {{issue}} i ON i.id = q.issue_id",
    "row_key": "{bucket_hour} AT TIME ZONE 'UTC' AS bucket_hour, {task_key}, tu.provider, "
    "tu.model",
    "has_key": "q.runtime_id IS NOT NULL",
}


def key_columns(alias: str = "") -> sql.Composed:
    """The key's columns, of relation ``alias`` when given: ``"k"."bucket_hour", ...``."""
    return sql.SQL(", ").join(
        sql.Identifier(alias, name) if alias else sql.Identifier(name) for name in KEY_COLUMNS
    )


def key_table(table: str) -> sql.Composed:
    """``CREATE TEMP TABLE IF NOT EXISTS table`` of the key's columns (kept across commits)."""
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in KEY_TYPES
    )
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT PRESERVE ROWS").format(
        sql.Identifier(table), columns
    )


def same_key(a: str, b: str) -> sql.Composed:
    """The keys of relations ``a`` and ``b`` are equal (project_id may be NULL on both)."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT DISTINCT FROM {}" if name == "project_id" else "{} = {}").format(
            sql.Identifier(a, name), sql.Identifier(b, name)
        )
        for name in KEY_COLUMNS
    )


CANDIDATE_IDS_SQL = """
SELECT tu.id FROM {eligible_from} WHERE {eligible_where}"""

COUNT_ELIGIBLE_SQL = """
SELECT count(*) FROM {eligible_from} WHERE {eligible_where}"""


@cache
def names() -> dict[str, sql.Composable]:
    """Every shared name: schema-qualified identifiers, and the shared fragments composed."""
    target, tool = settings.CODEX_TARGET_SCHEMA, settings.CODEX_REPAIR_SCHEMA
    found: dict[str, sql.Composable] = {
        name: sql.Identifier(target, name) for name in TARGET_NAMES
    }
    found.update({key: sql.Identifier(tool, table) for key, table in TOOL_NAMES.items()})
    found["tool_schema"] = sql.Identifier(tool)
    found["target_schema"] = sql.Identifier(target)
    found["key_columns"] = key_columns()
    for key, fragment in FRAGMENTS.items():
        found[key] = sql.SQL(fragment).format(**found)
    return found


def format_sql(template: str, **parts: sql.Composable) -> sql.Composed:
    """``template`` with the shared names and ``parts`` (composed already) filled in."""
    return sql.SQL(template).format(**dict(names(), **parts))


@cache
def compose(template: str, **parts: str) -> str:
    """``parts``: the statement's own fragments, each may use the names and the parts before it."""
    own: dict[str, sql.Composable] = {}
    for key, fragment in parts.items():
        own[key] = sql.SQL(fragment).format(**{**names(), **own})
    return format_sql(template, **own).as_string()


def eligible_params(cutoff: datetime, workspace_id: uuid.UUID | None) -> dict[str, Any]:
    return {"cutoff": cutoff, "workspace_id": str(workspace_id) if workspace_id else None}
