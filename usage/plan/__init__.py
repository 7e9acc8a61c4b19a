"""Saved plans: the dry run writes what it found (``--plan-out``); ``--execute --plan``
repairs that, or refuses and changes nothing. ``document`` is the file, ``check`` holds it
against the database, ``handling`` is what the repair command does with its plan options.
"""

from __future__ import annotations

from usage.plan.check import (
    DEFAULT_MAX_AGE,
    PlanOutcome,
    SnapshotCheck,
    read_identity,
    short,
)
from usage.plan.document import (
    Plan,
    PlanError,
    checksum,
    fingerprint,
    plan_document,
    plan_text,
    read_plan,
    timestamp,
)
from usage.plan.handling import PlanOptions

__all__ = [
    "DEFAULT_MAX_AGE",
    "Plan",
    "PlanError",
    "PlanOptions",
    "PlanOutcome",
    "SnapshotCheck",
    "checksum",
    "fingerprint",
    "plan_document",
    "plan_text",
    "read_identity",
    "read_plan",
    "short",
    "timestamp",
]
