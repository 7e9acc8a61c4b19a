"""``runserver``: Django's development server, refusing in one line to start without a secret
key of its own (``usage.serving``) or a database it can reach."""

from __future__ import annotations

from typing import Any

from django.contrib.staticfiles.management.commands.runserver import Command as Runserver
from django.core.management.base import CommandError
from django.db import DatabaseError, connection

from usage.management.base import failing
from usage.serving import serving_refusal


class Command(Runserver):
    help = (
        "Serve the read-only admin (Django's development server). Off the sandbox it needs "
        "DJANGO_SECRET_KEY, and refuses to start without it."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if refusal := serving_refusal():
            raise CommandError(refusal)
        with failing(DatabaseError):
            connection.ensure_connection()
        connection.close()
        super().handle(*args, **options)
