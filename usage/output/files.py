"""Writing a result to a file the operator named: ``check_output`` refuses a bad path before
any work; ``OutputFile`` replaces a file atomically, or writes into a device or a FIFO."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from usage.options import shown

# A new result file gets these permissions, less the umask's.
NEW_FILE_MODE = 0o666
DANGLING_LINK = "is a symbolic link to a file that does not exist; give the real path"


class OutputError(Exception):
    """The result cannot be written there; the message is one line and says why."""


@dataclass(frozen=True)
class OutputFile:
    """A checked place for a result; ``write`` puts the text there."""

    given: str
    path: Path
    stream: bool
    flag: str = "--output"

    def write(self, text: str) -> None:
        data = (text if text.endswith("\n") else text + "\n").encode()
        try:
            (_write_into if self.stream else _replace)(self.path, data)
        except OSError as exc:
            raise OutputError(
                f"could not write the result to {self.flag} {shown(self.given)}: {_reason(exc)}"
            ) from exc


def named_file(given: str, flag: str, dash: str) -> tuple[Path, Callable[[str], ValueError]]:
    """The file's absolute path, and how to refuse it in one line; ``dash``: instead of ``-``."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{flag} {shown(given)} {why}")

    if not given.strip():
        raise ValueError(f"{flag} needs a file name, e.g. {flag} plan.json")
    if "\x00" in given:
        raise refuse("contains a NUL byte; give a file name")
    if given == "-":
        raise refuse(f"is not a file; {dash}")
    return Path(os.path.abspath(given)), refuse


def check_output(given: str, *, flag: str = "--output") -> OutputFile:
    """Refuse a path that cannot take a result in one line, creating or opening nothing."""
    path, refuse = named_file(given, flag, "leave out the option to print the result on stdout")
    if given.endswith(("/", os.sep)):
        raise refuse("names a directory; give a file name, e.g. reports/plan.json")
    try:
        found = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise refuse(DANGLING_LINK) from None
        _check_directory(path.parent, refuse)
        return OutputFile(given, path, stream=False, flag=flag)
    except OSError as exc:
        raise refuse(f"cannot be used: {_reason(exc)}") from None
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        raise refuse("is a directory; give a file name, e.g. reports/plan.json")
    if stat.S_ISREG(mode):
        final = Path(os.path.realpath(path))
        if not os.access(final, os.W_OK):
            raise refuse("is not writable; give another file or change its permissions")
        _check_directory(final.parent, refuse)
        return OutputFile(given, final, stream=False, flag=flag)
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        if not os.access(path, os.W_OK):
            raise refuse("is not writable")
        return OutputFile(given, path, stream=True, flag=flag)
    kind = "a block device" if stat.S_ISBLK(mode) else "not a regular file"
    raise refuse(f"is {kind}; give a regular file name")


def _check_directory(directory: Path, refuse: Callable[[str], ValueError]) -> None:
    """The directory must exist and let us create files: a result replaces a file whole."""
    try:
        found = os.stat(directory)
    except FileNotFoundError:
        raise refuse(f"cannot be created: the directory {directory} does not exist") from None
    except OSError as exc:
        raise refuse(f"cannot be created in {directory}: {_reason(exc)}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise refuse(f"cannot be created: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise refuse(f"cannot be written: no permission to create files in {directory}")


def _replace(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.open(temporary, flags, NEW_FILE_MODE)
    try:
        with open(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(handle)
        if os.path.islink(path):
            # Checked as a file (links followed); a link put there since is never replaced.
            raise OSError(errno.ELOOP, "it became a symbolic link after it was checked")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_into(path: Path, data: bytes) -> None:
    """Write into a character device or a FIFO; never create, truncate or replace it."""
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        handle = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "it is a FIFO that no process reads") from exc
        raise
    with open(handle, "wb") as file:
        found = os.fstat(handle).st_mode
        if not (stat.S_ISCHR(found) or stat.S_ISFIFO(found)):
            raise OSError(errno.EINVAL, "it is no longer a device or a FIFO")
        # Non-blocking only to open a FIFO without a reader; write the usual way.
        fcntl.fcntl(handle, fcntl.F_SETFL, fcntl.fcntl(handle, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        file.write(data)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
