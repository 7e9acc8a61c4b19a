-- Target-database schema fixture for the task_usage repair tool.
--
-- Written from the facts in shared/docs/target-database.md.  It creates the
-- subset of the hosted application's schema that the repair reads and writes,
-- plus the hourly rollup and its rebuild function, on an empty database.
-- Object names are unqualified on purpose: everything lands in the first
-- schema on search_path, and the rollup function resolves its tables through
-- the calling session's search_path.  Requires PostgreSQL 15 or newer
-- (UNIQUE NULLS NOT DISTINCT).
--
-- Hourly rollup key derivation.  For a task_usage row tu with
--     JOIN agent_task_queue q ON q.id = tu.task_id
--     JOIN agent a            ON a.id = q.agent_id
--     LEFT JOIN issue i       ON i.id = q.issue_id
-- the key of its task_usage_hourly bucket is
--     bucket_hour  = date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
--     workspace_id = a.workspace_id
--     runtime_id   = q.runtime_id
--     agent_id     = q.agent_id
--     project_id   = i.project_id   (NULL without an issue or without a project)
--     provider     = tu.provider
--     model        = tu.model
-- Rows whose task has q.runtime_id IS NULL are not rolled up.  Keys compare
-- NULL project_id (and NULL runtime_id in the dirty queue) as equal.

CREATE TABLE agent (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    runtime_id uuid NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_agent_workspace_name UNIQUE (workspace_id, name)
);

CREATE TABLE issue (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL,
    project_id uuid NULL
);

CREATE TABLE agent_task_queue (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id uuid NOT NULL REFERENCES agent (id) ON DELETE CASCADE,
    runtime_id uuid NULL,
    issue_id uuid NULL REFERENCES issue (id) ON DELETE SET NULL,
    status text NOT NULL DEFAULT 'completed',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_agent_task_queue_agent_id ON agent_task_queue (agent_id);

CREATE TABLE task_usage (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id uuid NOT NULL REFERENCES agent_task_queue (id) ON DELETE CASCADE,
    provider text NOT NULL DEFAULT '',
    model text NOT NULL,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    cache_read_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULL on legacy rows written before the column existed.
    updated_at timestamptz NULL DEFAULT now(),
    cost_usd_ticks bigint NULL,
    CONSTRAINT uq_task_usage_task_provider_model UNIQUE (task_id, provider, model)
);

CREATE INDEX idx_task_usage_task_id ON task_usage (task_id);
CREATE INDEX idx_task_usage_created_at ON task_usage (created_at);
CREATE INDEX idx_task_usage_updated_at ON task_usage (updated_at);
CREATE INDEX idx_task_usage_legacy_created_at ON task_usage (created_at)
    WHERE updated_at IS NULL;

CREATE TABLE task_usage_hourly (
    bucket_hour timestamptz NOT NULL,
    workspace_id uuid NOT NULL,
    runtime_id uuid NOT NULL,
    agent_id uuid NOT NULL,
    project_id uuid NULL,
    provider text NOT NULL,
    model text NOT NULL,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    cache_read_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens bigint NOT NULL DEFAULT 0,
    cost_usd_ticks bigint NOT NULL DEFAULT 0,
    task_count bigint NOT NULL DEFAULT 0,
    event_count bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_task_usage_hourly_key UNIQUE NULLS NOT DISTINCT
        (bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model)
);

-- Keys invalidated by deletes and re-attributions, drained by the rollup.
CREATE TABLE task_usage_hourly_dirty (
    id bigserial PRIMARY KEY,
    bucket_hour timestamptz NOT NULL,
    workspace_id uuid NOT NULL,
    runtime_id uuid NULL,
    agent_id uuid NOT NULL,
    project_id uuid NULL,
    provider text NOT NULL,
    model text NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_task_usage_hourly_dirty_enqueued_at ON task_usage_hourly_dirty (enqueued_at);

-- rollup_task_usage_hourly_window(p_from, p_to)
--
-- 1. Returns 0 when p_from >= p_to (or either bound is NULL).
-- 2. Dirty keys: keys of task_usage rows with updated_at in [p_from, p_to),
--    or with updated_at IS NULL and created_at in [p_from, p_to), plus the
--    queued keys with enqueued_at < p_to.
-- 3. Each dirty key's hourly row is REPLACED by sums over all task_usage rows
--    of that key; hourly rows whose key has no source rows left are deleted;
--    queue rows with enqueued_at < p_to are drained.  Returns the number of
--    hourly rows upserted plus deleted.
-- 4. Idempotent: re-running an overlapping window gives the same state.
--
-- Everything runs as one statement, so the dirty keys, the recompute and the
-- queue drain share one snapshot: a queue row enqueued concurrently is never
-- drained without having been recomputed.  The per-key recompute is a LATERAL
-- subquery that starts from the agent's tasks (idx_agent_task_queue_agent_id)
-- and probes task_usage per task (uq_task_usage_task_provider_model); the
-- bucket is matched on the key-derivation expression, which no index serves,
-- so the cost of a key grows with its agent's task count, as in production.
CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
RETURNS bigint
LANGUAGE plpgsql
AS $rollup$
DECLARE
    v_changed bigint;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_from >= p_to THEN
        RETURN 0;
    END IF;

    WITH touched AS (
        SELECT tu.task_id, tu.provider, tu.model, tu.created_at
        FROM task_usage tu
        WHERE tu.updated_at >= p_from AND tu.updated_at < p_to
        UNION ALL
        SELECT tu.task_id, tu.provider, tu.model, tu.created_at
        FROM task_usage tu
        WHERE tu.updated_at IS NULL
          AND tu.created_at >= p_from AND tu.created_at < p_to
    ),
    dirty AS (
        -- UNION (not UNION ALL) deduplicates, treating NULLs as equal.
        SELECT date_trunc('hour', t.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                   AS bucket_hour,
               a.workspace_id,
               q.runtime_id,
               q.agent_id,
               i.project_id,
               t.provider,
               t.model
        FROM touched t
        JOIN agent_task_queue q ON q.id = t.task_id
        JOIN agent a ON a.id = q.agent_id
        LEFT JOIN issue i ON i.id = q.issue_id
        WHERE q.runtime_id IS NOT NULL
        UNION
        SELECT d.bucket_hour, d.workspace_id, d.runtime_id, d.agent_id,
               d.project_id, d.provider, d.model
        FROM task_usage_hourly_dirty d
        WHERE d.enqueued_at < p_to
    ),
    recomputed AS (
        SELECT k.bucket_hour, k.workspace_id, k.runtime_id, k.agent_id,
               k.project_id, k.provider, k.model,
               s.input_tokens, s.output_tokens, s.cache_read_tokens,
               s.cache_write_tokens, s.cost_usd_ticks, s.task_count, s.event_count
        FROM dirty k
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(tu.input_tokens), 0)::bigint AS input_tokens,
                   coalesce(sum(tu.output_tokens), 0)::bigint AS output_tokens,
                   coalesce(sum(tu.cache_read_tokens), 0)::bigint AS cache_read_tokens,
                   coalesce(sum(tu.cache_write_tokens), 0)::bigint AS cache_write_tokens,
                   coalesce(sum(tu.cost_usd_ticks), 0)::bigint AS cost_usd_ticks,
                   count(DISTINCT tu.task_id) AS task_count,
                   count(*) AS event_count
            FROM agent_task_queue q
            JOIN task_usage tu ON tu.task_id = q.id
            JOIN agent a ON a.id = q.agent_id
            LEFT JOIN issue i ON i.id = q.issue_id
            WHERE q.agent_id = k.agent_id
              -- NULL runtime (queue only) matches nothing: never inserted.
              AND q.runtime_id = k.runtime_id
              AND a.workspace_id = k.workspace_id
              AND i.project_id IS NOT DISTINCT FROM k.project_id
              AND tu.provider = k.provider
              AND tu.model = k.model
              AND date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                  = k.bucket_hour
        ) s
    ),
    upserted AS (
        INSERT INTO task_usage_hourly AS h (
            bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
            input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
            cost_usd_ticks, task_count, event_count, updated_at
        )
        SELECT r.bucket_hour, r.workspace_id, r.runtime_id, r.agent_id, r.project_id,
               r.provider, r.model,
               r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens,
               r.cost_usd_ticks, r.task_count, r.event_count, now()
        FROM recomputed r
        WHERE r.event_count > 0
        ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_key DO UPDATE SET
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            cache_read_tokens = EXCLUDED.cache_read_tokens,
            cache_write_tokens = EXCLUDED.cache_write_tokens,
            cost_usd_ticks = EXCLUDED.cost_usd_ticks,
            task_count = EXCLUDED.task_count,
            event_count = EXCLUDED.event_count,
            updated_at = EXCLUDED.updated_at
        RETURNING 1
    ),
    deleted AS (
        DELETE FROM task_usage_hourly h
        USING recomputed r
        WHERE r.event_count = 0
          AND h.bucket_hour = r.bucket_hour
          AND h.workspace_id = r.workspace_id
          AND h.runtime_id IS NOT DISTINCT FROM r.runtime_id
          AND h.agent_id = r.agent_id
          AND h.project_id IS NOT DISTINCT FROM r.project_id
          AND h.provider = r.provider
          AND h.model = r.model
        RETURNING 1
    ),
    drained AS (
        -- Runs to completion although nothing reads it.
        DELETE FROM task_usage_hourly_dirty d
        WHERE d.enqueued_at < p_to
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted)
    INTO v_changed;

    RETURN v_changed;
END;
$rollup$;
