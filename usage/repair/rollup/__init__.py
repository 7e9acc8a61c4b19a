"""Rebuilding the hourly rollup for the rows a run changed, in slices under lock 4246
(README.md lays out the modules; docs/design.md says why)."""

from __future__ import annotations

from usage.repair.rollup.function import REVERT_KEYS_TABLE
from usage.repair.rollup.own import REVERT_KEYS, RUN_KEYS, KeySource, rebuild_keys
from usage.repair.rollup.slices import DEFAULT_MAX_ROLLUP_LOCK_SECONDS, RollupError, RollupResult
from usage.repair.rollup.versions import PathChoice, choose_path

__all__ = [
    "DEFAULT_MAX_ROLLUP_LOCK_SECONDS",
    "KeySource",
    "REVERT_KEYS",
    "REVERT_KEYS_TABLE",
    "RUN_KEYS",
    "PathChoice",
    "RollupError",
    "RollupResult",
    "choose_path",
    "rebuild_keys",
]
