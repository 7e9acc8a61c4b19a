"""The candidates page as data: its cutoff and workspace, and one grouped aggregate on
``usage.eligibility`` giving the dry run's totals with the sidebar's and paginator's counts.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction

from usage import options
from usage.eligibility import compose, eligible_params
from usage.events import utc_text
from usage.models import BackfillRun
from usage.repair.summary import CutoffError, Totals, ensure_cutoff_in_past, workspace_has_agents

logger = logging.getLogger("usage.candidates")

# GET parameters that choose what the page lists (the command's --cutoff and --workspace-id).
CUTOFF_PARAM = "cutoff"
WORKSPACE_PARAM = "workspace"
CREATED_PARAM = "created"
CLAMPED_PARAM = "clamped"
SEARCH_PARAM = "q"

# The workspace filter lists the workspaces with the most candidates, at most this many.
WORKSPACE_CHOICES = 20

# Totals and the sidebar's counts in one pass over the eligible rows: the empty grouping set
# is the dry run's totals; the others count rows per workspace, created month and clamped.
CANDIDATE_TOTALS_SQL = """
SELECT
    GROUPING(c.workspace_id) AS all_workspaces,
    GROUPING(c.created_month) AS all_months,
    GROUPING(c.clamped) AS all_clamped,
    c.workspace_id,
    c.created_month,
    c.clamped,
    count(*) AS rows,
    coalesce(sum(c.input_before), 0) AS input_before,
    coalesce(sum(c.input_after), 0) AS input_after,
    coalesce(sum(c.input_tokens_removed), 0) AS input_tokens_removed,
    count(*) FILTER (WHERE c.clamped) AS clamped_rows
FROM (
    SELECT
        a.workspace_id,
        date_trunc('month', tu.created_at AT TIME ZONE 'UTC')::date AS created_month,
        {is_clamped} AS clamped,
        tu.input_tokens AS input_before,
        {corrected_input} AS input_after,
        {removed_input} AS input_tokens_removed
    FROM {eligible_from}
    WHERE {eligible_where}
) AS c
GROUP BY GROUPING SETS (
    (), (c.workspace_id), (c.created_month), (c.clamped), (c.created_month, c.clamped)
)"""

# Changes whenever a run starts, finishes a batch, ends or is reverted: whenever the tool
# itself changed which rows are eligible.
RUNS_FINGERPRINT_SQL = """
SELECT md5(coalesce(string_agg(
    concat_ws('/', id, status, rows_updated, finished_at, reverted_at), ',' ORDER BY id
), ''))
FROM {run}"""

# The totals pass reads every eligible row (as the dry run does); while the runs stay the same,
# paging, filtering and searching reuse it for this long.
TOTALS_CACHE_SECONDS = 120


def parse_month(value: str | None) -> date | None:
    """Parse the created-month filter (``YYYY-MM``); ``None`` when absent."""
    if not value:
        return None
    try:
        return date.fromisoformat(f"{value.strip()}-01")
    except ValueError:
        raise ValueError(
            f"created month {options.shown(value)} is not YYYY-MM, e.g. 2026-05"
        ) from None


def parse_clamped(value: str | None) -> bool | None:
    if not value:
        return None
    if value in ("yes", "no"):
        return value == "yes"
    raise ValueError(f"clamped {options.shown(value)} must be yes or no")


def month_range(month: date) -> tuple[datetime, datetime | None]:
    """The UTC bounds of a calendar month; no upper bound (None) after December 9999."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    if (month.year, month.month) == (9999, 12):
        return start, None
    return start, datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class CandidateTotals:
    """What the page shows above the list, and the counts its sidebar and paginator use."""

    database_now: datetime
    totals: Totals
    workspaces: list[tuple[uuid.UUID, int]]
    months: list[tuple[date, int]]
    counts: dict[tuple[date | None, bool | None], int]


def load_candidate_totals(cutoff: datetime, workspace_id: uuid.UUID | None) -> CandidateTotals:
    """One read-only pass: the dry run's totals plus the sidebar's counts, refusing a cutoff
    not in the database's past as the dry run does."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute("SELECT now()")
        database_now = cursor.fetchone()[0]
        ensure_cutoff_in_past(cutoff, database_now)
        cursor.execute(compose(CANDIDATE_TOTALS_SQL), eligible_params(cutoff, workspace_id))
        rows = cursor.fetchall()
    totals = Totals()
    workspaces: list[tuple[uuid.UUID, int]] = []
    months: list[tuple[date, int]] = []
    counts: dict[tuple[date | None, bool | None], int] = {}
    for all_ws, all_months, all_clamped, ws, month, clamped, count, *sums in rows:
        count = int(count)
        if not all_ws:
            workspaces.append((ws, count))
            continue
        counts[(None if all_months else month, None if all_clamped else clamped)] = count
        if all_months and all_clamped:
            # input_before, input_after, input_tokens_removed, clamped_rows, in Totals' order
            totals = Totals(count, *(int(value) for value in sums))
        elif all_clamped:
            months.append((month, count))
    workspaces.sort(key=lambda item: (-item[1], str(item[0])))
    months.sort()
    return CandidateTotals(database_now, totals, workspaces, months, counts)


def cached_candidate_totals(
    cutoff: datetime, workspace_id: uuid.UUID | None
) -> tuple[CandidateTotals, bool]:
    """The totals, from the last pass while no run changed anything, and whether reused.

    Only the tool's own runs make rows eligible again; ingestion can only take rows out
    (it stamps ``updated_at`` after the cutoff), so a short reuse is safe to show.
    """
    with connection.cursor() as cursor:
        cursor.execute(compose(RUNS_FINGERPRINT_SQL))
        runs = cursor.fetchone()[0]
    key = f"codex-candidates:{cutoff.isoformat()}:{workspace_id or 'all'}:{runs}"
    result = cache.get(key)
    if result is not None:
        return result, True
    result = load_candidate_totals(cutoff, workspace_id)
    cache.set(key, result, TOTALS_CACHE_SECONDS)
    return result, False


def parsed_or_none(parse: Callable[[str | None], Any], value: str | None) -> Any:
    try:
        return parse(value)
    except ValueError:
        return None


@dataclass
class CandidatePage:
    """The cutoff and workspace the page lists candidates for, and what it found."""

    cutoff: datetime | None = None
    cutoff_text: str = ""
    cutoff_source: str = ""
    source_run_id: int | None = None
    workspace_id: uuid.UUID | None = None
    workspace_text: str = ""
    error: str = ""
    workspace_known: bool = True
    result: CandidateTotals | None = None
    reused: bool = False

    @property
    def ready(self) -> bool:
        return self.result is not None

    @property
    def totals(self) -> Totals | None:
        return self.result.totals if self.result else None

    def known_count(self, params: Mapping[str, str]) -> int | None:
        """The list's row count for these sidebar choices, if the totals pass counted it."""
        if self.result is None:
            return 0
        if (params.get(SEARCH_PARAM) or "").strip():
            return None
        month = parsed_or_none(parse_month, params.get(CREATED_PARAM))
        clamped = parsed_or_none(parse_clamped, params.get(CLAMPED_PARAM))
        return self.result.counts.get((month, clamped), 0)


def load_candidate_page(params: Mapping[str, str]) -> CandidatePage:
    """Resolve the page's cutoff (chosen on the page, else ``CODEX_BACKFILL_CUTOFF``, else the
    latest run's; with none the page lists nothing) and workspace, then load their totals."""
    page = CandidatePage(
        cutoff_text=(params.get(CUTOFF_PARAM) or "").strip(),
        workspace_text=(params.get(WORKSPACE_PARAM) or "").strip(),
    )
    try:
        page.workspace_id = options.parse_workspace_id(page.workspace_text, name="The workspace")
    except ValueError as exc:
        page.error = str(exc)
        return page

    value = page.cutoff_text or settings.CODEX_BACKFILL_CUTOFF
    if page.cutoff_text:
        page.cutoff_source = "chosen on this page"
    elif value:
        page.cutoff_source = "CODEX_BACKFILL_CUTOFF"
    else:
        run = BackfillRun.objects.order_by("-started_at", "-id").only("id", "cutoff").first()
        if run is None:
            return page
        page.cutoff = run.cutoff
        page.cutoff_source = f"the latest run (#{run.pk})"
        page.source_run_id = run.pk
    # The page's own words, not the command line's flags.
    name = "The cutoff" if page.cutoff_text else page.cutoff_source
    try:
        if value:
            page.cutoff = options.parse_cutoff(value, name=name)
        page.cutoff_text = page.cutoff_text or utc_text(page.cutoff)
        page.result, page.reused = cached_candidate_totals(page.cutoff, page.workspace_id)
    except CutoffError as exc:  # a ValueError too, said here in the page's words
        page.error = exc.named(name)
    except ValueError as exc:
        page.error = str(exc)
    else:
        rows, ws = page.result.totals.rows, page.workspace_id
        if ws and rows == 0:
            page.workspace_known = workspace_has_agents(ws)
        logger.debug(
            "candidates for cutoff %s, workspace %s: %s rows", page.cutoff_text, ws or "all", rows
        )
    return page
