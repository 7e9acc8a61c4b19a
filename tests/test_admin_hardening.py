"""The admin under hostile input: no password form, no 500 for a NUL byte or an odd date.

Through Django's test client on a real PostgreSQL, like ``tests/test_admin.py``; the
fuzz-style sweep over every query parameter is in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from tests.factories import make_agent, make_task, make_usage

pytestmark = pytest.mark.django_db

CANDIDATES = "admin:usage_candidateusage_changelist"
RUNS = "admin:usage_backfillrun_changelist"
JOURNAL = "admin:usage_backfilljournal_changelist"


@pytest.fixture(autouse=True)
def _fresh_page(settings: Any) -> None:
    settings.CODEX_BACKFILL_CUTOFF = ""
    cache.clear()


@pytest.fixture
def operator(client: Client) -> User:
    user = User.objects.create_superuser("operator", password="first-pass-123")
    client.force_login(user)
    return user


def test_the_admin_has_no_password_form(client: Client, operator: User) -> None:
    index = client.get(reverse("admin:index"))
    assert index.status_code == 200
    content = index.content.decode()
    assert "password_change" not in content and "Change password" not in content
    assert "Log out" in content

    for name in ("admin:password_change", "admin:password_change_done"):
        assert client.get(reverse(name)).status_code == 404, name
    forged = client.post(
        reverse("admin:password_change"),
        {
            "old_password": "first-pass-123",
            "new_password1": "taken-over-456",
            "new_password2": "taken-over-456",
        },
    )
    assert forged.status_code in (403, 404)  # 403 when the CSRF token is missing
    operator.refresh_from_db()
    assert operator.check_password("first-pass-123")
    assert not operator.check_password("taken-over-456")


@pytest.mark.parametrize(
    "url",
    [
        reverse(RUNS) + "?status__exact=%00",
        reverse(RUNS) + "?rollup_state__exact=a%00b",
        reverse(JOURNAL) + "?run__id__exact=%00",
        reverse(JOURNAL) + "?q=%00",
        reverse(CANDIDATES) + "?cutoff=2026-06-13T08:00:00Z&q=agent%00",
        reverse(CANDIDATES) + "?cutoff=%00",
        reverse(CANDIDATES) + "?%00=1",
        reverse("admin:usage_backfillrun_change", args=["1"]).replace("/1/", "/1%00/"),
    ],
)
def test_a_nul_byte_gets_a_bad_request_page_not_a_server_error(
    client: Client, operator: User, url: str
) -> None:
    response = client.get(url)
    assert response.status_code == 400
    assert "contains a NUL byte" in response.content.decode()


@pytest.mark.parametrize(
    ("cutoff", "message"),
    [
        ("0001-01-01T00:00:00+05:30", "is out of range"),
        ("9999-12-31T23:59:59-05:00", "is out of range"),
        ("9999-12-31T23:59:59Z", "is not before the database"),
        ("١٢٠٢-06-13T08:00:00Z", "is not an RFC 3339 timestamp"),
    ],
)
@pytest.mark.parametrize("source", ["page", "CODEX_BACKFILL_CUTOFF"])
def test_a_cutoff_out_of_range_is_a_message_on_the_page(
    client: Client, operator: User, settings: Any, cutoff: str, message: str, source: str
) -> None:
    params = {"cutoff": cutoff}
    if source == "CODEX_BACKFILL_CUTOFF":
        settings.CODEX_BACKFILL_CUTOFF, params = cutoff, {}
    response = client.get(reverse(CANDIDATES), params)
    assert response.status_code == 200
    content = response.content.decode()
    assert message in content
    shown = " ".join(str(m) for m in response.context["messages"])
    assert "--cutoff" not in shown, shown  # the page's words, not the command line's
    if source == "page" and "RFC" in message:
        assert shown.startswith("The cutoff "), shown
    if source == "CODEX_BACKFILL_CUTOFF" and "RFC" in message:
        assert (
            "CODEX_BACKFILL_CUTOFF &#x27;" in content
            and "CODEX_BACKFILL_CUTOFF: --cutoff" not in content
        )


def test_year_one_is_shown_with_four_digits(client: Client, operator: User) -> None:
    make_usage(make_task(make_agent()))
    response = client.get(
        reverse(CANDIDATES), {"cutoff": "0001-01-01T00:00:00Z", "created": "9999-12"}
    )
    assert response.status_code == 200
    content = response.content.decode()
    assert "0001-01-01T00:00:00Z" in content
    assert "python manage.py backfill_codex_usage_cache --cutoff 0001-01-01T00:00:00Z" in content
