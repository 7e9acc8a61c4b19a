"""Rebuilding the hourly rollup for the rows a run changed, fast and in short lock slices.

Where each part lives:

* ``slices``: one slice transaction under lock 4246, the budget that bounds it, and the
  room left to the lock's other users (the cron tick, try-lock callers, a stop request).
* ``versions``: the definitions of the platform's function the tool recognises (by a
  fingerprint of their tokens), and the path a run takes.
* ``recompute``: the own path. For a recognised definition, keys are recomputed
  aggregate-first, a range of bucket hours a slice, after each run proved the recompute
  equal to the function on its first keys.
* ``function``: the function path, through ``rollup_task_usage_hourly_window`` itself, in
  slices of the repair's stamps planned by a measured cost model (nested loops or hashed),
  and the queue drains the revert uses.
* ``rebuild``: the callers' entry points, the repair's ``rebuild_keys`` and the revert's
  ``RevertDrains``, which take a run's path and go on through the function when the own
  path's proof fails.
"""

from __future__ import annotations

from usage.cron import ROLLUP_LOCK_ID
from usage.repair.rollup.function import QueueDrainer
from usage.repair.rollup.rebuild import RevertDrains, rebuild_keys
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    LOCK_CAP_SLACK_SECONDS,
    MAX_SLICE_GROWTH,
    NeighbourOptions,
    RollupError,
    RollupResult,
    RollupSlice,
    SliceLimits,
)
from usage.repair.rollup.versions import PathChoice, choose_path

__all__ = [
    "DEFAULT_MAX_ROLLUP_LOCK_SECONDS",
    "LOCK_CAP_SLACK_SECONDS",
    "MAX_SLICE_GROWTH",
    "ROLLUP_LOCK_ID",
    "NeighbourOptions",
    "PathChoice",
    "QueueDrainer",
    "RevertDrains",
    "RollupError",
    "RollupResult",
    "RollupSlice",
    "SliceLimits",
    "choose_path",
    "rebuild_keys",
]
