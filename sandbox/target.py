"""Creating a target database: the project's own schema fixture and the demo dataset.

Used by the sandbox, the test suite and the benchmark, so all three run against the same
tables and the same ``rollup_task_usage_hourly_window``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psycopg import sql

from sandbox import dataset

SCHEMA_FIXTURE = Path(__file__).resolve().parent / "target_schema.sql"


def create_target_schema(cursor: Any, schema: str) -> None:
    """Create the application's tables and rollup function in ``schema``.

    The caller's transaction scopes the ``search_path`` change, so the fixture's unqualified
    names land in the target schema whatever the connection's default path is.
    """
    create = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
    cursor.execute(create.as_string())
    cursor.execute(
        sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)).as_string()
    )
    cursor.execute(SCHEMA_FIXTURE.read_text())


def seed_demo_data(cursor: Any, schema: str, spec: dataset.DatasetSpec | None = None) -> None:
    """Fill the target schema with the deterministic dataset and a consistent rollup."""
    cursor.execute(
        sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)).as_string()
    )
    dataset.generate_dataset(cursor, spec or dataset.DEMO_SPEC)
    dataset.populate_hourly(cursor)
    dataset.mark_rolled_up(cursor)
