"""The README is a runbook whose every step is run here, verbatim, on a fresh sandbox."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import PROJECT_DIR

README = (PROJECT_DIR / "README.md").read_text()
CUTOFF = "2026-06-13T08:00:00Z"


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block in ``text``."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.strip() for line in b.splitlines() if line.strip()] for b in blocks]


def runbook_commands() -> list[str]:
    sections = re.findall(r"<!-- runbook:start -->(.*?)<!-- runbook:end -->", README, flags=re.S)
    return [line for section in sections for block in bash_blocks(section) for line in block]


def test_setup_commands_are_the_ones_ci_runs() -> None:
    setup = README.split("## Set up", 1)[1]
    assert bash_blocks(setup)[0] == ["pip install -r requirements.txt", "python -m pytest"]
    ci = (PROJECT_DIR / ".ci" / "run").read_text()
    assert "TEST_COMMAND=(python -m pytest)" in ci
    assert "pip install -q -r requirements.txt" in ci


def test_runbook_covers_preflight_first_and_verify_last() -> None:
    commands = runbook_commands()
    assert commands[0] == "python manage.py migrate"
    steps = [c for c in commands[1:] if "revert_codex_usage_backfill" not in c]
    assert steps[0].startswith("python manage.py preflight_codex_usage_backfill")
    main_steps = steps
    assert main_steps[-1].startswith("python manage.py backfill_codex_usage_cache --verify")
    assert any("revert_codex_usage_backfill" in c and "--execute" in c for c in commands)


@pytest.mark.slow
def test_runbook_runs_verbatim_on_a_fresh_sandbox(tmp_path: Path) -> None:
    plan = PROJECT_DIR / "plan.json"
    if plan.exists():
        pytest.skip("plan.json exists in the project folder; the runbook would overwrite it")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        # "python" in the README is the interpreter running these tests (its virtualenv).
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        CODEX_REPAIR_SANDBOX_DIR=str(tmp_path / "sandbox"),
        CODEX_BACKFILL_CUTOFF=CUTOFF,
        PYTHONUNBUFFERED="1",
    )

    def run(command: str) -> str:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    try:
        # The sandbox command from "Set up": a real dry run, no other step.
        first = run(f"python manage.py backfill_codex_usage_cache --cutoff {CUTOFF}")
        assert "Database: sandbox" in first and "rows would change" in first

        outputs = {}
        for command in runbook_commands():
            outputs[command] = run(command)
            started = re.search(r"Run (\d+) started", outputs[command])
            if started:
                env["RUN_ID"] = started.group(1)
        assert "RUN_ID" in env, "the execute step did not report a run id"
        assert any("Verification passed." in out for out in outputs.values())
        planned = json.loads(plan.read_text())
        assert planned["totals"]["rows"] > 0

        # After the revert the same rows are candidates again.
        again = json.loads(
            run(f"python manage.py backfill_codex_usage_cache --cutoff {CUTOFF} --format json")
        )
        assert again["totals"] == planned["totals"]
    finally:
        plan.unlink(missing_ok=True)
