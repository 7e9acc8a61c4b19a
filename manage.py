#!/usr/bin/env python
"""Django's command-line entry point for the codex-usage-repair operator tool.

A setting the environment got wrong (``DATABASE_URL``, a timeout, a schema name) is bad
input like any other: one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        if "--traceback" in sys.argv:
            raise
        message = " ".join(str(exc).split())
        sys.stderr.write(f"ImproperlyConfigured: {message}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
