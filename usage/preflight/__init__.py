"""Pre-flight: is this database ready for the repair, checked read-only before a run.

Used by the ``preflight_codex_usage_backfill`` command and ``pytest -m preflight``.
"""

from __future__ import annotations

# The package's interface (the command's and the tests'), re-exported.
from usage.preflight.checks import CHECK_NAMES, CHECKS  # noqa: F401
from usage.preflight.result import Check, CheckResult, Context, passed  # noqa: F401
from usage.preflight.run import connect_target, run_preflight  # noqa: F401
