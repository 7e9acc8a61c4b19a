"""Rebuilding the hourly rollup for the rows a run changed, in slices under lock 4246: the names
below are the engine's interface (README.md lays out the modules; docs/design.md says why)."""

from __future__ import annotations

from usage.repair.rollup.function import REVERT_KEYS_TABLE  # noqa: F401
from usage.repair.rollup.own import REVERT_KEYS, RUN_KEYS, KeySource, rebuild_keys  # noqa: F401
from usage.repair.rollup.slices import (  # noqa: F401
    DEFAULT_MAX_ROLLUP_LOCK_SECONDS,
    RollupError,
    RollupResult,
)
from usage.repair.rollup.versions import PathChoice, choose_path  # noqa: F401
