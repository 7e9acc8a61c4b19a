"""The real commands on real pseudo-terminals of 80, 100, 120 and 160 columns.

What an operator reads must fit the terminal and stay true: no line is wider than it (the
live bar's redraws included), no number or header is split over two lines, and the
progress keeps done/total, rate and ETA at 80 columns.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid

import pytest

from tests.factories import make_agent, make_task, make_usage
from tests.processes import on_terminal, screen_lines
from tests.support import COMMITS, CUTOFF_ARG
from usage.models import BackfillRun

pytestmark = [COMMITS, pytest.mark.slow]

WORKSPACES = (
    uuid.UUID("0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d"),
    uuid.UUID("0b5c3a4e-1111-4c2a-9e7b-1d2f3a4b5c6d"),
)
HEADERS = ("workspace", "rows", "clamped", "input", "tokens", "removed", "rollup", "keys")
# A number with thousands separators, whole: a split one leaves a fragment like "178,39".
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+")


@pytest.fixture
def rows() -> None:
    """Two workspaces whose ids share their first 8 characters, large figures."""
    for workspace in WORKSPACES:
        agent = make_agent(workspace)
        for model in ("a", "b", "c"):
            make_usage(
                make_task(agent), model=model, input_tokens=987_654_321, cache_read_tokens=123_456
            )


def fits(lines: list[str], width: int) -> None:
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, too_wide


def numbers_whole(lines: list[str], width: int) -> None:
    """No full line ends inside a number that the next goes on with, and every number's
    groups of digits are whole (a number cut after a separator leaves "178,39")."""
    for before, after in zip(lines, lines[1:], strict=False):
        cut = len(before) >= width - 1 and re.search(r"[\d,]$", before)
        assert not (cut and re.match(r"^[\d,]", after)), (before, after)
    for line in lines:
        for found in NUMBER.findall(line):
            assert all(len(part) == 3 for part in found.split(",")[1:]), line


@pytest.mark.parametrize("width", [80, 100, 120, 160])
def test_the_dry_run_table_fits_and_splits_nothing(
    rows: None, subprocess_env: dict[str, str], width: int
) -> None:
    status, received = on_terminal(
        "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, env=subprocess_env, columns=width
    )
    lines = screen_lines(received)
    assert status == 0, received
    fits(lines, width)
    numbers_whole(lines, width)
    words = {word for line in lines for word in re.findall(r"[a-z_]+", line)}
    assert set(HEADERS) <= words  # every header whole
    assert "2,962,962,963" in received  # a workspace's input before, whole
    table = [line for line in lines if line.startswith("0b5c3a4e")]
    assert len(table) == 2  # one line per group, at every width
    if width >= 160:
        assert str(WORKSPACES[0]) in table[0] + table[1]
    else:
        # The shortest prefix that tells the two workspaces apart, and the full ids below.
        assert {line.split()[0] for line in table} == {"0b5c3a4e-8", "0b5c3a4e-1"}
        assert f"0b5c3a4e-8  {WORKSPACES[0]}" in received
        assert f"fitted to {width} columns" in received


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_bars_and_the_outcome_fit_and_keep_what_matters(
    rows: None, subprocess_env: dict[str, str], width: int
) -> None:
    status, received = on_terminal(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--execute",
        "--batch-size",
        "2",
        "--sleep-between-batches",
        "300ms",
        env=subprocess_env,
        columns=width,
    )
    lines = screen_lines(received)
    assert status == 0, received
    fits(lines, width)
    numbers_whole(lines, width)
    bars = [line for line in lines if line.startswith("update")]
    assert bars, received
    final = bars[-1]
    # done/total with separators and its unit, the rate, a labelled ETA: at every width.
    assert re.search(r"6/6 rows +[\d,]+ rows/s +ETA \d+:\d\d:\d\d", final), final
    rollup = [line for line in lines if line.startswith("rollup ")]
    assert rollup and re.search(r"\d+/\d+ keys", rollup[-1]), rollup
    assert " rows/s" not in rollup[-1]  # the rollup counts keys
    if width >= 100:
        assert re.search(r"elapsed \d+:\d\d:\d\d", final), final
    run = BackfillRun.objects.get()
    # The outcome, not the table of groups again, and never "would change".
    assert "would change" not in received and "0b5c3a4e  2026" not in received
    assert f"Run {run.pk} succeeded." in received
    assert "rows changed" in received and "6 of 6 planned" in received
    assert f"--verify --run-id {run.pk}" in received
    # A unit stays with its number ("in 0.3 s;", never "in 0.3" then "s;": issue 26).
    assert not any(re.match(r"\s*(s|ms)[;,.)]?(\s|$)", line) for line in lines), lines


@pytest.mark.parametrize("width", [80, 160])
def test_the_plans_next_command_is_kept_whole(
    rows: None, subprocess_env: dict[str, str], width: int
) -> None:
    """Issue 26: the command was split between words even at 160 columns."""
    # A short path, as an operator types it (pytest's own would not fit 80 columns alone).
    folder = tempfile.mkdtemp(prefix="plan", dir="/tmp")
    plan_file = f"{folder}/plan-for-review.json"
    status, received = on_terminal(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--plan-out",
        plan_file,
        env=subprocess_env,
        columns=width,
    )
    shutil.rmtree(folder)
    assert status == 0, received
    lines = screen_lines(received)
    fits(lines, width)
    start = next(n for n, line in enumerate(lines) if line.startswith("Plan written to"))
    block = lines[start : start + 4]
    command = f"python manage.py backfill_codex_usage_cache --execute --plan {plan_file}"
    joined = " ".join(line.strip().removesuffix("\\").strip() for line in block)
    assert command in " ".join(joined.split()), block
    # Broken, if at all, only before an option and with a shell continuation.
    assert any("python manage.py backfill_codex_usage_cache" in line for line in block), block
    for line in block:
        assert not line.rstrip().endswith(("python", "manage.py", "--plan")), block
        if "python manage.py" in line or line.strip().startswith("--"):
            assert line.rstrip().endswith("\\") or line.rstrip().endswith(plan_file), block
