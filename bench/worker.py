"""Measurements that must run in the tool's own process, on one copy (``DATABASE_URL``).

``bench/run.py`` starts this script once per measurement, so each one runs the real library
code (``usage.repair.summary.load_summary``) through Django's connection, exactly as the command
would, and reports one JSON object on stdout.

    python bench/worker.py summary --cutoff 2026-06-13T08:00:00Z --repeat 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The checkout under test (run.py --tool-root) comes first, so its ``usage`` is the one run.
for _path in (ROOT, Path(os.environ.get("BENCH_TOOL_ROOT", ROOT)).resolve()):
    if str(_path) in sys.path:
        sys.path.remove(str(_path))
    sys.path.insert(0, str(_path))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402

from bench.variants import ORIGINAL_SUMMARY_SQL, PLAIN_AGGREGATE_SQL  # noqa: E402
from usage import options  # noqa: E402
from usage.eligibility import compose, eligible_params  # noqa: E402
from usage.output.table import TABLE_GROUP_LIMIT  # noqa: E402
from usage.repair.summary import load_summary  # noqa: E402

logger = logging.getLogger("bench.worker")


def summary(cutoff_text: str, repeat: int) -> dict[str, Any]:
    """The dry run's query (load_summary) against one plain aggregate, alternately.

    The original tool's dry-run query is timed too, as a second reference. All run read-only
    on the same connection; each is run once untimed first so none pays for a cold cache,
    then ``repeat`` times each, in turn. Medians are reported.
    """
    cutoff = options.parse_cutoff(cutoff_text)
    params = eligible_params(cutoff, None)
    # As the command calls it for its default table output.
    keep = TABLE_GROUP_LIMIT
    plain_sql = compose(PLAIN_AGGREGATE_SQL)

    def plain() -> tuple[int, int, int, int]:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute(plain_sql, params)
            return tuple(int(v) for v in cursor.fetchone())

    def original() -> int:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute(ORIGINAL_SUMMARY_SQL, {"cutoff": cutoff, "workspace": ""})
            return len(cursor.fetchall())

    def timed(function: Any, samples: list[float]) -> Any:
        started = time.monotonic()
        value = function()
        samples.append(time.monotonic() - started)
        return value

    load_summary(cutoff, None, max_groups=keep)
    plain()
    original()
    summary_times: list[float] = []
    plain_times: list[float] = []
    original_times: list[float] = []
    result = None
    totals: tuple[int, int, int, int] = (0, 0, 0, 0)
    for _ in range(repeat):
        result = timed(lambda: load_summary(cutoff, None, max_groups=keep), summary_times)
        totals = timed(plain, plain_times)
        timed(original, original_times)
    assert result is not None
    t = result.totals
    return {
        "summary_seconds": statistics.median(summary_times),
        "plain_seconds": statistics.median(plain_times),
        "original_seconds": statistics.median(original_times),
        "summary_samples": summary_times,
        "plain_samples": plain_times,
        "original_samples": original_times,
        "groups": getattr(result, "group_count", len(result.groups)),
        "rows": t.rows,
        "rollup_keys": t.rollup_keys,
        "totals_agree": (t.rows, t.input_before, t.input_after, t.clamped_rows) == totals,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_summary = sub.add_parser("summary")
    p_summary.add_argument("--cutoff", required=True)
    p_summary.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    out = summary(args.cutoff, args.repeat)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
