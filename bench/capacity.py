"""What repairing 100 million and a billion candidate rows would take, from a benchmark's figures.

Reads the JSON of ``bench/run.py`` and projects, per dataset shape, from its largest size:
the tool's update phase and rollup phase (time per candidate), the two floors (the one-shot
UPDATE and the aggregate-first recompute, per candidate), the snapshot's temp space, the
journal and the WAL (bytes per candidate). A projection, not a measurement. Times follow the
slope between the two largest sizes measured: the growth of the time per candidate from one
to the other is applied again for each further tenfold (with two sizes ten times apart, the
growth per tenfold). Bytes are taken as linear.

With a (g) run, the same projection is made at its budget from its own figures. It also
says what breaks first. An hour whose rows do not fit a slice of the own rollup (70 % of the
lock budget at the measured rate) is recomputed in parts of its agents; only one agent's
rows of one hour that do not fit a part go through the platform's function. The datasets
grow their agents with their rows, so an agent's rows of an hour stay the same at any size.

    python bench/capacity.py bench/results/2026-12-03-own-rollup.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TARGETS = (100_000_000, 1_000_000_000)
GIB = 1024**3
TARGET_LOCK_FRACTION = 0.7  # usage.repair.rollup.slices.TARGET_LOCK_FRACTION
# The datasets spread their rows over 60 days of history and 7 after the cutoff.
HISTORY_HOURS = 67 * 24


def growth(smaller: dict[str, Any] | None, size: dict[str, Any], seconds: Any) -> float:
    """How much ``seconds(size)`` per candidate grows for each tenfold, from ``smaller``."""
    if smaller is None:
        return 1.0
    ratio = (seconds(size) / size["candidates"]) / (seconds(smaller) / smaller["candidates"])
    decades = math.log10(size["candidates"] / smaller["candidates"])
    return max(ratio, 0.0) ** (1 / decades) if decades > 0 else 1.0


def projection(
    size: dict[str, Any], candidates: int, budget: float, smaller: dict[str, Any] | None = None
) -> dict[str, Any]:
    """At ``budget``: from (c)'s figures, or (g)'s when it ran with that budget; times
    follow the slope from ``smaller`` when given."""
    r = size["results"]
    t = dict(r["tool"])
    g = r.get("small_budget")
    key = "tool"
    if g is not None and g["budget"] == budget and budget != size["max_rollup_lock_seconds"]:
        key = "small_budget"
        t.update(
            seconds=g["update_seconds"],
            rollup_seconds=g["rollup_seconds"],
            execute_seconds=g["execute_seconds"],
            per_plan=g["per_plan"],
        )
    n = size["candidates"]
    scale = candidates / n
    decades = math.log10(scale)

    def slope(seconds: Any) -> float:
        return scale * growth(smaller, size, seconds) ** decades

    execute_scale = slope(lambda s: s["results"][key]["execute_seconds"])
    floors_scale = slope(
        lambda s: s["results"]["floor"]["seconds"] + s["results"]["floor_rollup"]["seconds"]
    )
    table_rows = size["rows"] * scale
    own = t["per_plan"].get("own", {})
    rows_per_second = own["rows"] / own["held_seconds"] if own.get("held_seconds") else None
    hour_rows = table_rows / HISTORY_HOURS
    hour_seconds = hour_rows / rows_per_second if rows_per_second else None
    target = TARGET_LOCK_FRACTION * budget
    agent_rows = hour_rows / (size["agents"] * scale)
    agent_seconds = agent_rows / rows_per_second if rows_per_second else None
    floors = r["floor"]["seconds"] + r["floor_rollup"]["seconds"]
    return {
        "candidates": candidates,
        "table_rows": table_rows,
        "update_hours": t["seconds"] * execute_scale / 3600,
        "rollup_hours": t["rollup_seconds"] * execute_scale / 3600,
        "execute_hours": t["execute_seconds"] * execute_scale / 3600,
        "floors_hours": floors * floors_scale / 3600,
        "snapshot_gib": t["snapshot_bytes"] * scale / GIB,
        "journal_gib": t["journal_bytes"] * scale / GIB,
        "wal_gib": t["wal_bytes"] * scale / GIB,
        "keys": t["rollup_keys"] * scale,
        "hour_rows": hour_rows,
        "hour_seconds": hour_seconds,
        "hour_parts": math.ceil(hour_seconds / target) if hour_seconds else 1,
        "agent_rows": agent_rows,
        "agent_fits": agent_seconds is not None and agent_seconds <= target,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a bench/run.py result")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    shapes: dict[str, list[dict[str, Any]]] = {}
    for size in report["sizes"]:
        if "tool" in size["results"] and "floor_rollup" in size["results"]:
            shapes.setdefault(size["shape"], []).append(size)
    out = sys.stdout
    for shape, sizes in shapes.items():
        sizes.sort(key=lambda s: s["rows"])
        size, smaller = sizes[-1], (sizes[-2] if len(sizes) > 1 else None)
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
                p = projection(size, candidates, budget, smaller)
                fit = (
                    f"{p['hour_parts']} part(s) of its agents (one agent's rows of the hour, "
                    f"~{p['agent_rows']:,.0f}, "
                    + ("fit a part)" if p["agent_fits"] else "do NOT fit: the function)")
                )
                out.write(
                    f"  {candidates:>11,} candidates (table ~{p['table_rows'] / 1e6:,.0f}M "
                    f"rows), budget {budget:g} s: execute {p['execute_hours']:.2f} h "
                    f"(update {p['update_hours']:.2f} h, rollup {p['rollup_hours']:.2f} h) "
                    f"against the floors' {p['floors_hours']:.2f} h "
                    f"({p['execute_hours'] / p['floors_hours']:.2f}x); snapshot "
                    f"{p['snapshot_gib']:.1f} GiB temp; journal {p['journal_gib']:.1f} GiB; "
                    f"WAL {p['wal_gib']:.0f} GiB; an hour ~{p['hour_rows']:,.0f} rows, "
                    f"~{p['hour_seconds'] or 0:.1f} s of hold: {fit}\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
