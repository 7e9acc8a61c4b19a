"""The read-only admin: what a repair would change (the candidates) and did (runs, journal)."""

from __future__ import annotations

# Registers the pages: Django's admin imports this package, and the pages are these modules.
from usage.admin import candidates, runs  # noqa: F401
