"""The admin in a real browser: Playwright driving Debian's Chromium on a live server.

An operator logs in with a 1,400 px wide window, opens the candidates page for the demo
data's cutoff, picks a workspace in the sidebar and reads the totals, which must be the dry
run's for that workspace. Then a real execute repairs that workspace, and the operator opens
the runs list, the run's page and its journal. Every list must show all its columns: the
table is no wider than the box it scrolls in. The candidates page and the run's page are
saved as ``artifacts/admin-candidates.png`` and ``artifacts/admin-run.png`` (the README's
screenshots in ``docs/`` are copies of them).

Skipped, with the reason, where ``/usr/bin/chromium`` or Playwright is missing; ``.ci/run``
installs Debian's chromium package so that it runs there.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.management import call_command
from django.db import connection

from sandbox.dataset import DEMO_SPEC, generate_dataset, mark_rolled_up, populate_hourly
from tests.support import CUTOFF_ARG
from usage import render
from usage.models import BackfillRun
from usage.repair.summary import Totals, load_summary

logger = logging.getLogger("tests.admin_browser")

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
# The window the issue measured in: the lists get about 1,050 px of it beside their filters.
VIEWPORT = {"width": 1400, "height": 1000}
ARTIFACTS = Path(settings.BASE_DIR) / "artifacts"
CANDIDATES_SHOT = ARTIFACTS / "admin-candidates.png"
RUN_SHOT = ARTIFACTS / "admin-run.png"
TOTAL_CELLS = {
    "total-rows": "rows",
    "total-input-before": "input_before",
    "total-input-after": "input_after",
    "total-removed": "input_tokens_removed",
    "total-clamped": "clamped_rows",
}
# The list's table, the box it scrolls in, and whether every header lies inside that box.
MEASURE_LIST = """() => {
    const table = document.querySelector('#result_list');
    const box = table.parentElement;
    const right = box.getBoundingClientRect().right;
    const headers = Array.from(table.querySelectorAll('thead th'));
    return {
        table: table.scrollWidth,
        box: box.clientWidth,
        page: document.documentElement.scrollWidth,
        window: window.innerWidth,
        columns: headers.length,
        hidden: headers.filter(th => th.getBoundingClientRect().right > right + 0.5)
            .map(th => th.innerText.trim()),
        // Times that had to break between date and time (fine, but the list is then tight).
        wrapped: Array.from(table.querySelectorAll('td')).filter(td => {
            const parts = td.querySelectorAll('.nowrap');
            return parts.length === 2
                && parts[1].getBoundingClientRect().top > parts[0].getBoundingClientRect().top;
        }).length,
    };
}"""

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


def measure_list(page: Any, url: str, columns: int) -> dict[str, Any]:
    """Open a list and measure it: every one of its columns must be in view."""
    page.goto(url)
    page.wait_for_selector("#result_list")
    measured = page.evaluate(MEASURE_LIST)
    logger.info("%s at %s px: %s", urlparse(url).path, VIEWPORT["width"], measured)
    assert measured["columns"] == columns, (url, measured)
    assert measured["table"] <= measured["box"], (url, measured)
    assert not measured["hidden"], (url, measured)
    assert measured["page"] <= measured["window"], (url, measured)
    return measured


@contextmanager
def logged_in_page(live_server: Any, password: str) -> Iterator[Any]:
    """A Chromium page of the given window size, logged in to the admin as the operator."""
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{live_server.url}/admin/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", password)
            page.click("input[type=submit]")
            page.wait_for_selector("#site-name")
            yield page
        finally:
            browser.close()


def test_operator_reviews_candidates_then_a_run_in_a_1400_px_window(
    live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connection.cursor() as cursor:  # the sandbox's demo data, rolled up as it is there
        generate_dataset(cursor, DEMO_SPEC)
        populate_hourly(cursor)
        watermark = mark_rolled_up(cursor)
    password = "browser-test-only-9f3c"  # A throwaway user in the test database.
    User.objects.create_superuser("operator", password=password)
    expected = expected_totals()
    assert expected, "the demo data has no eligible rows"
    cache.clear()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # Playwright's sync API runs an event loop in this thread while it is open; the database
    # work of the test (the execute included) happens outside it, and the live server
    # answers from its own thread.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with logged_in_page(live_server, password) as page:
        # Before: the candidates, all workspaces, then one.
        candidates = f"{live_server.url}/admin/usage/candidateusage/?cutoff={CUTOFF_ARG}"
        measure_list(page, candidates, columns=10)
        all_rows = page.text_content("#total-rows")
        page.click("#changelist-filter a[href*='workspace=']")
        page.wait_for_selector("#selected-workspace:not(:text('all workspaces'))")
        workspace = parse_qs(urlparse(page.url).query)["workspace"][0]
        shown = {cell: page.text_content(f"#{cell}") or "" for cell in TOTAL_CELLS}
        shown["selected-workspace"] = page.text_content("#selected-workspace") or ""
        shown["result-count"] = page.text_content("#result-count") or ""
        measure_list(page, page.url, columns=10)
        page.screenshot(path=str(CANDIDATES_SHOT))

    want = expected[workspace]
    assert all_rows == render.number(sum(t.rows for t in expected.values()))
    assert shown["selected-workspace"] == workspace
    for cell, attribute in TOTAL_CELLS.items():
        assert shown[cell] == render.number(getattr(want, attribute)), cell
    assert shown["result-count"] == render.number(want.rows)

    # The repair of that workspace, then what the admin says about it.
    call_command(
        "backfill_codex_usage_cache",
        "--cutoff",
        CUTOFF_ARG,
        "--workspace-id",
        workspace,
        "--execute",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    run = BackfillRun.objects.get()
    assert run.status == BackfillRun.Status.SUCCEEDED and run.rows_updated == want.rows
    assert run.stamp == BackfillRun.Stamp.BELOW_WATERMARK and run.watermark_at_start == watermark
    with logged_in_page(live_server, password) as page:
        measure_list(page, f"{live_server.url}/admin/usage/backfillrun/", columns=11)
        journal = f"{live_server.url}/admin/usage/backfilljournal/?run__id__exact={run.pk}"
        measure_list(page, journal, columns=10)
        page.goto(f"{live_server.url}/admin/usage/backfillrun/{run.pk}/change/")
        page.wait_for_selector("#backfillrun_form")
        run_text = page.text_content("#backfillrun_form") or ""
        run_page_width = page.evaluate("() => document.documentElement.scrollWidth")
        page.screenshot(path=str(RUN_SHOT), full_page=True)

    assert run_page_width <= VIEWPORT["width"]
    for words in ("OS user", "Database role", "Top stamp", render.number(want.rows)):
        assert words in run_text, words
    assert "None" not in run_text
    for shot in (CANDIDATES_SHOT, RUN_SHOT):
        assert shot.stat().st_size > 10_000, shot
        logger.info("screenshot saved to %s", shot)
