"""Saved plans: the dry run writes what it found (``--plan-out``); ``--execute --plan``
repairs that, or refuses and changes nothing."""

from __future__ import annotations

from usage.plan.check import SnapshotCheck, read_identity
from usage.plan.document import PlanError, checksum, read_plan, timestamp
from usage.plan.handling import DEFAULT_MAX_AGE

__all__ = [
    "DEFAULT_MAX_AGE",
    "PlanError",
    "SnapshotCheck",
    "checksum",
    "read_identity",
    "read_plan",
    "timestamp",
]
