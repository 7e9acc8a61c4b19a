"""A chaos schedule, drawn from a seed: a dataset, the commands to run as real processes, a
fault for some of them, and the neighbours that run beside each.

Everything here is data; ``chaos.soak`` carries it out. The same seed always draws the same
schedule (what the processes and threads then interleave is the machine's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

# How a fault stops the command, and when: on the n-th occurrence of one of its JSON log
# events (``--log-format json``), or a delay after it starts when ``event`` is "".
FAULT_KINDS = ("kill9", "sigterm", "sigint", "terminate_backend")
FAULT_EVENTS = ("", "start", "planned", "batch", "stamped", "rollup_path", "rollup_slice")
# Events that come more than once in a run.
REPEATED_EVENTS = ("batch", "rollup_slice")
# The neighbours: the platform's ingestion (new rows, and rewrites of existing ones, some
# repaired), a task moved to another runtime or project, rows deleted, the platform's cron
# tick, another session holding row locks for a while, and a concurrent second run.
NEIGHBOURS = ("ingestion", "moves", "deletes", "cron_tick", "row_locks", "second_run")
COMMANDS = ("execute", "revert", "verify")


@dataclass(frozen=True)
class Dataset:
    workspaces: int
    agents: int
    tasks: int
    rows_per_task: int


@dataclass(frozen=True)
class Fault:
    kind: str
    event: str
    nth: int
    delay: float

    def describe(self) -> str:
        at = f"{self.event} #{self.nth}" if self.event else f"{self.delay:.2f}s"
        return f"{self.kind} at {at}"


@dataclass(frozen=True)
class Step:
    command: str
    batch_size: int
    lock_budget: float
    sleep_ms: int
    fault: Fault | None
    neighbours: tuple[str, ...]

    def describe(self) -> str:
        fault = f", {self.fault.describe()}" if self.fault else ""
        around = f", with {'+'.join(self.neighbours)}" if self.neighbours else ""
        return (
            f"{self.command} (batch {self.batch_size}, sleep {self.sleep_ms}ms, "
            f"budget {self.lock_budget:g}s{fault}{around})"
        )


@dataclass(frozen=True)
class Schedule:
    seed: int
    dataset: Dataset
    steps: tuple[Step, ...]
    kept: tuple[int, ...] | None = field(default=None)

    def describe(self) -> str:
        steps = "; ".join(f"{n}: {step.describe()}" for n, step in self.numbered())
        d = self.dataset
        return (
            f"seed {self.seed}: {d.workspaces} workspaces, {d.agents} agents, {d.tasks} tasks, "
            f"up to {d.rows_per_task} rows a task; {steps}"
        )

    def numbered(self) -> list[tuple[int, Step]]:
        return [
            (n, step) for n, step in enumerate(self.steps) if self.kept is None or n in self.kept
        ]

    def keeping(self, kept: tuple[int, ...]) -> Schedule:
        return replace(self, kept=kept)

    def without_neighbours_and_faults(self, n: int) -> Schedule:
        steps = list(self.steps)
        steps[n] = replace(steps[n], neighbours=(), fault=None)
        return replace(self, steps=tuple(steps))


def draw(seed: int) -> Schedule:
    """The schedule of ``seed``."""
    rng = random.Random(seed)
    dataset = Dataset(
        workspaces=rng.randint(1, 2),
        agents=rng.randint(2, 4),
        tasks=rng.randint(8, 40),
        rows_per_task=rng.randint(1, 3),
    )
    steps = [_step(rng, "execute")]
    for _ in range(rng.randint(1, 3)):
        steps.append(_step(rng, rng.choices(COMMANDS, weights=(5, 3, 2))[0]))
    return Schedule(seed, dataset, tuple(steps))


def _step(rng: random.Random, command: str) -> Step:
    fault = None
    if command != "verify" and rng.random() < 0.6:
        event = rng.choice(FAULT_EVENTS)
        fault = Fault(
            kind=rng.choice(FAULT_KINDS),
            event=event,
            nth=rng.randint(1, 3) if event in REPEATED_EVENTS else 1,
            delay=rng.uniform(0.4, 1.6),
        )
    neighbours = tuple(n for n in NEIGHBOURS if rng.random() < 0.3)
    return Step(
        command=command,
        batch_size=rng.choice((3, 7, 20, 50)),
        lock_budget=rng.choice((1.0, 2.0, 5.0)),
        sleep_ms=rng.choice((0, 0, 20, 100)),
        fault=fault,
        neighbours=neighbours,
    )
