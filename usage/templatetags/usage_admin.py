"""The admin's value formats and a cutoff as the command spells it, as template filters."""

from __future__ import annotations

from django import template

from usage import render
from usage.events import utc_text

register = template.Library()
for name in ("clock", "number"):
    register.filter(name, getattr(render, name))
register.filter("cutoff_param", utc_text)
