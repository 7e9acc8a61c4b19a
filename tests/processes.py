"""Running ``manage.py`` as a real subprocess, as an operator would."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def manage(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_manage(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines a command wrote on stderr (bad input must give exactly one)."""
    return [line for line in stderr.splitlines() if line.strip()]


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection and never says a word.

    Yields its port. A client without a connect timeout waits on it forever.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(client)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for client in held:
            client.close()
        listener.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What a terminal draws that is not text: colours, cursor moves, line erasing.
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(
    *args: str, env: dict[str, str], columns: int, timeout: float = 120
) -> tuple[int, str]:
    """Run ``manage.py`` on a pseudo-terminal ``columns`` wide (stdout and stderr both).

    Returns the exit status and what the terminal received, as text.
    """
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=dict(env, COLUMNS=str(columns), TERM="xterm"),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=timeout)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def screen_lines(received: str) -> list[str]:
    """Every line a terminal showed, live redraws included, without its control codes."""
    return re.split(r"\r\n|\r|\n", TERMINAL_CODES.sub("", received))
