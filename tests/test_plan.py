"""Saved plans: the execute repairs what the reviewed dry run saw, or refuses and changes nothing.

Every test runs the real command on PostgreSQL: the dry run writes the plan with
``--plan-out``, the execute reads it with ``--plan``. A plan "of another database", "too old"
or "from a buggy tool" is a real plan whose fields were changed and whose checksum was then
recomputed with the library's own function, as a tool (not a hand) would write it.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse

from tests.factories import BEFORE, CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.processes import error_lines, manage
from tests.support import COMMITS, CUTOFF_ARG
from tests.support import backfill as command
from tests.test_operator_output import check_type, documented_fields, lookup
from usage import plan
from usage.db import database_now
from usage.eligibility import COUNT_ELIGIBLE_SQL, compose, eligible_params
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.plan.document import checksum
from usage.repair.backfill import ExecuteOptions, execute_backfill

pytestmark = COMMITS

# What ingestion does to a row it receives again: the normalized value, updated_at = now().
INGEST_SQL = """
INSERT INTO task_usage (task_id, provider, model, input_tokens, cache_read_tokens, created_at)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (task_id, provider, model) DO UPDATE SET
    input_tokens = EXCLUDED.input_tokens,
    cache_read_tokens = EXCLUDED.cache_read_tokens,
    updated_at = now()"""


@pytest.fixture
def rows() -> dict[str, Any]:
    """Workspace A: three eligible rows on one UTC day; workspace B: one. Rolled up."""
    agent_a, agent_b = make_agent(), make_agent()
    made = {
        "agent_a": agent_a,
        "a": [make_usage(make_task(agent_a), model=m) for m in ("a", "b", "c")],
        "b": make_usage(make_task(agent_b), model="a"),
    }
    populate_rollup()
    return made


@pytest.fixture
def plan_file(rows: dict[str, Any], tmp_path: Path) -> Path:
    """A plan of every workspace, written by the dry run."""
    path = tmp_path / "plan.json"
    command("--cutoff", CUTOFF_ARG, "--plan-out", str(path))
    return path


def state() -> tuple[Any, ...]:
    """Everything a refused execute must leave as it was."""
    usage = sorted(TaskUsage.objects.values_list("id", "input_tokens", "updated_at"))
    return usage, BackfillRun.objects.count(), BackfillJournal.objects.count()


def refused(*args: str, match: str) -> str:
    """The execute refuses in one line with exit status 1, and nothing changes."""
    before = state()
    with pytest.raises(CommandError, match=match) as caught:
        command(*args)
    message = str(caught.value)
    assert caught.value.returncode == 1
    assert "\n" not in message and "Traceback" not in message
    assert state() == before
    return message


def resign(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a plan's fields and give it a matching checksum, as a tool would."""
    document = json.loads(path.read_text())
    change(document)
    document["checksum"] = checksum(document)
    path.write_text(json.dumps(document, indent=2))


def ingest(row: TaskUsage, input_tokens: int = 5000, cache_read_tokens: int = 300) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            INGEST_SQL,
            [
                row.task_id,
                row.provider,
                row.model,
                input_tokens,
                cache_read_tokens,
                row.created_at,
            ],
        )


def tokens(row: TaskUsage) -> int:
    return TaskUsage.objects.get(pk=row.pk).input_tokens


def eligible_now() -> int:
    with connection.cursor() as cursor:
        cursor.execute(compose(COUNT_ELIGIBLE_SQL), eligible_params(CUTOFF, None))
        return cursor.fetchone()[0]


# -- plan, then execute --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # logs in to the admin: auth is flushed too
def test_plan_then_execute_repairs_exactly_the_plan(
    rows: dict[str, Any], plan_file: Path, admin_client: Client
) -> None:
    saved = json.loads(plan_file.read_text())
    assert saved["kind"] == "codex_usage_backfill_plan" and saved["plan_version"] == 1
    assert (saved["cutoff"], saved["workspace_id"]) == (CUTOFF_ARG, None)
    assert saved["totals"]["rows"] == 4 and saved["group_count"] == len(saved["groups"]) == 2
    assert saved["checksum"] == checksum(saved)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_database(), (SELECT system_identifier::text FROM"
            " pg_control_system()), (SELECT oid::bigint FROM pg_database"
            " WHERE datname = current_database())"
        )
        name, system_identifier, oid = cursor.fetchone()
    assert saved["database"]["name"] == name
    assert saved["database"]["oid"] == oid
    assert saved["database"]["system_identifier"] == system_identifier

    out, err = command("--execute", "--plan", str(plan_file), "--verify", "--format", "json")
    document = json.loads(out)
    assert "Plan check: the candidates are exactly the planned 4 rows" in err
    assert document["rows_updated"] == 4 and document["verify"]["ok"] is True
    assert document["plan"] == {
        "file": str(plan_file),
        "fingerprint": saved["fingerprint"],
        "created_at": saved["created_at"],
        "age_seconds": document["plan"]["age_seconds"],
        "rows": 4,
        "rows_now": 4,
        "rows_gone": 0,
        "input_tokens_removed": 1200,
        "input_tokens_removed_now": 1200,
        "identical": True,
    }
    assert all(tokens(row) == 700 for row in [*rows["a"], rows["b"]])

    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert run.plan_fingerprint == saved["fingerprint"]
    assert run.plan_rows == 4 and run.rows_planned == 4
    assert plan.timestamp(run.plan_created_at) == saved["created_at"]
    assert run.cutoff == CUTOFF and run.workspace_id is None

    page = admin_client.get(reverse("admin:usage_backfillrun_change", args=[run.pk]))
    content = page.content.decode()
    assert saved["fingerprint"] in content
    assert "4 (4 still candidates at the execute)" in content


def test_the_plan_gives_the_cutoff_and_the_workspace(rows: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "plan-a.json"
    workspace = str(rows["agent_a"].workspace_id)
    command(
        "--cutoff",
        "2026-06-13T10:00:00+02:00",
        "--workspace-id",
        workspace,
        "--plan-out",
        str(path),
    )
    assert json.loads(path.read_text())["workspace_id"] == workspace

    out, _ = command("--execute", "--plan", str(path))
    assert f"Workspace: {workspace}" in out and f"Cutoff: {CUTOFF_ARG}" in out
    assert [tokens(row) for row in rows["a"]] == [700, 700, 700]
    assert tokens(rows["b"]) == 1000, "a workspace outside the plan was touched"
    run = BackfillRun.objects.get()
    assert (run.cutoff, str(run.workspace_id)) == (CUTOFF, workspace)


def test_giving_the_plans_own_cutoff_and_workspace_again_is_fine(
    rows: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "plan-a.json"
    workspace = str(rows["agent_a"].workspace_id)
    command("--cutoff", CUTOFF_ARG, "--workspace-id", workspace, "--plan-out", str(path))
    command(
        "--execute",
        "--plan",
        str(path),
        "--cutoff",
        "2026-06-13T10:00:00+02:00",
        "--workspace-id",
        workspace.upper(),
    )
    assert BackfillRun.objects.get().rows_updated == 3


@pytest.mark.parametrize(
    ("scope", "args", "match"),
    [
        ("all", ["--cutoff", "2026-06-14T08:00:00Z"], "is not the cutoff of --plan"),
        ("all", ["--cutoff", "2026-06-13T08:00:00.000001Z"], "is not the cutoff of --plan"),
        ("all", ["--cutoff", ""], "--cutoff is empty; leave it out"),
        ("all", ["--workspace-id", "B"], r"is not the workspace of .*\(every workspace\)"),
        ("A", ["--workspace-id", "B"], "is not the workspace of --plan"),
        ("A", ["--cutoff", "2026-06-12T08:00:00Z"], "is not the cutoff of --plan"),
    ],
)
def test_a_changed_cutoff_or_workspace_is_refused(
    rows: dict[str, Any], tmp_path: Path, scope: str, args: list[str], match: str
) -> None:
    workspaces = {
        "A": str(rows["agent_a"].workspace_id),
        "B": str(rows["b"].task.agent.workspace_id),
    }
    path = tmp_path / "plan.json"
    scoped = ["--workspace-id", workspaces[scope]] if scope in workspaces else []
    command("--cutoff", CUTOFF_ARG, *scoped, "--plan-out", str(path))
    given = [workspaces.get(arg, arg) for arg in args]
    refused("--execute", "--plan", str(path), *given, match=match)
    assert BackfillRun.objects.count() == 0


# -- another database, an old plan, an edited plan ----------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("host", "db.elsewhere.internal", "host"),
        ("port", 6543, "port"),
        ("name", "app_staging", "database name"),
        ("oid", 1, "database oid"),
        ("system_identifier", "7000000000000000001", "system identifier"),
    ],
)
def test_a_plan_of_another_database_is_refused(
    plan_file: Path, field: str, value: Any, named: str
) -> None:
    resign(plan_file, lambda document: document["database"].update({field: value}))
    message = refused(
        "--execute", "--plan", str(plan_file), match="is for another database: it was made on"
    )
    assert f"(different {named});" in message
    assert str(value) in message


def test_a_plan_without_the_system_identifier_is_judged_by_the_rest(
    rows: dict[str, Any], plan_file: Path
) -> None:
    """A dry-run role that may not call pg_control_system() writes null; the rest decides."""
    resign(plan_file, lambda document: document["database"].update(system_identifier=None))
    command("--execute", "--plan", str(plan_file))
    assert BackfillRun.objects.get().rows_updated == 4


def test_a_role_without_pg_control_system_reads_no_system_identifier() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cursor.fetchone()[0]:
            pytest.skip("needs a superuser to create a role for the test")
    role = f"plan_reader_{uuid.uuid4().hex[:12]}"
    # Role, revocation and role switch live in one transaction that is rolled back.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {role}")
            cursor.execute("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_system() FROM PUBLIC")
            cursor.execute(f"SET LOCAL ROLE {role}")
        identity = plan.read_identity()
        transaction.set_rollback(True)
    full = plan.read_identity()
    assert identity.system_identifier is None and full.system_identifier is not None
    assert identity.differences(full) == []
    assert (identity.name, identity.oid) == (full.name, full.oid)


def test_a_too_old_plan_is_refused(rows: dict[str, Any], plan_file: Path) -> None:
    made = database_now() - timedelta(hours=25)
    resign(plan_file, lambda document: document.update(created_at=plan.timestamp(made)))
    refused(
        "--execute",
        "--plan",
        str(plan_file),
        match=r"is too old: made 25 h 00 min ago .* more than --plan-max-age 24h;",
    )
    refused(
        "--execute",
        "--plan",
        str(plan_file),
        "--plan-max-age",
        "2h",
        match="more than --plan-max-age 2h;",
    )
    command("--execute", "--plan", str(plan_file), "--plan-max-age", "26h")
    assert BackfillRun.objects.get().rows_updated == 4


def test_a_plan_dated_after_the_database_clock_is_refused(plan_file: Path) -> None:
    made = database_now() + timedelta(hours=1)
    resign(plan_file, lambda document: document.update(created_at=plan.timestamp(made)))
    refused("--execute", "--plan", str(plan_file), match="after the database's clock")


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text.replace('"rows": 3', '"rows": 30', 1),
        lambda text: text.replace(f'"cutoff": "{CUTOFF_ARG}"', '"cutoff": "2026-06-20T08:00:00Z"'),
        lambda text: text.replace(
            '"workspace_id": null', '"workspace_id": "0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d"', 1
        ),
        lambda text: re.sub(r'"ids_digest": "[0-9a-f]', '"ids_digest": "x', text, count=1),
        lambda text: text.replace('"fingerprint": "sha256:', '"fingerprint": "sha256:0', 1),
    ],
    ids=["group-rows", "cutoff", "workspace", "digest", "fingerprint"],
)
def test_a_plan_edited_by_hand_is_refused(plan_file: Path, edit: Callable[[str], str]) -> None:
    text = plan_file.read_text()
    edited = edit(text)
    assert edited != text
    plan_file.write_text(edited)
    refused(
        "--execute",
        "--plan",
        str(plan_file),
        match=r"was changed since --plan-out wrote it \(its checksum does not match",
    )


def test_a_plan_without_its_checksum_is_refused(plan_file: Path) -> None:
    document = json.loads(plan_file.read_text())
    del document["checksum"]
    plan_file.write_text(json.dumps(document))
    refused(
        "--execute",
        "--plan",
        str(plan_file),
        match=r"has no checksum \(--plan-out always writes one\)",
    )


def test_a_reindented_plan_is_still_the_plan(rows: dict[str, Any], plan_file: Path) -> None:
    """The checksum covers the content, not the layout (``jq . plan.json`` is harmless)."""
    plan_file.write_text(json.dumps(json.loads(plan_file.read_text()), sort_keys=True))
    command("--execute", "--plan", str(plan_file))
    assert BackfillRun.objects.get().rows_updated == 4


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["database"].update(host="db\nevil"), r"\(host is not a short printable"),
        (lambda d: d["groups"][0].update(rows=-1), r"\(rows is not a whole number\)"),
        (lambda d: d.pop("cutoff"), r"\(it has no field cutoff\)"),
        (lambda d: d.update(cutoff="yesterday"), r"is not a valid plan \("),
        (lambda d: d.update(group_count=7), r"\(group_count is not the number of groups\)"),
    ],
    ids=["control-character", "negative", "missing", "bad-time", "group-count"],
)
def test_a_malformed_plan_with_a_valid_checksum_is_refused(
    plan_file: Path, change: Callable[[dict[str, Any]], Any], match: str
) -> None:
    """What a faulty tool might write: the checksum is right, a field is not."""
    resign(plan_file, change)
    message = refused("--execute", "--plan", str(plan_file), match=match)
    assert "is not a valid plan" in message


def test_a_plan_whose_fingerprint_does_not_match_its_groups_is_refused(plan_file: Path) -> None:
    """A plan written by a faulty tool (checksum right, figures inconsistent) is refused."""
    resign(plan_file, lambda document: document["groups"][0].update(ids_digest="0" * 16))
    refused("--execute", "--plan", str(plan_file), match="its fingerprint does not match")


# -- the candidates since the plan ---------------------------------------------------------


def _row_in_planned_group(rows: dict[str, Any]) -> None:
    make_usage(make_task(rows["agent_a"]), model="d")


def _row_of_a_new_workspace(rows: dict[str, Any]) -> None:
    make_usage(make_task(make_agent()), model="x")


def _row_of_another_day(rows: dict[str, Any]) -> None:
    make_usage(make_task(rows["agent_a"]), model="d", created_at=BEFORE - timedelta(days=3))


def _rows_swapped(rows: dict[str, Any]) -> None:
    ingest(rows["a"][0])
    make_usage(make_task(rows["agent_a"]), model="d")


def _input_raised_in_place(rows: dict[str, Any]) -> None:
    TaskUsage.objects.filter(pk=rows["a"][0].pk).update(input_tokens=1500)


def _cached_raised_in_place(rows: dict[str, Any]) -> None:
    TaskUsage.objects.filter(pk=rows["a"][0].pk).update(cache_read_tokens=900)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_row_in_planned_group, r"on 2026-06-11 has 4 candidate rows, the plan 3;"),
        (
            _row_of_a_new_workspace,
            r"has 1 candidate row \(300 input tokens to remove\) and the plan has none there",
        ),
        (_row_of_another_day, r"on 2026-06-08 has 1 candidate row .* the plan has none there"),
        (_rows_swapped, r"has 3 candidate rows as planned, but not the planned rows"),
        (_input_raised_in_place, r"has 3,500 input tokens before the repair, the plan 3,000"),
        (_cached_raised_in_place, r"has 1,500 input tokens to remove, the plan 900"),
    ],
    ids=["planned-group", "new-workspace", "new-day", "swap", "more-input", "more-removed"],
)
def test_rows_added_to_the_candidates_after_the_plan_are_refused(
    rows: dict[str, Any],
    plan_file: Path,
    change: Callable[[dict[str, Any]], None],
    match: str,
) -> None:
    change(rows)
    message = refused(
        "--execute", "--plan", str(plan_file), match="does not cover the candidates now: "
    )
    assert re.search(match, message), message
    assert message.endswith(
        "nothing was changed: make a new plan with --plan-out and have it reviewed again"
    )
    assert BackfillRun.objects.count() == 0


def test_every_group_beyond_the_plan_is_counted(rows: dict[str, Any], plan_file: Path) -> None:
    _row_in_planned_group(rows)
    _row_of_a_new_workspace(rows)
    _row_of_a_new_workspace(rows)
    refused(
        "--execute", "--plan", str(plan_file), match=r"\(and 2 more groups\); nothing was changed"
    )


def test_rows_a_revert_brings_back_after_the_plan_are_refused(
    rows: dict[str, Any], tmp_path: Path
) -> None:
    command("--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    path = tmp_path / "plan.json"
    command("--cutoff", CUTOFF_ARG, "--plan-out", str(path))
    assert json.loads(path.read_text())["totals"]["rows"] == 0
    call_command(
        "revert_codex_usage_backfill",
        str(run.pk),
        "--execute",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    assert eligible_now() == 4
    refused("--execute", "--plan", str(path), match="and the plan has none there")
    assert BackfillRun.objects.count() == 1


def test_rows_rewritten_by_ingestion_since_the_plan_are_left_alone_and_reported(
    rows: dict[str, Any], plan_file: Path
) -> None:
    rewritten = rows["a"][0]
    ingest(rewritten, input_tokens=5000)
    out, _ = command("--execute", "--plan", str(plan_file))
    line = (
        "Plan check: 3 of the 4 planned rows are candidates now (900 of 1,200 input tokens to "
        "remove); 1 planned row is no longer eligible (rewritten by ingestion or repaired since "
        "the plan) and is left alone."
    )
    assert out.count(line) == 1, out  # at the start
    # and in the run's outcome, as its "plan" line
    assert f"plan            {line.removeprefix('Plan check: ')}" in out
    assert tokens(rewritten) == 5000
    assert [tokens(row) for row in [*rows["a"][1:], rows["b"]]] == [700, 700, 700]
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert (run.plan_rows, run.rows_planned, run.rows_updated) == (4, 3, 3)


def test_the_plan_check_is_an_event_of_the_json_log(rows: dict[str, Any], plan_file: Path) -> None:
    ingest(rows["b"])
    _, err = command("--execute", "--plan", str(plan_file), "--log-format", "json")
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events][:3] == ["context", "plan", "start"]
    assert events[0]["plan"]["file"] == str(plan_file)
    checked = events[1]
    assert (checked["rows"], checked["rows_now"], checked["rows_gone"]) == (4, 3, 1)
    assert checked["identical"] is False
    assert checked["fingerprint"] == json.loads(plan_file.read_text())["fingerprint"]


def test_the_same_plan_again_resumes_and_repairs_nothing_twice(
    rows: dict[str, Any], plan_file: Path
) -> None:
    command("--execute", "--plan", str(plan_file))
    out, _ = command("--execute", "--plan", str(plan_file))
    assert "0 of the 4 planned rows are candidates now" in out
    assert [r.rows_updated for r in BackfillRun.objects.order_by("id")] == [4, 0]
    assert all(tokens(row) == 700 for row in [*rows["a"], rows["b"]])


def test_the_check_judges_the_snapshot_the_batches_walk(
    rows: dict[str, Any], plan_file: Path
) -> None:
    """A row that arrives after the check is not in the snapshot, so it is not repaired."""
    check = plan.SnapshotCheck(
        plan.read_plan(str(plan_file)), max_age_seconds=3600, lock_timeout=5
    )
    late: list[TaskUsage] = []

    def check_then_a_row_arrives() -> dict[str, Any]:
        fields = check()
        late.append(make_usage(make_task(rows["agent_a"]), model="late"))
        return fields

    result = execute_backfill(
        ExecuteOptions(cutoff=CUTOFF, check_snapshot=check_then_a_row_arrives)
    )
    assert check.outcome is not None and check.outcome.identical
    assert (result.rows_planned, result.rows_updated) == (4, 4)
    assert result.run.plan_fingerprint == check.plan.fingerprint
    assert tokens(late[0]) == 1000
    assert eligible_now() == 1


# -- the plan file: bad paths and contents -------------------------------------------------


def bad_plans(tmp_path: Path, plan_file: Path) -> dict[str, tuple[str, str]]:
    """name -> (the --plan value, what the one-line refusal says)."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    os.symlink(tmp_path / "missing-target", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    contents = {
        "empty.json": b"",
        "broken.json": b'{"kind": "codex_usage_backfill_plan",',
        "latin1.json": '{"kind": "café"}'.encode("latin-1"),
        "array.json": b"[]",
        "nan.json": b'{"kind": NaN}',
        "deep.json": b"[" * 200_000,
        "huge-number.json": b'{"n": 1' + b"0" * 5000 + b"}",
        "other-kind.json": b'{"kind": "terraform_plan"}',
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    version = json.loads(plan_file.read_text())
    version["plan_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(version))
    result = tmp_path / "result.json"
    command("--cutoff", CUTOFF_ARG, "--format", "json", "--output", str(result))

    def at(name: str) -> str:
        return str(tmp_path / name)

    return {
        "missing": (at("nothing.json"), "does not exist; give the file the dry run wrote"),
        "directory": (at("dir"), "is a directory; give the plan's file"),
        "empty-name": ("", "--plan needs a file name, e.g. --plan plan.json"),
        "blank-name": ("   ", "--plan needs a file name"),
        "dash": ("-", "is not a file"),
        "nul": ("plan\x00.json", "contains a NUL byte"),
        "file-as-parent": (at("a-file/plan.json"), "cannot be read: Not a directory"),
        "dangling-link": (at("dangling"), "symbolic link to a file that does not exist"),
        "device": ("/dev/null", "is a device"),
        "fifo-without-writer": (at("fifo"), "is empty"),
        "empty-file": (at("empty.json"), "is empty"),
        "not-json": (at("broken.json"), r"is not JSON \(Expecting"),
        "not-utf8": (at("latin1.json"), "is not UTF-8 text"),
        "array": (at("array.json"), "is not a plan written by --plan-out"),
        "nan": (at("nan.json"), "is not JSON"),
        "deep": (at("deep.json"), "is not JSON"),
        "huge-number": (at("huge-number.json"), "is not JSON"),
        "other-kind": (at("other-kind.json"), "is not a plan written by --plan-out"),
        "version-2": (at("v2.json"), "is plan version 2; this tool reads version 1"),
        "a-json-result": (at("result.json"), "is a result of --format json, not a plan"),
    }


BAD_PLAN_NAMES = [
    "missing",
    "directory",
    "empty-name",
    "blank-name",
    "dash",
    "nul",
    "file-as-parent",
    "dangling-link",
    "device",
    "fifo-without-writer",
    "empty-file",
    "not-json",
    "not-utf8",
    "array",
    "nan",
    "deep",
    "huge-number",
    "other-kind",
    "version-2",
    "a-json-result",
]


@pytest.mark.parametrize("name", BAD_PLAN_NAMES)
def test_a_bad_plan_file_is_refused_in_one_line(
    rows: dict[str, Any], plan_file: Path, tmp_path: Path, name: str
) -> None:
    value, match = bad_plans(tmp_path, plan_file)[name]
    message = refused("--execute", "--plan", value, match=match)
    assert message.startswith("--plan ")
    assert len(message) < 1000
    assert BackfillRun.objects.count() == 0


def test_an_unreadable_plan_is_refused(rows: dict[str, Any], plan_file: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    plan_file.chmod(0)
    refused("--execute", "--plan", str(plan_file), match="cannot be read: Permission denied")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--cutoff", CUTOFF_ARG, "--plan", "PLAN"], "--plan goes with --execute"),
        (
            ["--cutoff", CUTOFF_ARG, "--execute", "--plan-out", "OUT"],
            "--plan-out goes with the dry run",
        ),
        (["--execute", "--plan", "PLAN", "--plan-out", "OUT"], "--plan-out goes with the dry run"),
        (
            ["--cutoff", CUTOFF_ARG, "--plan-max-age", "2h"],
            "--plan-max-age goes with --execute --plan",
        ),
        (["--execute", "--plan", "PLAN", "--plan-max-age", "0s"], "between 1s and 720h"),
        (["--execute", "--plan", "PLAN", "--plan-max-age", "721h"], "between 1s and 720h"),
        (["--execute", "--plan", "PLAN", "--plan-max-age", "soon"], "is not a duration"),
        (["--execute", "--plan", "PLAN", "--plan-max-age", "-1h"], "is negative"),
        (["--cutoff", CUTOFF_ARG, "--plan-out", "OUT", "--output", "OUT"], "both name"),
        (["--cutoff", CUTOFF_ARG, "--plan-out", "DIR"], "--plan-out .* is a directory"),
        (["--cutoff", CUTOFF_ARG, "--plan-out", ""], "--plan-out needs a file name"),
        (["--execute"], "--execute needs the reviewed plan: --execute --plan FILE"),
    ],
)
def test_plan_option_mistakes_are_refused(
    plan_file: Path, tmp_path: Path, args: list[str], match: str
) -> None:
    names = {"PLAN": str(plan_file), "OUT": str(tmp_path / "out.json"), "DIR": str(tmp_path)}
    refused(*[names.get(arg, arg) for arg in args], match=match)
    assert not (tmp_path / "out.json").exists()


def test_a_plan_that_cannot_be_written_is_one_line_after_the_summary(
    rows: dict[str, Any], tmp_path: Path
) -> None:
    fifo = tmp_path / "nobody-reads"
    os.mkfifo(fifo)
    out = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command(
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--plan-out",
            str(fifo),
            stdout=out,
            stderr=io.StringIO(),
        )
    message = str(caught.value)
    assert caught.value.returncode == 1 and "\n" not in message
    assert message.startswith(f"could not write the result to --plan-out '{fifo}'")
    assert message.endswith("the dry run changed nothing (its summary is shown above)")
    assert "4 rows would change" in out.getvalue()


# -- documents: the plan file and the execute's JSON ---------------------------------------


def test_the_plan_file_matches_the_readme_description(
    rows: dict[str, Any], plan_file: Path
) -> None:
    document = json.loads(plan_file.read_text())
    fields = documented_fields("plan-fields")
    for path, spec, _ in fields:
        values = lookup(document, path)
        assert values, path
        for value in values:
            assert check_type(value, spec), (path, spec, value)
    paths = {path for path, _, _ in fields}
    present = set(document)
    present |= {f"database.{key}" for key in document["database"]}
    present |= {f"totals.{key}" for key in document["totals"]}
    present |= {f"groups[].{key}" for group in document["groups"] for key in group}
    assert present == paths, "the documented plan table and the plan file differ"


def test_the_execute_json_with_a_plan_matches_the_readme_description(
    rows: dict[str, Any], plan_file: Path
) -> None:
    out, _ = command("--execute", "--plan", str(plan_file), "--verify", "--format", "json")
    document = json.loads(out)
    checked = 0
    for path, spec, modes in documented_fields():
        if not {"execute", "execute with --plan"} & set(modes.split(", ")):
            continue
        for value in lookup(document, path):
            assert check_type(value, spec), (path, spec, value)
            checked += 1
    assert checked >= 40


# -- as an operator runs it ----------------------------------------------------------------


@pytest.mark.slow
def test_a_refusal_on_the_command_line_is_one_line_with_exit_status_1(
    rows: dict[str, Any], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    path = tmp_path / "plan.json"
    made = manage(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--plan-out",
        str(path),
        env=subprocess_env,
    )
    assert made.returncode == 0, made.stderr
    assert f"Plan written to {path}: 4 rows" in made.stdout
    _row_in_planned_group(rows)
    before = state()
    result = manage(
        "backfill_codex_usage_cache", "--execute", "--plan", str(path), env=subprocess_env
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"CommandError: --plan '{path}' does not cover the candidates now")
    assert state() == before
