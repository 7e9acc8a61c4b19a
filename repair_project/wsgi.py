"""WSGI entry point for the read-only admin; it refuses to load without a secret key of its own
(``usage.serving``)."""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

from usage.serving import serving_refusal

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "repair_project.settings")
if refusal := serving_refusal():
    raise ImproperlyConfigured(refusal)
application = get_wsgi_application()
