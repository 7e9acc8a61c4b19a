"""``--max-replication-lag``: pauses the repair between batches while a streaming replica is
behind (docs/design.md, "How a run works")."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from django.db import connection

logger = logging.getLogger("usage.replication")

# A row per walsender, no joins. On a standby (cascading replication) the reference position
# is what it has replayed itself, since pg_current_wal_lsn() fails there.
REPLICAS_SQL = """
WITH here AS (
    SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                ELSE pg_current_wal_lsn() END AS lsn
)
SELECT r.pid,
       r.state,
       coalesce(nullif(r.application_name, ''), r.usename::text, 'replica') AS name,
       coalesce(host(r.client_addr), 'local') AS client,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag_seconds,
       r.replay_lsn IS NULL AS position_unknown,
       greatest(pg_wal_lsn_diff(here.lsn, r.replay_lsn), 0)::bigint AS behind_bytes
FROM pg_stat_replication r CROSS JOIN here
WHERE r.state IS DISTINCT FROM 'backup'"""

MISSING_PRIVILEGE_HINT = "grant pg_monitor to the repair's role to see replica lag"


@dataclass(frozen=True)
class ReplicaState:
    pid: int
    state: str | None
    name: str
    client: str
    replay_lag_seconds: float | None
    position_unknown: bool
    behind_bytes: int | None

    @property
    def hidden(self) -> bool:
        """The role may not see this walsender's details (no ``pg_monitor``)."""
        return self.state is None


def _format_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "kB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def judge(replica: ReplicaState, max_lag_seconds: float) -> str | None:
    if replica.hidden:
        return f"replica pid {replica.pid} lag not visible to this role ({MISSING_PRIVILEGE_HINT})"
    lag, label = replica.replay_lag_seconds, f"replica {replica.name}@{replica.client}"
    if lag is not None:
        if lag <= max_lag_seconds:
            return None
        shown = f"{lag:.1f}s" if lag < 100 else f"{lag:.0f}s"
        return f"{label} replay lag {shown} > {max_lag_seconds:g}s"
    if replica.position_unknown:
        return f"{label} replay lag unknown, replay position not reported yet"
    if replica.behind_bytes:
        return (
            f"{label} replay lag unknown, {_format_bytes(replica.behind_bytes)} "
            "of WAL not replayed"
        )
    return None


def replica_states(cursor: Any = None) -> list[ReplicaState]:
    with nullcontext(cursor) if cursor is not None else connection.cursor() as current:
        current.execute(REPLICAS_SQL)
        return [ReplicaState(*row) for row in current.fetchall()]


def lag_too_high(max_lag_seconds: float, cursor: Any = None) -> str | None:
    """None when every replica is within ``max_lag_seconds``, else why the worst is not."""
    reasons: list[tuple[float, str]] = []
    for replica in replica_states(cursor):
        reason, lag = judge(replica, max_lag_seconds), replica.replay_lag_seconds
        if reason is not None:
            # Worst first: known lags by size; unknown or hidden ones rank above all of them.
            reasons.append((float("inf") if lag is None else lag, reason))
    if not reasons:
        return None
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return max(reasons, key=lambda item: item[0])[1] + more


def wait_for_replicas(
    max_lag_seconds: float,
    stop_event: threading.Event,
    on_pause: Callable[[str], None],
    poll_seconds: float = 0.5,
    cursor: Any = None,
) -> float:
    """Block while replication lag is too high (until it is not, or ``stop_event``) and return
    the seconds paused."""
    started = time.monotonic()
    paused = False
    while True:
        reason = lag_too_high(max_lag_seconds, cursor)
        waited = time.monotonic() - started
        if reason is None:
            if paused:
                logger.info("replicas caught up after a %.1fs pause", waited)
            return waited if paused else 0.0
        if stop_event.is_set():
            return waited
        paused = True
        logger.debug("pausing: %s", reason)
        on_pause(reason)
        if stop_event.wait(poll_seconds):
            return time.monotonic() - started
