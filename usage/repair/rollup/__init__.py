"""Rebuilding the hourly rollup for the rows a run changed, in slices under lock 4246: entry
points (``rebuild``), the path (``versions``), the own recompute (``proof``, ``recompute``) and
the platform's function (``function``, ``stamps``); docs/design.md says why.
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
