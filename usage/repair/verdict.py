"""What ``--verify --run-id N`` judges: nothing eligible left and the hourly keys of the
run's whole chain (``runs.chain``) equal to a recompute."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection, transaction

from usage.eligibility import compose, eligible_params
from usage.models import BackfillRun
from usage.repair import runs
from usage.repair.rollup.versions import read_installed_function
from usage.repair.verify import Mismatches, find_mismatches

# The eligible rows left, and how many of them a revert (of any run) restored exactly: those
# are eligible again by design, not rows the repair missed.
COUNT_LEFT_SQL = """
SELECT count(*), count(*) FILTER (WHERE EXISTS (
    SELECT 1 FROM {journal} r WHERE r.usage_id = tu.id AND r.reverted_at IS NOT NULL
      AND tu.updated_at IS NOT DISTINCT FROM r.old_updated_at))
FROM {eligible_from} WHERE {eligible_where}"""


@dataclass(frozen=True, kw_only=True)
class RunVerification(Mismatches):
    """A run's verification, with the runs it covers."""

    run_id: int
    run_status: str
    runs: list[int]
    last_status: str
    continues: int | None
    continued_by: int | None
    eligible_rows_left: int
    eligible_rows_expected: bool  # a run of the chain, or the rows left, reverted
    rollup_function: str = ""  # the installed function as recognised, or "unknown"

    @property
    def keys_ok(self) -> bool:
        """Every key equal to a recompute, or waiting for the tick that recomputes it."""
        return self.mismatched_keys == self.awaiting_tick_keys

    @property
    def ok(self) -> bool:
        rows_ok = self.eligible_rows_left == 0 or self.eligible_rows_expected
        return rows_ok and self.keys_ok


def verify_run_in_context(run_id: int, limit: int = 100) -> RunVerification:
    """Verify run ``run_id`` with its chain, read-only; at most ``limit`` keys are listed."""
    run = BackfillRun.objects.get(pk=run_id)
    members = runs.chain(run)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(compose(COUNT_LEFT_SQL), eligible_params(run.cutoff, run.workspace_id))
        left, restored = cursor.fetchone()
        found = find_mismatches(run_ids=[r.pk for r in members], limit=limit)
        installed = read_installed_function(cursor)
    return RunVerification(
        **vars(found),
        run_id=run.pk,
        run_status=run.status,
        runs=[r.pk for r in members],
        last_status=members[-1].status,
        continues=run.continues_id,
        continued_by=next((r.pk for r in members if r.continues_id == run.pk), None),
        eligible_rows_left=left,
        eligible_rows_expected=any(r.status == BackfillRun.Status.REVERTED for r in members)
        or (left > 0 and left == restored),
        rollup_function=installed.described if installed is not None else "missing",
    )
