"""Creating a target database: the project's own schema fixture and the demo dataset.

Used by the sandbox, the test suite and the benchmark, so all three run against the same
tables and the same ``rollup_task_usage_hourly_window``. The fixture is the platform as it
ships today (its migration 213); ``install_platform_version`` turns a database back into the
platform of migration 102 (no cost columns in the hourly rollup) and forth, for the tests
that prove the tool on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psycopg import sql

from sandbox import dataset

HERE = Path(__file__).resolve().parent
SCHEMA_FIXTURE = HERE / "target_schema.sql"
# The rollup function as each supported platform migration defines it.
ROLLUP_FUNCTIONS = {
    102: HERE / "rollup_window_102.sql",
    213: HERE / "rollup_window_213.sql",
}
CURRENT_PLATFORM_VERSION = 213

# The hourly rollup's cost columns, which migration 213 added (the uncosted ones nullable,
# with no default: NULL means "not recomputed since 213").
COST_COLUMNS = (
    ("cost_usd_ticks", "bigint NOT NULL DEFAULT 0"),
    ("uncosted_input_tokens", "bigint NULL"),
    ("uncosted_output_tokens", "bigint NULL"),
    ("uncosted_cache_read_tokens", "bigint NULL"),
    ("uncosted_cache_write_tokens", "bigint NULL"),
)
ADD_COLUMN_SQL = "ALTER TABLE task_usage_hourly ADD COLUMN IF NOT EXISTS {} {}"
DROP_COLUMN_SQL = "ALTER TABLE task_usage_hourly DROP COLUMN IF EXISTS {}"


def _on_search_path(cursor: Any, schema: str) -> None:
    """Unqualified names land in ``schema`` for the rest of the caller's transaction."""
    cursor.execute(
        sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)).as_string()
    )


def create_target_schema(cursor: Any, schema: str) -> None:
    """Create the application's tables and rollup function in ``schema``.

    The caller's transaction scopes the ``search_path`` change, so the fixture's unqualified
    names land in the target schema whatever the connection's default path is.
    """
    create = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
    cursor.execute(create.as_string())
    _on_search_path(cursor, schema)
    cursor.execute(SCHEMA_FIXTURE.read_text())
    cursor.execute(ROLLUP_FUNCTIONS[CURRENT_PLATFORM_VERSION].read_text())


def install_platform_version(cursor: Any, schema: str, version: int) -> None:
    """Make ``schema`` the platform of migration ``version`` (102 or 213): the hourly
    rollup's columns and the rollup function's body, data kept."""
    _on_search_path(cursor, schema)
    cursor.execute(ROLLUP_FUNCTIONS[version].read_text())
    for name, definition in COST_COLUMNS:
        if version >= 213:
            cursor.execute(ADD_COLUMN_SQL.format(name, definition))
        else:
            cursor.execute(DROP_COLUMN_SQL.format(name))


def seed_demo_data(cursor: Any, schema: str, spec: dataset.DatasetSpec | None = None) -> None:
    """Fill the target schema with the deterministic dataset and a consistent rollup."""
    _on_search_path(cursor, schema)
    dataset.generate_dataset(cursor, spec or dataset.DEMO_SPEC)
    dataset.populate_hourly(cursor)
    dataset.mark_rolled_up(cursor)
