"""What repairing 10 and 100 million candidate rows would take, from a benchmark's figures.

Reads the JSON of ``bench/run.py`` and projects, per dataset shape, from its largest size:
the update phase (time per candidate), the snapshot's temp space, the journal and the WAL
(bytes per candidate), and the rollup (keys per candidate, and the time per key of the plan
that still fits a slice on a table that large). A projection, not a measurement: each cost
is taken as linear in what it counts, which the sizes measured bear out within the stated
spread; the table's total size (candidates are about 42 % of the rows in the datasets) is
what decides whether the whole-scan plan still fits a slice.

    python bench/capacity.py bench/results/final.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = (10_000_000, 100_000_000)
NESTLOOP_KEY_BASE = 60  # usage.repair.rollup.KEY_BASE_COST["nestloop"]
GIB = 1024**3


def projection(size: dict[str, Any], candidates: int) -> dict[str, Any]:
    t = size["results"]["tool"]
    n = size["candidates"]
    rows_per_candidate = size["rows"] / n
    table_rows = candidates * rows_per_candidate
    keys_per_candidate = t["rollup_keys"] / n
    plans = t["per_plan"]
    hash_ = plans.get("hash")
    nested = plans.get("nestloop")
    budget = size["max_rollup_lock_seconds"]
    # The whole scans grow with the table: the shortest hashed slice measured is nearly all
    # scan; scaled to the projected table, does it still fit 70 % of the budget?
    scan = hash_["shortest_hold_seconds"] * table_rows / size["rows"] if hash_ else None
    hash_fits = scan is not None and scan < 0.7 * budget
    keys = candidates * keys_per_candidate
    scale = candidates / n
    if hash_fits:
        seconds = hash_["held_seconds"] / hash_["keys"] * keys
        slices = hash_["slices"] * scale
        plan = "hash"
    else:
        # Only nested loops fit. A key costs 60 plus its agent's tasks in task units (the
        # cost model's), whatever the table's size; the measured nested-loop slices give the
        # seconds per unit, all the run's keys the units.
        units = sum(p["tasks"] + NESTLOOP_KEY_BASE * p["keys"] for p in plans.values())
        per_unit = nested["held_seconds"] / (nested["tasks"] + NESTLOOP_KEY_BASE * nested["keys"])
        seconds = units * per_unit * scale
        slices = seconds / (0.7 * budget)
        plan = "nestloop"
    # The neighbours' share: a 0.2 s gap after every slice.
    rollup_seconds = seconds + 0.2 * slices
    return {
        "candidates": candidates,
        "table_rows": table_rows,
        "update_hours": t["seconds"] / n * candidates / 3600,
        "snapshot_gib": t["snapshot_bytes"] / n * candidates / GIB,
        "journal_gib": t["journal_bytes"] / n * candidates / GIB,
        "wal_gib": t["wal_bytes"] / n * candidates / GIB,
        "keys": keys,
        "whole_scan_seconds": scan,
        "rollup_plan": plan,
        "rollup_hours": rollup_seconds / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a bench/run.py result")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    shapes: dict[str, dict[str, Any]] = {}
    for size in report["sizes"]:
        if "tool" in size["results"]:
            best = shapes.get(size["shape"])
            if best is None or size["rows"] > best["rows"]:
                shapes[size["shape"]] = size
    out = sys.stdout
    for shape, size in shapes.items():
        t = size["results"]["tool"]
        n = size["candidates"]
        out.write(
            f"\n{shape}, from {size['rows']:,} rows ({n:,} candidates): "
            f"update {t['seconds'] / n * 1e6:.0f} us/candidate, snapshot "
            f"{t['snapshot_bytes'] / n:.0f} B, journal {t['journal_bytes'] / n:.0f} B, "
            f"WAL {t['wal_bytes'] / n:.0f} B per candidate; "
            f"{t['rollup_keys'] / n:.2f} hourly keys per candidate\n"
        )
        for plan, p in t["per_plan"].items():
            out.write(
                f"  {plan}: {p['keys']:,} keys in {p['slices']} slices, {p['ms_per_key']:.2f} "
                f"ms a key, holds {p['shortest_hold_seconds']:.2f} to "
                f"{p['longest_hold_seconds']:.2f} s\n"
            )
        for candidates in TARGETS:
            p = projection(size, candidates)
            scan = "-" if p["whole_scan_seconds"] is None else f"{p['whole_scan_seconds']:.0f} s"
            out.write(
                f"  {candidates:>11,} candidates (table ~{p['table_rows'] / 1e6:,.0f}M rows): "
                f"update {p['update_hours']:.1f} h; snapshot {p['snapshot_gib']:.1f} GiB temp; "
                f"journal {p['journal_gib']:.1f} GiB; WAL {p['wal_gib']:.0f} GiB; "
                f"whole scan ~{scan} -> {p['rollup_plan']}: {p['keys'] / 1e6:.1f}M keys in "
                f"{p['rollup_hours']:.1f} h\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
