"""The candidates page in a real browser: Playwright driving Debian's Chromium on a live server.

An operator logs in, opens the candidates page for the demo data's cutoff, picks a workspace
in the sidebar and reads the totals, which must be the dry run's for that workspace. The
page is saved as ``artifacts/admin-candidates.png`` (the README's screenshot comes from it).

Skipped, with the reason, where ``/usr/bin/chromium`` or Playwright is missing; ``.ci/run``
installs Debian's chromium package so that it runs there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection

from sandbox.dataset import DEMO_SPEC, generate_dataset
from tests.support import CUTOFF_ARG
from usage import render
from usage.repair.summary import Totals, load_summary

logger = logging.getLogger("usage.tests.browser")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(settings.BASE_DIR) / "artifacts" / "admin-candidates.png"
TOTAL_CELLS = {
    "total-rows": "rows",
    "total-input-before": "input_before",
    "total-input-after": "input_after",
    "total-removed": "input_tokens_removed",
    "total-clamped": "clamped_rows",
}

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium "
        "(.ci/run installs it with apt-get install chromium)",
    ),
]


def expected_totals() -> dict[str, Totals]:
    """The dry run's totals for every workspace of the demo data, computed before browsing."""
    workspaces = {g.workspace_id for g in load_summary(DEMO_SPEC.cutoff, None).groups}
    return {str(ws): load_summary(DEMO_SPEC.cutoff, ws).totals for ws in workspaces}


def test_operator_filters_candidates_by_workspace_and_reads_the_totals(
    live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connection.cursor() as cursor:
        generate_dataset(cursor, DEMO_SPEC)
    password = "browser-test-only-9f3c"  # A throwaway user in the test database.
    User.objects.create_superuser("operator", password=password)
    expected = expected_totals()
    assert expected, "the demo data has no eligible rows"
    cache.clear()

    # Playwright's sync API runs an event loop in this thread; the database work above and
    # below happens outside it, and the live server answers from its own thread.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    shown: dict[str, str] = {}
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1880, "height": 1000})
            page.goto(f"{live_server.url}/admin/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", password)
            page.click("input[type=submit]")
            page.wait_for_selector("#site-name")

            page.goto(f"{live_server.url}/admin/usage/candidateusage/?cutoff={CUTOFF_ARG}")
            page.wait_for_selector("#total-rows")
            all_rows = page.text_content("#total-rows")

            page.click("#changelist-filter a[href*='workspace=']")
            page.wait_for_selector("#selected-workspace:not(:text('all workspaces'))")
            workspace = parse_qs(urlparse(page.url).query)["workspace"][0]
            shown = {cell: page.text_content(f"#{cell}") or "" for cell in TOTAL_CELLS}
            shown["selected-workspace"] = page.text_content("#selected-workspace") or ""
            shown["result-count"] = page.text_content("#result-count") or ""
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()

    want = expected[workspace]
    assert all_rows == render.number(sum(t.rows for t in expected.values()))
    assert shown["selected-workspace"] == workspace
    for cell, attribute in TOTAL_CELLS.items():
        assert shown[cell] == render.number(getattr(want, attribute)), cell
    assert shown["result-count"] == render.number(want.rows)
    assert SCREENSHOT.stat().st_size > 10_000
    logger.info("screenshot saved to %s", SCREENSHOT)
