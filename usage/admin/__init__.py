"""The read-only admin: the candidates a repair would change, its runs and its journal.

Operators review here what a repair will do (the candidates page, whose totals are the dry
run's) and what it did (runs and journal entries, linked to each other and to the usage rows).
"""

from __future__ import annotations

# Registers the pages: Django's admin imports this package, and the pages are these modules.
from usage.admin import candidates, journal, runs  # noqa: F401
