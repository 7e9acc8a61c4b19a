"""Pre-flight: is this database ready for the repair, checked read-only before a run.

``checks`` holds the checks (``CHECKS``), each returning a ``CheckResult`` that says what
was found and, when it is not fine, what to do; ``run`` runs them all read-only
(``run_preflight``) on Django's connection or the pre-flight's own (``connect_target``).
The ``preflight_codex_usage_backfill`` command and ``pytest -m preflight`` use both.
"""

from __future__ import annotations

from usage.preflight.checks import (
    CHECK_NAMES,
    CHECKS,
    DEFAULT_STATEMENT_TIMEOUT_SECONDS,
    Check,
    CheckResult,
    Context,
    passed,
)
from usage.preflight.run import connect_target, run_preflight

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
