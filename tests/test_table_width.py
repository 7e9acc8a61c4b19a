"""The dry run's table fits the operator's terminal; in a file or a pipe it keeps its width."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest
from django.core.management import call_command

from tests.factories import make_agent, make_task, make_usage
from tests.support import CUTOFF_ARG
from usage.output.table import summary_table

WORKSPACE = uuid.UUID("0b5c3a4e-8f1d-4c2a-9e7b-1d2f3a4b5c6d")
FIRST = datetime(2026, 6, 11, 8, 0, tzinfo=UTC)
LAST = datetime(2026, 6, 11, 23, 59, 59, tzinfo=UTC)


def group(day: int) -> dict[str, Any]:
    return {
        "workspace_id": WORKSPACE,
        "date_utc": date(2026, 6, day),
        "rows": 12_345,
        "input_before": 987_654_321,
        "input_after": 123_456_789,
        "input_tokens_removed": 864_197_532,
        "clamped_rows": 1_234,
        "rollup_keys": 5_678,
        "first_created_at": FIRST,
        "last_created_at": LAST,
    }


DOCUMENT = {
    "groups": [group(10), group(11)],
    "group_count": 2,
    "totals": {
        "rows": 24_690,
        "input_before": 1_975_308_642,
        "input_after": 246_913_578,
        "input_tokens_removed": 1_728_395_064,
        "clamped_rows": 2_468,
    },
    "expected_rollup_keys": 11_356,
}
VALUES = [
    str(WORKSPACE),
    "2026-06-10",
    "987,654,321",
    "864,197,532",
    "1,975,308,642",
    "1,728,395,064",
    "2026-06-11T08:00:00Z",
    "2026-06-11T23:59:59Z",
]


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_the_table_is_wider_than_160_columns_at_its_natural_width() -> None:
    """What the fitting is for: unfitted, this table's last column wraps on 160 columns."""
    text = summary_table(DOCUMENT)
    assert widest(text) > 160
    assert "input before" in text and "last created_at" in text
    for value in VALUES:
        assert value in text


def test_on_a_160_column_terminal_every_line_fits_and_every_value_is_whole() -> None:
    text = summary_table(DOCUMENT, width=160)
    assert widest(text) <= 160
    for value in VALUES:
        assert value in text  # on one line: wrapped headers make the room, not cut values
    assert "TOTAL" in text and "2 groups" in text


@pytest.mark.parametrize("width", [120, 100, 80])
def test_on_a_narrow_terminal_lines_fit_and_cells_fold_rather_than_end_in_dots(
    width: int,
) -> None:
    text = summary_table(DOCUMENT, width=width)
    assert widest(text) <= width
    assert "…" not in text  # a cell too wide goes on over lines: nothing is left out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.django_db
def test_the_dry_run_fits_the_terminal_it_is_shown_on(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = make_agent(WORKSPACE)
    for model in ("a", "b", "c"):
        make_usage(
            make_task(agent), model=model, input_tokens=987_654_321, cache_read_tokens=123_456
        )
    monkeypatch.setenv("COLUMNS", "160")
    shown, piped = Terminal(), io.StringIO()
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, stdout=shown)
    call_command("backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG, stdout=piped)
    assert widest(piped.getvalue()) > 160  # a pipe gets the table at its natural width
    assert widest(shown.getvalue()) <= 160
    assert str(WORKSPACE) in shown.getvalue()
    assert "2,962,962,963" in shown.getvalue()  # the three rows' input before, whole
