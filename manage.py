#!/usr/bin/env python
"""Django's command-line entry point for the codex-usage-repair operator tool.

A setting the environment got wrong (``DATABASE_URL``, a timeout, a schema name) is bad
input like any other: one line on stderr and exit status 1, not a traceback. So is a database
that cannot be reached, in Django's own commands too (``migrate``, the runbook's first step).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line
    from django.db.utils import OperationalError

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        if "--traceback" in sys.argv:
            raise
        message = " ".join(str(exc).split())
        sys.stderr.write(f"ImproperlyConfigured: {message}\n")
        sys.exit(1)
    except OperationalError as exc:
        if "--traceback" in sys.argv:
            raise
        from usage.db import describe_database, error_text

        sys.stderr.write(
            f"OperationalError: cannot use {describe_database()}: {error_text(exc)}; check "
            "DATABASE_URL and that the server is reachable\n"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
