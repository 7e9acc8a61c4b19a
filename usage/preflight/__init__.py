"""Pre-flight: is this database ready for the repair, checked read-only before a run."""

# The package's interface (the command's and the tests'), re-exported.
from usage.preflight.catalog import Check, CheckResult, Context, passed  # noqa: F401
from usage.preflight.checks import CHECK_NAMES, CHECKS  # noqa: F401
from usage.preflight.run import connect_target, run_preflight  # noqa: F401
