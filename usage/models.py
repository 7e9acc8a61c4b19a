"""Models: the application's tables (unmanaged) and the tool's own run record and journal.

The unmanaged models map the target tables the repair reads and writes; Django never creates
or alters them. ``BackfillRun`` and ``BackfillJournal`` are the tool's own, created by
``migrate`` in the tool's schema (``CODEX_REPAIR_SCHEMA``), never in the application's.
"""

from __future__ import annotations

from django.contrib.postgres.indexes import BrinIndex
from django.db import models


class Agent(models.Model):
    id = models.UUIDField(primary_key=True)
    workspace_id = models.UUIDField()
    name = models.TextField()
    runtime_id = models.UUIDField(null=True)
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "agent"

    def __str__(self) -> str:
        return self.name


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
        """What ``updated_at`` the run writes into the rows it repairs (see ``usage.stamp``)."""

        BELOW_WATERMARK = "below_watermark"
        REPAIR_TIME = "repair_time"

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
    stamp = models.CharField(max_length=24, choices=Stamp.choices, blank=True)
    # Rows are stamped ``stamp_base`` less their hourly key's rank in microseconds.
    stamp_base = models.DateTimeField(null=True, blank=True)
    watermark_at_start = models.DateTimeField(null=True, blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    # The saved plan the run executed (``--plan``; see ``usage.plan``): its fingerprint of the
    # candidate set, the database time it was made, and how many rows it planned.
    plan_fingerprint = models.CharField(max_length=80, blank=True)
    plan_created_at = models.DateTimeField(null=True, blank=True)
    plan_rows = models.BigIntegerField(null=True, blank=True)

    class Meta:
        db_table = "backfill_run"
        ordering = ["-id"]
        indexes = [models.Index(fields=["status"], name="backfill_run_status")]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.status})"


class BackfillJournal(models.Model):
    """A row the repair changed, with what it was before: the proof and the undo record.

    Written in the same statement as the update it describes. The partial unique constraint
    makes "repaired at most once" a database fact, not only a query filter.

    Every repaired row writes an entry, so each index here is paid once per row. Entries are
    appended one run at a time, so a BRIN index on the run serves the per-run reads (rollup
    keys, revert, verify) at almost no write cost; the foreign key gets no index of its own.
    """

    run = models.ForeignKey(
        BackfillRun, on_delete=models.PROTECT, related_name="journal", db_index=False
    )
    usage_id = models.UUIDField()
    old_input_tokens = models.BigIntegerField()
    old_updated_at = models.DateTimeField(null=True)
    new_input_tokens = models.BigIntegerField()
    cache_read_tokens = models.BigIntegerField()
    new_updated_at = models.DateTimeField()
    # The database time of the repair: ``new_updated_at`` is what was written into the row,
    # which may be just below the platform's rollup watermark rather than the repair's time.
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
        indexes = [BrinIndex(fields=["run", "new_updated_at"], name="backfill_journal_run_brin")]

    def __str__(self) -> str:
        return f"{self.usage_id} in run {self.run_id}"


# The admin's proxy model lives with the admin code; import it so the app always has it.
from usage.candidates import CandidateUsage  # noqa: E402,F401
