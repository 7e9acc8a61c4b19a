"""The read-only admin: the candidates a repair would change, its runs and its journal.

Operators review here, in a browser, what a repair will do (the candidates page, whose totals
are the dry run's) and what it did (runs and journal entries, linked to each other and to the
usage rows). Nothing can be added, changed or deleted from it: every admin refuses add,
change and delete, and offers no bulk action. The site itself (``usage.sites``) serves no
other app's models (no user or group pages) and refuses every POST but logging out.
"""

from __future__ import annotations

from django.contrib import admin

# Registers the pages: Django's admin imports this package, and the pages are these modules.
from usage.admin import candidates, journal, runs  # noqa: F401

admin.site.site_header = "Codex usage repair"
admin.site.site_title = "Codex usage repair"
admin.site.index_title = "Review (read-only)"
admin.site.site_url = None  # The tool has no site besides this admin.
admin.site.enable_nav_sidebar = False  # Room for the wide lists.
