"""What the operator is told, in each mode: outcomes, continued runs, verify, JSON and quiet.

An execute and a revert say what they did (once), runs that continue an interrupted run say
so and are verified as one repair, a reverted run's verification is not a failure, every
stderr line under ``--log-format json`` is a JSON object of a documented event, and the
quiet and file modes do what they say.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from django.core.management.base import CommandError
from django.core.management.color import no_style

from tests.factories import CUTOFF, make_agent, make_task, make_usage, populate_rollup
from tests.processes import PROJECT_DIR, manage
from tests.support import COMMITS, CUTOFF_ARG, backfill, command
from tests.test_operator_output import check_type, documented_fields, lookup
from usage.models import BackfillRun
from usage.output import outcome
from usage.repair.backfill import ExecuteOptions, execute_backfill

pytestmark = COMMITS

REFERENCE = (PROJECT_DIR / "docs" / "reference.md").read_text()


def documented_events() -> set[str]:
    block = REFERENCE.split("<!-- log-events:start -->")[1].split("<!-- log-events:end -->")[0]
    return {
        cells[1].strip().strip("`")
        for cells in (line.split("|") for line in block.splitlines())
        if len(cells) > 2 and cells[1].strip().startswith("`")
    }


@pytest.fixture
def rows() -> None:
    agent = make_agent()
    for index in range(6):
        make_usage(make_task(agent), model=f"m{index}")
    populate_rollup()


def interrupted_run() -> BackfillRun:
    """A run stopped by a signal after its first batch (of 2 rows)."""
    stop = threading.Event()

    def progress(event: str, /, **details: Any) -> None:
        if event == "batch":
            stop.set()

    options = ExecuteOptions(cutoff=CUTOFF, batch_size=2, arguments={})
    result = execute_backfill(options, stop=stop, progress=progress)
    assert result.run.status == BackfillRun.Status.INTERRUPTED
    return result.run


# -- outcomes ------------------------------------------------------------------------------


def test_an_execute_says_what_it_did_once_and_what_to_type_next(rows: None) -> None:
    out, _ = backfill("--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    assert "would change" not in out
    assert "first created_at" not in out and "date (UTC)" not in out  # no table of groups
    assert f"Run {run.pk} succeeded.\n" in out
    assert "  rows changed    6 of 6 planned; 0 still eligible\n" in out
    assert "  tokens removed  1,800 input tokens; 0 rows clamped to 0\n" in out
    assert "  rollup keys     6 rebuilt in 1 slice" in out
    assert out.rstrip().endswith(
        f"Next: verify it: python manage.py backfill_codex_usage_cache --verify --run-id {run.pk}"
    )
    assert out.count("rows changed") == 1


def test_the_revert_explains_hourly_rows_that_differ_from_keys() -> None:
    document = {
        "run_id": 3,
        "executed": True,
        "status": "reverted",
        "stale_runs": [],
        "rows_restored": 6_000,
        "rows_restorable": 6_000,
        "rows_remaining": 0,
        "rows_changed": 0,
        "rollup_keys": 6_000,
        "rollup_calls": 12,
        "rollup_rows": 6_009,
        "rollup_max_lock_seconds": 0.5,
        "cutoff": CUTOFF,
        "workspace_id": None,
        "error": "",
    }
    text = "\n".join(outcome.revert_lines(document, no_style(), None))
    assert text.startswith("Run 3 reverted.\n")
    assert "6,000 hourly keys queued and rebuilt in 12 calls" in text
    assert "reported 6,009 hourly rows: it counts rows upserted plus rows deleted" in text
    assert "keys other writers queued included" in text
    assert "--cutoff 2026-06-13T08:00:00Z" in text
    document["rollup_rows"] = 6_000
    assert "upserted" not in "\n".join(outcome.revert_lines(document, no_style(), None))


def test_the_revert_has_the_repairs_look_and_options(rows: None, tmp_path: Path) -> None:
    backfill("--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    out, _ = command("revert_codex_usage_backfill", str(run.pk))
    assert f"Mode: revert run {run.pk} (dry run)" in out
    assert "rows to restore  6\n" in out
    # At -v 0 the dry run's block still names its run; its JSON outcome says what it is.
    brief, _ = command("revert_codex_usage_backfill", str(run.pk), "-v", "0")
    assert brief.startswith(f"Revert of run {run.pk} (dry run):\n  rows to restore  6\n")
    _, logged = command("revert_codex_usage_backfill", str(run.pk), "--log-format", "json")
    last = json.loads(logged.splitlines()[-1])
    assert last["event"] == "outcome" and last["status"] == "would_revert"
    assert last["message"] == (
        f"Dry run of the revert of run {run.pk}: 6 rows to restore; nothing was written."
    )
    target = tmp_path / "revert.json"
    out, err = command(
        "revert_codex_usage_backfill",
        str(run.pk),
        "--execute",
        "--format",
        "json",
        "--output",
        str(target),
        "--log-format",
        "json",
    )
    document = json.loads(target.read_text())
    assert document["mode"] == "revert" and document["status"] == "reverted"
    assert document["rows_restored"] == 6 and document["rows_remaining"] == 0
    assert f"Result written to {target} (json)." in out
    assert f"Run {run.pk} reverted." in out and out.count("rows restored") == 1
    for path, spec, modes in documented_fields("revert-fields"):
        assert "revert" in modes.split(", ")
        for value in lookup(document, path):
            assert check_type(value, spec), (path, spec, value)
    assert set(document) == {path for path, _, _ in documented_fields("revert-fields")}
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events][0] == "context"
    assert "batch" in {e["event"] for e in events} and events[-1]["event"] == "outcome"
    # Each batch is one event, emitted by the revert itself, with its figures.
    batches = [e for e in events if e["event"] == "batch"]
    assert sum(e["rows_restored"] for e in batches) == 6 and batches[-1]["rows_done"] == 6
    assert {"run_id", "entries", "keys_queued", "rows_skipped_locked", "seconds"} <= set(
        batches[0]
    )


# -- continued runs and verify ----------------------------------------------------------------


def test_a_rerun_continues_the_interrupted_run_and_both_are_verified_as_one(rows: None) -> None:
    first = interrupted_run()
    out, _ = backfill("--cutoff", CUTOFF_ARG, "--execute")
    second = BackfillRun.objects.exclude(pk=first.pk).get()
    assert second.continues_id == first.pk
    assert (
        f"Run {second.pk} continues run {first.pk} (interrupted: 2 rows repaired, 4 left; "
        "stopped by a signal)." in out
    )
    assert f"  continues       run {first.pk}\n" in out

    out, _ = backfill("--verify", "--run-id", str(first.pk))  # exit status 0: no error
    assert f"Run {first.pk} (interrupted) was continued by run {second.pk}" in out
    chain = f"with its chain (runs {first.pk}, {second.pk}): 0 eligible"
    assert f"Verify run {first.pk} {chain}" in out
    assert "Verification passed." in out

    # A finished run ends the chain: the next run of the scope continues nothing.
    backfill("--cutoff", CUTOFF_ARG, "--execute")
    assert BackfillRun.objects.order_by("pk").last().continues_id is None


def test_verify_of_a_run_whose_chain_did_not_finish_says_what_to_do(rows: None) -> None:
    run = interrupted_run()
    with pytest.raises(CommandError, match="verification of run .* failed") as failed:
        out, _ = backfill("--verify", "--run-id", str(run.pk))
    assert failed.value.returncode == 4
    assert "listed" not in str(failed.value)  # no list of keys to point to


def test_verify_of_a_reverted_run_says_so_and_is_not_a_failure(rows: None) -> None:
    backfill("--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    command("revert_codex_usage_backfill", str(run.pk), "--execute")
    out, _ = backfill("--verify", "--run-id", str(run.pk))  # no CommandError: exit 0
    assert f"Run {run.pk} was reverted: its rows were restored and are eligible again" in out
    assert "6 eligible rows left (eligible again by design: restored by a revert)" in out
    assert "Verification passed." in out
    document = json.loads(backfill("--verify", "--run-id", str(run.pk), "--format", "json")[0])
    verify = document["verify"]
    assert verify["run_status"] == "reverted" and verify["ok"] is True
    assert verify["eligible_rows_left"] == 6 and verify["eligible_rows_expected"] is True


# -- machine-readable and quiet modes -----------------------------------------------------------


@pytest.mark.slow
def test_every_stderr_line_of_every_command_is_json_and_a_documented_event(
    rows: None, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = subprocess_env
    plan = tmp_path / "plan.json"
    runs = [
        ("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, "--plan-out", str(plan)),
        ("backfill_codex_usage_cache", "--execute", "--plan", str(plan), "--format", "csv"),
        ("backfill_codex_usage_cache", "--verify", "--run-id", "1"),
        ("backfill_codex_usage_cache", "--verify", "--run-id", "99"),  # an error
        ("backfill_codex_usage_cache", "--batch-size", "x"),  # bad input
        ("revert_codex_usage_backfill", "1"),
        ("revert_codex_usage_backfill", "1", "--execute", "--batch-size", "2"),
    ]
    seen: set[str] = set()
    for args in runs:
        done = manage(*args, "--log-format", "json", env=env)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines, args
        for line in lines:
            event = json.loads(line)  # every line, or this fails
            assert {"time", "level", "event", "message"} <= event.keys()
            seen.add(event["event"])
        if done.returncode:
            assert json.loads(lines[-1])["event"] == "error", args
            assert json.loads(lines[-1])["exit_status"] == done.returncode
    assert {"context", "start", "batch", "end", "outcome", "error"} <= seen
    assert seen <= documented_events(), seen - documented_events()


def test_an_output_file_takes_the_result_instead_of_stdout(rows: None, tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    out, _ = backfill("--cutoff", CUTOFF_ARG, "--format", "json", "--output", str(target))
    assert json.loads(target.read_text())["totals"]["rows"] == 6
    assert "first created_at" not in out and "date (UTC)" not in out  # no table
    assert f"Result written to {target} (json)." in out


def test_a_document_on_stdout_ends_stderr_with_the_outcome(rows: None) -> None:
    out, err = backfill("--cutoff", CUTOFF_ARG, "--execute", "--format", "csv")
    run = BackfillRun.objects.get()
    assert out.startswith("workspace_id,date_utc,rows")
    assert err.splitlines()[-1] == (
        f"Run {run.pk} succeeded: 6 rows changed, 0 still eligible (exit status 0)."
    )


def test_verbosity_zero_is_minimal_output(rows: None) -> None:
    for index in range(30):  # 31 workspace/day groups
        make_usage(make_task(make_agent()), model=f"w{index}")
    dry, err = backfill("--cutoff", CUTOFF_ARG, "--verbosity", "0")
    assert err == "" and len(dry.splitlines()) <= 4, dry
    assert "rows would change" in dry
    done, err = backfill("--cutoff", CUTOFF_ARG, "--execute", "--verbosity", "0")
    assert err == "" and len(done.splitlines()) <= 7, done
    assert "Database:" not in done and "succeeded." in done
