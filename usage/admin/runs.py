"""The runs, read-only: what each repair was asked, what it did, and how.

A run's page says who ran it, with which arguments, what it changed, the ``updated_at`` stamp
it wrote and why, and how it rebuilt the hourly rollup. Fields a run does not have (no error,
never reverted, no run it continues, none of the rollup path's details) are left out rather
than shown empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from usage.admin.base import ReadOnlyAdmin, candidates_url, journal_url, run_url
from usage.admin.candidate_page import cutoff_param
from usage.admin.formats import (
    DASH,
    clock,
    clock_cell,
    elapsed,
    number,
    seconds,
)
from usage.models import BackfillRun

README_SECTION = "the README, “The platform's cron tick and lock 4246”"

STAMP_KINDS = {
    BackfillRun.Stamp.BELOW_WATERMARK: "just below the platform rollup's watermark",
    BackfillRun.Stamp.REPAIR_TIME: "the time the run started",
}
STAMP_HELP = {
    BackfillRun.Stamp.BELOW_WATERMARK: (
        "Each repaired row's <code>updated_at</code> is a stamp of its hourly key, from the "
        "top stamp down, a microsecond a key (neighbouring keys share one where there is less "
        "room): strictly below the platform rollup's watermark read at the start, and "
        "strictly after the cutoff. This is on purpose: the platform's cron tick never covers "
        "that time again, so it never re-rolls the keys this run rebuilt, and the row is never "
        "eligible again. When each row was repaired is in its journal entry "
        f"(<em>repaired at</em>). See {README_SECTION}."
    ),
    BackfillRun.Stamp.REPAIR_TIME: (
        "The rows were stamped with the time the run started: the platform rollup's watermark "
        "was not usable (its cron tick never ran, or its watermark was not after the cutoff), "
        "or the run left the rollup to the cron tick (<code>--no-rebuild-rollup</code>). The "
        "platform's rollup re-rolls these rows' hourly keys once its watermark passes that "
        f"time. See {README_SECTION}."
    ),
}
ROLLUP_PATHS = {
    BackfillRun.RollupPath.OWN: "the tool's own recompute (for a rollup function it recognised)",
    BackfillRun.RollupPath.FUNCTION: "the platform's rollup_task_usage_hourly_window",
}

# The command's recorded options in reading order (what, which plan, how fast, the rollup);
# a flag is recorded as the setting it turns off ("rebuild_rollup": "False" for
# --no-rebuild-rollup). Options recorded later by a newer version follow, by name.
ARGUMENT_ORDER = (
    "cutoff",
    "workspace_id",
    "plan",
    "plan_max_age",
    "batch_size",
    "sleep_between_batches",
    "lock_timeout",
    "statement_timeout",
    "max_replication_lag",
    "rebuild_rollup",
    "max_rollup_lock_seconds",
    "cron_tick_interval",
)
NEGATED_FLAGS = {"rebuild_rollup": "--no-rebuild-rollup"}
NOT_GIVEN = "not given"


def argument_rows(arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """The recorded arguments as (option, value) pairs: unset options say "not given"."""
    known = [key for key in ARGUMENT_ORDER if key in arguments]
    rest = sorted(key for key in arguments if key not in ARGUMENT_ORDER)
    rows = []
    for key in [*known, *rest]:
        value = arguments[key]
        text = "" if value is None else str(value).strip()
        if key in NEGATED_FLAGS:
            given = text.lower() in ("false", "0", "no")
            rows.append((NEGATED_FLAGS[key], "given" if given else NOT_GIVEN))
            continue
        if text in ("", "None", "null"):
            text = NOT_GIVEN
        rows.append(("--" + key.replace("_", "-"), text))
    return rows


def run_link(run: BackfillRun) -> SafeString:
    return format_html(
        '<a href="{}">run #{}</a> ({})', run_url(run.pk), run.pk, run.get_status_display()
    )


# -- runs ----------------------------------------------------------------------------------


@admin.register(BackfillRun)
class BackfillRunAdmin(ReadOnlyAdmin):
    # Fits the list's 1,050 px at a 1,400 px window: times may wrap between date and time,
    # rows updated link to the journal, the rollup state shows under the status when not done.
    list_display = (
        "id",
        "status_cell",
        "started_cell",
        "took",
        "cutoff_cell",
        "workspace",
        "updated",
        "removed",
        "clamped",
        "remaining",
        "os_user_cell",
    )
    list_display_links = ("id",)
    id_columns = {"workspace": lambda run: run.workspace_id}
    list_filter = ("status", "rollup_state")
    ordering = ("-id",)
    fieldsets = (
        (
            "Run",
            {
                "fields": (
                    "status_shown",
                    "progress_shown",
                    "error_shown",
                    "started",
                    "finished",
                    "took",
                    "reverted",
                    "continues_link",
                    "continued_by_links",
                )
            },
        ),
        (
            "Who ran it",
            {
                "fields": (
                    "os_user_shown",
                    "db_role_shown",
                    "client_host_shown",
                    "pid_shown",
                    "backend_pid_shown",
                )
            },
        ),
        (
            "What it was asked",
            {
                "fields": (
                    "cutoff_shown",
                    "workspace_shown",
                    "batch_size_shown",
                    "arguments_shown",
                    "candidates_link",
                )
            },
        ),
        ("Saved plan", {"fields": ("plan_fingerprint_shown", "plan_made", "plan_rows_shown")}),
        (
            "Result",
            {
                "fields": (
                    "rows_planned_shown",
                    "rows_updated_shown",
                    "removed_shown",
                    "clamped_shown",
                    "remaining_shown",
                    "journal_link",
                    "batches",
                )
            },
        ),
        (
            "Stamp: the updated_at written into the repaired rows",
            {
                "fields": (
                    "stamp_kind",
                    "stamp_base_shown",
                    "watermark_shown",
                    "stamps_written",
                )
            },
        ),
        (
            "Revert",
            {
                "fields": (
                    "revert_state_shown",
                    "revert_started",
                    "revert_finished",
                    "rows_restored_shown",
                    "revert_error_shown",
                )
            },
        ),
        (
            "Hourly rollup",
            {
                "fields": (
                    "rollup_state_shown",
                    "rollup_path_shown",
                    "rollup_function_shown",
                    "rollup_fingerprint_shown",
                    "rollup_path_reason_shown",
                    "rollup_keys_shown",
                    "rollup_slices_shown",
                    "rollup_rows_shown",
                    "rollup_time",
                    "rollup_hold",
                    "rollup_cron_waits_shown",
                )
            },
        ),
    )
    # Shown only when the run has them.
    optional_fields: dict[str, Callable[[BackfillRun], Any]] = {
        "progress_shown": lambda run: run.status == BackfillRun.Status.RUNNING,
        "revert_state_shown": lambda run: run.revert_state,
        "revert_started": lambda run: run.revert_started_at,
        "revert_finished": lambda run: run.revert_finished_at,
        "rows_restored_shown": lambda run: run.revert_state,
        "revert_error_shown": lambda run: run.revert_error,
        "error_shown": lambda run: run.error,
        "reverted": lambda run: run.reverted_at,
        "continues_link": lambda run: run.continues_id,
        "continued_by_links": lambda run: run.continued_by.exists(),
        "stamps_written": lambda run: run.stamp_first or run.stamp_last,
        "rollup_path_shown": lambda run: run.rollup_path,
        "rollup_function_shown": lambda run: run.rollup_function,
        "rollup_fingerprint_shown": lambda run: run.rollup_fingerprint,
        "rollup_path_reason_shown": lambda run: run.rollup_path_reason,
        "plan_made": lambda run: run.plan_fingerprint,
        "plan_rows_shown": lambda run: run.plan_fingerprint,
    }

    def get_fieldsets(self, request: HttpRequest, obj: BackfillRun | None = None) -> Any:
        if obj is None:
            return self.fieldsets
        shown = []
        for title, options in self.fieldsets:
            fields = tuple(
                name
                for name in options["fields"]
                if name not in self.optional_fields or self.optional_fields[name](obj)
            )
            if not fields:
                continue  # a section with nothing to show (a run never reverted)
            options = {**options, "fields": fields}
            if title.startswith("Stamp") and obj.stamp in STAMP_HELP:
                options["description"] = STAMP_HELP[obj.stamp]
            shown.append((title, options))
        return shown

    # -- list columns (some are detail fields too) -------------------------------------

    @admin.display(description="status", ordering="status")
    def status_cell(self, obj: BackfillRun) -> str:
        if obj.rollup_state == BackfillRun.RollupState.DONE:
            return obj.get_status_display()
        return format_html(
            '{}<br><span class="quiet nowrap">rollup {}</span>',
            obj.get_status_display(),
            obj.rollup_state,
        )

    @admin.display(description="started", ordering="started_at")
    def started_cell(self, obj: BackfillRun) -> str:
        return clock_cell(obj.started_at)

    @admin.display(description="took")
    def took(self, obj: BackfillRun) -> str:
        return elapsed(obj.started_at, obj.finished_at)

    @admin.display(description="cutoff", ordering="cutoff")
    def cutoff_cell(self, obj: BackfillRun) -> str:
        return clock_cell(obj.cutoff)

    @admin.display(description="workspace", ordering="workspace_id")
    def workspace(self, obj: BackfillRun) -> str:
        return self.short_id_of(obj, "workspace") if obj.workspace_id else "all"

    @admin.display(description="updated", ordering="rows_updated")
    def updated(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}" title="the journal entries of run #{}">{}</a>',
            journal_url(run__id__exact=obj.pk),
            obj.pk,
            number(obj.rows_updated),
        )

    @admin.display(description="removed", ordering="input_tokens_removed")
    def removed(self, obj: BackfillRun) -> str:
        return number(obj.input_tokens_removed)

    @admin.display(description="clamped", ordering="clamped_rows")
    def clamped(self, obj: BackfillRun) -> str:
        return number(obj.clamped_rows)

    @admin.display(description="left", ordering="rows_remaining")
    def remaining(self, obj: BackfillRun) -> str:
        return number(obj.rows_remaining)

    @admin.display(description="OS user", ordering="os_user")
    def os_user_cell(self, obj: BackfillRun) -> str:
        return obj.os_user or DASH

    # -- the run -----------------------------------------------------------------------

    @admin.display(description="status")
    def status_shown(self, obj: BackfillRun) -> str:
        return obj.get_status_display()

    @admin.display(description="progress")
    def progress_shown(self, obj: BackfillRun) -> str:
        """A running run's progress from its record, as the terminal shows it: rows done of
        planned, the rate since it started and the ETA (as of its last batch)."""
        done, planned = obj.rows_updated, obj.rows_planned
        share = f" ({100 * done / planned:.0f}%)" if planned else ""
        running_for = (timezone.now() - obj.started_at).total_seconds()
        rate = done / running_for if running_for > 0 else 0.0
        left = max(planned - done, 0)
        eta = f"ETA {seconds(left / rate)}" if rate else "ETA not known yet"
        return (
            f"{number(done)} of {number(planned)} rows{share}, {number(round(rate))} rows/s "
            f"since it started, {eta} (as of its last batch: reload to follow it)"
        )

    @admin.display(description="error")
    def error_shown(self, obj: BackfillRun) -> str:
        return obj.error

    @admin.display(description="started at")
    def started(self, obj: BackfillRun) -> str:
        return clock(obj.started_at)

    @admin.display(description="finished at")
    def finished(self, obj: BackfillRun) -> str:
        return clock(obj.finished_at) if obj.finished_at else "not finished"

    @admin.display(description="reverted at")
    def reverted(self, obj: BackfillRun) -> str:
        return clock(obj.reverted_at)

    @admin.display(description="state of its latest revert")
    def revert_state_shown(self, obj: BackfillRun) -> str:
        state = obj.get_revert_state_display()
        if obj.revert_state == BackfillRun.RevertState.RUNNING and obj.revert_finished_at is None:
            return f"{state} (or stopped without a trace: kill -9, a lost connection)"
        return state

    @admin.display(description="revert started at")
    def revert_started(self, obj: BackfillRun) -> str:
        return clock(obj.revert_started_at)

    @admin.display(description="revert ended at")
    def revert_finished(self, obj: BackfillRun) -> str:
        return clock(obj.revert_finished_at)

    @admin.display(description="rows restored")
    def rows_restored_shown(self, obj: BackfillRun) -> str:
        return f"{number(obj.rows_restored)} of {number(obj.rows_updated)}"

    @admin.display(description="why the revert did not finish")
    def revert_error_shown(self, obj: BackfillRun) -> str:
        return obj.revert_error

    @admin.display(description="continues")
    def continues_link(self, obj: BackfillRun) -> str:
        return run_link(obj.continues) if obj.continues_id else DASH

    @admin.display(description="continued by")
    def continued_by_links(self, obj: BackfillRun) -> str:
        runs = obj.continued_by.order_by("id")
        return format_html_join(", ", "{}", ((run_link(run),) for run in runs)) or DASH

    # -- who ---------------------------------------------------------------------------

    @admin.display(description="OS user")
    def os_user_shown(self, obj: BackfillRun) -> str:
        return obj.os_user or DASH

    @admin.display(description="database role")
    def db_role_shown(self, obj: BackfillRun) -> str:
        return obj.db_role or DASH

    @admin.display(description="client host")
    def client_host_shown(self, obj: BackfillRun) -> str:
        return obj.client_host or DASH

    @admin.display(description="PID")
    def pid_shown(self, obj: BackfillRun) -> str:
        return DASH if obj.pid is None else str(obj.pid)

    @admin.display(description="backend PID")
    def backend_pid_shown(self, obj: BackfillRun) -> str:
        return DASH if obj.backend_pid is None else str(obj.backend_pid)

    # -- what --------------------------------------------------------------------------

    @admin.display(description="cutoff")
    def cutoff_shown(self, obj: BackfillRun) -> str:
        return clock(obj.cutoff)

    @admin.display(description="workspace")
    def workspace_shown(self, obj: BackfillRun) -> str:
        return str(obj.workspace_id) if obj.workspace_id else "every workspace"

    @admin.display(description="batch size")
    def batch_size_shown(self, obj: BackfillRun) -> str:
        return number(obj.batch_size)

    @admin.display(description="arguments")
    def arguments_shown(self, obj: BackfillRun) -> str:
        if not isinstance(obj.arguments, dict) or not obj.arguments:
            return DASH
        rows = format_html_join(
            "",
            '<tr><th scope="row"><code>{}</code></th><td{}>{}</td></tr>',
            (
                (option, ' class="quiet"' if value == NOT_GIVEN else "", value)
                for option, value in argument_rows(obj.arguments)
            ),
        )
        return format_html('<table class="arguments"><tbody>{}</tbody></table>', rows)

    @admin.display(description="candidates now")
    def candidates_link(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}">rows still eligible for this cutoff and workspace</a>',
            candidates_url(cutoff=cutoff_param(obj.cutoff), workspace=obj.workspace_id or ""),
        )

    # -- plan --------------------------------------------------------------------------

    @admin.display(description="plan fingerprint")
    def plan_fingerprint_shown(self, obj: BackfillRun) -> str:
        return obj.plan_fingerprint or "none: executed without --plan"

    @admin.display(description="plan made at (database clock)")
    def plan_made(self, obj: BackfillRun) -> str:
        return clock(obj.plan_created_at)

    @admin.display(description="rows in the plan")
    def plan_rows_shown(self, obj: BackfillRun) -> str:
        if obj.plan_rows is None:
            return DASH
        return (
            f"{number(obj.plan_rows)} ({number(obj.rows_planned)} still candidates at the execute)"
        )

    # -- result ------------------------------------------------------------------------

    @admin.display(description="rows planned")
    def rows_planned_shown(self, obj: BackfillRun) -> str:
        return number(obj.rows_planned)

    @admin.display(description="rows updated")
    def rows_updated_shown(self, obj: BackfillRun) -> str:
        return number(obj.rows_updated)

    @admin.display(description="input tokens removed")
    def removed_shown(self, obj: BackfillRun) -> str:
        return number(obj.input_tokens_removed)

    @admin.display(description="clamped rows (input set to 0)")
    def clamped_shown(self, obj: BackfillRun) -> str:
        return number(obj.clamped_rows)

    @admin.display(description="rows remaining (still eligible)")
    def remaining_shown(self, obj: BackfillRun) -> str:
        return number(obj.rows_remaining)

    @admin.display(description="journal")
    def journal_link(self, obj: BackfillRun) -> str:
        return format_html(
            '<a href="{}">{} entries</a>',
            journal_url(run__id__exact=obj.pk),
            number(obj.rows_updated),
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

    # -- stamp -------------------------------------------------------------------------

    @admin.display(description="stamp")
    def stamp_kind(self, obj: BackfillRun) -> str:
        return STAMP_KINDS.get(obj.stamp, obj.stamp or DASH)

    @admin.display(description="top stamp")
    def stamp_base_shown(self, obj: BackfillRun) -> str:
        return clock(obj.stamp_base, micro=True)

    @admin.display(description="rollup watermark at the start")
    def watermark_shown(self, obj: BackfillRun) -> str:
        if obj.watermark_at_start is None and obj.stamp:
            return "none (task_usage_hourly_rollup_state had no row)"
        return clock(obj.watermark_at_start, micro=True)

    @admin.display(description="stamps written")
    def stamps_written(self, obj: BackfillRun) -> str:
        first, last = obj.stamp_first, obj.stamp_last
        if first is None or last is None or first == last:
            return clock(first or last, micro=True)
        return f"from {clock(first, micro=True)} to {clock(last, micro=True)}"

    # -- rollup ------------------------------------------------------------------------

    @admin.display(description="state")
    def rollup_state_shown(self, obj: BackfillRun) -> str:
        return obj.get_rollup_state_display()

    @admin.display(description="path")
    def rollup_path_shown(self, obj: BackfillRun) -> str:
        return ROLLUP_PATHS.get(obj.rollup_path, obj.rollup_path)

    @admin.display(description="rollup function recognised")
    def rollup_function_shown(self, obj: BackfillRun) -> str:
        return obj.rollup_function

    @admin.display(description="its definition's fingerprint")
    def rollup_fingerprint_shown(self, obj: BackfillRun) -> str:
        return obj.rollup_fingerprint

    @admin.display(description="why this path")
    def rollup_path_reason_shown(self, obj: BackfillRun) -> str:
        return obj.rollup_path_reason

    @admin.display(description="hourly keys rebuilt")
    def rollup_keys_shown(self, obj: BackfillRun) -> str:
        return number(obj.rollup_keys)

    @admin.display(description="slices")
    def rollup_slices_shown(self, obj: BackfillRun) -> str:
        if not obj.rollup_slices:
            return number(obj.rollup_slices)
        if obj.rollup_path == BackfillRun.RollupPath.OWN:
            return f"{number(obj.rollup_slices)} (the first a proof against the function)"
        nested = obj.rollup_slices - obj.rollup_hash_slices
        return (
            f"{number(obj.rollup_slices)} ({number(obj.rollup_hash_slices)} hashed, "
            f"{number(nested)} nested-loop)"
        )

    @admin.display(description="hourly rows written")
    def rollup_rows_shown(self, obj: BackfillRun) -> str:
        return number(obj.rollup_rows)

    @admin.display(description="time")
    def rollup_time(self, obj: BackfillRun) -> str:
        return seconds(obj.rollup_seconds)

    @admin.display(description="longest hold of lock 4246")
    def rollup_hold(self, obj: BackfillRun) -> str:
        return seconds(obj.rollup_max_lock_seconds)

    @admin.display(description="waits for the cron tick")
    def rollup_cron_waits_shown(self, obj: BackfillRun) -> str:
        if not obj.rollup_cron_waits:
            return number(obj.rollup_cron_waits)
        return f"{number(obj.rollup_cron_waits)} ({seconds(obj.rollup_cron_wait_seconds)} in all)"
