"""The figures of a ``bench/run.py`` result as Markdown tables, for ``BENCHMARKS.md``.

Reads the JSON the benchmark wrote and prints, per dataset shape, one summary line per size
(the issue's measures side by side), then each size's full table and its targets, exactly as
the run printed them. Nothing is measured here, so the document can be regenerated from the
committed JSON:

    python bench/markdown.py bench/results/2026-12-03-own-rollup.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

SUMMARY_HEADER = (
    "| rows | candidates | hourly keys | UPDATE, s | floor recompute, s | update, s "
    "| rollup, s | rollup / floor | execute, s | execute / floors | execute at 1 s budget, s "
    "| default call, s | longest 4246 hold, s (tool / pg_locks) | longest try-lock refusal, s "
    "| cron ticks (skipped, in a row) | next tick, s (rows) |"
)
SUMMARY_COLUMNS = 16


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def summary_line(size: dict[str, Any]) -> str:
    r = size["results"]
    t = r["tool"]
    floor = r["floor"]["seconds"]
    recompute = r.get("floor_rollup", {}).get("seconds")
    floors = floor + recompute if recompute is not None else None
    d = r.get("default_call")
    default = "-" if d is None else _s(d["seconds"], 1) + (" (sampled)" if d["sampled"] else "")
    g = r.get("small_budget")
    small = "-"
    if g is not None:
        small = f"{_s(g['execute_seconds'])} ({_x(g['execute_seconds'], t['execute_seconds'])})"
    return (
        f"| {size['rows']:,} | {size['candidates']:,} | {t['rollup_keys']:,} | {_s(floor)} "
        f"| {_s(recompute)} | {_s(t['seconds'])} | {_s(t['rollup_seconds'])} "
        f"| {_x(t['rollup_seconds'], recompute)} | {_s(t['execute_seconds'])} "
        f"| {_x(t['execute_seconds'], floors)} | {small} | {default} "
        f"| {_s(t['max_lock_held_seconds'])} / {_s(t.get('lock_observed_seconds'))} "
        f"| {_s(t['try_lock_longest_refusal_seconds'])} "
        f"| {t['cron_ticks']} ({t['cron_ticks_skipped']}, {t['cron_ticks_skipped_in_a_row']}) "
        f"| {_s(t['next_tick_hold_seconds'], 3)} ({t['next_tick_rows']:,}) |"
    )


def detail_table(size: dict[str, Any], out: TextIO) -> None:
    out.write(
        "| | variant | seconds | ratio | rows/s | peak MB | max 4246 hold, s "
        "| seen in pg_locks, s | note |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    for line in size["table"]:
        ratio = "-" if line["ratio"] is None else f"{line['ratio']:.2f}x"
        rate = "-" if line["rows_per_second"] is None else f"{line['rows_per_second']:,.0f}"
        mb = "-" if line["peak_mb"] is None else f"{line['peak_mb']:.0f}"
        out.write(
            f"| {line['phase']} | {line['variant'].strip()} | {_s(line['seconds'])} | {ratio} "
            f"| {rate} | {mb} | {_s(line['max_lock_seconds'], 3)} "
            f"| {_s(line['lock_observed_seconds'], 3)} | {line['note']} |\n"
        )


def targets_table(size: dict[str, Any], out: TextIO) -> None:
    out.write("| target | measured | limit | verdict |\n|---|---:|---|---|\n")
    for t in size["targets"]:
        if t["verdict"] == "n/a":
            continue
        out.write(f"| {t['target']} | {_s(t['measured'], 3)} | {t['limit']} | {t['verdict']} |\n")


def render(report: dict[str, Any], out: TextIO) -> None:
    shapes: dict[str, list[dict[str, Any]]] = {}
    for size in report["sizes"]:
        shapes.setdefault(size["shape"], []).append(size)
    for shape, sizes in shapes.items():
        out.write(f"\n### Shape `{shape}`: the issue's measures\n\n{SUMMARY_HEADER}\n")
        out.write("|" + "---:|" * SUMMARY_COLUMNS + "\n")
        for size in sizes:
            out.write(summary_line(size) + "\n")
    for shape, sizes in shapes.items():
        for size in sizes:
            out.write(
                f"\n### `{shape}`, {size['rows']:,} rows ({size['agents']:,} agents, "
                f"{size['tasks']:,} tasks, {size['candidates']:,} candidates)\n\n"
            )
            detail_table(size, out)
            out.write("\n")
            targets_table(size, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a bench/run.py result")
    args = parser.parse_args(argv)
    render(json.loads(args.json.read_text()), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
