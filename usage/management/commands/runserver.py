"""``runserver``: Django's development server, refusing in one line to start without a secret
key of its own (``usage.serving``) or a database it can reach."""

from __future__ import annotations

from typing import Any

from django.contrib.staticfiles.management.commands.runserver import Command as Runserver
from django.core.management.base import CommandError
from django.db import DatabaseError, connection

from usage.db import database_failure
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
        try:
            connection.ensure_connection()
        except DatabaseError as exc:
            raise CommandError(database_failure(exc)) from exc
        connection.close()
        super().handle(*args, **options)
