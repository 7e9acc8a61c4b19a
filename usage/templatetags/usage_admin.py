"""The admin's value formats (``usage.admin.formats``) as template filters."""

from __future__ import annotations

from django import template

from usage.admin import formats

register = template.Library()
for name in ("clock", "number"):
    register.filter(name, getattr(formats, name))
