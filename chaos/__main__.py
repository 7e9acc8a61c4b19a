"""Run the chaos soak: ``python -m chaos --schedules 1000 --seed 1``.

Each schedule is drawn from its own seed (``--seed`` the first, then the next ones); a failing
schedule prints its seed, its violations and the command that replays it, then shrinks to the
fewest steps (without their faults and neighbours where it still fails) and prints that too.
Exits 1 when any schedule failed. See the README, "The chaos soak".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The tool's settings read the environment; the soak itself needs none of them.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")

SERVER = os.environ.get("CODEX_SOAK_SERVER", "postgresql://postgres@127.0.0.1:5432")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=20, help="how many (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="the first schedule's seed")
    parser.add_argument("--keep", default="", help="replay only these steps (e.g. 0,2)")
    parser.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    parser.add_argument(
        "--server", default=SERVER, help=f"the PostgreSQL server (default {SERVER})"
    )
    args = parser.parse_args(argv)

    import django

    django.setup()
    from chaos.schedule import draw
    from chaos.soak import Soak

    started = time.monotonic()
    failed = ran = faults = commands = 0
    with Soak.on_server(args.server) as soak:
        for seed in range(args.seed, args.seed + args.schedules):
            schedule = draw(seed)
            if args.keep:
                schedule = schedule.keeping(tuple(int(n) for n in args.keep.split(",")))
            outcome = soak.run(schedule)
            ran += 1
            faults += len(outcome.faults)
            commands += outcome.commands
            status = "ok" if outcome.ok else "FAILED"
            print(
                f"schedule {seed}: {status} in {outcome.seconds:.1f}s, {outcome.commands} "
                f"commands, faults: {', '.join(outcome.faults) or 'none'}",
                flush=True,
            )
            if outcome.ok:
                continue
            failed += 1
            print(f"  schedule: {schedule.describe()}")
            for violation in outcome.violations:
                print(f"  violation: {violation}")
            print(f"  replay: python -m chaos --schedules 1 --seed {seed}", flush=True)
            if not args.no_shrink:
                shrunk = shrink(soak, schedule)
                if shrunk is not None:
                    kept = ",".join(str(n) for n, _ in shrunk.numbered())
                    print(f"  shrunk: {shrunk.describe()}")
                    print(f"  replay shrunk: python -m chaos --schedules 1 --seed {seed} "
                          f"--keep {kept}", flush=True)  # fmt: skip
    seconds = time.monotonic() - started
    print(
        f"{ran} schedules, {commands} commands, {faults} faults fired, {failed} failed, "
        f"in {seconds:.0f}s"
    )
    return 1 if failed else 0


def shrink(soak: object, schedule: object) -> object | None:
    """The shortest prefix-free subset of steps that still fails (each removal tried once,
    kept when the schedule still fails); None when nothing smaller failed."""
    from chaos.schedule import Schedule
    from chaos.soak import Soak

    assert isinstance(soak, Soak) and isinstance(schedule, Schedule)
    current = schedule
    smaller = None
    for n, _ in list(schedule.numbered()):
        kept = tuple(k for k, _ in current.numbered() if k != n)
        if not kept:
            continue
        candidate = current.keeping(kept)
        if not soak.run(candidate).ok:
            current = smaller = candidate
    return smaller


if __name__ == "__main__":
    sys.exit(main())
