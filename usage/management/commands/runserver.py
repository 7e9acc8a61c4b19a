"""``runserver``: Django's development server, refusing to serve without a secret key."""

from __future__ import annotations

from typing import Any

from django.contrib.staticfiles.management.commands.runserver import Command as Runserver
from django.core.management.base import CommandError

from usage.serving import serving_refusal


class Command(Runserver):
    help = (
        "Serve the read-only admin (Django's development server). Off the sandbox it needs "
        "DJANGO_SECRET_KEY, and refuses to start without it."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        refusal = serving_refusal()
        if refusal:
            raise CommandError(refusal)
        super().handle(*args, **options)
