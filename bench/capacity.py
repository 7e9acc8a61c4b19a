"""What repairing 10 and 100 million candidate rows would take, from a benchmark's figures.

Reads the JSON of ``bench/run.py`` and projects, per dataset shape, from its largest size:
the tool's update phase and rollup phase (time per candidate), the two floors (the one-shot
UPDATE and the aggregate-first recompute, per candidate), the snapshot's temp space, the
journal and the WAL (bytes per candidate). A projection, not a measurement: each cost is
taken as linear in what it counts, which the sizes measured bear out within the spread the
scaling table shows.

With a (g) run, the same projection is made at its budget from its own figures. It also
says what breaks first. A slice of the own rollup is at least one bucket hour of
usage rows: the projection compares the rows of an hour (the table's rows over the hours of
its history) with what a slice reads in 70 % of the lock budget at the measured rate. An
hour that does not fit goes through the platform's function instead (its keys a window of
stamps at a time, at the function's measured cost a key).

    python bench/capacity.py bench/results/2026-12-03-own-rollup.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = (10_000_000, 100_000_000)
GIB = 1024**3
TARGET_LOCK_FRACTION = 0.7  # usage.repair.rollup.slices.TARGET_LOCK_FRACTION
# The datasets spread their rows over 60 days of history and 7 after the cutoff.
HISTORY_HOURS = 67 * 24


def projection(size: dict[str, Any], candidates: int, budget: float) -> dict[str, Any]:
    """At ``budget``: from (c)'s figures, or (g)'s when it ran with that budget."""
    r = size["results"]
    t = dict(r["tool"])
    g = r.get("small_budget")
    if g is not None and g["budget"] == budget and budget != size["max_rollup_lock_seconds"]:
        t.update(
            seconds=g["update_seconds"],
            rollup_seconds=g["rollup_seconds"],
            execute_seconds=g["execute_seconds"],
            per_plan=g["per_plan"],
        )
    n = size["candidates"]
    scale = candidates / n
    table_rows = size["rows"] * scale
    own = t["per_plan"].get("own", {})
    rows_per_second = own["rows"] / own["held_seconds"] if own.get("held_seconds") else None
    hour_rows = table_rows / HISTORY_HOURS
    hour_seconds = hour_rows / rows_per_second if rows_per_second else None
    fits = hour_seconds is not None and hour_seconds <= TARGET_LOCK_FRACTION * budget
    floors = r["floor"]["seconds"] + r["floor_rollup"]["seconds"]
    return {
        "candidates": candidates,
        "table_rows": table_rows,
        "update_hours": t["seconds"] * scale / 3600,
        "rollup_hours": t["rollup_seconds"] * scale / 3600,
        "execute_hours": t["execute_seconds"] * scale / 3600,
        "floors_hours": floors * scale / 3600,
        "snapshot_gib": t["snapshot_bytes"] * scale / GIB,
        "journal_gib": t["journal_bytes"] * scale / GIB,
        "wal_gib": t["wal_bytes"] * scale / GIB,
        "keys": t["rollup_keys"] * scale,
        "hour_rows": hour_rows,
        "hour_seconds": hour_seconds,
        "hour_fits": fits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a bench/run.py result")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    shapes: dict[str, dict[str, Any]] = {}
    for size in report["sizes"]:
        if "tool" in size["results"] and "floor_rollup" in size["results"]:
            best = shapes.get(size["shape"])
            if best is None or size["rows"] > best["rows"]:
                shapes[size["shape"]] = size
    out = sys.stdout
    for shape, size in shapes.items():
        r = size["results"]
        t = r["tool"]
        n = size["candidates"]
        own = t["per_plan"].get("own", {})
        rate = own["rows"] / own["held_seconds"] if own.get("held_seconds") else 0
        out.write(
            f"\n{shape}, from {size['rows']:,} rows ({n:,} candidates): "
            f"execute {t['execute_seconds'] / n * 1e6:.1f} us/candidate (update "
            f"{t['seconds'] / n * 1e6:.1f}, rollup {t['rollup_seconds'] / n * 1e6:.1f}); floors "
            f"{(r['floor']['seconds'] + r['floor_rollup']['seconds']) / n * 1e6:.1f} us "
            f"(UPDATE {r['floor']['seconds'] / n * 1e6:.1f}, recompute "
            f"{r['floor_rollup']['seconds'] / n * 1e6:.1f}); snapshot "
            f"{t['snapshot_bytes'] / n:.0f} B, journal {t['journal_bytes'] / n:.0f} B, WAL "
            f"{t['wal_bytes'] / n:.0f} B per candidate; own slices read {rate:,.0f} rows/s of "
            "hold\n"
        )
        budgets = [size["max_rollup_lock_seconds"]]
        if "small_budget" in r:
            budgets.append(r["small_budget"]["budget"])
        for budget in budgets:
            for candidates in TARGETS:
                p = projection(size, candidates, budget)
                fit = (
                    "fits a slice"
                    if p["hour_fits"]
                    else "does NOT fit a slice: its keys go through the function"
                )
                out.write(
                    f"  {candidates:>11,} candidates (table ~{p['table_rows'] / 1e6:,.0f}M "
                    f"rows), budget {budget:g} s: execute {p['execute_hours']:.2f} h "
                    f"(update {p['update_hours']:.2f} h, rollup {p['rollup_hours']:.2f} h) "
                    f"against the floors' {p['floors_hours']:.2f} h "
                    f"({p['execute_hours'] / p['floors_hours']:.2f}x); snapshot "
                    f"{p['snapshot_gib']:.1f} GiB temp; journal {p['journal_gib']:.1f} GiB; "
                    f"WAL {p['wal_gib']:.0f} GiB; an hour ~{p['hour_rows']:,.0f} rows, "
                    f"~{p['hour_seconds'] or 0:.1f} s of a slice: {fit}\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
