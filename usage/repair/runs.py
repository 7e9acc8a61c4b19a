"""The run record's life cycle and the run-level lock.

Only one ``--execute`` (or revert) may work on a database at a time. The owner holds a
session-level advisory lock of its own (never 4246, which belongs to the rollup writers) for
its whole life; a run left ``running`` while nobody holds that lock lost its process (kill -9,
a lost machine) and is marked interrupted by the next invocation.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection
from django.db.models.functions import Now

from usage.db import reconnect_if_dead
from usage.models import BackfillRun

logger = logging.getLogger("usage.runs")

# "codex" in ASCII: a bigint advisory lock id that no other writer of this database uses.
RUN_LOCK_ID = 0x636F646578

WHO_SQL = "SELECT current_user, pg_backend_pid()"


class RunLockError(Exception):
    """Another run holds the run lock."""


@contextmanager
def run_lock() -> Iterator[None]:
    """Hold the run lock for the block, or fail at once naming the run that has it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [RUN_LOCK_ID])
        acquired = cursor.fetchone()[0]
    if not acquired:
        running = BackfillRun.objects.filter(status=BackfillRun.Status.RUNNING).first()
        detail = (
            f"run {running.pk} (started {running.started_at:%Y-%m-%d %H:%M:%S} UTC by "
            f"{running.os_user}@{running.client_host}, pid {running.pid})"
            if running
            else "another backfill or revert process"
        )
        raise RunLockError(
            f"{detail} is still running on this database; wait for it to finish "
            "or stop it before starting another"
        )
    try:
        yield
    finally:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [RUN_LOCK_ID])
        except Exception:
            logger.debug("run lock released with the session", exc_info=True)


def mark_stale_runs() -> list[int]:
    """Mark runs left ``running`` by a dead process as interrupted. Call with the lock held."""
    stale = list(
        BackfillRun.objects.filter(status=BackfillRun.Status.RUNNING).values_list("pk", flat=True)
    )
    if stale:
        BackfillRun.objects.filter(pk__in=stale).update(
            status=BackfillRun.Status.INTERRUPTED,
            finished_at=Now(),
            error="the process running it ended without finishing (found with no live owner)",
        )
        logger.warning("marked stale run(s) %s as interrupted", stale)
    return stale


def start_run(**fields: Any) -> BackfillRun:
    """Create the run record, stamped with who runs it and the database's clock."""
    with connection.cursor() as cursor:
        cursor.execute(WHO_SQL)
        db_role, backend_pid = cursor.fetchone()
    run = BackfillRun.objects.create(
        os_user=_os_user(),
        db_role=db_role,
        client_host=socket.gethostname(),
        pid=os.getpid(),
        backend_pid=backend_pid,
        started_at=Now(),
        **fields,
    )
    run.refresh_from_db()
    return run


def finish_run(run: BackfillRun, status: str, **fields: Any) -> None:
    """Close the run record; a fresh connection is used if the old one died."""
    reconnect_if_dead()
    BackfillRun.objects.filter(pk=run.pk).update(status=status, finished_at=Now(), **fields)
    run.refresh_from_db()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
