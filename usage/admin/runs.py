"""The runs (who ran each repair, with what, what it changed, its stamp and rollup; fields a run
lacks are left out) and their journal: each row changed, what it was, when, and its stamp."""

from __future__ import annotations

import uuid
from functools import partial
from operator import attrgetter
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from usage.admin.base import ReadOnlyAdmin, names, shown
from usage.models import BackfillJournal, BackfillRun
from usage.render import DASH, clock, clock_cell, elapsed, number, seconds, short_id, stamp

STAMP_TITLE = "Stamp: the updated_at written into the repaired rows"
JOURNAL_STAMP_TITLE = "The row's updated_at"
STAMP_KINDS = {
    BackfillRun.Stamp.BELOW_WATERMARK: "just below the platform rollup's watermark",
    BackfillRun.Stamp.REPAIR_TIME: "the time the run started",
}
ROLLUP_PATHS = {
    BackfillRun.RollupPath.OWN: "the tool's own recompute (for a rollup function it recognised)",
    BackfillRun.RollupPath.FUNCTION: "the platform's rollup_task_usage_hourly_window",
}
# The command's options in reading order (what, which plan, how fast, the rollup), then any a
# newer version records, by name; a flag is recorded as the setting it turns off.
ARGUMENT_ORDER = names(
    "cutoff workspace_id plan plan_max_age batch_size sleep_between_batches lock_timeout "
    "statement_timeout max_replication_lag rebuild_rollup max_rollup_lock_seconds "
    "cron_tick_interval"
)
NEGATED_FLAGS = {"rebuild_rollup": "--no-rebuild-rollup"}
NOT_GIVEN = "not given"


def argument_rows(arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """The recorded arguments as (option, value) pairs: unset options say "not given"."""
    rank = {key: n for n, key in enumerate(ARGUMENT_ORDER)}
    rows = []
    for key in sorted(arguments, key=lambda key: (rank.get(key, len(rank)), key)):
        value = "" if arguments[key] is None else str(arguments[key]).strip()
        if key in NEGATED_FLAGS:
            given = value.lower() in ("false", "0", "no")
            rows.append((NEGATED_FLAGS[key], "given" if given else NOT_GIVEN))
        else:
            given = value not in ("", "None", "null")
            rows.append(("--" + key.replace("_", "-"), value if given else NOT_GIVEN))
    return rows


@admin.register(BackfillRun)
class BackfillRunAdmin(ReadOnlyAdmin):
    # Fits the list's 1,050 px at a 1,400 px window (times may wrap between date and time).
    list_display = names(
        "id status_cell started_cell took cutoff_cell workspace updated removed clamped "
        "remaining os_user_cell"
    )
    list_filter = ("status", "rollup_state")
    sections = {
        "Run": "status_shown progress_shown error_shown started finished took reverted "
        "continues_link continued_by_links",
        "Who ran it": "os_user_shown db_role_shown client_host_shown pid_shown backend_pid_shown",
        "What it was asked": "cutoff_shown workspace_shown batch_size_shown arguments_shown "
        "candidates_link",
        "Saved plan": "plan_fingerprint_shown plan_made plan_rows_shown",
        "Result": "rows_planned_shown rows_updated_shown removed_shown clamped_shown "
        "remaining_shown journal_link batches",
        STAMP_TITLE: "stamp_kind stamp_base_shown watermark_shown stamps_written",
        "Revert": "revert_state_shown revert_started revert_finished rows_restored_shown "
        "revert_error_shown",
        "Hourly rollup": "rollup_state_shown rollup_path_shown rollup_function_shown "
        "rollup_fingerprint_shown rollup_path_reason_shown rollup_keys_shown "
        "rollup_slices_shown rollup_rows_shown rollup_time rollup_hold "
        "rollup_cron_waits_shown",
    }
    optional_fields = {
        "progress_shown": lambda run: run.status == BackfillRun.Status.RUNNING,
        "revert_state_shown": lambda run: run.revert_state,
        "rows_restored_shown": lambda run: run.revert_state,
        "continued_by_links": lambda run: run.continued_by.exists(),
        "stamps_written": lambda run: run.stamp_first or run.stamp_last,
        **dict.fromkeys(names("plan_made plan_rows_shown"), attrgetter("plan_fingerprint")),
    }
    notes = {STAMP_TITLE: "run_stamp"}

    started_cell = shown("started", "started_at", clock_cell)
    took = shown("took", lambda run: elapsed(run.started_at, run.finished_at))
    cutoff_cell = shown("cutoff", "cutoff", clock_cell)
    workspace = shown("workspace", "workspace_id", short_id, none="all")
    removed = shown("removed", "input_tokens_removed", number)
    clamped = shown("clamped", "clamped_rows", number)
    remaining = shown("left", "rows_remaining", number)
    status_cell = shown("status", "status", template="run_status")
    updated = shown("updated", "rows_updated", template="run_updated")
    status_shown = shown("status", "get_status_display")
    error_shown = shown("error", "error", optional=True)
    started = shown("started at", "started_at", clock)
    finished = shown("finished at", "finished_at", clock, none="not finished")
    reverted = shown("reverted at", "reverted_at", clock, optional=True)
    continues_link = shown("continues", "continues_id", template="run_continues", optional=True)
    continued_by_links = shown("continued by", "continued_by", template="run_continued_by")
    os_user_shown = os_user_cell = shown("OS user", "os_user")
    db_role_shown = shown("database role", "db_role")
    client_host_shown = shown("client host", "client_host")
    pid_shown = shown("PID", "pid")
    backend_pid_shown = shown("backend PID", "backend_pid")
    cutoff_shown = shown("cutoff", "cutoff", clock)
    batch_size_shown = shown("batch size", "batch_size", number)
    workspace_shown = shown("workspace", "workspace_id", none="every workspace")
    candidates_link = shown("candidates now", "cutoff", template="run_candidates")
    plan_fingerprint_shown = shown(
        "plan fingerprint", "plan_fingerprint", none="none: executed without --plan"
    )
    plan_made = shown("plan made at (database clock)", "plan_created_at", clock)
    rows_planned_shown = shown("rows planned", "rows_planned", number)
    rows_updated_shown = shown("rows updated", "rows_updated", number)
    removed_shown = shown("input tokens removed", "input_tokens_removed", number)
    clamped_shown = shown("clamped rows (input set to 0)", "clamped_rows", number)
    remaining_shown = shown("rows remaining (still eligible)", "rows_remaining", number)
    journal_link = shown("journal", "rows_updated", template="run_journal")
    stamp_kind = shown("stamp", "stamp", lambda kind: STAMP_KINDS.get(kind, kind or DASH))
    stamp_base_shown = shown("top stamp", "stamp_base", stamp)
    revert_started = shown("revert started at", "revert_started_at", clock, optional=True)
    revert_finished = shown("revert ended at", "revert_finished_at", clock, optional=True)
    rows_restored_shown = shown(
        "rows restored", lambda run: f"{number(run.rows_restored)} of {number(run.rows_updated)}"
    )
    revert_error_shown = shown("why the revert did not finish", "revert_error", optional=True)
    rollup_state_shown = shown("state", "get_rollup_state_display")
    rollup_path_shown = shown(
        "path", "rollup_path", lambda path: ROLLUP_PATHS.get(path, path), optional=True
    )
    rollup_function_shown = shown("rollup function recognised", "rollup_function", optional=True)
    rollup_fingerprint_shown = shown(
        "its definition's fingerprint", "rollup_fingerprint", optional=True
    )
    rollup_path_reason_shown = shown("why this path", "rollup_path_reason", optional=True)
    rollup_keys_shown = shown("hourly keys rebuilt", "rollup_keys", number)
    rollup_rows_shown = shown("hourly rows written", "rollup_rows", number)
    rollup_time = shown("time", "rollup_seconds", seconds)
    rollup_hold = shown("longest hold of lock 4246", "rollup_max_lock_seconds", seconds)

    @admin.display(description="progress")
    def progress_shown(self, obj: BackfillRun) -> str:
        """A running run's progress from its record, as the terminal shows it."""
        done, planned = obj.rows_updated, obj.rows_planned
        share = f" ({100 * done / planned:.0f}%)" if planned else ""
        running_for = (timezone.now() - obj.started_at).total_seconds()
        rate = done / running_for if running_for > 0 else 0.0
        eta = f"ETA {seconds(max(planned - done, 0) / rate)}" if rate else "ETA not known yet"
        return (
            f"{number(done)} of {number(planned)} rows{share}, {number(round(rate))} rows/s "
            f"since it started, {eta} (as of its last batch: reload to follow it)"
        )

    @admin.display(description="arguments")
    def arguments_shown(self, obj: BackfillRun) -> str:
        if not isinstance(obj.arguments, dict) or not obj.arguments:
            return DASH
        rows = format_html_join(
            "",
            '<tr><th scope="row"><code>{}</code></th><td class="{}">{}</td></tr>',
            (
                (option, "quiet" if value == NOT_GIVEN else "", value)
                for option, value in argument_rows(obj.arguments)
            ),
        )
        return format_html('<table class="arguments"><tbody>{}</tbody></table>', rows)

    @admin.display(description="rows in the plan")
    def plan_rows_shown(self, obj: BackfillRun) -> str:
        if obj.plan_rows is None:
            return DASH
        return (
            f"{number(obj.plan_rows)} ({number(obj.rows_planned)} still candidates at the execute)"
        )

    @admin.display(description="batches (database clock)")
    def batches(self, obj: BackfillRun) -> str:
        if obj.rollup_from is None:
            return DASH
        if obj.rollup_to is None:
            return f"from {clock(obj.rollup_from)}, not finished"
        return (
            f"from {clock(obj.rollup_from)} to {clock(obj.rollup_to)} "
            f"({elapsed(obj.rollup_from, obj.rollup_to)})"
        )

    @admin.display(description="rollup watermark at the start")
    def watermark_shown(self, obj: BackfillRun) -> str:
        if obj.watermark_at_start is None and obj.stamp:
            return "none (task_usage_hourly_rollup_state had no row)"
        return stamp(obj.watermark_at_start)

    @admin.display(description="stamps written")
    def stamps_written(self, obj: BackfillRun) -> str:
        first, last = obj.stamp_first, obj.stamp_last
        if first is None or last is None or first == last:
            return stamp(first or last)
        return f"from {stamp(first)} to {stamp(last)}"

    @admin.display(description="state of its latest revert")
    def revert_state_shown(self, obj: BackfillRun) -> str:
        state = obj.get_revert_state_display()
        if obj.revert_state == BackfillRun.RevertState.RUNNING and obj.revert_finished_at is None:
            return f"{state} (or stopped without a trace: kill -9, a lost connection)"
        return state

    @admin.display(description="slices")
    def rollup_slices_shown(self, obj: BackfillRun) -> str:
        slices = number(obj.rollup_slices)
        if not obj.rollup_slices:
            return slices
        if obj.rollup_path == BackfillRun.RollupPath.OWN:
            return f"{slices} (the first a proof against the function)"
        nested = obj.rollup_slices - obj.rollup_hash_slices
        return f"{slices} ({number(obj.rollup_hash_slices)} hashed, {number(nested)} nested-loop)"

    @admin.display(description="waits for the cron tick")
    def rollup_cron_waits_shown(self, obj: BackfillRun) -> str:
        waits = number(obj.rollup_cron_waits)
        if not obj.rollup_cron_waits:
            return waits
        return f"{waits} ({seconds(obj.rollup_cron_wait_seconds)} in all)"


@admin.register(BackfillJournal)
class BackfillJournalAdmin(ReadOnlyAdmin):
    list_display = names(
        "id run_link usage_cell repaired_cell old_input new_input removed cached stamp_cell "
        "reverted_cell"
    )
    list_filter = ("run", ("reverted_at", admin.EmptyFieldListFilter))
    ordering = ("-id",)
    search_fields = ("usage_id",)
    search_help_text = "Search by usage row id (a UUID)."
    sections = {
        "Repair": "repaired run_link usage_link reverted",
        "Input tokens": "old_input new_input removed cached",
        JOURNAL_STAMP_TITLE: "old_updated_at_shown stamp_shown",
    }
    notes = {JOURNAL_STAMP_TITLE: "journal_stamp"}

    run_link = shown("run", "run_id", template="journal_run")
    usage_cell = shown("usage row", "usage_id", short_id, link="admin:usage_candidateusage_change")
    repaired_cell = shown("repaired at", "repaired_at", clock_cell)
    reverted_cell = shown("reverted", "reverted_at", clock_cell)
    stamp_cell = shown("stamp written", "new_updated_at", partial(clock_cell, micro=True))
    repaired = shown("repaired at (database clock)", "repaired_at", template="journal_repaired")
    usage_link = shown("usage row", "usage_id", template="journal_usage")
    reverted = shown("reverted at", "reverted_at", clock, none="not reverted")
    old_input = shown("input before", "old_input_tokens", number)
    new_input = shown("input after", "new_input_tokens", number)
    removed = shown(
        "removed", lambda entry: number(entry.old_input_tokens - entry.new_input_tokens)
    )
    cached = shown("cached", "cache_read_tokens", number)
    old_updated_at_shown = shown(
        "old updated_at (a revert restores it)",
        "old_updated_at",
        stamp,
        none="none (the row had no updated_at)",
    )
    stamp_shown = shown("stamp written to updated_at", "new_updated_at", stamp)

    def render_change_form(
        self, request: HttpRequest, context: dict, *args: Any, obj: BackfillJournal, **kwargs: Any
    ) -> Any:
        context["subtitle"] = (
            f"Journal entry #{obj.pk}: usage row {obj.usage_id}, repaired by run "
            f"#{obj.run_id} at {clock(obj.repaired_at)}"
        )
        return super().render_change_form(request, context, *args, obj=obj, **kwargs)

    def search(self, request: HttpRequest, queryset: QuerySet, term: str) -> QuerySet:
        try:
            return queryset.filter(usage_id=uuid.UUID(term))
        except ValueError:
            messages.warning(request, f"{term!r} is not a usage row id (a UUID).")
            return queryset.none()
