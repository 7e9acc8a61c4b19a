"""Hostile values for every command option and every admin query parameter.

Each value a careless script or a hostile user might pass (empty, negative, non-ASCII
digits, overflowing dates, SQL, markup, NUL, another option's name, megabytes...) must be
refused with one line and exit status 1 by the commands, and with a page (a message, a 400,
or Django's redirect for a bad list filter) by the admin, never a 500; and nothing in the
database may change. The repair and the revert run with ``--execute`` while being fuzzed,
so that a value wrongly accepted would show up as a changed row.
"""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.urls import reverse

from tests.factories import make_agent, make_task, make_usage, populate_rollup
from tests.processes import error_lines, manage
from tests.support import CUTOFF_ARG
from usage.eligibility import compose
from usage.models import BackfillRun

pytestmark = pytest.mark.django_db(transaction=True)

HOSTILE = [
    "",
    "   ",
    "-1",
    "-1s",
    "-0.5",
    "--execute",
    "nan",
    "inf",
    "1e309",
    "99999999999999999999999999",
    "0x10",
    "1_000",
    "١٢",  # Arabic-Indic digits
    "１２",  # full-width digits
    "²",  # a superscript two: str.isdigit() says yes, int() says no
    "' OR 1=1 --",
    "1; DROP TABLE task_usage; --",
    "%(cutoff)s",
    "{task_usage}",
    "<script>alert(1)</script>",
    "\x00",
    "12\x00",
    "a\nb",
    "\u202e12",
    "🙂",
    "0001-01-01T00:00:00+05:30",
    "9999-12-31T23:59:59-05:00",
    "2026-06-13T08:00:00Z",  # a date where a number or an id is expected
    "x" * 5000,
]
# Where a file name is expected: every one of these must be refused before any work.
HOSTILE_PATHS = [
    "",
    "   ",
    "-",
    "/",
    ".",
    "..",
    "/nonexistent-dir/plan.json",
    "README.md/plan.json",
    "plan\x00.json",
    "x" * 5000,
    "nowhere/",
]

REPAIR_OPTIONS = [
    "--cutoff",
    "--workspace-id",
    "--batch-size",
    "--sleep-between-batches",
    "--lock-timeout",
    "--statement-timeout",
    "--max-rollup-lock-seconds",
    "--max-replication-lag",
    "--format",
    "--log-format",
    "--verbosity",
]
REVERT_OPTIONS = [
    "--batch-size",
    "--lock-timeout",
    "--statement-timeout",
    "--max-rollup-lock-seconds",
    "--show",
    "--verbosity",
]
PREFLIGHT_OPTIONS = ["--cutoff", "--workspace-id", "--statement-timeout"]

FINGERPRINT_SQL = """
SELECT md5(concat_ws('|',
    (SELECT string_agg(concat_ws(',', id, input_tokens, updated_at), ';' ORDER BY id)
       FROM {task_usage}),
    (SELECT string_agg(concat_ws(',', bucket_hour, agent_id, model, input_tokens,
                                 event_count), ';' ORDER BY bucket_hour, agent_id, model)
       FROM {task_usage_hourly}),
    (SELECT string_agg(concat_ws(',', id, status, rows_updated, reverted_at), ';'
                       ORDER BY id) FROM {run}),
    (SELECT string_agg(concat_ws(',', id, reverted_at), ';' ORDER BY id) FROM {journal}),
    (SELECT count(*) FROM {task_usage_hourly_dirty})
))"""


def fingerprint() -> str:
    with connection.cursor() as cursor:
        cursor.execute(compose(FINGERPRINT_SQL))
        return cursor.fetchone()[0]


@pytest.fixture
def rows() -> None:
    """Eligible rows in two workspaces, their rollup in line."""
    for _ in range(2):
        agent = make_agent()
        for model in ("a", "b"):
            make_usage(make_task(agent), model=model)
    populate_rollup()


def refused(name: str, args: list[str]) -> CommandError:
    """Run the command in-process; it must refuse, in one line, with exit status 1."""
    with pytest.raises(CommandError) as caught:
        call_command(name, *args, stdout=io.StringIO(), stderr=io.StringIO())
    error = caught.value
    message = str(error)
    assert error.returncode == 1, (args, message)
    assert "\n" not in message and "\r" not in message, (args, message)
    assert "Traceback" not in message, (args, message)
    assert len(message) < 1000, (args[:4], len(message))
    return error


def with_value(base: list[str], option: str, value: str) -> list[str]:
    """``base`` with ``option`` set to ``value`` (replacing it if ``base`` already has it)."""
    args = list(base)
    if option in args:
        del args[args.index(option) : args.index(option) + 2]
    return [*args, option, value]


def test_every_repair_option_refuses_every_hostile_value(rows: None) -> None:
    before = fingerprint()
    base = ["--cutoff", CUTOFF_ARG, "--execute"]
    for option in REPAIR_OPTIONS:
        for value in HOSTILE:
            if option == "--cutoff" and value == CUTOFF_ARG:
                continue  # the one valid value in the list
            refused("backfill_codex_usage_cache", with_value(base, option, value))
    for value in HOSTILE:
        refused("backfill_codex_usage_cache", ["--verify", "--run-id", value])
    for value in HOSTILE_PATHS:
        refused("backfill_codex_usage_cache", [*base, "--output", value])
        refused("backfill_codex_usage_cache", ["--cutoff", CUTOFF_ARG, "--plan-out", value])
    for value in HOSTILE + HOSTILE_PATHS:
        refused("backfill_codex_usage_cache", ["--execute", "--plan", value])
    assert fingerprint() == before


def test_every_plan_option_refuses_every_hostile_value(rows: None, tmp_path: Path) -> None:
    """With a valid plan, a hostile --plan-max-age, --cutoff or --workspace-id is refused."""
    plan = tmp_path / "plan.json"
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--plan-out",
        str(plan),
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    before = fingerprint()
    base = ["--execute", "--plan", str(plan)]
    for option in ("--plan-max-age", "--cutoff", "--workspace-id"):
        for value in HOSTILE:
            if option == "--cutoff" and value == CUTOFF_ARG:
                continue  # the plan's own cutoff
            refused("backfill_codex_usage_cache", [*base, option, value])
    assert fingerprint() == before


def test_every_revert_option_refuses_every_hostile_value(rows: None) -> None:
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    run_id = BackfillRun.objects.latest("id").pk
    before = fingerprint()
    for value in HOSTILE:
        refused("revert_codex_usage_backfill", [value, "--execute"])
    for option in REVERT_OPTIONS:
        for value in HOSTILE:
            refused("revert_codex_usage_backfill", [str(run_id), "--execute", option, value])
    assert fingerprint() == before


def test_every_preflight_option_refuses_every_hostile_value(rows: None) -> None:
    before = fingerprint()
    for option in PREFLIGHT_OPTIONS:
        for value in HOSTILE:
            if option == "--cutoff" and value == CUTOFF_ARG:
                continue
            refused(
                "preflight_codex_usage_backfill",
                with_value(["--cutoff", CUTOFF_ARG], option, value),
            )
    assert fingerprint() == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            [
                "backfill_codex_usage_cache",
                "--cutoff",
                CUTOFF_ARG,
                "--execute",
                "--sleep-between-batches",
                "-1s",
            ],
            "--sleep-between-batches '-1s' is negative",
        ),
        (["backfill_codex_usage_cache", "--cutoff", "--execute"], "expected one argument"),
        (["backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--format", "xml"], "'xml'"),
        (["backfill_codex_usage_cache", "--verify", "--run-id", "١٢"], "is not a run number"),
        (
            ["backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--execute", "--output", "/"],
            "names a directory",
        ),
        (["revert_codex_usage_backfill", "²", "--execute"], "RUN_ID '²' is not a run number"),
        (["revert_codex_usage_backfill", "--execute"], "required: RUN_ID"),
        (
            ["preflight_codex_usage_backfill", "--cutoff", "9999-12-31T23:59:59-05:00"],
            "is out of range",
        ),
        (
            ["backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--no-such-option"],
            "unrecognized",
        ),
    ],
)
def test_the_command_line_gives_one_line_and_exit_status_1(
    rows: None, subprocess_env: dict[str, str], args: list[str], expected: str
) -> None:
    before = fingerprint()
    result: subprocess.CompletedProcess[str] = manage(*args, env=subprocess_env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("CommandError: ") and expected in lines[0]
    assert fingerprint() == before


# -- the admin ------------------------------------------------------------------------------

ADMIN_PARAMS = {
    "admin:usage_candidateusage_changelist": [
        "cutoff",
        "workspace",
        "created",
        "clamped",
        "q",
        "o",
        "p",
        "all",
        "e",
        "_to_field",
        "_popup",
    ],
    "admin:usage_backfillrun_changelist": [
        "status__exact",
        "rollup_state__exact",
        "o",
        "p",
        "q",
        "id__gt",
    ],
    "admin:usage_backfilljournal_changelist": [
        "run__id__exact",
        "reverted_at__isempty",
        "q",
        "o",
        "p",
    ],
}
# Parameters the page itself reads: a bad value is named in a message on the page.
PAGE_PARAMS = {"cutoff", "workspace", "created", "clamped"}


@pytest.fixture
def operator(client: Client, settings: Any) -> Client:
    settings.CODEX_BACKFILL_CUTOFF = ""
    cache.clear()
    client.force_login(User.objects.create_superuser("operator", password="pass-123-word"))
    return client


def check_page(client: Client, url: str) -> Any:
    """A page for a hostile request: never a server error, bad input said or refused."""
    response = client.get(url)
    assert response.status_code in (200, 302, 400, 404), (url[:200], response.status_code)
    if response.status_code == 302:
        # Django's answer to a filter it cannot apply: the list again, without it.
        assert response["Location"].endswith("?e=1") or "/admin/" in response["Location"]
    return response


def test_every_admin_query_parameter_survives_every_hostile_value(
    rows: None, operator: Client
) -> None:
    before = fingerprint()
    for name, params in ADMIN_PARAMS.items():
        base = reverse(name)
        for param in params:
            for value in HOSTILE:
                query = {param: value}
                if param not in ("cutoff",) and name.endswith("candidateusage_changelist"):
                    query = {"cutoff": CUTOFF_ARG, **query}
                response = check_page(operator, f"{base}?{urlencode(query)}")
                if param in PAGE_PARAMS and response.status_code == 200 and value.strip():
                    if param == "cutoff" and value == CUTOFF_ARG:
                        continue
                    shown = [str(m) for m in response.context["messages"]]
                    assert shown, (param, value[:40])
    assert fingerprint() == before


def test_every_admin_object_page_survives_every_hostile_id(rows: None, operator: Client) -> None:
    before = fingerprint()
    for model in ("candidateusage", "backfillrun", "backfilljournal"):
        change = reverse(f"admin:usage_{model}_change", args=[uuid.uuid4()])
        for value in HOSTILE:
            if not value.strip():
                continue
            url = change.replace(change.split("/")[-3], quote(value, safe=""), 1)
            check_page(operator, url)
            check_page(operator, url.replace("/change/", "/history/"))
    assert fingerprint() == before


def test_a_hostile_default_cutoff_is_a_message_on_the_page(
    rows: None, operator: Client, settings: Any
) -> None:
    for value in HOSTILE:
        if not value.strip() or value == CUTOFF_ARG:
            continue
        settings.CODEX_BACKFILL_CUTOFF = value.strip()
        response = check_page(operator, reverse("admin:usage_candidateusage_changelist"))
        assert response.status_code == 200
        shown = " ".join(str(m) for m in response.context["messages"])
        assert shown.startswith("CODEX_BACKFILL_CUTOFF "), (value[:40], shown[:200])
