"""Operator output: JSON/CSV documents, files, structured logs, progress, verify, help."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management.base import CommandError
from django.db import connection

from tests.factories import make_agent, make_task, make_usage, populate_rollup
from tests.processes import PROJECT_DIR, on_terminal
from tests.support import COMMITS, CUTOFF_ARG
from tests.support import backfill as command
from usage.models import BackfillRun
from usage.output.progress import ProgressBar
from usage.output.report import wrap

pytestmark = COMMITS

REFERENCE = PROJECT_DIR / "docs" / "reference.md"
TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
}


def documented_fields(marker: str = "json-fields") -> list[tuple[str, str, str]]:
    """(path, type, modes) rows of the documented JSON field table (or another table of its
    fields between ``<!-- marker:start -->`` and ``<!-- marker:end -->``) in docs/reference.md."""
    text = REFERENCE.read_text()
    block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] and not set(cells[0]) <= {"-"} and cells[0] != "field":
            rows.append((cells[0], cells[1], cells[2]))
    assert len(rows) >= 15
    return rows


def lookup(document: dict, path: str) -> list:
    """Values at a dotted path; ``groups[].rows`` fans out over the list."""
    values = [document]
    for part in path.split("."):
        if part.endswith("[]"):
            values = [item for v in values for item in v[part[:-2]]]
        else:
            values = [v[part] for v in values]
    return values


def check_type(value: object, spec: str) -> bool:
    nullable = spec.endswith(" or null")
    base = spec.removesuffix(" or null")
    if value is None:
        return nullable
    if base in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, TYPES[base])


@pytest.fixture
def rows() -> None:
    agent = make_agent()
    for model in ("a", "b"):
        make_usage(make_task(agent), model=model)
    make_usage(make_task(agent), model="c", input_tokens=100, cache_read_tokens=300)
    populate_rollup()


@pytest.mark.parametrize("mode", ["dry_run", "execute"])
def test_json_output_matches_the_readme_description(rows: None, mode: str) -> None:
    extra = ["--execute", "--verify"] if mode == "execute" else []
    out, _ = command("--cutoff", CUTOFF_ARG, "--format", "json", *extra)
    document = json.loads(out)  # stdout carries the document alone
    assert document["mode"] == mode
    checked = 0
    for path, spec, modes in documented_fields():
        if mode not in modes.split(", "):
            continue
        for value in lookup(document, path):
            assert check_type(value, spec), (path, spec, value)
            checked += 1
    assert checked >= 20
    assert document["totals"] == {
        "rows": 3,
        "input_before": 2100,
        "input_after": 1400,
        "input_tokens_removed": 700,
        "clamped_rows": 1,
    }
    assert "password" not in out.lower()
    if mode == "execute":
        assert document["rows_updated"] == 3 and document["rows_remaining"] == 0
        assert document["verify"]["ok"] is True


def test_csv_output_to_a_file_is_complete(rows: None, tmp_path: Path) -> None:
    target = tmp_path / "plan.csv"
    out, _ = command("--cutoff", CUTOFF_ARG, "--format", "csv", "--output", str(target))
    assert f"Result written to {target} (csv)" in out
    records = list(csv.reader(target.read_text().splitlines()))
    assert records[0][:3] == ["workspace_id", "date_utc", "rows"]
    assert records[-1][:7] == ["TOTAL", "", "3", "2100", "1400", "700", "1"]
    assert not list(tmp_path.glob(".plan.csv.*")), "no temporary file left behind"


def test_json_logs_are_one_object_per_event(rows: None) -> None:
    _, err = command(
        "--cutoff", CUTOFF_ARG, "--execute", "--batch-size", "1", "--log-format", "json"
    )
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [line for line in err.splitlines() if line.strip() and not line.startswith("{")] == []
    kinds = [e["event"] for e in events]
    assert kinds.count("batch") == 3
    assert kinds[0] == "context" and "rollup_slice" in kinds
    assert kinds[-2:] == ["end", "outcome"]
    # Each event of a run once (the rollup's path was written twice, issue 26).
    for once in ("context", "start", "stamp", "rollup_path", "planned", "stamped", "end"):
        assert kinds.count(once) == 1, (once, kinds)
    path = next(e for e in events if e["event"] == "rollup_path")
    assert {"path", "function", "fingerprint"} <= path.keys()
    batch = next(e for e in events if e["event"] == "batch")
    assert {"run_id", "rows", "input_tokens_removed", "seconds", "batch_size"} <= batch.keys()
    assert events[-2]["status"] == "succeeded"
    assert events[-1]["exit_status"] == 0


def test_verbosity_zero_prints_only_the_result(rows: None) -> None:
    out, err = command("--cutoff", CUTOFF_ARG, "--execute", "--verbosity", "0")
    assert err == ""
    assert "Run" in out and "succeeded" in out


def test_verbosity_two_logs_every_batch(rows: None) -> None:
    _, err = command("--cutoff", CUTOFF_ARG, "--execute", "--batch-size", "1", "--verbosity", "2")
    assert len(re.findall(r"batch \d+: 1 rows", err)) == 3


def test_verify_finds_a_wrong_hourly_row_and_exits_non_zero(rows: None) -> None:
    command("--cutoff", CUTOFF_ARG, "--execute")
    run = BackfillRun.objects.get()
    out, _ = command("--verify", "--run-id", str(run.pk))
    assert "Verification passed." in out
    with connection.cursor() as cursor:
        cursor.execute("UPDATE task_usage_hourly SET input_tokens = input_tokens + 1")
    with pytest.raises(CommandError, match="verification of run .* failed") as error:
        command("--verify", "--run-id", str(run.pk))
    assert error.value.returncode == 4


def test_verify_of_a_run_that_does_not_exist(rows: None) -> None:
    # The verify mistakes refused before the database are in tests/test_options.py.
    with pytest.raises(CommandError, match="run 999999 does not exist"):
        command("--verify", "--run-id", "999999")


@pytest.mark.parametrize(
    "name",
    [
        "backfill_codex_usage_cache",
        "revert_codex_usage_backfill",
        "preflight_codex_usage_backfill",
    ],
)
def test_help_is_complete_with_examples(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", name, "--help"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert f"python manage.py {name}" in result.stdout


@pytest.mark.slow
def test_progress_bar_on_a_terminal(rows: None, subprocess_env: dict[str, str]) -> None:
    """On a real pseudo-terminal the run shows a live bar with rows, rate and ETA."""
    status, screen = on_terminal(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--batch-size",
        "1",
        "--sleep-between-batches",
        "300ms",
        env=subprocess_env,
        columns=160,
    )
    assert status == 0, screen
    assert "update" in screen and "3/3" in screen
    assert "rows/s" in screen and "ETA" in screen
    assert "paused: sleep between batches" in screen
    assert "rollup" in screen and "lock 4246 held" in screen


def test_execute_with_verify_says_what_is_next_after_the_verification() -> None:
    make_usage(make_task(make_agent()), input_tokens=900, cache_read_tokens=100)
    populate_rollup()
    out, _ = command("--cutoff", CUTOFF_ARG, "--execute", "--verify")
    lines = out.splitlines()
    verdict = lines.index("Verification passed.")
    assert lines[verdict + 1].startswith("Nothing else to do. To undo the run:")
    assert not any(line.startswith("Nothing else to do") for line in lines[:verdict])


def test_off_a_terminal_each_phase_ends_on_where_it_ended() -> None:
    """A line every few seconds could leave a log at "update: 0/3 rows" (issue 26)."""
    stream = io.StringIO()
    bar = ProgressBar(stream, terminal=False)
    bar.phase("update", 3, "rows")
    bar.update("update", 1)  # shown: a phase's first update
    bar.update("update", 3)  # within the interval: not shown yet
    bar.phase("rollup", 2, "keys", started_now=False)
    bar.update("rollup", 2)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "update: 0/3 rows"
    ended = [n for n, line in enumerate(lines) if line.startswith("update: 3/3 rows (100%)")]
    started = [n for n, line in enumerate(lines) if line.startswith("rollup: ")]
    assert ended and started and ended[0] < started[0]  # the update's end before the rollup
    assert lines[-1].startswith("rollup: 2/2 keys (100%)")


def test_a_unit_is_never_wrapped_away_from_its_number() -> None:
    text = "6 keys rebuilt in 1 slice in 0.3 s; lock 4246 held at most 0.020 s, 50 % done"
    for width in range(20, len(text) + 2):
        lines = wrap(text, width)
        assert " ".join(line.strip() for line in lines) == text
        assert not any(re.match(r"(s|%)[;,]?$|(s|%)[;,]? ", line.strip()) for line in lines), (
            width,
            lines,
        )
