"""The admin site as a whole: what it serves, and that none of it can write.

Issue 18 found user and group pages that could add users, although the tool's own pages were
read-only: Django's auth app registered them after our module had unregistered them. So these
tests look at the site that is actually served, after every admin module is loaded, and walk
every URL it answers, the ones Django adds included, as a superuser made by
``createsuperuser``: no page shows a form that writes, every POST is refused, and a POST to
each add URL (the auth ones too) leaves the users and groups as they were.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.sites import AdminSite
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.test import Client, RequestFactory
from django.urls import URLPattern, URLResolver, get_resolver, resolve, reverse
from django.utils import timezone

from tests.factories import BEFORE, CUTOFF, make_agent, make_task, make_usage
from tests.processes import PROJECT_DIR
from usage.models import BackfillJournal, BackfillRun, TaskUsage
from usage.serving import ReviewAdminSite

# Tests that log in need auth's tables flushed after them, not only the tool's.
LOGS_IN = pytest.mark.django_db(transaction=True)

PASSWORD = "site-test-only-7c1e"  # A throwaway superuser in the test database.
TOOL_MODELS = {"usage.CandidateUsage", "usage.BackfillRun", "usage.BackfillJournal"}
# The pages issue 18 found writable, and the rest of what Django's auth admin would add.
AUTH_PAGES = (
    "auth/",
    "auth/user/",
    "auth/user/add/",
    "auth/user/{user}/change/",
    "auth/user/{user}/password/",
    "auth/user/{user}/delete/",
    "auth/group/",
    "auth/group/add/",
    "auth/group/{group}/change/",
)
# What a browser would post to an add page: every field of User, Group and the tool's rows.
ADD_FORM = {
    "username": "intruder",
    "password1": "intruder-pass-4242",
    "password2": "intruder-pass-4242",
    "usable_password": "true",
    "name": "intruders",
    "is_staff": "on",
    "is_superuser": "on",
    "status": "succeeded",
    "cutoff": "2026-06-13T08:00:00Z",
    "batch_size": "1000",
    "started_at": "2026-06-13T08:00:00Z",
    "input_tokens": "1",
    "_save": "Save",
}
# Buttons and links of Django's forms that write; none may appear on any page.
WRITE_BUTTONS = {"_save", "_addanother", "_continue", "_saveasnew", "post", "action"}
WRITE_LINKS = {"addlink", "changelink", "deletelink", "changepassword"}


class Writables(HTMLParser):
    """The forms of a page that post somewhere, and its write buttons and links."""

    def __init__(self) -> None:
        super().__init__()
        self.post_forms: list[str] = []
        self.buttons: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form" and values.get("method", "get").lower() != "get":
            self.post_forms.append(values.get("action", ""))
        if tag in ("input", "button") and values.get("name") in WRITE_BUTTONS:
            self.buttons.append(values["name"])
        if tag == "a" and WRITE_LINKS & set(values.get("class", "").split()):
            self.links.append(values.get("href", ""))


def writables(content: str) -> Writables:
    parser = Writables()
    parser.feed(content)
    return parser


@pytest.fixture
def operator(monkeypatch: pytest.MonkeyPatch) -> tuple[Client, User]:
    """A superuser made as the README makes it (``createsuperuser``), logged in."""
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)
    call_command("createsuperuser", interactive=False, username="operator", email="", verbosity=0)
    client = Client()
    assert client.login(username="operator", password=PASSWORD)
    return client, User.objects.get(username="operator")


@pytest.fixture
def objects() -> dict[str, Any]:
    """One object of every kind a page can show: a usage row, a run, its journal entry."""
    row = make_usage(make_task(make_agent()), input_tokens=1000, cache_read_tokens=300)
    run = BackfillRun.objects.create(
        status=BackfillRun.Status.SUCCEEDED,
        cutoff=CUTOFF,
        batch_size=1000,
        started_at=timezone.now(),
        rows_updated=1,
    )
    entry = BackfillJournal.objects.create(
        run=run,
        usage_id=row.id,
        old_input_tokens=1000,
        old_updated_at=BEFORE,
        new_input_tokens=700,
        cache_read_tokens=300,
        new_updated_at=timezone.now(),
        repaired_at=timezone.now(),
    )
    return {
        "usage.candidateusage": row.pk,
        "usage.backfillrun": run.pk,
        "usage.backfilljournal": entry.pk,
        "auth.user": User.objects.create_user("someone", password="someone-pass-123").pk,
        "auth.group": Group.objects.create(name="reviewers").pk,
    }


def served_site() -> AdminSite:
    """The site the URLconf serves at /admin/, after every admin module is loaded."""
    get_resolver().url_patterns  # noqa: B018 - loads the URLconf and so every admin module
    return resolve("/admin/").func.admin_site


def admin_routes() -> Iterator[tuple[str, URLPattern]]:
    """Every route the admin serves (its full text from the root) and its pattern."""
    root = next(
        p
        for p in get_resolver().url_patterns
        if isinstance(p, URLResolver) and p.namespace == "admin"
    )

    def walk(patterns: list[Any], prefix: str) -> Iterator[tuple[str, URLPattern]]:
        for pattern in patterns:
            route = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, route)
            else:
                yield route, pattern

    yield from walk(root.url_patterns, str(root.pattern))


def concrete_urls(objects: dict[str, Any]) -> list[str]:
    """A URL for every route the admin serves, with real ids where a route takes one."""
    content_type = ContentType.objects.get_for_model(BackfillRun).pk
    urls = []
    for route, _pattern in admin_routes():
        match = re.match(r"admin/(\w+)/(\w+)/", route)
        label = ".".join(match.groups()) if match else ""
        url = "/" + route
        url = re.sub(r"<(?:\w+:)?(?:object_)?id>", str(objects.get(label, "1")), url)
        url = re.sub(r"<(?:\w+:)?content_type_id>", str(content_type), url)
        url = re.sub(r"\(\?P<app_label>[^)]*\)", "usage", url)
        url = url.replace("(?P<url>.*)", "auth/user/")  # the catch-all: what auth would have
        assert "<" not in url and "(?" not in url, route
        urls.append(url)
    return urls


def auth_urls(objects: dict[str, Any]) -> list[str]:
    ids = {"user": objects["auth.user"], "group": objects["auth.group"]}
    return ["/admin/" + page.format(**ids) for page in AUTH_PAGES]


def database_state() -> tuple[Any, ...]:
    """Everything a write through the admin could change."""
    return (
        sorted(User.objects.values_list("username", "password", "is_staff", "is_superuser")),
        sorted(Group.objects.values_list("name", flat=True)),
        sorted(TaskUsage.objects.values_list("id", "input_tokens", "updated_at")),
        sorted(BackfillRun.objects.values_list("id", "status", "rows_updated")),
        sorted(BackfillJournal.objects.values_list("id", "new_input_tokens", "reverted_at")),
    )


# -- what the site serves --------------------------------------------------------------------


@LOGS_IN
def test_the_served_site_has_only_the_tools_models_and_none_can_write(
    operator: tuple[Client, User],
) -> None:
    site = served_site()
    assert isinstance(site, ReviewAdminSite)
    assert site._registry is admin.site._registry  # admin.site is a lazy proxy of it
    import django.contrib.auth.admin  # noqa: F401 - the module that registers User and Group

    assert {model._meta.label for model in site._registry} == TOOL_MODELS
    request = RequestFactory().get("/admin/")
    request.user = operator[1]
    for model, model_admin in site._registry.items():
        label = model._meta.label
        obj = model.objects.first()
        assert not model_admin.has_add_permission(request), label
        for may in (model_admin.has_change_permission, model_admin.has_delete_permission):
            assert not may(request), label
            assert not may(request, obj), label
        assert not model_admin.get_actions(request), label
        assert model_admin.has_view_permission(request), label
    assert [app["app_label"] for app in site.get_app_list(request)] == ["usage"]


def test_the_site_takes_no_model_of_another_app() -> None:
    site = ReviewAdminSite(name="check")
    site.register(User, UserAdmin)
    site.register([Group], GroupAdmin)
    assert not site._registry
    assert not site.is_registered(User) and not site.is_registered(Group)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["usage first", "auth first"])
def test_the_registry_does_not_depend_on_the_order_of_the_apps(tmp_path: Path, order: str) -> None:
    """The issue's cause: auth's admin registered User and Group after ours; in either order
    of ``INSTALLED_APPS`` the served site has only the tool's models."""
    (tmp_path / "order_settings.py").write_text(
        textwrap.dedent(
            f"""
            from repair_project.settings import *  # noqa: F403

            if {order == "auth first"!r}:
                INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "usage"] + ["usage"]
            """
        )
    )
    # The child writes the apps' order and the served site's models as one JSON line.
    probe = (
        "import json, sys, django; django.setup();"
        "from django.conf import settings; from django.urls import get_resolver, resolve;"
        "get_resolver().url_patterns; site = resolve('/admin/').func.admin_site;"
        "sys.stdout.write(json.dumps([list(settings.INSTALLED_APPS),"
        " sorted(m._meta.label for m in site._registry)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        DJANGO_SETTINGS_MODULE="order_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(PROJECT_DIR)]),
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    installed, registry = json.loads(result.stdout)
    first = installed.index("usage") < installed.index("django.contrib.auth")
    assert first == (order == "usage first")
    assert registry == sorted(TOOL_MODELS)


# -- every URL it serves ---------------------------------------------------------------------


@LOGS_IN
def test_every_url_the_admin_serves_shows_no_form_that_writes(
    operator: tuple[Client, User], objects: dict[str, Any]
) -> None:
    client, _user = operator
    urls = concrete_urls(objects)
    assert len(urls) == len(list(admin_routes()))
    logout = reverse("admin:logout")
    answered = {}
    for url in [*urls, *auth_urls(objects)]:
        response = client.get(url)
        answered[url] = response.status_code
        assert response.status_code < 500, url
        if response.status_code != 200:
            continue
        found = writables(response.content.decode())
        assert set(found.post_forms) <= {logout}, (url, found.post_forms)
        assert not found.buttons and not found.links, (url, found.buttons, found.links)

    # The pages issue 18 found, and the rest of auth's: not served at all.
    for url in auth_urls(objects):
        assert answered[url] == 404, url
    # The tool's own pages are there, to read.
    for name in ("index", "usage_backfillrun_changelist", "usage_backfilljournal_change"):
        url = next(u for u in urls if resolve(u).url_name == name)
        assert answered[url] == 200, url
    for url in urls:
        if (resolve(url).url_name or "").endswith(("_add", "_delete")):
            assert answered[url] == 403, url
    assert answered[reverse("admin:password_change")] == 404
    names = {pattern.name for _route, pattern in admin_routes()}
    assert {"index", "logout", "password_change", "usage_backfillrun_add"} <= names
    assert not {"auth_user_add", "auth_group_changelist", "auth_user_password_change"} & names


@LOGS_IN
def test_a_post_to_any_add_url_adds_nothing(
    operator: tuple[Client, User], objects: dict[str, Any]
) -> None:
    client, _user = operator
    served = [u for u in concrete_urls(objects) if (resolve(u).url_name or "").endswith("_add")]
    add_urls = list(dict.fromkeys([*served, "/admin/auth/user/add/", "/admin/auth/group/add/"]))
    users, groups = User.objects.count(), Group.objects.count()
    before = database_state()
    answers = {url: client.post(url, ADD_FORM).status_code for url in add_urls}
    assert (User.objects.count(), Group.objects.count()) == (users, groups)
    assert not User.objects.filter(username="intruder").exists()
    assert database_state() == before
    # The tool's add pages refuse it; auth's are not served (the site refuses any POST first).
    assert set(answers.values()) == {403}, answers
    assert len(add_urls) == len(TOOL_MODELS) + 2


@LOGS_IN
def test_every_url_refuses_a_post(operator: tuple[Client, User], objects: dict[str, Any]) -> None:
    """Forged, without a CSRF token even (the test client does not check it): nothing is
    written, and every view but logging in and out says 403 or 404."""
    client, user = operator
    before = database_state()
    served = [u for u in concrete_urls(objects) if resolve(u).url_name not in ("login", "logout")]
    for url in [*served, *auth_urls(objects)]:
        data = {
            **ADD_FORM,
            "old_password": PASSWORD,
            "new_password1": "taken-over-456",
            "new_password2": "taken-over-456",
            "post": "yes",
        }
        assert client.post(url, data).status_code in (403, 404), url
    assert database_state() == before
    user.refresh_from_db()
    assert user.check_password(PASSWORD)
