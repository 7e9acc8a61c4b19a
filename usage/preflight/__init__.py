"""Pre-flight: is this database ready for the repair, checked read-only before a run.

Used by the ``preflight_codex_usage_backfill`` command and ``pytest -m preflight``.
"""

from __future__ import annotations

from usage.preflight.checks import CHECK_NAMES, CHECKS
from usage.preflight.result import Check, CheckResult, Context, passed
from usage.preflight.run import DEFAULT_STATEMENT_TIMEOUT_SECONDS, connect_target, run_preflight

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "DEFAULT_STATEMENT_TIMEOUT_SECONDS",
    "Check",
    "CheckResult",
    "Context",
    "connect_target",
    "passed",
    "run_preflight",
]
