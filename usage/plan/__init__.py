"""Saved plans: the dry run writes what it found (``--plan-out``); ``--execute --plan``
repairs that, or refuses and changes nothing."""

# The package's interface (the command's and the tests'), re-exported.
from usage.plan.document import PlanError, checksum, read_plan, timestamp  # noqa: F401
from usage.plan.handling import DEFAULT_MAX_AGE, SnapshotCheck, read_identity  # noqa: F401
