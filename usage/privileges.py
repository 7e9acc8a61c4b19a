"""The privileges a run needs, checked before its first write.

A role that may rewrite ``task_usage`` but not call the rollup function (or write the tool's
journal, or queue a key) would repair the rows and then fail to rebuild their hourly keys:
the rows carry stamps below the cron's watermark, so no tick would ever fix those keys. So
the execute and the revert check, before they write anything, every privilege they will need
to finish, and refuse in one line that names what is missing and the ``GRANT`` that gives it.
The pre-flight lists the same requirements (``usage.preflight.checks``).

Privileges are read with ``has_*_privilege`` for the role actually connected, so grants
through role membership count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from psycopg import sql

from usage.db import REQUIRED_TOOL_TABLES, ROLLUP_FUNCTION_SIGNATURE, TargetError
from usage.eligibility import compose

# The tool's own tables: the run record and the journal are read, written and updated.
TOOL_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")

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


@dataclass(frozen=True)
class Need:
    """One privilege: on what (``kind`` table, function, schema or database) and why."""

    kind: str
    obj: str
    privilege: str
    why: str = ""

    def named(self, database: str) -> str:
        target = self.obj or f"database {database}"
        return f"{self.privilege} on {target}"


@dataclass(frozen=True)
class Missing:
    """What the connected role lacks of some needs."""

    role: str
    database: str
    needs: tuple[Need, ...]

    def described(self) -> str:
        return ", ".join(
            need.named(self.database) + (f" ({need.why})" if need.why else "")
            for need in self.needs
        )

    def grants(self) -> str:
        return " ".join(grant_statement(need, self.role, self.database) for need in self.needs)


class PrivilegeError(TargetError):
    """The role lacks privileges a run needs; nothing was written."""


def _quote(identifier: str) -> str:
    return sql.Identifier(identifier).as_string()


def grant_statement(need: Need, role: str, database: str) -> str:
    role_name = _quote(role)
    if need.kind == "database":
        return f"GRANT {need.privilege} ON DATABASE {_quote(database)} TO {role_name};"
    if need.kind == "function":
        return f"GRANT EXECUTE ON FUNCTION {need.obj} TO {role_name};"
    if need.kind == "schema":
        return f"GRANT {need.privilege} ON SCHEMA {_quote(need.obj)} TO {role_name};"
    return f"GRANT {need.privilege} ON {need.obj} TO {role_name};"


def _table(name: str) -> str:
    return compose("{" + name + "}")


def requirements(
    *,
    rebuild_rollup: bool = True,
    security_definer: bool = False,
    revert: bool = False,
    own_path: bool = True,
) -> list[Need]:
    """What a run needs: the repair's (``revert=False``) or the revert's.

    ``rebuild_rollup`` adds the rollup's needs: the function, and, when the function runs
    with the caller's privileges (not ``security_definer``) or the own path writes the hourly
    table itself (``own_path``), the hourly table and the queue.
    """
    target, tool = settings.CODEX_TARGET_SCHEMA, settings.CODEX_REPAIR_SCHEMA
    needs = [
        # has_schema_privilege takes the schema's name, not a quoted identifier.
        Need("schema", target, "USAGE"),
        Need("table", _table("task_usage"), "SELECT"),
        Need("table", _table("task_usage"), "UPDATE", "the rows are rewritten"),
        Need("table", _table("agent_task_queue"), "SELECT"),
        Need("table", _table("agent"), "SELECT"),
        Need("table", _table("issue"), "SELECT"),
        Need("table", _table("task_usage_hourly_rollup_state"), "SELECT"),
        # The batches keep their work list in a temporary table.
        Need("database", "", "TEMPORARY", "the work list is a temporary table"),
        Need("schema", tool, "USAGE"),
    ]
    for tool_table in (*REQUIRED_TOOL_TABLES, "django_migrations"):
        qualified = compose("{tool_schema}") + "." + _quote(tool_table)
        privileges = ("SELECT",) if tool_table == "django_migrations" else TOOL_TABLE_PRIVILEGES
        needs.extend(Need("table", qualified, privilege) for privilege in privileges)
    if not rebuild_rollup:
        return needs
    hourly, queue = _table("task_usage_hourly"), _table("task_usage_hourly_dirty")
    needs.append(
        Need(
            "function",
            compose("{rollup_task_usage_hourly_window}") + "(timestamptz, timestamptz)",
            "EXECUTE",
            "the rollup rebuild",
        )
    )
    needs.append(Need("table", hourly, "SELECT"))
    if not security_definer or own_path:
        # The rollup runs with the caller's privileges, or the own path writes the hourly
        # table itself.
        needs.extend(
            Need("table", hourly, privilege, "the rollup rebuild")
            for privilege in ("INSERT", "UPDATE", "DELETE")
        )
    if not security_definer or (own_path and revert):
        # The function drains the queue as the caller; the revert's own path removes the
        # queue rows of the keys it rebuilt.
        needs.extend(
            Need("table", queue, privilege, "draining rebuilt keys")
            for privilege in ("SELECT", "DELETE")
        )
    # Keys of rewritten rows, and the revert's, are queued with the platform's upsert.
    needs.extend(
        Need("table", queue, privilege, "queueing keys") for privilege in ("INSERT", "UPDATE")
    )
    return needs


def find_missing(cursor: Any, needs: Sequence[Need]) -> Missing:
    """The needs the connected role lacks (read-only)."""
    cursor.execute(
        PRIVILEGES_SQL,
        {
            "kinds": [need.kind for need in needs],
            "objs": [need.obj for need in needs],
            "privs": [need.privilege for need in needs],
        },
    )
    rows = cursor.fetchall()
    lacking = tuple(need for need, row in zip(needs, rows, strict=True) if not row[3])
    return Missing(rows[0][4], rows[0][5], lacking)


def refuse_missing(cursor: Any, needs: Sequence[Need], what: str) -> None:
    """Raise ``PrivilegeError`` (one line, nothing written) when the role lacks a need."""
    missing = find_missing(cursor, needs)
    if missing.needs:
        raise PrivilegeError(
            f"role {missing.role} lacks {missing.described()}: {what} would not be able to "
            f"finish, so nothing was changed; grant them (as the owner or a superuser): "
            f"{missing.grants()} or connect as a role that has them"
        )


def function_runs_as_owner(cursor: Any) -> bool:
    """Whether the rollup function is SECURITY DEFINER (it writes as its owner)."""
    cursor.execute(
        "SELECT coalesce((SELECT prosecdef FROM pg_proc WHERE oid = to_regprocedure(%s)), false)",
        [f"{settings.CODEX_TARGET_SCHEMA}.{ROLLUP_FUNCTION_SIGNATURE}"],
    )
    return bool(cursor.fetchone()[0])
