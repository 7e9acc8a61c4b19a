"""The privileges a run needs, checked before its first write so that no run rewrites rows it
could not then roll up; the refusal names each ``GRANT``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

from django.conf import settings
from psycopg import sql

from usage.db import TargetError, rollup_function
from usage.eligibility import compose

# Each requirement (kind, qualified object, privilege), evaluated for the current role.
PRIVILEGES_SQL = """
SELECT r.kind, r.obj, r.priv,
       CASE r.kind
           WHEN 'table' THEN has_table_privilege(r.obj, r.priv)
           WHEN 'function' THEN has_function_privilege(r.obj, r.priv)
           WHEN 'schema' THEN has_schema_privilege(r.obj, r.priv)
           WHEN 'database' THEN has_database_privilege(current_database(), r.priv)
       END,
       current_user,
       current_database()
FROM unnest(%(kinds)s::text[], %(objs)s::text[], %(privs)s::text[]) AS r(kind, obj, priv)"""


def _quote(identifier: str) -> str:
    return sql.Identifier(identifier).as_string()


@dataclass(frozen=True)
class Need:
    kind: str
    obj: str
    privilege: str
    why: str = ""

    def grant(self, role: str, database: str) -> str:
        target = {
            "database": f"DATABASE {_quote(database)}",
            "schema": f"SCHEMA {_quote(self.obj)}",
            "function": f"FUNCTION {self.obj}",  # its privilege is EXECUTE
        }.get(self.kind, self.obj)  # a table
        return f"GRANT {self.privilege} ON {target} TO {_quote(role)};"


@dataclass(frozen=True)
class Missing:
    role: str
    database: str
    needs: tuple[Need, ...]

    def described(self) -> str:
        return ", ".join(
            f"{need.privilege} on {need.obj or f'database {self.database}'}"
            + (f" ({need.why})" if need.why else "")
            for need in self.needs
        )

    def grants(self) -> str:
        return " ".join(need.grant(self.role, self.database) for need in self.needs)


def _needs(tables: str, privileges: str, why: str = "") -> list[Need]:
    """``tables``: their shared names, e.g. ``{task_usage} {agent}`` (``eligibility.names``)."""
    pairs = product(tables.split(), privileges.split())
    return [Need("table", compose(table), privilege, why) for table, privilege in pairs]


def requirements(
    *, rebuild_rollup: bool = True, security_definer: bool = False, own_path: bool = True
) -> list[Need]:
    needs = [
        # has_schema_privilege takes the schema's name, not a quoted identifier.
        Need("schema", settings.CODEX_TARGET_SCHEMA, "USAGE"),
        *_needs("{task_usage}", "SELECT"),
        *_needs("{task_usage}", "UPDATE", "the rows are rewritten"),
        *_needs("{agent_task_queue} {agent} {issue} {task_usage_hourly_rollup_state}", "SELECT"),
        Need("database", "", "TEMPORARY", "the work list is a temporary table"),
        Need("schema", settings.CODEX_REPAIR_SCHEMA, "USAGE"),
        *_needs("{run} {journal}", "SELECT INSERT UPDATE"),
        *_needs('{tool_schema}."django_migrations"', "SELECT"),
    ]
    if not rebuild_rollup:
        return needs
    function = compose("{rollup_task_usage_hourly_window}") + "(timestamptz, timestamptz)"
    needs += [
        Need("function", function, "EXECUTE", "the rollup rebuild"),
        *_needs("{task_usage_hourly}", "SELECT"),
    ]
    if not security_definer or own_path:
        # The rollup runs with the caller's privileges, or the own path writes the hourly
        # table itself and its proof sets others' queued keys aside and puts them back.
        needs += _needs("{task_usage_hourly}", "INSERT UPDATE DELETE", "the rollup rebuild")
        needs += _needs("{task_usage_hourly_dirty}", "SELECT DELETE", "draining rebuilt keys")
    # Keys of rewritten rows, and the revert's, are queued with the platform's upsert.
    return needs + _needs("{task_usage_hourly_dirty}", "INSERT UPDATE", "queueing keys")


def find_missing(cursor: Any, needs: Sequence[Need]) -> Missing:
    columns = {"kinds": "kind", "objs": "obj", "privs": "privilege"}
    cursor.execute(PRIVILEGES_SQL, {k: [getattr(n, a) for n in needs] for k, a in columns.items()})
    rows = cursor.fetchall()
    lacking = tuple(need for need, row in zip(needs, rows, strict=True) if not row[3])
    return Missing(rows[0][4], rows[0][5], lacking)


def refuse_missing(cursor: Any, needs: Sequence[Need], what: str) -> None:
    missing = find_missing(cursor, needs)
    if missing.needs:
        raise TargetError(
            f"role {missing.role} lacks {missing.described()}: {what} would not be able to "
            f"finish, so nothing was changed; grant them (as the owner or a superuser): "
            f"{missing.grants()} or connect as a role that has them"
        )


def function_runs_as_owner(cursor: Any) -> bool:
    """A SECURITY DEFINER function writes as its owner."""
    return bool(rollup_function(cursor)[2])
