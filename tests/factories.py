"""Builders for target rows in tests: explicit values, no hidden randomness that matters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from usage.models import Agent, AgentTaskQueue, Issue, TaskUsage

CUTOFF = datetime(2026, 6, 13, 8, 0, tzinfo=UTC)
BEFORE = CUTOFF - timedelta(days=2)
AFTER = CUTOFF + timedelta(days=1)


def make_agent(workspace_id: uuid.UUID | None = None, name: str | None = None) -> Agent:
    return Agent.objects.create(
        id=uuid.uuid4(),
        workspace_id=workspace_id or uuid.uuid4(),
        name=name or f"agent-{uuid.uuid4().hex[:8]}",
        created_at=BEFORE - timedelta(days=30),
    )


def make_task(
    agent: Agent, *, runtime: bool = True, project_id: uuid.UUID | None = None
) -> AgentTaskQueue:
    issue = None
    if project_id is not None:
        issue = Issue.objects.create(
            id=uuid.uuid4(), workspace_id=agent.workspace_id, project_id=project_id
        )
    return AgentTaskQueue.objects.create(
        id=uuid.uuid4(),
        agent=agent,
        runtime_id=uuid.uuid4() if runtime else None,
        issue=issue,
        status="completed",
        created_at=BEFORE - timedelta(days=1),
    )


def make_usage(
    task: AgentTaskQueue,
    *,
    provider: str = "codex",
    model: str | None = None,
    input_tokens: int = 1000,
    cache_read_tokens: int = 300,
    output_tokens: int = 50,
    created_at: datetime = BEFORE,
    updated_at: datetime | None | str = "same",
    cost_usd_ticks: int | None = 10,
) -> TaskUsage:
    return TaskUsage.objects.create(
        id=uuid.uuid4(),
        task=task,
        provider=provider,
        model=model or f"model-{uuid.uuid4().hex[:6]}",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=0,
        created_at=created_at,
        updated_at=created_at if updated_at == "same" else updated_at,
        cost_usd_ticks=cost_usd_ticks,
    )


def make_keys(agents: int, models: int) -> list[TaskUsage]:
    """``agents`` x ``models`` eligible rows, each its own hourly key, rolled up."""
    rows = []
    for _ in range(agents):
        task = make_task(make_agent())
        rows.extend(make_usage(task, model=f"m{model}") for model in range(models))
    populate_rollup()
    return rows


def populate_rollup() -> int:
    """Bring task_usage_hourly in line with task_usage, as production's cron would."""
    from django.db import connection

    from usage.eligibility import compose

    with connection.cursor() as cursor:
        cursor.execute(
            compose("SELECT {rollup_task_usage_hourly_window}('-infinity', 'infinity')")
        )
        return cursor.fetchone()[0]


def set_rollup_state(watermark_at: datetime, last_run_started_at: datetime | None = None) -> None:
    """Put the platform's cron tick where a test needs it (its watermark and last start)."""
    from django.db import connection

    from usage.eligibility import compose

    with connection.cursor() as cursor:
        cursor.execute(
            compose(
                "UPDATE {task_usage_hourly_rollup_state}"
                " SET watermark_at = %s, last_run_started_at = %s WHERE id = 1"
            ),
            [watermark_at, last_run_started_at],
        )
