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
from tests.support import COMMITS, CUTOFF_ARG, rollup_mismatches, table_snapshot
from usage.db import database_now
from usage.eligibility import compose
from usage.models import AgentTaskQueue, BackfillRun, Issue
from usage.preflight import run_preflight
from usage.repair.backfill import ExecuteOptions, execute_backfill
from usage.repair.revert import RevertOptions, execute_revert
from usage.repair.rollup import choose_path, own, recompute, versions
from usage.repair.verify import verify_run_in_context

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


def as_the_own_path_makes_it(
    version: versions.FunctionVersion, probed: dict[str, str] | None = None
) -> list[tuple]:
    """The hourly table after the own recompute wrote every key (rolled back)."""
    first, last = sql(HOURS_SQL)[0]
    span = [(first - timedelta(hours=1), last + timedelta(hours=1))]
    statement = recompute.Recompute(version).statement(
        recompute.WRITE_SQL, ALL_KEYS_SQL, probed=probed
    )
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement, recompute.span_params(span))
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


def known(version: int) -> versions.FunctionVersion:
    """The fixture's rendition of a platform version, as the tool knows it."""
    return next(
        v
        for v in versions.KNOWN_FUNCTIONS.values()
        if (v.migration, v.source) == (version, versions.FIXTURE)
    )


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


def test_the_platforms_own_fingerprints_name_its_versions_and_columns() -> None:
    """The platform's definitions as its migrations install them (measured on databases built
    from its migration files: tests/test_platform_as_it_ships.py checks them there)."""
    platform_102 = versions.recognise(
        "sha256:6d1db7180295ad57298900e2bfa7066f1516e47fa2fa909fd79c81b3602f3b1e"
    )
    platform_213 = versions.recognise(
        "sha256:894f2246ef809a93a20791e3e3f6b8a67fc886e54881bb26555b0d96f02e8ed1"
    )
    assert platform_102 is not None and platform_213 is not None
    assert (platform_102.source, platform_102.migration) == (versions.PLATFORM, 102)
    assert (platform_213.source, platform_213.migration) == (versions.PLATFORM, 213)
    assert platform_102.name == "the platform's migration 102"
    assert platform_213.name == "the platform's migration 213"
    tokens = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    assert platform_102.columns == (*tokens, "task_count", "event_count")
    assert platform_213.columns == (
        *tokens,
        "cost_usd_ticks",
        *(f"uncosted_{name}" for name in tokens),
        "task_count",
        "event_count",
    )
    # Two of each source, one a version: nothing else is known.
    assert sorted((v.source, v.migration) for v in versions.KNOWN_FUNCTIONS.values()) == [
        ("fixture", 102),
        ("fixture", 213),
        ("platform", 102),
        ("platform", 213),
    ]


def test_the_fixtures_functions_are_known_as_the_fixtures(platform: int) -> None:
    choice = choose_path()
    assert choice.own and choice.version == known(platform)
    assert choice.version.source == versions.FIXTURE
    assert choice.function == f"this project's fixture of migration {platform}"
    assert "platform's migration" not in choice.reason
    with connection.cursor() as cursor:
        installed_function = versions.read_installed_function(cursor)
    assert installed_function is not None
    assert installed_function.fingerprint == known(platform).fingerprint
    # 102 writes no cost columns; 213 writes cost_usd_ticks and the four uncosted sums.
    assert ("uncosted_input_tokens" in choice.version.columns) == (platform == 213)
    assert ("cost_usd_ticks" in choice.version.columns) == (platform == 213)
    checks = {r.name: r for r in run_preflight(CUTOFF, None)}
    assert f"this project's fixture of migration {platform}" in checks["rollup_function"].detail
    assert checks["rollup_path"].status == "ok"


BODY = "BEGIN\n    IF p_from >= p_to THEN RETURN 0; END IF;\n    RETURN 'UTC' = $x$--$x$;\nEND"


@pytest.mark.parametrize(
    "same",
    [
        " begin if p_from>=p_to then return 0 ; end if;return 'UTC'=$x$--$x$; end ",
        "-- a comment\nBEGIN /* a /* nested */ one */ IF p_from >= p_to THEN RETURN 0;\n"
        "END IF; -- why\nRETURN 'UTC' = $x$--$x$; END",
    ],
    ids=["layout-and-case", "comments"],
)
def test_comments_layout_and_keyword_case_leave_the_fingerprint(same: str) -> None:
    assert versions.fingerprint("plpgsql", "", same) == versions.fingerprint("plpgsql", "", BODY)


@pytest.mark.parametrize(
    "other",
    [
        BODY.replace("RETURN 0", "RETURN 1"),
        BODY.replace("'UTC'", "'utc'"),  # a literal's case is its value
        BODY.replace("$x$--$x$", "$x$-$x$"),  # dollar-quoted text is text, not a comment
        BODY.replace(">=", ">"),
        BODY.replace("p_from >= p_to", '"P_FROM" >= p_to'),  # a quoted name keeps its case
    ],
    ids=["number", "literal-case", "dollar-text", "operator", "quoted-name"],
)
def test_any_change_of_a_token_or_setting_changes_the_fingerprint(other: str) -> None:
    assert versions.fingerprint("plpgsql", "", other) != versions.fingerprint("plpgsql", "", BODY)
    assert versions.fingerprint("plpgsql", "search_path=app", BODY) != versions.fingerprint(
        "plpgsql", "", BODY
    )
    assert versions.fingerprint("sql", "", BODY) != versions.fingerprint("plpgsql", "", BODY)


def test_a_definition_recommented_and_relaid_is_still_recognised(
    restored_function: None,
) -> None:
    """As a platform migration that only edits comments and layout would install it."""
    text = target.ROLLUP_FUNCTIONS[213].read_text()
    body = text[text.index("$rollup$") : text.rindex("$rollup$")]
    lines = ["  " + line.upper().replace("--", "-- note:") for line in body.split("\n")]
    lines.insert(1, "/* reviewed 2026-12-06: comments and layout only */")
    # Upper-casing reaches words and literals: put the one literal that is not upper case
    # already back, and the dollar quote's tag.
    relaid = "\n".join(lines).replace("'HOUR'", "'hour'").replace("$ROLLUP$", "$rollup$")
    assert relaid.count("\n") == body.count("\n") + 1
    install_body((body, relaid))
    choice = choose_path()
    assert choice.own and choice.version == known(213)
    make_keys(2, 3)
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.rollup is not None and result.rollup.path == "own"
    assert hourly() == as_the_function_makes_it()


# -- equal to the function, column by column --------------------------------------------


@pytest.mark.parametrize("probed", [False, True], ids=["planner-joined", "probed"])
def test_the_own_path_writes_what_the_function_writes(
    platform: int, probed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either way of joining a slice's rows to their tasks (the planner's, or a lookup per
    task for slices that read few of the task table's rows), in slices after a proof of one
    stamp's keys."""
    monkeypatch.setattr(own, "PROOF_KEYS_COUNT", 1)
    if probed:
        monkeypatch.setattr(own, "PROBE_BELOW", 1e12)
    tasks = edge_cases()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert (run.rollup_path, run.rollup_function) == ("own", known(platform).name)
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
    recomputed = as_the_own_path_makes_it(
        known(platform), recompute.SPAN_TASKS if probed else None
    )
    assert recomputed != before  # the changes matter: this comparison can fail
    assert recomputed == as_the_function_makes_it()


def test_the_revert_rebuilds_on_the_own_path_and_leaves_nothing_queued() -> None:
    make_keys(12, 6)  # 72 keys: the proof takes the first 50, own slices the rest
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    reverted = execute_revert(RevertOptions(run_id=result.run.pk, batch_size=5))
    assert reverted.reverted and reverted.rows_restored == 72
    assert reverted.rollup.path == "own"
    plans = [piece.plan for piece in reverted.rollup.slices]
    assert plans[0] == "nestloop" and "own" in plans[1:]  # the proof, then its own slices
    assert sum(piece.keys for piece in reverted.rollup.slices) == 72  # each key once
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
    install_body(SAME_SUMS)  # a hotfix this tool has not seen
    choice = choose_path()
    assert not choice.own and choice.function == "unknown"
    assert "is not one this tool knows" in choice.reason
    assert choice.fingerprint not in versions.KNOWN_FUNCTIONS

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


@pytest.fixture
def declared(settings: Any) -> Any:
    """The operator's CODEX_ROLLUP_DECLARE, as settings holds it (fingerprint to migration)."""
    settings.CODEX_ROLLUP_DECLARED = {}
    return settings.CODEX_ROLLUP_DECLARED


def installed_fingerprint() -> str:
    with connection.cursor() as cursor:
        installed_function = versions.read_installed_function(cursor)
    assert installed_function is not None
    return installed_function.fingerprint


# A platform hotfix that computes what 213 computes: a statement that changes nothing.
SAME_SUMS = ("BEGIN\n", "BEGIN\n    PERFORM set_config('application_name', 'rollup', true);\n")


def test_an_unknown_definition_says_how_to_declare_it(restored_function: None) -> None:
    install_body(SAME_SUMS)
    checks = {r.name: r for r in run_preflight(CUTOFF, None)}
    assert checks["rollup_path"].status == "warn"
    assert "unknown" in checks["rollup_function"].detail
    assert f"CODEX_ROLLUP_DECLARE={installed_fingerprint()}=213" in checks["rollup_path"].fix


def test_a_declared_definition_takes_the_own_path_named_as_declared(
    restored_function: None, declared: dict[str, int]
) -> None:
    make_keys(3, 4)
    live_watermark()
    install_body(SAME_SUMS)
    assert not choose_path().own
    declared[installed_fingerprint()] = 213
    name = "declared as the platform's migration 213 (CODEX_ROLLUP_DECLARE)"
    checks = {r.name: r for r in run_preflight(CUTOFF, None)}
    assert checks["rollup_path"].status == "ok"
    assert name in checks["rollup_path"].detail and name in checks["rollup_function"].detail

    out = io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", stdout=out)
    run = BackfillRun.objects.get()
    assert (run.rollup_path, run.rollup_function) == ("own", name)
    assert run.rollup_fingerprint == installed_fingerprint()
    assert f"Rollup: own ({name})" in out.getvalue()
    assert "proven equal to the function" in run.rollup_path_reason
    assert hourly() == as_the_function_makes_it()
    assert verify_run_in_context(run.pk).ok


def test_a_declared_definition_that_writes_something_else_ends_on_the_function(
    restored_function: None, declared: dict[str, int]
) -> None:
    """The operator declares a definition 213 that is not: the proof sees it.

    The function here sums every row's input into uncosted_input_tokens (the costed ones
    too). The run's first keys differ, so the rest goes through the function, and the record
    says why.
    """
    make_keys(3, 4)  # every row has a cost: its uncosted input is 0
    live_watermark()
    install_body(
        (
            "coalesce(sum(tu.input_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL),",
            "coalesce(sum(tu.input_tokens),",
        )
    )
    declared[installed_fingerprint()] = 213
    assert choose_path().own
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    run = BackfillRun.objects.get(pk=result.run.pk)
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert result.rollup is not None and result.rollup.path == "function"
    assert run.rollup_path == "function"
    assert run.rollup_function == "declared as the platform's migration 213 (CODEX_ROLLUP_DECLARE)"
    assert "differs from the function" in run.rollup_path_reason
    assert "uncosted_input_tokens: function" in run.rollup_path_reason
    # Every key is the function's, as it would have been without the own path ...
    assert hourly() == as_the_function_makes_it()
    # ... and verify, whose SQL is its own, finds what that function gets wrong.
    verdict = verify_run_in_context(run.pk)
    assert not verdict.ok and verdict.mismatched_keys == 12
    assert {c.column for m in verdict.mismatches for c in m.columns} == {"uncosted_input_tokens"}


def test_a_declaration_never_overrides_a_known_definition(declared: dict[str, int]) -> None:
    declared[known(213).fingerprint] = 102
    assert choose_path().version == known(213)


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


# -- each verdict names its real cause (issue 26, point 4) --------------------------------


def test_keys_rewritten_since_by_ingestion_wait_for_the_tick_and_verify_says_so() -> None:
    make_keys(2, 3)
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    # Ingestion rewrites two repaired rows (now(): after the tick's watermark).
    sql(
        "UPDATE {task_usage} SET input_tokens = input_tokens + 5, updated_at = now()"
        " WHERE id IN (SELECT usage_id FROM {journal} ORDER BY id LIMIT 2)"
    )
    verdict = verify_run_in_context(result.run.pk)
    assert verdict.mismatched_keys == verdict.awaiting_tick_keys == 2
    assert verdict.ok and all(m.awaiting_tick for m in verdict.mismatches)
    out = io.StringIO()
    call_command(
        "backfill_codex_usage_cache", "--verify", "--run-id", str(result.run.pk), stdout=out
    )
    text = " ".join(out.getvalue().split())
    assert "2 of the 2 differing keys wait for the platform's cron tick" in text
    assert "(waits for the platform's cron tick)" in text and "Verification passed." in text
    # Once the tick has rolled them up, nothing differs.
    sql(
        "SELECT {rollup_task_usage_hourly_window}(watermark_at, clock_timestamp())"
        " FROM {task_usage_hourly_rollup_state}"
    )
    verdict = verify_run_in_context(result.run.pk)
    assert (verdict.mismatched_keys, verdict.awaiting_tick_keys) == (0, 0)


def test_a_key_wrong_for_no_such_reason_still_fails() -> None:
    make_keys(2, 3)
    live_watermark()
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    sql(
        "UPDATE {task_usage_hourly} SET event_count = event_count + 1 WHERE ctid ="
        " (SELECT ctid FROM {task_usage_hourly} LIMIT 1)"
    )
    verdict = verify_run_in_context(result.run.pk)
    assert (verdict.mismatched_keys, verdict.awaiting_tick_keys) == (1, 0) and not verdict.ok


def test_verify_on_an_unknown_definition_names_it_as_the_likely_cause(
    restored_function: None,
) -> None:
    make_keys(3, 4)  # every row has a cost: its uncosted input is 0
    live_watermark()
    install_body(
        (
            "coalesce(sum(tu.input_tokens) FILTER (WHERE tu.cost_usd_ticks IS NULL),",
            "coalesce(sum(tu.input_tokens),",
        )
    )
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.rollup is not None and result.rollup.path == "function"
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command(
            "backfill_codex_usage_cache", "--verify", "--run-id", str(result.run.pk), stdout=out
        )
    assert failed.value.returncode == 4
    assert "the installed rollup function is one this tool does not know" in str(failed.value)
    text = " ".join(out.getvalue().split())
    assert "The installed rollup function is not a definition this tool knows" in text


# -- a definition changed during the run (issue 26, fault 2) -------------------------------

# A bad hotfix: every key's cost doubled.
DOUBLED_COST = (
    "coalesce(sum(tu.cost_usd_ticks), 0)::bigint AS cost_usd_ticks",
    "coalesce(sum(tu.cost_usd_ticks) * 2, 0)::bigint AS cost_usd_ticks",
)


def _redefine_after_the_proof(other: Any) -> tuple[list[Any], Any]:
    """A progress callback that, once the proof's slice is reported, redefines the function
    from another session, as an operator's migration would; and the pieces it saw."""
    seen: list[Any] = []
    text = target.ROLLUP_FUNCTIONS[213].read_text()
    assert DOUBLED_COST[0] in text

    def progress(event: str, /, **details: Any) -> None:
        if event == "rollup_slice":
            seen.append(details["piece"])
            if len(seen) == 1:
                other.execute(f"SET search_path TO {settings.CODEX_TARGET_SCHEMA}")
                other.execute(text.replace(*DOUBLED_COST))
                other.commit()

    return seen, progress


def test_a_function_redefined_after_the_proof_sends_the_rest_to_the_function(
    restored_function: None, other_connection: Any
) -> None:
    make_keys(12, 6)  # 72 keys: the proof takes the first 50 stamps', slices the rest
    live_watermark()
    version = choose_path().version
    assert version is not None
    seen, progress = _redefine_after_the_proof(other_connection)
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF), progress=progress)
    assert seen[0].plan == "nestloop" and len(seen) > 1  # the proof, then the rest
    assert result.rollup.path == "function"
    reason = result.rollup.path_reason
    assert reason.startswith("the rollup function was redefined during the run (now unknown")
    assert reason.endswith("): the rest on the function path")
    run = BackfillRun.objects.get()
    assert (run.status, run.rollup_path) == (BackfillRun.Status.SUCCEEDED, "function")
    assert run.rollup_path_reason == reason
    # Every key as the installed function makes it now, none as the proven one did.
    assert hourly() == as_the_function_makes_it()
    assert hourly() != as_the_own_path_makes_it(version)


def test_a_function_redefined_during_a_revert_sends_its_next_slices_to_the_function(
    restored_function: None, other_connection: Any
) -> None:
    make_keys(12, 6)
    live_watermark()
    done = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert done.rollup.path == "own"
    seen, progress = _redefine_after_the_proof(other_connection)
    reverted = execute_revert(RevertOptions(run_id=done.run.pk, batch_size=5), progress=progress)
    assert reverted.reverted and reverted.rows_restored == 72
    assert [piece.plan for piece in reverted.rollup.slices][:1] == ["nestloop"]
    assert reverted.rollup.path == "function"
    assert "the rollup function was redefined during the run" in reverted.rollup.path_reason
    assert "own" not in [piece.plan for piece in reverted.rollup.slices[1:]]


# -- the proof and the platform's queue (issue 26, fault 3) --------------------------------

QUEUE_OTHERS_SQL = """
INSERT INTO {task_usage_hourly_dirty} (bucket_hour, workspace_id, runtime_id, agent_id,
                                       project_id, provider, model, enqueued_at)
SELECT date_trunc('hour', now()) - n * interval '1 hour', gen_random_uuid(), gen_random_uuid(),
       gen_random_uuid(), NULL, 'codex', 'm' || n %% 7, now() - interval '1 minute'
FROM generate_series(1, %s) n"""
QUEUE_DIGEST_SQL = """
SELECT count(*), md5(string_agg(d::text, ',' ORDER BY d::text))
FROM {task_usage_hourly_dirty} d"""


def test_the_proof_leaves_the_keys_others_queued_to_the_cron_tick() -> None:
    """With the cron tick stopped (here: it never ran), the run stamps its rows with its own
    start, and the proof's call of the function would drain every key others queued before
    it: 20,000 here. The proof sets them aside in its transaction and puts them back."""
    make_keys(3, 4)
    sql(QUEUE_OTHERS_SQL, [20_000])
    queue = sql(QUEUE_DIGEST_SQL)
    assert queue[0][0] == 20_000
    result = execute_backfill(ExecuteOptions(cutoff=CUTOFF))
    assert result.run.stamp == BackfillRun.Stamp.REPAIR_TIME  # the window reaches now
    assert (result.rollup.path, result.rollup.slices[0].plan) == ("own", "nestloop")
    assert sql(QUEUE_DIGEST_SQL) == queue  # every queued key, as it was
    assert rollup_mismatches() == []
