"""Bad input refused before the database: ``usage.options`` itself, and the commands using it.

None of these tests may touch a database (pytest-django refuses it: a command that reached
the database before refusing its input would fail here), so "nothing was changed" holds by
construction. The refusals that need the database (a cutoff in its future, a run that does
not exist) are tested with one, next to the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.support import CUTOFF_ARG, backfill, command
from usage import options

TIMEOUT_DEFAULTS = {
    "lock_timeout": "5s",
    "statement_timeout": "60s",
    "max_rollup_lock_seconds": "5",
    "cron_tick_interval": "5m",
}


def timeouts(name: str) -> Callable[[str], Any]:
    return lambda value: options.parse_limits({**TIMEOUT_DEFAULTS, name: value})


# Each option's parser, as the commands call it.
PARSERS: dict[str, Callable[[str], Any]] = {
    "--cutoff": options.parse_cutoff,
    "--workspace-id": lambda value: options.parse_workspace_id(value, allow_empty=False),
    "--batch-size": options.parse_batch_size,
    "--sleep-between-batches": options.parse_duration,
    "--lock-timeout": timeouts("lock_timeout"),
    "--statement-timeout": timeouts("statement_timeout"),
    "--max-rollup-lock-seconds": timeouts("max_rollup_lock_seconds"),
    "--cron-tick-interval": timeouts("cron_tick_interval"),
    "--run-id": options.parse_run_id,
}

# (option, value, what the one-line refusal says)
BAD_VALUES = [
    ("--cutoff", None, "--cutoff is required"),
    ("--cutoff", "yesterday", "not an RFC 3339 timestamp"),
    ("--cutoff", "2026-06-13", "not an RFC 3339 timestamp"),
    ("--cutoff", "2026-06-13T08:00:00", "not an RFC 3339 timestamp with an offset"),
    ("--cutoff", "2026-13-45T08:00:00Z", "not a valid date and time"),
    ("--cutoff", "0001-01-01T00:00:00+05:30", "is out of range"),
    ("--cutoff", "9999-12-31T23:59:59-05:00", "is out of range"),
    ("--cutoff", "２０２６-06-13T08:00:00Z", "not an RFC 3339 timestamp"),
    ("--workspace-id", "acme", "is not a UUID"),
    ("--workspace-id", "12345", "is not a UUID"),
    ("--workspace-id", "١" * 32, "is not a UUID"),
    ("--workspace-id", "", "--workspace-id is empty"),
    ("--batch-size", "0", "--batch-size must be positive"),
    ("--batch-size", "-5", "--batch-size must be positive"),
    ("--batch-size", "ten", "is not a whole number"),
    ("--batch-size", "1000000000", "is too large"),
    ("--batch-size", "１０", "is not a whole number"),
    ("--batch-size", "1_000", "is not a whole number"),
    ("--sleep-between-batches", "5 parsecs", "is not a duration"),
    ("--sleep-between-batches", "-1s", "'-1s' is negative"),
    # 0 is refused too: the message never offers it.
    ("--lock-timeout", "-1s", "'-1s' is negative; give 0.001 seconds or more"),
    ("--sleep-between-batches", "2h", "between 0 and 1h"),
    ("--sleep-between-batches", "1h1h", "'1h1h' is not a duration"),
    ("--sleep-between-batches", "30s1m", "'30s1m' is not a duration"),
    ("--sleep-between-batches", " 5s", "has spaces around it"),
    ("--lock-timeout", "5s ", "has spaces around it"),
    ("--lock-timeout", "nan", "is not a duration"),
    ("--lock-timeout", "١", "is not a duration"),
    ("--lock-timeout", "soon", "is not a duration"),
    ("--statement-timeout", "0", "must be between"),
    ("--max-rollup-lock-seconds", "0.01", "must be between"),
    ("--cron-tick-interval", "0.5s", "must be between"),
    ("--run-id", "x", "is not a run number"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD_VALUES)
def test_each_parser_refuses_its_bad_values_in_one_line(
    option: str, value: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        PARSERS[option](value)
    text = str(refused.value)
    assert "\n" not in text
    assert text.startswith(option), text


# The repair's command line for each bad value (the cutoff is given unless it is the one).
def repair_args(option: str, value: str | None) -> list[str]:
    if option == "--cutoff":
        return [] if value is None else ["--cutoff", value]
    if option == "--sleep-between-batches" and value == "-1s":
        # A value that starts with "-" is still the option's value, in both spellings.
        return ["--cutoff", CUTOFF_ARG, f"{option}={value}"]
    return ["--cutoff", CUTOFF_ARG, option, str(value)]


REPAIR_BAD_VALUES = [case for case in BAD_VALUES if case[0] != "--run-id"]


@pytest.mark.parametrize(("option", "value", "message"), REPAIR_BAD_VALUES)
@pytest.mark.parametrize("execute", [False, True], ids=["dry-run", "execute"])
def test_the_repair_refuses_bad_input_before_the_database(
    option: str, value: str | None, message: str, execute: bool
) -> None:
    if execute and (option, value) == ("--cutoff", None):
        # An execute without a cutoff is told to use the reviewed plan first.
        message = "--execute needs the reviewed plan: --execute --plan FILE"
    with pytest.raises(CommandError, match=message) as error:
        backfill(*repair_args(option, value), *(["--execute"] if execute else []))
    assert "\n" not in str(error.value)


def test_a_dash_value_after_a_space_is_still_the_options_value() -> None:
    with pytest.raises(CommandError, match="'-1s' is negative"):
        backfill("--cutoff", CUTOFF_ARG, "--execute", "--sleep-between-batches", "-1s")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verify"], "--verify needs --execute"),
        (["--verify", "--run-id", "x"], "is not a run number"),
        (["--run-id", "3"], "--run-id goes with --verify"),
        (["--cutoff", CUTOFF_ARG, "--max-replication-lag", "lots"], "is not a duration"),
    ],
)
def test_verify_and_option_mistakes(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        backfill(*args)


def revert_error(*args: str) -> CommandError:
    with pytest.raises(CommandError) as caught:
        command("revert_codex_usage_backfill", *args)
    assert "\n" not in str(caught.value), caught.value
    return caught.value


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5", "", " "])
def test_a_revert_of_something_that_is_not_a_run_number(value: str) -> None:
    error = revert_error(value, "--execute")
    assert "is not a run number" in str(error)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "--batch-size must be positive"),
        ("--lock-timeout", "soon", "--lock-timeout"),
        ("--show", "many", "--show 'many' must be a whole number"),
    ],
)
def test_bad_revert_options(flag: str, value: str, expected: str) -> None:
    error = revert_error("1", flag, value)
    assert expected in str(error)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "--cutoff is required"),
        (("--cutoff", "2026-06-13"), "is not an RFC 3339 timestamp"),
        (("--cutoff", CUTOFF_ARG, "--workspace-id", "nope"), "is not a UUID"),
        (("--cutoff", CUTOFF_ARG, "--statement-timeout", "2h"), "must be between"),
    ],
)
def test_the_preflight_refuses_bad_input_before_the_database(
    args: tuple[str, ...], expected: str
) -> None:
    with pytest.raises(CommandError, match=expected):
        command("preflight_codex_usage_backfill", *args)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (5, "5s"),
        (60, "1m"),
        (300, "5m"),
        (5400, "1h30m"),
        (2.5, "2.5s"),
    ],
)
def test_defaults_read_as_durations_the_options_take(seconds: float, text: str) -> None:
    assert options.duration_text(seconds) == text
    assert options.parse_seconds(text, flag="--x", minimum=0, maximum=86400) == seconds


def test_the_help_gives_every_default_as_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        call_command("backfill_codex_usage_cache", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default 0s)",
        "(default 5s)",
        "(default 1m)",
        "(default 5m)",
        "(default 24h",
    ):
        assert default in text, default
    assert "nothing changed by it" not in text
    assert "a run that failed keeps what it did" in text
