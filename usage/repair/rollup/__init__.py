"""Rebuilding the hourly rollup for the rows a run changed, in slices under lock 4246
(README.md lays out the modules; docs/design.md says why)."""

from __future__ import annotations

from usage.cron import ROLLUP_LOCK_ID
from usage.repair.rollup.function import REVERT_KEYS_TABLE
from usage.repair.rollup.own import REVERT_KEYS, RUN_KEYS, KeySource, rebuild_keys
from usage.repair.rollup.slices import (
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    LOCK_CAP_SLACK_SECONDS,
    RollupError,
    RollupResult,
)
from usage.repair.rollup.versions import PathChoice, choose_path

__all__ = [
    "DEFAULT_MAX_ROLLUP_LOCK_SECONDS",
    "KeySource",
    "LOCK_CAP_SLACK_SECONDS",
    "ROLLUP_LOCK_ID",
    "REVERT_KEYS",
    "REVERT_KEYS_TABLE",
    "RUN_KEYS",
    "PathChoice",
    "RollupError",
    "RollupResult",
    "choose_path",
    "rebuild_keys",
]
