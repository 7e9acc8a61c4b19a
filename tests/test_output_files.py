"""``--output``: checked before any work, never replacing a device, FIFO or link, umask modes.

The path checks and the writing live in ``usage.output.files`` (one library for every file the
tool writes a result to); the command tests run the real repair on PostgreSQL and check
that a refused path changed nothing, and that a write failing after a run never hides the
run's outcome.
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.factories import make_agent, make_task, make_usage, populate_rollup
from tests.support import COMMITS, CUTOFF_ARG
from tests.support import backfill as command
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.output.files import OutputError, check_output


@pytest.fixture
def rows() -> list[TaskUsage]:
    agent = make_agent()
    made = [make_usage(make_task(agent), model=m) for m in ("a", "b", "c")]
    populate_rollup()
    return made


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process's umask after a test that sets its own."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def make_device(path: Path, kind: int, major: int, minor: int) -> Path:
    try:
        os.mknod(path, kind | 0o666, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("this user may not create device nodes")
    return path


def unchanged(rows: list[TaskUsage]) -> bool:
    current = {r.pk: r.input_tokens for r in TaskUsage.objects.all()}
    return current == {r.pk: r.input_tokens for r in rows} and not BackfillRun.objects.exists()


# -- the library: what is refused before anything happens -----------------------------------


def refused_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (the --output value, what the one-line refusal says)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "missing-target", tmp_path / "dangling")
    return {
        "directory": (str(tmp_path / "dir"), "is a directory"),
        "trailing-slash": (str(tmp_path / "new") + "/", "names a directory"),
        "missing-parent": (str(tmp_path / "no" / "such" / "x.json"), "does not exist"),
        "file-as-parent": (str(tmp_path / "a-file" / "x.json"), "Not a directory"),
        "dangling-link": (str(tmp_path / "dangling"), "symbolic link to a file that does"),
        "empty": ("", "needs a file name"),
        "blank": ("   ", "needs a file name"),
        "dash": ("-", "leave out the option"),
        "nul": ("plan\x00.json", "contains a NUL byte"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "directory",
        "trailing-slash",
        "missing-parent",
        "file-as-parent",
        "dangling-link",
        "empty",
        "blank",
        "dash",
        "nul",
    ],
)
def test_paths_that_cannot_take_a_result_are_refused_in_one_line(
    tmp_path: Path, name: str
) -> None:
    value, expected = refused_paths(tmp_path)[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=expected) as refused:
        check_output(value)
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_a_block_device_is_refused(tmp_path: Path) -> None:
    device = make_device(tmp_path / "disk", stat.S_IFBLK, 7, 0)
    with pytest.raises(ValueError, match="is a block device"):
        check_output(str(device))
    assert stat.S_ISBLK(os.lstat(device).st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="no permission to create files"):
            check_output(str(locked / "plan.json"))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_or_replaced_file_gets_the_mode_the_umask_gives(
    tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    os.umask(mask)
    fresh, existing = tmp_path / "fresh.json", tmp_path / "existing.json"
    existing.write_text("old")
    existing.chmod(0o600)
    for target in (fresh, existing):
        check_output(str(target)).write('{"ok": true}')
        assert stat.S_IMODE(os.stat(target).st_mode) == mode
        assert target.read_text() == '{"ok": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json", "fresh.json"]


def test_a_symlink_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    os.symlink(real, link)
    check_output(str(link)).write("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new\n"


def test_a_character_device_is_written_into_never_replaced(tmp_path: Path) -> None:
    null = make_device(tmp_path / "null", stat.S_IFCHR, 1, 3)
    check_output(str(null)).write("discarded")
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_fifo_is_written_into_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    try:
        target = check_output(str(fifo))
        # The reader opens the FIFO in its own time; a write with no reader yet is refused.
        for _ in range(200):
            try:
                target.write("through the pipe")
                break
            except OutputError as exc:
                assert "no process reads" in str(exc)
                time.sleep(0.01)
    finally:
        reader.join(10)
    assert received == ["through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_fifo_nobody_reads_is_an_error_not_a_wait(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = check_output(str(fifo))
    with pytest.raises(OutputError, match="it is a FIFO that no process reads"):
        target.write("nobody listens")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- the command: refused before the run, outcome kept after it -----------------------------


@COMMITS
@pytest.mark.parametrize(
    "name", ["directory", "missing-parent", "file-as-parent", "dangling-link"]
)
def test_execute_with_an_unusable_output_changes_nothing(
    rows: list[TaskUsage], tmp_path: Path, name: str
) -> None:
    value, expected = refused_paths(tmp_path)[name]
    with pytest.raises(CommandError, match=expected) as refused:
        command("--cutoff", CUTOFF_ARG, "--execute", "--output", value)
    assert refused.value.returncode == 1
    assert "\n" not in str(refused.value)
    assert unchanged(rows)


@COMMITS
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_a_write_failing_after_the_run_still_shows_its_outcome(
    rows: list[TaskUsage], tmp_path: Path, fmt: str
) -> None:
    fifo = tmp_path / "nobody-reads"
    os.mkfifo(fifo)
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command(
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--execute",
            "--format",
            fmt,
            "--output",
            str(fifo),
            stdout=out,
            stderr=io.StringIO(),
        )
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED
    assert BackfillJournal.objects.count() == 3
    assert f"Run {run.pk} succeeded." in out.getvalue()
    shown = out.getvalue()
    assert f"Run {run.pk} succeeded.\n  rows changed    3 of 3 planned; 0 still eligible" in shown
    message = str(failed.value)
    assert "\n" not in message and failed.value.returncode == 1
    assert "could not write the result to --output" in message
    assert "it is a FIFO that no process reads" in message
    assert f"run {run.pk} succeeded (its outcome is shown above)" in message
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@COMMITS
def test_a_full_device_after_a_dry_run_says_nothing_changed(rows: list[TaskUsage]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    out = io.StringIO()
    with pytest.raises(CommandError, match="No space left on device") as failed:
        call_command(
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--output",
            "/dev/full",
            stdout=out,
            stderr=io.StringIO(),
        )
    assert "the dry run changed nothing" in str(failed.value)
    assert "3 rows would change" in out.getvalue()
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    assert unchanged(rows)


@COMMITS
def test_json_through_a_symlink_reaches_its_target(
    rows: list[TaskUsage], tmp_path: Path, umask: None
) -> None:
    real = tmp_path / "plan.json"
    real.write_text("an older plan")
    link = tmp_path / "latest.json"
    os.symlink(real.name, link)
    out, _ = command("--cutoff", CUTOFF_ARG, "--format", "json", "--output", str(link))
    assert f"Result written to {link} (json)." in out
    assert link.is_symlink()
    assert json.loads(real.read_text())["totals"]["rows"] == 3
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o644
