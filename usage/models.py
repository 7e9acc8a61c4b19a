"""The application's tables (unmanaged: Django never creates or alters them) and the tool's
own run record and journal, in the tool's schema."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Self

from django.contrib.postgres.indexes import BrinIndex
from django.db import connection, models
from django.db.models.expressions import RawSQL
from django.utils.functional import cached_property

from usage.eligibility import CANDIDATE_IDS_SQL, FRAGMENTS, compose, eligible_params


class Agent(models.Model):
    id = models.UUIDField(primary_key=True)
    workspace_id = models.UUIDField()
    name = models.TextField()
    runtime_id = models.UUIDField(null=True)
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "agent"


class Issue(models.Model):
    id = models.UUIDField(primary_key=True)
    workspace_id = models.UUIDField()
    project_id = models.UUIDField(null=True)

    class Meta:
        managed = False
        db_table = "issue"


class AgentTaskQueue(models.Model):
    id = models.UUIDField(primary_key=True)
    agent = models.ForeignKey(
        Agent, on_delete=models.DO_NOTHING, db_column="agent_id", related_name="tasks"
    )
    runtime_id = models.UUIDField(null=True)
    issue = models.ForeignKey(
        Issue, on_delete=models.DO_NOTHING, db_column="issue_id", null=True, related_name="+"
    )
    status = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "agent_task_queue"

    def __str__(self) -> str:
        return str(self.id)


class TaskUsage(models.Model):
    id = models.UUIDField(primary_key=True)
    task = models.ForeignKey(
        AgentTaskQueue, on_delete=models.DO_NOTHING, db_column="task_id", related_name="usage"
    )
    provider = models.TextField()
    model = models.TextField()
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    cache_read_tokens = models.BigIntegerField()
    cache_write_tokens = models.BigIntegerField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField(null=True)
    cost_usd_ticks = models.BigIntegerField(null=True)

    class Meta:
        managed = False
        db_table = "task_usage"
        verbose_name = "task usage row"

    def __str__(self) -> str:
        return str(self.id)


class BackfillRun(models.Model):
    """One ``--execute`` invocation: who ran it, with what, and what it did."""

    class Status(models.TextChoices):
        RUNNING = "running"
        INTERRUPTED = "interrupted"
        FAILED = "failed"
        SUCCEEDED = "succeeded"
        REVERTED = "reverted"

    class RollupState(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        SKIPPED = "skipped"

    class Stamp(models.TextChoices):
        BELOW_WATERMARK = "below_watermark"
        REPAIR_TIME = "repair_time"

    class RevertState(models.TextChoices):
        RUNNING = "running"
        STOPPED = "stopped"  # by a signal: the rows restored so far stay restored
        INCOMPLETE = "incomplete"  # rows stayed locked by writers
        FAILED = "failed"
        DONE = "done"

    class RollupPath(models.TextChoices):
        OWN = "own"  # the tool's aggregate-first recompute, for a function definition it knows
        FUNCTION = "function"  # the platform's rollup_task_usage_hourly_window

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    rollup_state = models.CharField(
        max_length=16, choices=RollupState.choices, default=RollupState.PENDING
    )
    os_user = models.TextField(blank=True)
    db_role = models.TextField(blank=True)
    client_host = models.TextField(blank=True)
    pid = models.IntegerField(null=True)
    backend_pid = models.IntegerField(null=True)
    arguments = models.JSONField(default=dict)
    cutoff = models.DateTimeField()
    workspace_id = models.UUIDField(null=True, blank=True)
    batch_size = models.IntegerField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    rows_planned = models.BigIntegerField(default=0)
    rows_updated = models.BigIntegerField(default=0)
    input_tokens_removed = models.BigIntegerField(default=0)
    clamped_rows = models.BigIntegerField(default=0)
    rows_remaining = models.BigIntegerField(default=0)
    rollup_from = models.DateTimeField(null=True, blank=True)
    rollup_to = models.DateTimeField(null=True, blank=True)
    rollup_slices = models.IntegerField(default=0)
    rollup_rows = models.BigIntegerField(default=0)
    rollup_max_lock_seconds = models.FloatField(default=0)
    rollup_keys = models.BigIntegerField(default=0)
    rollup_seconds = models.FloatField(default=0)
    rollup_hash_slices = models.IntegerField(default=0)
    rollup_cron_waits = models.IntegerField(default=0)
    rollup_cron_wait_seconds = models.FloatField(default=0)
    stamp = models.CharField(max_length=24, choices=Stamp.choices, blank=True)
    # The top stamp (docs/design.md, "The platform's cron tick and lock 4246").
    stamp_base = models.DateTimeField(null=True, blank=True)
    watermark_at_start = models.DateTimeField(null=True, blank=True)
    stamp_first = models.DateTimeField(null=True, blank=True)
    stamp_last = models.DateTimeField(null=True, blank=True)
    # The installed function recognised: a version name, or "unknown".
    rollup_path = models.CharField(max_length=16, choices=RollupPath.choices, blank=True)
    rollup_function = models.CharField(max_length=80, blank=True)
    rollup_fingerprint = models.CharField(max_length=80, blank=True)
    rollup_path_reason = models.TextField(blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)
    # The latest revert of this run ("" before any); rows restored counts every revert.
    revert_state = models.CharField(max_length=16, choices=RevertState.choices, blank=True)
    revert_started_at = models.DateTimeField(null=True, blank=True)
    revert_finished_at = models.DateTimeField(null=True, blank=True)
    rows_restored = models.BigIntegerField(default=0)
    revert_error = models.TextField(blank=True)
    error = models.TextField(blank=True)
    # The saved plan the run executed (``--plan``).
    plan_fingerprint = models.CharField(max_length=80, blank=True)
    plan_created_at = models.DateTimeField(null=True, blank=True)
    plan_rows = models.BigIntegerField(null=True, blank=True)
    # The earlier run (interrupted or failed) on the same cutoff and workspace it continues.
    continues = models.ForeignKey(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="continued_by",
        db_index=False,
    )

    class Meta:
        db_table = "backfill_run"
        ordering = ["-id"]
        indexes = [models.Index(fields=["status"], name="backfill_run_status")]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.status})"


class BackfillJournal(models.Model):
    """A row the repair changed and what it was before, written with the update: proof and undo."""

    run = models.ForeignKey(
        BackfillRun, on_delete=models.PROTECT, related_name="journal", db_index=False
    )
    usage_id = models.UUIDField()
    old_input_tokens = models.BigIntegerField()
    old_updated_at = models.DateTimeField(null=True)
    new_input_tokens = models.BigIntegerField()
    cache_read_tokens = models.BigIntegerField()
    new_updated_at = models.DateTimeField()
    # The database time of the repair (``new_updated_at`` is the stamp).
    repaired_at = models.DateTimeField(null=True, blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "backfill_journal"
        verbose_name = "journal entry"
        verbose_name_plural = "journal entries"
        constraints = [
            models.UniqueConstraint(
                fields=["usage_id"],
                condition=models.Q(reverted_at__isnull=True),
                name="backfill_journal_repaired_once",
            )
        ]
        # Appended run by run: BRIN serves the per-run reads at almost no write cost.
        indexes = [BrinIndex(fields=["run", "new_updated_at"], name="backfill_journal_run_brin")]

    def __str__(self) -> str:
        return f"{self.usage_id} in run {self.run_id}"


_NAMED_PARAM = re.compile(r"%\((\w+)\)s")


def _on_usage_table(fragment: str, field: models.Field) -> RawSQL:
    """The shared fragments name the usage table ``tu``; the ORM names it after its table."""
    alias = connection.ops.quote_name(TaskUsage._meta.db_table)
    return RawSQL(re.sub(r"\btu\.", f"{alias}.", FRAGMENTS[fragment]), (), field)


class CandidateUsageQuerySet(models.QuerySet):
    def with_repair(self) -> Self:
        return self.annotate(
            corrected_input=_on_usage_table("corrected_input", models.BigIntegerField()),
            tokens_removed=_on_usage_table("removed_input", models.BigIntegerField()),
            clamped=_on_usage_table("is_clamped", models.BooleanField()),
        )

    def eligible(self, cutoff: datetime, workspace_id: uuid.UUID | None) -> Self:
        # ``RawSQL`` takes positional parameters.
        ids_sql, params = compose(CANDIDATE_IDS_SQL), eligible_params(cutoff, workspace_id)
        values = [params[name] for name in _NAMED_PARAM.findall(ids_sql)]
        return self.filter(id__in=RawSQL(_NAMED_PARAM.sub("%s", ids_sql), values))


class CandidateUsage(TaskUsage):
    """A ``task_usage`` row as the admin's candidates page shows it (no table of its own)."""

    objects = CandidateUsageQuerySet.as_manager()

    @cached_property
    def repair_entry(self) -> BackfillJournal | None:
        return BackfillJournal.objects.filter(usage_id=self.id, reverted_at__isnull=True).first()

    class Meta:
        proxy = True
        verbose_name = "candidate"
        verbose_name_plural = "candidates"
