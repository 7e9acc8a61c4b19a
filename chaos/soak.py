"""The chaos soak: random schedules of commands, faults and neighbours on a real PostgreSQL,
each checked against the invariants a repair promises.

Every look at sessions and locks is confined to the soak's own database, so that soaks (or
test runs) on the same server never see or stop each other's sessions.

A schedule (``chaos.schedule``) runs on a database of its own, emptied and seeded anew for
each schedule: the repair, revert and verify commands run as real processes (``manage.py``,
``--log-format json``), a fault fires on one of their log events or after a delay, and the
neighbours run as threads on connections of their own while a command lasts. Then every
interrupted run is resumed (or its revert finished), the platform's tick catches up, and the
invariants are checked (``check``). A sampler watches lock 4246 the whole time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from chaos.schedule import Schedule, Step

PROJECT_DIR = Path(__file__).resolve().parent.parent
APPLICATION = "codex-usage-repair"
KEYS = "bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model"
LOCK_SLACK_SECONDS = 0.5
COMMAND_TIMEOUT_SECONDS = 120.0

TRUNCATE_SQL = """
TRUNCATE codex_repair.backfill_journal, codex_repair.backfill_run, task_usage_hourly_dirty,
         task_usage_hourly, task_usage, agent_task_queue, issue, agent CASCADE"""
RESET_STATE_SQL = """
UPDATE task_usage_hourly_rollup_state
SET watermark_at = now() - interval '10 minutes', last_run_started_at = NULL,
    last_run_finished_at = NULL, last_run_rows = NULL, last_error = NULL WHERE id = 1"""
HOURLY_SQL = f"""
SELECT {KEYS}, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
       cost_usd_ticks, uncosted_input_tokens, uncosted_output_tokens,
       uncosted_cache_read_tokens, uncosted_cache_write_tokens, task_count, event_count
FROM task_usage_hourly ORDER BY {KEYS}"""
# Every key there is, queued, and one call of the function over the queue: its own
# from-scratch recompute of every key.
RECOMPUTE_EVERY_KEY_SQL = f"""
INSERT INTO task_usage_hourly_dirty AS d ({KEYS})
SELECT {KEYS} FROM task_usage_hourly
UNION
SELECT date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', a.workspace_id,
       q.runtime_id, q.agent_id, i.project_id, tu.provider, tu.model
FROM task_usage tu JOIN agent_task_queue q ON q.id = tu.task_id
JOIN agent a ON a.id = q.agent_id LEFT JOIN issue i ON i.id = q.issue_id
WHERE q.runtime_id IS NOT NULL
ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at);
SELECT rollup_task_usage_hourly_window(clock_timestamp(), clock_timestamp() + interval '1s')"""
# What an operator re-runs the repair for: a chain that did not finish (its last run stopped
# before the end, not reverted), or a run whose rollup is still pending, whatever became of
# its chain (a run that continued it may have been reverted since: the pre-flight's
# pending_rollups says so, and the next repair rebuilds those keys).
UNFINISHED_SQL = """
SELECT count(*) FROM codex_repair.backfill_run r
WHERE r.status <> 'reverted' AND (
    r.rollup_state = 'pending'
    OR (r.status IN ('running', 'interrupted', 'failed')
        AND NOT EXISTS (SELECT 1 FROM codex_repair.backfill_run c WHERE c.continues_id = r.id)))"""
RUNS_SQL = """
SELECT id, status, rollup_state, rows_updated, continues_id, left(error, 120)
FROM codex_repair.backfill_run ORDER BY id"""
LOCK_HOLDERS_SQL = """
SELECT l.pid, a.xact_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = 4246 AND l.granted
  AND a.application_name = %s AND a.datname = current_database()"""


@dataclass
class Row:
    """What the model knows of one usage row."""

    input: int
    cache_read: int
    eligible: bool
    rewritten: int | None = None  # ingestion's last input_tokens, once it rewrote the row
    deleted: bool = False
    created_by_ingestion: bool = False

    @property
    def fixed(self) -> int:
        return max(self.input - self.cache_read, 0)


@dataclass
class Outcome:
    schedule: Schedule
    violations: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    commands: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class Soak:
    """One database, many schedules."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.env = dict(os.environ, DATABASE_URL=url, PYTHONUNBUFFERED="1")
        self.env.pop("CODEX_ROLLUP_DECLARE", None)
        # What the neighbours of the current schedule saw go wrong (a command that hung).
        self.problems: list[str] = []

    # -- the database -------------------------------------------------------------------

    @classmethod
    @contextmanager
    def on_server(cls, server: str, name: str | None = None) -> Iterator[Soak]:
        """A fresh database on ``server`` with the fixture's schema and the tool's, dropped
        after."""
        from sandbox import target

        name = name or f"codex_soak_{os.getpid()}"
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{server}/{name}"
        try:
            with psycopg.connect(url) as conn, conn.cursor() as cursor:
                target.create_target_schema(cursor, "public")
            soak = cls(url)
            soak.manage("migrate", "--no-input", "-v", "0", check=True)
            yield soak
        finally:
            with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def manage(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """A command run to its end; one still running after COMMAND_TIMEOUT_SECONDS is
        killed and reported with exit status -9 ("hung")."""
        try:
            done = subprocess.run(
                [sys.executable, "manage.py", *args],
                cwd=PROJECT_DIR,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            hung = f"hung: still running after {COMMAND_TIMEOUT_SECONDS:g}s, killed"
            return subprocess.CompletedProcess(args, -9, "", hung)
        if check and done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done

    # -- one schedule -------------------------------------------------------------------

    def run(self, schedule: Schedule) -> Outcome:
        started = time.monotonic()
        outcome = Outcome(schedule)
        self.problems = []
        rng = random.Random(schedule.seed * 7919 + 1)
        with self.connect() as conn:
            conn.execute(TRUNCATE_SQL)
            conn.execute(RESET_STATE_SQL)
            rows, cutoff = seed(conn, schedule, rng)
        sampler = LockSampler(self.url)
        sampler.start()
        try:
            for _, step in schedule.numbered():
                self.step(step, cutoff, rows, rng, outcome)
            self.recover(cutoff, outcome)
        finally:
            sampler.stop()
        budget = max((s.lock_budget for _, s in schedule.numbered()), default=5.0)
        if sampler.longest > budget + LOCK_SLACK_SECONDS:
            outcome.violations.append(
                f"lock 4246 held {sampler.longest:.2f}s by the tool (budget {budget:g}s)"
            )
        outcome.violations.extend(self.problems)
        outcome.violations.extend(check(self, rows))
        outcome.seconds = time.monotonic() - started
        return outcome

    def step(
        self, step: Step, cutoff: str, rows: dict[str, Row], rng: random.Random, outcome: Outcome
    ) -> None:
        args = self.command_args(step, cutoff)
        if args is None:
            return
        stop = threading.Event()
        threads = [
            threading.Thread(target=NEIGHBOUR[name], args=(self, rows, rng.random(), stop, cutoff))
            for name in step.neighbours
        ]
        for thread in threads:
            thread.start()
        try:
            outcome.commands += 1
            fired, hung = run_with_fault(self, args, step)
            if fired:
                outcome.faults.append(fired)
            if hung:
                outcome.violations.append(
                    f"{step.describe()}: still running after {COMMAND_TIMEOUT_SECONDS:g}s "
                    f"(killed){', after ' + fired if fired else ''}"
                )
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

    def command_args(self, step: Step, cutoff: str) -> list[str] | None:
        budget = ["--max-rollup-lock-seconds", f"{step.lock_budget:g}"]
        if step.command == "execute":
            budget += ["--sleep-between-batches", f"{step.sleep_ms}ms"]
            return [
                "backfill_codex_usage_cache", "--cutoff", cutoff, "--execute",
                "--batch-size", str(step.batch_size), *budget,
            ]  # fmt: skip
        run_id = self.latest_run(reverted=step.command == "verify")
        if run_id is None:
            return None
        if step.command == "revert":
            return [
                "revert_codex_usage_backfill", str(run_id), "--execute",
                "--batch-size", str(step.batch_size), *budget,
            ]  # fmt: skip
        return ["backfill_codex_usage_cache", "--verify", "--run-id", str(run_id)]

    def latest_run(self, reverted: bool) -> int | None:
        with self.connect() as conn:
            found = conn.execute(
                "SELECT max(id) FROM codex_repair.backfill_run"
                + ("" if reverted else " WHERE status <> 'reverted'")
            ).fetchone()
        return found[0] if found else None

    def recover(self, cutoff: str, outcome: Outcome) -> None:
        """Finish what the schedule left: a revert that stopped, then a repair that did."""
        for _ in range(4):
            with self.connect() as conn:
                half_reverted = conn.execute(
                    "SELECT r.id FROM codex_repair.backfill_run r WHERE r.status <> 'reverted'"
                    " AND EXISTS (SELECT 1 FROM codex_repair.backfill_journal j"
                    " WHERE j.run_id = r.id AND j.reverted_at IS NOT NULL) ORDER BY r.id"
                ).fetchall()
                unfinished = conn.execute(UNFINISHED_SQL).fetchone()[0]
            if half_reverted:
                run_id = str(half_reverted[0][0])
                done = self.manage("revert_codex_usage_backfill", run_id, "--execute")
            elif unfinished:
                done = self.manage("backfill_codex_usage_cache", "--cutoff", cutoff, "--execute")
            else:
                return
            outcome.commands += 1
            if done.returncode not in (0, 1):
                outcome.violations.append(
                    f"recovery exited {done.returncode}: {last_line(done.stderr)}"
                )
        outcome.violations.append("recovery did not finish every run in 4 commands")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# -- the dataset --------------------------------------------------------------------------


def seed(conn: psycopg.Connection, schedule: Schedule, rng: random.Random) -> tuple[dict, str]:
    """The schedule's rows (the model of each) and its cutoff (two hours ago)."""
    d = schedule.dataset
    now = conn.execute("SELECT now()").fetchone()[0]
    cutoff = now - timedelta(hours=2)
    agents, issues = [], [None]
    for w in range(d.workspaces):
        workspace = uuid.uuid4()
        for n in range(d.agents):
            agent = uuid.uuid4()
            conn.execute(
                "INSERT INTO agent (id, workspace_id, name) VALUES (%s, %s, %s)",
                [agent, workspace, f"a{w}-{n}"],
            )
            agents.append((agent, [uuid.uuid4(), uuid.uuid4()]))
        for project in (uuid.uuid4(), None):
            issue = uuid.uuid4()
            conn.execute(
                "INSERT INTO issue (id, workspace_id, project_id) VALUES (%s, %s, %s)",
                [issue, workspace, project],
            )
            issues.append(issue)
    rows: dict[str, Row] = {}
    for _ in range(d.tasks):
        agent, runtimes = rng.choice(agents)
        task = uuid.uuid4()
        runtime = rng.choice([*runtimes, None]) if rng.random() < 0.2 else rng.choice(runtimes)
        conn.execute(
            "INSERT INTO agent_task_queue (id, agent_id, runtime_id, issue_id)"
            " VALUES (%s, %s, %s, %s)",
            [task, agent, runtime, rng.choice(issues)],
        )
        models = rng.sample(["gpt-5", "gpt-5-mini", "o4"], rng.randint(1, d.rows_per_task))
        for model in models:
            provider = "codex" if rng.random() < 0.85 else "claude"
            created = now - timedelta(hours=rng.uniform(2.5, 30))
            updated = None if rng.random() < 0.2 else created + timedelta(minutes=1)
            if rng.random() < 0.1:  # rewritten after the cutoff: already normalized
                updated = now - timedelta(minutes=rng.uniform(20, 60))
            input_tokens = rng.choice([0, 800, 5000, 40_000])
            cache_read = rng.choice([0, 300, 6000, 20_000])
            row_id = conn.execute(
                "INSERT INTO task_usage (task_id, provider, model, input_tokens, output_tokens,"
                " cache_read_tokens, cache_write_tokens, created_at, updated_at, cost_usd_ticks)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                [
                    task,
                    provider,
                    model,
                    input_tokens,
                    rng.randint(0, 900),
                    cache_read,
                    rng.randint(0, 90),
                    created,
                    updated,
                    None if rng.random() < 0.6 else rng.randint(0, 10**5),
                ],  # fmt: skip
            ).fetchone()[0]
            eligible = (
                provider == "codex"
                and cache_read > 0
                and input_tokens > 0
                and (updated or created) < cutoff
            )
            rows[str(row_id)] = Row(input_tokens, cache_read, eligible)
    # The platform rolled up everything written before the tick's watermark.
    conn.execute(
        "SELECT rollup_task_usage_hourly_window('-infinity', watermark_at)"
        " FROM task_usage_hourly_rollup_state"
    )
    return rows, cutoff.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- faults ---------------------------------------------------------------------------------


def run_with_fault(soak: Soak, args: list[str], step: Step) -> tuple[str, bool]:
    """Run one command; fire the step's fault when its moment comes. What fired (or ""),
    and whether the command hung (still running after COMMAND_TIMEOUT_SECONDS: killed)."""
    proc = subprocess.Popen(
        [sys.executable, "manage.py", *args, "--log-format", "json"]
        if "--verify" not in args
        else [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=soak.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    fault = step.fault
    fired = ""
    seen: dict[str, int] = {}

    def fire() -> str:
        assert fault is not None
        if fault.kind == "kill9":
            proc.kill()
        elif fault.kind == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif fault.kind == "sigint":
            proc.send_signal(signal.SIGINT)
        else:
            with soak.connect() as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()"
                    " AND datname = current_database()",
                    [APPLICATION],
                )
        return f"{step.command}: {fault.describe()}"

    timer = None
    if fault is not None and not fault.event:

        def delayed() -> None:
            nonlocal fired
            if proc.poll() is None:
                fired = fire()

        timer = threading.Timer(fault.delay, delayed)
        timer.start()
    hung = threading.Event()

    def watchdog() -> None:
        if proc.poll() is None:
            hung.set()
            proc.kill()

    deadline = threading.Timer(COMMAND_TIMEOUT_SECONDS, watchdog)
    deadline.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        if fault is None or fired or not fault.event:
            continue
        with suppress(ValueError):
            event = json.loads(line).get("event", "")
            seen[event] = seen.get(event, 0) + 1
            if event == fault.event and seen[event] == fault.nth:
                fired = fire()
    proc.wait()
    deadline.cancel()
    if timer is not None:
        timer.cancel()
    return fired, hung.is_set()


# -- neighbours -----------------------------------------------------------------------------

Neighbour = Callable[[Soak, dict[str, Row], float, threading.Event, str], None]


def _loop(stop: threading.Event, rng: random.Random, low: float, high: float) -> Iterator[int]:
    n = 0
    while not stop.wait(rng.uniform(low, high)) and n < 200:
        yield n
        n += 1


def ingestion(
    soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, _: str
) -> None:
    """New rows, and rewrites of existing ones (the platform's UPSERT: updated_at = now())."""
    rng = random.Random(seed)
    with soak.connect() as conn:
        for _n in _loop(stop, rng, 0.02, 0.2):
            ids = [k for k, r in rows.items() if not r.deleted]
            if ids and rng.random() < 0.7:
                row_id = rng.choice(ids)
                value = rng.randint(1, 90_000)
                done = conn.execute(
                    "UPDATE task_usage SET input_tokens = %s, updated_at = now() WHERE id = %s",
                    [value, row_id],
                ).rowcount
                if done:
                    rows[row_id].rewritten = value
            else:
                task = conn.execute(
                    "SELECT id FROM agent_task_queue ORDER BY random() LIMIT 1"
                ).fetchone()
                if task is None:
                    continue
                value = rng.randint(1, 90_000)
                found = conn.execute(
                    "INSERT INTO task_usage (task_id, provider, model, input_tokens,"
                    " cache_read_tokens) VALUES (%s, 'codex', %s, %s, 100)"
                    " ON CONFLICT (task_id, provider, model) DO UPDATE"
                    " SET input_tokens = EXCLUDED.input_tokens, updated_at = now()"
                    " RETURNING id",
                    [task[0], f"live-{rng.randint(0, 3)}", value],
                ).fetchone()
                key = str(found[0])
                if key in rows:
                    rows[key].rewritten = value
                else:
                    rows[key] = Row(value, 100, False, created_by_ingestion=True)


def moves(soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, _: str) -> None:
    """A task moved to another runtime, an issue to another project (the triggers queue)."""
    rng = random.Random(seed)
    with soak.connect() as conn:
        for _n in _loop(stop, rng, 0.1, 0.6):
            if rng.random() < 0.5:
                conn.execute(
                    "UPDATE agent_task_queue SET runtime_id = gen_random_uuid()"
                    " WHERE id = (SELECT id FROM agent_task_queue ORDER BY random() LIMIT 1)"
                )
            else:
                conn.execute(
                    "UPDATE issue SET project_id = CASE WHEN random() < 0.5 THEN NULL"
                    " ELSE gen_random_uuid() END"
                    " WHERE id = (SELECT id FROM issue ORDER BY random() LIMIT 1)"
                )


def deletes(soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, _: str) -> None:
    rng = random.Random(seed)
    with soak.connect() as conn:
        for _n in _loop(stop, rng, 0.2, 0.8):
            ids = [k for k, r in rows.items() if not r.deleted]
            if ids:
                row_id = rng.choice(ids)
                conn.execute("DELETE FROM task_usage WHERE id = %s", [row_id])
                rows[row_id].deleted = True


def cron_tick(
    soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, _: str
) -> None:
    rng = random.Random(seed)
    with soak.connect() as conn:
        for _n in _loop(stop, rng, 0.05, 1.5):
            conn.execute("SELECT rollup_task_usage_hourly()")


def row_locks(
    soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, _: str
) -> None:
    """Another session holding some rows (usage, hourly) locked for a while."""
    rng = random.Random(seed)
    with soak.connect() as conn:
        for _n in _loop(stop, rng, 0.1, 0.5):
            table = rng.choice(("task_usage", "task_usage_hourly"))
            with conn.transaction():
                conn.execute(
                    f"SELECT 1 FROM {table} ORDER BY random() LIMIT %s FOR UPDATE",
                    [rng.randint(1, 5)],
                )
                stop.wait(rng.uniform(0.2, 2.5))


def second_run(
    soak: Soak, rows: dict[str, Row], seed: float, stop: threading.Event, cutoff: str
) -> None:
    """A second operator starting the same repair meanwhile."""
    rng = random.Random(seed)
    if not stop.wait(rng.uniform(0.0, 1.5)):
        done = soak.manage("backfill_codex_usage_cache", "--cutoff", cutoff, "--execute")
        if done.returncode == -9:
            soak.problems.append(f"the second operator's execute {done.stderr}")


NEIGHBOUR: dict[str, Neighbour] = {
    "ingestion": ingestion,
    "moves": moves,
    "deletes": deletes,
    "cron_tick": cron_tick,
    "row_locks": row_locks,
    "second_run": second_run,
}


# -- lock 4246 ------------------------------------------------------------------------------


class LockSampler(threading.Thread):
    """Samples who of the tool's sessions holds lock 4246, every 20 ms: the longest hold of
    one transaction."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.longest = 0.0
        self.first_seen: dict[tuple[int, datetime], float] = {}

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.halt.wait(0.02):
                now = time.monotonic()
                for pid, xact_start in conn.execute(LOCK_HOLDERS_SQL, [APPLICATION]).fetchall():
                    first = self.first_seen.setdefault((pid, xact_start), now)
                    self.longest = max(self.longest, now - first)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# -- the invariants -------------------------------------------------------------------------


def check(soak: Soak, rows: dict[str, Row]) -> list[str]:
    """Every invariant of a finished schedule; what broke, in words."""
    violations: list[str] = []
    with soak.connect() as conn:
        wait_for_sessions(conn)
        # The platform's tick catches up: everything written up to now rolled up.
        conn.execute(
            "SELECT rollup_task_usage_hourly_window(watermark_at, clock_timestamp())"
            " FROM task_usage_hourly_rollup_state"
        )
        violations += check_rows(conn, rows)
        violations += check_runs(conn)
        hourly = conn.execute(HOURLY_SQL).fetchall()
        with conn.transaction(force_rollback=True):
            conn.execute(RECOMPUTE_EVERY_KEY_SQL)
            recomputed = conn.execute(HOURLY_SQL).fetchall()
        if hourly != recomputed:
            extra, missing = set(hourly) - set(recomputed), set(recomputed) - set(hourly)
            violations.append(
                f"hourly table differs from a recompute ({len(extra)} rows not as recomputed, "
                f"{len(missing)} recomputed rows absent); first of each: "
                f"{sorted(extra, key=str)[:1]} {sorted(missing, key=str)[:1]}"
            )
        if violations:
            violations.append(f"runs: {conn.execute(RUNS_SQL).fetchall()}")
        violations += check_leftovers(conn)
        heads = [
            run_id
            for (run_id,) in conn.execute(
                "SELECT id FROM codex_repair.backfill_run r WHERE NOT EXISTS"
                " (SELECT 1 FROM codex_repair.backfill_run c WHERE c.continues_id = r.id)"
                " ORDER BY id"
            ).fetchall()
        ]
    for run_id in heads:
        done = soak.manage("backfill_codex_usage_cache", "--verify", "--run-id", str(run_id))
        if done.returncode != 0:
            violations.append(
                f"verify of run {run_id} exited {done.returncode}: {last_line(done.stdout)}"
            )
    return violations


def wait_for_sessions(conn: psycopg.Connection, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [APPLICATION],
        ).fetchone()[0]
        if not left:
            return
        time.sleep(0.1)


def check_rows(conn: psycopg.Connection, rows: dict[str, Row]) -> list[str]:
    found = {
        str(row_id): value
        for row_id, value in conn.execute("SELECT id, input_tokens FROM task_usage").fetchall()
    }
    active: dict[str, int] = {}
    entries: dict[str, int] = {}
    for usage_id, reverted in conn.execute(
        "SELECT usage_id, reverted_at IS NOT NULL FROM codex_repair.backfill_journal"
    ).fetchall():
        entries[str(usage_id)] = entries.get(str(usage_id), 0) + 1
        if not reverted:
            active[str(usage_id)] = active.get(str(usage_id), 0) + 1
    problems = []
    for row_id, row in rows.items():
        if row.deleted or row_id not in found:
            continue
        value = found[row_id]
        if active.get(row_id, 0) > 1:
            problems.append(f"row {row_id} has {active[row_id]} unreverted repairs")
        if row.rewritten is not None:
            if value != row.rewritten:
                problems.append(
                    f"row {row_id}: ingestion wrote {row.rewritten}, the row holds {value}"
                )
        elif not row.eligible:
            if value != row.input or entries.get(row_id):
                problems.append(
                    f"row {row_id} was not eligible but changed ({row.input}->{value})"
                )
        elif active.get(row_id):
            if value != row.fixed:
                problems.append(
                    f"row {row_id} journaled as repaired holds {value}, not {row.fixed}"
                )
        elif value != row.input:
            problems.append(
                f"row {row_id} not repaired (or restored) holds {value}, not {row.input}"
            )
    return problems[:10]


def check_runs(conn: psycopg.Connection) -> list[str]:
    problems = []
    for run_id, status, rollup_state, rows_updated, journaled, error in conn.execute(
        "SELECT r.id, r.status, r.rollup_state, r.rows_updated,"
        " (SELECT count(*) FROM codex_repair.backfill_journal j WHERE j.run_id = r.id), r.error"
        " FROM codex_repair.backfill_run r ORDER BY r.id"
    ).fetchall():
        if status == "running":
            problems.append(f"run {run_id} is still 'running'")
        if rows_updated != journaled:
            problems.append(f"run {run_id} says {rows_updated} rows, its journal has {journaled}")
        if status == "succeeded" and rollup_state == "pending":
            problems.append(f"run {run_id} succeeded with its rollup pending")
        if status in ("failed", "interrupted") and not error:
            problems.append(f"run {run_id} is {status} without an error")
    return problems


def check_leftovers(conn: psycopg.Connection) -> list[str]:
    problems = []
    sessions = conn.execute(
        "SELECT state, left(query, 120), now() - backend_start FROM pg_stat_activity"
        " WHERE application_name = %s AND datname = current_database()",
        [APPLICATION],
    ).fetchall()
    if sessions:
        problems.append(f"{len(sessions)} sessions of the tool left: {sessions}")
    locks = conn.execute(
        "SELECT l.objid, l.granted, a.application_name FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchall()
    if locks:
        problems.append(f"{len(locks)} advisory locks left held: {locks}")
    temps = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relpersistence = 't' AND n.nspname NOT LIKE 'pg_toast%%'"
    ).fetchone()[0]
    if temps:
        problems.append(f"{temps} temporary relations left")
    return problems
