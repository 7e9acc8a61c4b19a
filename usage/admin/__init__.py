"""The read-only admin: what a repair would change (the candidates, with the dry run's
totals) and what it did (its runs and journal, linked to each other and to the usage rows)."""

from __future__ import annotations

# Registers the pages: Django's admin imports this package, and the pages are these modules.
from usage.admin import candidates, runs  # noqa: F401
