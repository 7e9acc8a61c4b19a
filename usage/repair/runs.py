"""The run record's start (and the unfinished run it continues), and the run lock: a session
advisory lock (never 4246) that one ``--execute`` or revert holds at a time."""

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

from usage.models import BackfillRun

logger = logging.getLogger("usage.runs")

# "codex" in ASCII: a bigint advisory lock id that no other writer of this database uses.
RUN_LOCK_ID = 0x636F646578
RUN_LOCK_HALVES = {"high": RUN_LOCK_ID >> 32, "low": RUN_LOCK_ID & 0xFFFFFFFF}

# Who holds the run lock in this database (a bigint lock shows as classid, objid halves).
RUN_LOCK_HOLDER_SQL = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = %(high)s::bigint::oid AND objid = %(low)s::bigint::oid AND objsubid = 1
LIMIT 1"""


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


def run_lock_holder() -> int | None:
    """The backend holding the run lock, if any, read without taking it."""
    with connection.cursor() as cursor:
        cursor.execute(RUN_LOCK_HOLDER_SQL, RUN_LOCK_HALVES)
        row = cursor.fetchone()
    return row[0] if row else None


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


# Runs whose rollup did not finish, none running or reverted: the next run rebuilds their keys.
PENDING_ROLLUPS_SQL = """
SELECT id FROM {run}
WHERE rollup_state = 'pending' AND status NOT IN ('running', 'reverted')
ORDER BY id"""

# A run that did not finish: the next run of the same cutoff and workspace continues it.
UNFINISHED = (BackfillRun.Status.INTERRUPTED, BackfillRun.Status.FAILED)


def start_run(**fields: Any) -> BackfillRun:
    """Create the run record, stamped with who runs it and the unfinished run it continues."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user, pg_backend_pid()")
        db_role, backend_pid = cursor.fetchone()
    scope = {"cutoff": fields["cutoff"], "workspace_id": fields["workspace_id"]}
    latest = BackfillRun.objects.filter(**scope).order_by("-pk").first()
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):
        os_user = str(os.getuid())
    run = BackfillRun.objects.create(
        os_user=os_user,
        db_role=db_role,
        client_host=socket.gethostname(),
        pid=os.getpid(),
        backend_pid=backend_pid,
        started_at=Now(),
        continues=latest if latest is not None and latest.status in UNFINISHED else None,
        **fields,
    )
    run.refresh_from_db()
    return run
