"""The rollup's own path: equal to the platform's function in every column, on both platform
versions; taken only for a definition the tool knows; proven by each run before it is relied on.

The comparisons are with the function itself: the hourly table the own path leaves is compared
with the one the function makes from the same rows (every key requeued and recomputed by it,
then rolled back), column by column, ``updated_at`` aside.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from sandbox import target
from tests.factories import BEFORE, CUTOFF, make_agent, make_keys, make_task, make_usage
from tests.support import COMMITS, CUTOFF_ARG, table_snapshot
from usage.db import database_now
from usage.eligibility import compose
from usage.models import AgentTaskQueue, BackfillRun, Issue
from usage.preflight.run import run_preflight
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.revert import RevertOptions, execute_revert
from usage.repair.rollup import choose_path
from usage.repair.rollup import recompute as own
from usage.repair.verdict import verify_run_in_context
from usage.repair.verify import rollup_mismatches

pytestmark = COMMITS

KEYS = "bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model"
# Every key there is: those the hourly table has, and those of the usage rows as their tasks
# are attributed now.
ALL_KEYS_SQL = f"""
SELECT {KEYS} FROM {{task_usage_hourly}}
UNION
SELECT {{bucket_hour}} AT TIME ZONE 'UTC', a.workspace_id, q.runtime_id, q.agent_id,
       i.project_id, tu.provider, tu.model
FROM {{task_usage}} tu JOIN {{agent_task_queue}} q ON q.id = tu.task_id
JOIN {{agent}} a ON a.id = q.agent_id LEFT JOIN {{issue}} i ON i.id = q.issue_id
WHERE q.runtime_id IS NOT NULL"""
QUEUE_ALL_KEYS_SQL = f"""
INSERT INTO {{task_usage_hourly_dirty}} AS d ({KEYS}, enqueued_at)
SELECT {KEYS}, clock_timestamp() FROM ({ALL_KEYS_SQL}) every_key
ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at)"""
CALL_OVER_THE_QUEUE_SQL = """
SELECT {rollup_task_usage_hourly_window}(clock_timestamp(), clock_timestamp() + interval '1 s')"""
HOURS_SQL = "SELECT min(created_at), max(created_at) FROM {task_usage}"


def sql(statement: str, params: Any = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(compose(statement), params)
        return cursor.fetchall() if cursor.description else []


def hourly() -> list[tuple]:
    return table_snapshot("task_usage_hourly", exclude=("updated_at",))


def as_the_function_makes_it() -> list[tuple]:
    """The hourly table after the platform's function recomputed every key (rolled back)."""
    with transaction.atomic():
        sql(QUEUE_ALL_KEYS_SQL)
        sql(CALL_OVER_THE_QUEUE_SQL)
        state = hourly()
        transaction.set_rollback(True)
    return state


def as_the_own_path_makes_it(version: own.FunctionVersion) -> list[tuple]:
    """The hourly table after the own recompute wrote every key (rolled back)."""
    first, last = sql(HOURS_SQL)[0]
    span = [(first - timedelta(hours=1), last + timedelta(hours=1))]
    statement = own.Recompute(version).statement(own.WRITE_SQL, ALL_KEYS_SQL)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement, own.span_params(span))
        state = hourly()
        transaction.set_rollback(True)
    return state


def live_watermark() -> None:
    sql(
        "UPDATE {task_usage_hourly_rollup_state} SET watermark_at = %s WHERE id = 1",
        [database_now() - timedelta(minutes=10)],
    )


def populate_rollup() -> None:
    sql("SELECT {rollup_task_usage_hourly_window}('-infinity', 'infinity')")


@pytest.fixture(params=[102, 213], ids=["migration-102", "migration-213"])
def platform(request: pytest.FixtureRequest) -> Iterator[int]:
    """The platform as of one of its migrations (the hourly columns and the function)."""
    with transaction.atomic(), connection.cursor() as cursor:
        target.install_platform_version(cursor, settings.CODEX_TARGET_SCHEMA, request.param)
    yield request.param
    with transaction.atomic(), connection.cursor() as cursor:
        target.install_platform_version(cursor, settings.CODEX_TARGET_SCHEMA, 213)


def known(version: int) -> own.FunctionVersion:
    name = f"platform migration {version}"
    return next(v for v in own.KNOWN_FUNCTIONS.values() if v.name == name)


def edge_cases() -> dict[str, Any]:
    """Keys of every kind the rollup meets: a project, no issue (NULL project), an issue
    without a project, a legacy row (NULL updated_at), rows with and without a cost, two
    tasks in one key, a task without a runtime, another provider in the same hour."""
    workspace = uuid.uuid4()
    agent, other = make_agent(workspace), make_agent(workspace)
    project = uuid.uuid4()
    with_project = make_task(agent, project_id=project)
    same_key = make_task(agent, project_id=project)
    same_key.runtime_id = with_project.runtime_id
    same_key.issue = with_project.issue
    same_key.save()
    no_issue = make_task(agent)
    no_project = make_task(agent)
    no_project.issue = Issue.objects.create(
        id=uuid.uuid4(), workspace_id=workspace, project_id=None
    )
    no_project.save()
    no_runtime = make_task(agent, runtime=False)
    later = BEFORE + timedelta(hours=1)
    make_usage(with_project, model="m1", cost_usd_ticks=120)
    make_usage(with_project, model="m2", cost_usd_ticks=None)
    make_usage(same_key, model="m1", cost_usd_ticks=None, input_tokens=5000)
    make_usage(no_issue, model="m1", cost_usd_ticks=None, updated_at=None)
    make_usage(no_issue, model="m1x", created_at=later, cost_usd_ticks=7)
    make_usage(no_project, model="m1", cost_usd_ticks=None)
    make_usage(no_runtime, model="m1")
    make_usage(make_task(other, project_id=project), model="m1", created_at=later)
    make_usage(make_task(other), provider="claude", model="c1", cost_usd_ticks=None)
    populate_rollup()
    live_watermark()
    return {"with_project": with_project, "no_issue": no_issue, "no_project": no_project}


# -- the versions the tool knows ---------------------------------------------------------


def test_the_fixtures_functions_are_the_versions_the_tool_knows(platform: int) -> None:
    choice = choose_path()
    assert choice.own and choice.version == known(platform)
    assert choice.function == f"platform migration {platform}"
    with connection.cursor() as cursor:
        installed_function = own.read_installed_function(cursor)
    assert installed_function is not None
    assert installed_function.fingerprint == known(platform).fingerprint
    # 102 writes no cost columns; 213 writes cost_usd_ticks and the four uncosted sums.
    assert ("uncosted_input_tokens" in choice.version.columns) == (platform == 213)
    assert ("cost_usd_ticks" in choice.version.columns) == (platform == 213)


def test_a_reformatted_body_is_the_same_definition_a_changed_one_is_not() -> None:
    body = "BEGIN\n    RETURN 0;\nEND"
    assert own.fingerprint("plpgsql", "", body) == own.fingerprint(
        "plpgsql", "", " BEGIN RETURN 0; END "
    )
    assert own.fingerprint("plpgsql", "", body) != own.fingerprint(
        "plpgsql", "", "BEGIN RETURN 1; END"
    )
    assert own.fingerprint("plpgsql", "", body) != own.fingerprint(
        "plpgsql", "search_path=app", body
    )


# -- equal to the function, column by column --------------------------------------------


def test_the_own_path_writes_what_the_function_writes(platform: int) -> None:
    tasks = edge_cases()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert (run.rollup_path, run.rollup_function) == ("own", f"platform migration {platform}")
    assert result.rollup is not None and result.rollup.path == "own"
    assert hourly() == as_the_function_makes_it()
    assert verify_run_in_context(run.pk).ok

    # Since then: a task moved to another runtime, an issue to another project, a key's rows
    # deleted, a row's cost gone. The own recompute of every key still writes what the
    # function writes, the keys left with no rows deleted.
    AgentTaskQueue.objects.filter(pk=tasks["no_issue"].pk).update(runtime_id=uuid.uuid4())
    Issue.objects.filter(pk=tasks["with_project"].issue_id).update(project_id=uuid.uuid4())
    sql("DELETE FROM {task_usage} WHERE task_id = %s", [tasks["no_project"].pk])
    sql(
        "UPDATE {task_usage} SET cost_usd_ticks = NULL WHERE task_id = %s AND model = 'm1'",
        [tasks["with_project"].pk],
    )
    before = hourly()
    recomputed = as_the_own_path_makes_it(known(platform))
    assert recomputed != before  # the changes matter: this comparison can fail
    assert recomputed == as_the_function_makes_it()


def test_the_revert_rebuilds_on_the_own_path_and_leaves_nothing_queued() -> None:
    make_keys(4, 5)
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    reverted = execute_revert(RevertOptions(run_id=result.run.pk, batch_size=5))
    assert reverted.reverted and reverted.rows_restored == 20
    assert reverted.rollup.path == "own"
    plans = [piece.plan for piece in reverted.rollup.slices]
    assert plans[0] == "nestloop" and "own" in plans[1:]  # the proof, then its own drains
    assert sql("SELECT count(*) FROM {task_usage_hourly_dirty}") == [(0,)]
    assert rollup_mismatches() == []
    assert hourly() == as_the_function_makes_it()


# -- only for a definition it knows ------------------------------------------------------


@pytest.fixture
def restored_function() -> Iterator[None]:
    yield
    with transaction.atomic(), connection.cursor() as cursor:
        target.install_platform_version(cursor, settings.CODEX_TARGET_SCHEMA, 213)


def install_body(edit: tuple[str, str]) -> None:
    """The current function with one edit to its body (a platform hotfix, say)."""
    text = target.ROLLUP_FUNCTIONS[213].read_text()
    assert edit[0] in text
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL search_path TO {settings.CODEX_TARGET_SCHEMA}")
        cursor.execute(text.replace(*edit))


def test_an_unknown_definition_takes_the_function_path_and_says_so(
    restored_function: None,
) -> None:
    make_keys(2, 3)
    live_watermark()
    install_body(("DECLARE\n", "DECLARE\n    -- a hotfix this tool has not seen\n"))
    choice = choose_path()
    assert not choice.own and choice.function == "unknown"
    assert "is not one this tool knows" in choice.reason
    assert choice.fingerprint not in own.KNOWN_FUNCTIONS

    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    run = BackfillRun.objects.get()
    assert (run.rollup_path, run.rollup_function) == ("function", "unknown")
    assert run.rollup_fingerprint == choice.fingerprint
    assert f"Rollup: function (unknown): {choice.reason}." in out.getvalue()
    assert rollup_mismatches() == []
    checks = {r.name: r for r in run_preflight(CUTOFF, None)}
    assert checks["rollup_path"].status == "warn"
    assert "is not one this tool knows" in checks["rollup_path"].detail


def test_a_failed_proof_puts_the_rest_of_the_run_on_the_function(
    restored_function: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A definition taken for a known one that writes something else: the proof sees it.

    The function here sums every row's input into uncosted_input_tokens (the costed ones
    too); the tool is made to believe it is the 213 definition. The run's first keys differ,
    so the rest goes through the function, and the record says why.
    """
    make_keys(3, 4)  # every row has a cost: its uncosted input is 0
    live_watermark()
    install_body(
        (
            "coalesce(sum(tu.input_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL),",
            "coalesce(sum(tu.input_tokens),",
        )
    )
    with connection.cursor() as cursor:
        wrong = own.read_installed_function(cursor)
    assert wrong is not None and wrong.version is None
    monkeypatch.setitem(
        own.KNOWN_FUNCTIONS,
        wrong.fingerprint,
        own.FunctionVersion("platform migration 213", wrong.fingerprint, known(213).columns),
    )
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert result.rollup is not None and result.rollup.path == "function"
    assert run.rollup_path == "function"
    assert "differs from the function" in run.rollup_path_reason
    assert "uncosted_input_tokens: function" in run.rollup_path_reason
    # Every key is the function's, as it would have been without the own path ...
    assert hourly() == as_the_function_makes_it()
    # ... and verify, whose SQL is its own, finds what that function gets wrong.
    verdict = verify_run_in_context(run.pk)
    assert not verdict.ok and verdict.mismatched_keys == 12
    assert {c.column for m in verdict.mismatches for c in m.columns} == {"uncosted_input_tokens"}


# -- verify compares every column the function writes ------------------------------------


def test_verify_catches_a_wrong_uncosted_input_tokens() -> None:
    task = make_task(make_agent())
    make_usage(task, model="m1", cost_usd_ticks=None, input_tokens=4000, cache_read_tokens=1000)
    make_usage(task, model="m2", cost_usd_ticks=40)
    populate_rollup()
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert verify_run_in_context(result.run.pk).ok
    # The repaired uncosted row: its uncosted input is its input, 3,000 after the repair.
    sql(
        "UPDATE {task_usage_hourly} SET uncosted_input_tokens = uncosted_input_tokens + 1000"
        " WHERE model = 'm1'"
    )
    verdict = verify_run_in_context(result.run.pk)
    assert not verdict.ok and verdict.mismatched_keys == 1
    [mismatch] = verdict.mismatches
    assert [(c.column, c.expected, c.actual) for c in mismatch.columns] == [
        ("uncosted_input_tokens", 3000, 4000)
    ]
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command(
            "backfill_codex_usage_cache", "--verify", "--run-id", str(result.run.pk), stdout=out
        )
    assert failed.value.returncode == 4
    assert "uncosted_input_tokens expected 3,000 got 4,000" in out.getvalue()

    # A key whose uncosted columns were never written since migration 213 is caught too.
    sql("UPDATE {task_usage_hourly} SET uncosted_input_tokens = NULL WHERE model = 'm1'")
    [mismatch] = verify_run_in_context(result.run.pk).mismatches
    assert [(c.column, c.actual) for c in mismatch.columns] == [("uncosted_input_tokens", None)]
