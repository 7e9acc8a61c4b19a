"""The tool against the platform as it ships: databases built from the platform's own
migration files, not this project's fixture.

Developer machines only (CI has no copy of the platform): set ``CODEX_PLATFORM_GIT_DIR`` to a
git directory of the platform's public repository (multica-ai/multica) and, if it is not at
``../shared/tools/platform-db``, ``CODEX_PLATFORM_DB_TOOL`` to the script that builds a
database from its migrations; ``CODEX_PLATFORM_SERVER`` names the server (default the local
one). Each version's database is built anew, seeded here, and dropped at the end:

    CODEX_PLATFORM_GIT_DIR=/path/to/multica.git python -m pytest -m platform

What it checks, at the platform's migration 102 and at its latest (whose window function is
213's): the installed definitions are the ones the facts name (length and whitespace-collapsed
fingerprint) and the tool recognises them as the platform's; this project's fixture computes
what the platform's function computes, column by column, over every kind of key; and a repair
takes the own path, proves it against the real function, and leaves the hourly table equal to
the function's own recompute.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sandbox import target
from tests.processes import PROJECT_DIR, manage
from usage.repair.rollup import versions

GIT_DIR = os.environ.get("CODEX_PLATFORM_GIT_DIR", "")
DB_TOOL = Path(
    os.environ.get("CODEX_PLATFORM_DB_TOOL", "")
    or PROJECT_DIR.parent / "shared" / "tools" / "platform-db"
)
SERVER = os.environ.get("CODEX_PLATFORM_SERVER", "postgresql://postgres@127.0.0.1:5432")

pytestmark = [
    pytest.mark.platform,
    pytest.mark.slow,
    pytest.mark.skipif(not GIT_DIR, reason="CODEX_PLATFORM_GIT_DIR is not set"),
]

# The facts (shared/docs/target-database.md, "The rollup function", point 8): the length of
# each version's body and its fingerprint with whitespace runs collapsed.
FACTS = {
    102: (5079, "sha256:19c4de1feeb9aa5bd640bbce57b46b694a7e6d10a6f80a262e18e321ae58f973"),
    213: (6586, "sha256:97588176d14a96094ef489ccda04ebd92864f7af5cd571c4c0e958b30a4f73c1"),
}
FUNCTION_SQL = """
SELECT l.lanname, coalesce(array_to_string(p.proconfig, E'\\n'), ''), p.prosrc
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.oid = 'public.rollup_task_usage_hourly_window(timestamptz, timestamptz)'::regprocedure"""
KEYS = "bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model"
HOURLY_SQL = f"SELECT * FROM task_usage_hourly ORDER BY {KEYS}"
QUEUE_SQL = f"SELECT {KEYS} FROM task_usage_hourly_dirty ORDER BY {KEYS}"
# Every key there is, queued: the function's own from-scratch recompute of each.
QUEUE_EVERY_KEY_SQL = f"""
INSERT INTO task_usage_hourly_dirty AS d ({KEYS})
SELECT {KEYS} FROM task_usage_hourly
UNION
SELECT task_usage_hour_bucket(tu.created_at), a.workspace_id, q.runtime_id, q.agent_id,
       i.project_id, tu.provider, tu.model
FROM task_usage tu JOIN agent_task_queue q ON q.id = tu.task_id
JOIN agent a ON a.id = q.agent_id LEFT JOIN issue i ON i.id = q.issue_id
WHERE q.runtime_id IS NOT NULL
ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)"""
FIXTURE_NAME = "fixture_rollup_task_usage_hourly_window"


@pytest.fixture(scope="module", params=[102, 213], ids=["migration-102", "latest"])
def platform(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    """(version, URL) of a database built from the platform's migrations (up to 102, or all
    of them: migration 213's window function is the latest)."""
    version = request.param
    name = f"codex_platform_{version}_{os.getpid()}"
    last = ["102"] if version == 102 else []
    subprocess.run(
        ["bash", str(DB_TOOL), GIT_DIR, name, *last],
        check=True,
        capture_output=True,
        env=dict(os.environ, PGOPTIONS="-c client_min_messages=warning"),
    )
    yield version, f"{SERVER}/{name}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(conn: psycopg.Connection, version: int, seed_no: int = 7) -> None:
    """Two workspaces of agents, runtimes, projects and issues, and usage rows of every kind:
    a project, no issue, an issue without a project, no cost and a cost, legacy rows (NULL
    updated_at), Codex rows to repair (some clamped), other providers; on the current
    schema also a task without a runtime."""
    rng = random.Random(seed_no)
    now = conn.execute("SELECT now()").fetchone()[0]
    tasks: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None, uuid.UUID | None]] = []
    for w in range(2):
        workspace = uuid.uuid4()
        conn.execute(
            "INSERT INTO workspace (id, name, slug) VALUES (%s, %s, %s)",
            [workspace, f"w{w}", f"codex-{workspace.hex[:12]}"],
        )
        runtimes = [uuid.uuid4() for _ in range(2)]
        for n, runtime in enumerate(runtimes):
            conn.execute(
                "INSERT INTO agent_runtime (id, name, provider, workspace_id, runtime_mode)"
                " VALUES (%s, %s, 'codex', %s, 'local')",
                [runtime, f"r{n}", workspace],
            )
        project = uuid.uuid4()
        conn.execute(
            "INSERT INTO project (id, title, workspace_id) VALUES (%s, 'p', %s)",
            [project, workspace],
        )
        issues: list[uuid.UUID | None] = [None]
        for number, project_id in enumerate((project, None), start=1):
            issue = uuid.uuid4()
            conn.execute(
                "INSERT INTO issue (id, title, workspace_id, creator_id, creator_type,"
                " project_id, number) VALUES (%s, 'i', %s, %s, 'member', %s, %s)",
                [issue, workspace, uuid.uuid4(), project_id, number],
            )
            issues.append(issue)
        for n in range(3):
            agent = uuid.uuid4()
            conn.execute(
                "INSERT INTO agent (id, name, workspace_id, runtime_mode, runtime_id)"
                " VALUES (%s, %s, %s, 'local', %s)",
                [agent, f"a{n}", workspace, runtimes[0]],
            )
            for _ in range(8):
                tasks.append((uuid.uuid4(), agent, rng.choice(runtimes), rng.choice(issues)))
    if version >= 213:  # a finished task without a runtime: never rolled up
        tasks.append((uuid.uuid4(), tasks[0][1], None, None))
    for task, agent, runtime, issue in tasks:
        conn.execute(
            "INSERT INTO agent_task_queue (id, agent_id, runtime_id, issue_id, status,"
            " completed_at) VALUES (%s, %s, %s, %s, 'completed', now())",
            [task, agent, runtime, issue],
        )
        for provider, model in rng.sample(
            [("codex", "gpt-5"), ("codex", "gpt-5-mini"), ("claude", "opus")], 2
        ):
            created = now - timedelta(hours=rng.randint(2, 30), minutes=rng.randint(0, 59))
            updated = None if rng.random() < 0.2 else created + timedelta(minutes=1)
            cache_read = rng.choice([0, 100, 5000, 90_000])
            row = {
                "task": task,
                "provider": provider,
                "model": model,
                "input": rng.choice([0, 1000, 50_000, 120_000]),
                "output": rng.randint(0, 9000),
                "cache_read": cache_read,
                "cache_write": rng.randint(0, 500),
                "created": created,
                "updated": updated,
                "cost": None if rng.random() < 0.5 else rng.randint(0, 10**6),
            }
            cost = ", cost_usd_ticks" if version >= 213 else ""
            conn.execute(
                "INSERT INTO task_usage (task_id, provider, model, input_tokens,"
                " output_tokens, cache_read_tokens, cache_write_tokens, created_at,"
                f" updated_at{cost}) VALUES (%(task)s, %(provider)s, %(model)s, %(input)s,"
                " %(output)s, %(cache_read)s, %(cache_write)s, %(created)s, %(updated)s"
                + (", %(cost)s)" if version >= 213 else ")"),
                row,
            )


def state(conn: psycopg.Connection) -> tuple[list[Any], list[Any]]:
    """The hourly table (updated_at aside) and the queue."""
    cursor = conn.execute(HOURLY_SQL)
    names = [column.name for column in cursor.description]
    rows = [
        tuple(value for name, value in zip(names, row, strict=True) if name != "updated_at")
        for row in cursor.fetchall()
    ]
    return rows, conn.execute(QUEUE_SQL).fetchall()


def after_call(conn: psycopg.Connection, function: str, window: tuple[Any, Any]) -> Any:
    """What a call of ``function`` over ``window`` returns and leaves (rolled back)."""
    with conn.transaction(force_rollback=True):
        returned = conn.execute(f"SELECT {function}(%s, %s)", window).fetchone()[0]
        return returned, state(conn)


def test_the_platforms_definitions_are_the_facts_and_the_tool_knows_them(
    platform: tuple[int, str],
) -> None:
    version, url = platform
    with psycopg.connect(url) as conn:
        language, config, body = conn.execute(FUNCTION_SQL).fetchone()
    length, collapsed = FACTS[version]
    assert len(body) == length
    text = "\n".join((language, config, " ".join(body.split())))
    assert "sha256:" + hashlib.sha256(text.encode()).hexdigest() == collapsed
    known = versions.recognise(versions.fingerprint(language, config, body))
    assert known is not None
    assert (known.source, known.migration) == (versions.PLATFORM, version)
    assert known.name == f"the platform's migration {version}"


def test_the_fixture_computes_what_the_platforms_function_computes(
    platform: tuple[int, str],
) -> None:
    version, url = platform
    fixture = target.ROLLUP_FUNCTIONS[version].read_text()
    fixture = fixture.replace(
        "FUNCTION rollup_task_usage_hourly_window(", f"FUNCTION {FIXTURE_NAME}("
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(fixture)
        seed(conn, version)
        everything = (datetime(1970, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
        real = after_call(conn, "rollup_task_usage_hourly_window", everything)
        assert real[0] > 20 and real[1][0]  # the comparison has something to compare
        assert after_call(conn, FIXTURE_NAME, everything) == real
        conn.execute("SELECT rollup_task_usage_hourly_window(%s, %s)", everything)

        # Since then, through the platform's own triggers where it has them: a key's rows
        # deleted, a task moved to another runtime, an issue's project cleared, costs gone,
        # rows rewritten, and a key queued that has no rows at all.
        since = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        task, runtime = conn.execute(
            "SELECT q.id, r.id FROM agent_task_queue q JOIN agent a ON a.id = q.agent_id"
            " JOIN agent_runtime r ON r.workspace_id = a.workspace_id"
            " WHERE q.runtime_id IS NOT NULL AND r.id <> q.runtime_id LIMIT 1"
        ).fetchone()
        conn.execute("UPDATE agent_task_queue SET runtime_id = %s WHERE id = %s", [runtime, task])
        conn.execute("UPDATE issue SET project_id = NULL WHERE project_id IS NOT NULL")
        conn.execute(
            "DELETE FROM task_usage WHERE id IN (SELECT id FROM task_usage ORDER BY id LIMIT 5)"
        )
        rewrite = "updated_at = clock_timestamp(), input_tokens = input_tokens + 7"
        if version >= 213:
            rewrite += ", cost_usd_ticks = NULL"
        conn.execute(
            f"UPDATE task_usage SET {rewrite} WHERE id IN"
            " (SELECT id FROM task_usage ORDER BY id DESC LIMIT 9)"
        )
        conn.execute(
            f"INSERT INTO task_usage_hourly_dirty ({KEYS}) SELECT date_trunc('hour', now()),"
            " workspace_id, runtime_id, agent_id, NULL, 'codex', 'no-rows' FROM task_usage_hourly"
            " LIMIT 1"
        )
        window = (since, conn.execute("SELECT clock_timestamp()").fetchone()[0])
        real = after_call(conn, "rollup_task_usage_hourly_window", window)
        assert real[0] > 0 and real[1][0] != state(conn)[0]
        assert after_call(conn, FIXTURE_NAME, window) == real
        # A window that starts after it ends changes nothing, in both.
        backwards = (window[1], window[0])
        assert after_call(conn, FIXTURE_NAME, backwards) == after_call(
            conn, "rollup_task_usage_hourly_window", backwards
        )


def test_a_repair_takes_the_own_path_on_the_platforms_function(
    platform: tuple[int, str],
) -> None:
    version, url = platform
    env = dict(os.environ, DATABASE_URL=url, PYTHONUNBUFFERED="1")
    env.pop("CODEX_ROLLUP_DECLARE", None)
    with psycopg.connect(url, autocommit=True) as conn:
        seed(conn, version, seed_no=11)
        conn.execute("SELECT rollup_task_usage_hourly_window('-infinity', 'infinity')")
        conn.execute(
            "UPDATE task_usage_hourly_rollup_state SET watermark_at = now() - interval '10 min'"
        )
        cutoff = conn.execute("SELECT now() - interval '1 hour'").fetchone()[0]
    cutoff_arg = cutoff.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    migrated = manage("migrate", "--no-input", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr
    name = f"the platform's migration {version}"

    checked = manage("preflight_codex_usage_backfill", "--cutoff", cutoff_arg, env=env)
    assert name in checked.stdout, checked.stdout
    assert "is not one this tool knows" not in checked.stdout

    done = manage("backfill_codex_usage_cache", "--cutoff", cutoff_arg, "--execute", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"own ({name})" in done.stdout
    with psycopg.connect(url, autocommit=True) as conn:
        run_id, path, function, reason, rows = conn.execute(
            "SELECT id, rollup_path, rollup_function, rollup_path_reason, rows_updated"
            " FROM codex_repair.backfill_run ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert (path, function) == ("own", name), reason
        assert rows > 0
        left = state(conn)[0]
        with conn.transaction(force_rollback=True):
            conn.execute(QUEUE_EVERY_KEY_SQL)
            conn.execute("SELECT rollup_task_usage_hourly_window(now(), now() + interval '1s')")
            assert state(conn)[0] == left
    verified = manage("backfill_codex_usage_cache", "--verify", "--run-id", str(run_id), env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
