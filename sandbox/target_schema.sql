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

-- Keys invalidated by deletes and re-attributions, drained by the rollup.  No id column: a
-- key is queued at most once, and every writer upserts it (ON CONFLICT ON CONSTRAINT
-- uq_task_usage_hourly_dirty_key DO UPDATE SET enqueued_at = GREATEST(existing, new)).
CREATE TABLE task_usage_hourly_dirty (
    bucket_hour timestamptz NOT NULL,
    workspace_id uuid NOT NULL,
    runtime_id uuid NOT NULL,
    agent_id uuid NOT NULL,
    project_id uuid NULL,
    provider text NOT NULL,
    model text NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_task_usage_hourly_dirty_key UNIQUE NULLS NOT DISTINCT
        (bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model)
);

CREATE INDEX idx_task_usage_hourly_dirty_enqueued_at ON task_usage_hourly_dirty (enqueued_at);

-- The cron tick's progress: a single row.
CREATE TABLE task_usage_hourly_rollup_state (
    id smallint PRIMARY KEY DEFAULT 1 CONSTRAINT ck_task_usage_hourly_rollup_state_single
        CHECK (id = 1),
    watermark_at timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    last_run_started_at timestamptz NULL,
    last_run_finished_at timestamptz NULL,
    last_run_rows bigint NULL,
    last_error text NULL
);

INSERT INTO task_usage_hourly_rollup_state (id) VALUES (1);

-- rollup_task_usage_hourly_window(p_from, p_to)
--
-- 1. Returns 0 when p_from >= p_to (or either bound is NULL).
-- 2. Dirty keys: keys of task_usage rows with updated_at in [p_from, p_to), or with
--    updated_at IS NULL and created_at in [p_from, p_to), plus the queued keys with
--    enqueued_at < p_to.
-- 3. Each dirty key's hourly row is REPLACED by sums over all task_usage rows of that key;
--    hourly rows whose key has no source rows left are deleted; queue rows with
--    enqueued_at < p_to are drained.  Returns the number of hourly rows upserted plus
--    deleted.
-- 4. Idempotent: re-running an overlapping window gives the same state.
--
-- Everything runs as one statement, so the dirty keys, the recompute and the queue drain
-- share one snapshot: a key queued concurrently is never drained without its recompute.
--
-- The recompute is shaped like the platform's (fact 6 of the function's contract): each
-- dirty key is joined to *every* task of its agent and runtime, then each task's usage rows
-- are looked up by task_id and filtered to the key's bucket, provider and model.  With the
-- default planner settings that is a nested loop per key (keys x tasks-per-agent index
-- probes); with enable_nestloop off the planner scans the joined tables whole and hashes
-- them, so the cost grows with the table instead.  The statement takes p_from and p_to as
-- parameters, so PL/pgSQL caches its plan per session like any other (plan_cache_mode).
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
    sums AS (
        -- Every task of the key's agent and runtime, and each task's usage rows of the key's
        -- bucket, provider, model and project.
        SELECT k.bucket_hour, k.workspace_id, k.runtime_id, k.agent_id,
               k.project_id, k.provider, k.model,
               sum(tu.input_tokens)::bigint AS input_tokens,
               sum(tu.output_tokens)::bigint AS output_tokens,
               sum(tu.cache_read_tokens)::bigint AS cache_read_tokens,
               sum(tu.cache_write_tokens)::bigint AS cache_write_tokens,
               coalesce(sum(tu.cost_usd_ticks), 0)::bigint AS cost_usd_ticks,
               count(DISTINCT tu.task_id) AS task_count,
               count(*) AS event_count
        FROM dirty k
        JOIN agent a ON a.id = k.agent_id AND a.workspace_id = k.workspace_id
        JOIN agent_task_queue q ON q.agent_id = k.agent_id AND q.runtime_id = k.runtime_id
        LEFT JOIN issue i ON i.id = q.issue_id
        JOIN task_usage tu
          ON tu.task_id = q.id
         AND tu.provider = k.provider
         AND tu.model = k.model
         AND date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
             = k.bucket_hour
        WHERE i.project_id IS NOT DISTINCT FROM k.project_id
        GROUP BY k.bucket_hour, k.workspace_id, k.runtime_id, k.agent_id,
                 k.project_id, k.provider, k.model
    ),
    recomputed AS (
        -- Every dirty key, with zero sums when no source row is left.
        SELECT k.bucket_hour, k.workspace_id, k.runtime_id, k.agent_id,
               k.project_id, k.provider, k.model,
               coalesce(s.input_tokens, 0) AS input_tokens,
               coalesce(s.output_tokens, 0) AS output_tokens,
               coalesce(s.cache_read_tokens, 0) AS cache_read_tokens,
               coalesce(s.cache_write_tokens, 0) AS cache_write_tokens,
               coalesce(s.cost_usd_ticks, 0) AS cost_usd_ticks,
               coalesce(s.task_count, 0) AS task_count,
               coalesce(s.event_count, 0) AS event_count
        FROM dirty k
        LEFT JOIN sums s
          ON s.bucket_hour = k.bucket_hour
         AND s.workspace_id = k.workspace_id
         AND s.runtime_id = k.runtime_id
         AND s.agent_id = k.agent_id
         AND s.project_id IS NOT DISTINCT FROM k.project_id
         AND s.provider = k.provider
         AND s.model = k.model
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
          AND h.runtime_id = r.runtime_id
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

-- rollup_task_usage_hourly(): the cron tick, run by the platform's scheduler every 5
-- minutes (a cancelled tick does not advance the watermark, so the next one retries).
-- Under pg_try_advisory_xact_lock(4246) (returns 0 at once when another writer holds it),
-- it rolls up [watermark, least(now() - 5 minutes, watermark + 1 day)), advances the
-- watermark to that end, records the run (or the error, and re-raises), and prunes queue
-- rows the call has drained, all in one transaction.
CREATE FUNCTION rollup_task_usage_hourly()
RETURNS bigint
LANGUAGE plpgsql
AS $tick$
DECLARE
    v_from timestamptz;
    v_to timestamptz;
    v_rows bigint := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(4246) THEN
        RETURN 0;
    END IF;

    SELECT watermark_at INTO STRICT v_from
    FROM task_usage_hourly_rollup_state WHERE id = 1 FOR UPDATE;
    v_to := least(now() - interval '5 minutes', v_from + interval '1 day');

    BEGIN
        v_rows := rollup_task_usage_hourly_window(v_from, v_to);
    EXCEPTION WHEN OTHERS THEN
        UPDATE task_usage_hourly_rollup_state
        SET last_run_started_at = now(), last_run_finished_at = clock_timestamp(),
            last_error = SQLERRM
        WHERE id = 1;
        RAISE;
    END;

    UPDATE task_usage_hourly_rollup_state
    SET watermark_at = greatest(watermark_at, v_to),
        last_run_started_at = now(),
        last_run_finished_at = clock_timestamp(),
        last_run_rows = v_rows,
        last_error = NULL
    WHERE id = 1;

    DELETE FROM task_usage_hourly_dirty WHERE enqueued_at < v_to;
    RETURN v_rows;
END;
$tick$;

-- The platform's queueing triggers.  Each queues the hourly keys a change invalidates
-- (rows of tasks without a runtime have none), upserting as every platform writer does.
-- The delete triggers do nothing while multica.workspace_teardown is 'on'.  There is no
-- trigger on UPDATE of task_usage: the rollup finds updated rows through updated_at.

-- The keys of one task's usage rows, attributed to the given agent, runtime and project.
CREATE FUNCTION task_usage_hourly_enqueue_task(
    p_task_id uuid, p_agent_id uuid, p_runtime_id uuid, p_project_id uuid
)
RETURNS void
LANGUAGE sql
AS $enqueue$
    INSERT INTO task_usage_hourly_dirty AS d (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
        enqueued_at
    )
    SELECT DISTINCT
           date_trunc('hour', tu.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           a.workspace_id, p_runtime_id, p_agent_id, p_project_id, tu.provider, tu.model,
           now()
    FROM task_usage tu
    JOIN agent a ON a.id = p_agent_id
    WHERE tu.task_id = p_task_id AND p_runtime_id IS NOT NULL
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at);
$enqueue$;

CREATE FUNCTION task_usage_hourly_teardown() RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT coalesce(current_setting('multica.workspace_teardown', true), '') = 'on' $$;

CREATE FUNCTION task_usage_enqueue_on_delete() RETURNS trigger
LANGUAGE plpgsql
AS $trg$
BEGIN
    IF task_usage_hourly_teardown() THEN
        RETURN OLD;
    END IF;
    INSERT INTO task_usage_hourly_dirty AS d (
        bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
        enqueued_at
    )
    SELECT date_trunc('hour', OLD.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           a.workspace_id, q.runtime_id, q.agent_id, i.project_id, OLD.provider, OLD.model,
           now()
    FROM agent_task_queue q
    JOIN agent a ON a.id = q.agent_id
    LEFT JOIN issue i ON i.id = q.issue_id
    WHERE q.id = OLD.task_id AND q.runtime_id IS NOT NULL
    ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_dirty_key
    DO UPDATE SET enqueued_at = GREATEST(d.enqueued_at, EXCLUDED.enqueued_at);
    RETURN OLD;
END;
$trg$;

CREATE TRIGGER task_usage_hourly_enqueue_delete
    BEFORE DELETE ON task_usage
    FOR EACH ROW EXECUTE FUNCTION task_usage_enqueue_on_delete();

CREATE FUNCTION agent_task_queue_enqueue_on_change() RETURNS trigger
LANGUAGE plpgsql
AS $trg$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF NOT task_usage_hourly_teardown() THEN
            PERFORM task_usage_hourly_enqueue_task(
                OLD.id, OLD.agent_id, OLD.runtime_id,
                (SELECT i.project_id FROM issue i WHERE i.id = OLD.issue_id));
        END IF;
        RETURN OLD;
    END IF;
    IF NEW.runtime_id IS DISTINCT FROM OLD.runtime_id
       OR NEW.issue_id IS DISTINCT FROM OLD.issue_id THEN
        PERFORM task_usage_hourly_enqueue_task(
            OLD.id, OLD.agent_id, OLD.runtime_id,
            (SELECT i.project_id FROM issue i WHERE i.id = OLD.issue_id));
        PERFORM task_usage_hourly_enqueue_task(
            NEW.id, NEW.agent_id, NEW.runtime_id,
            (SELECT i.project_id FROM issue i WHERE i.id = NEW.issue_id));
    END IF;
    RETURN NEW;
END;
$trg$;

CREATE TRIGGER agent_task_queue_hourly_enqueue
    BEFORE DELETE OR UPDATE OF runtime_id, issue_id ON agent_task_queue
    FOR EACH ROW EXECUTE FUNCTION agent_task_queue_enqueue_on_change();

CREATE FUNCTION issue_enqueue_on_change() RETURNS trigger
LANGUAGE plpgsql
AS $trg$
DECLARE
    v_task record;
BEGIN
    IF TG_OP = 'DELETE' AND task_usage_hourly_teardown() THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.project_id IS NOT DISTINCT FROM OLD.project_id THEN
        RETURN NEW;
    END IF;
    FOR v_task IN
        SELECT q.id, q.agent_id, q.runtime_id FROM agent_task_queue q WHERE q.issue_id = OLD.id
    LOOP
        PERFORM task_usage_hourly_enqueue_task(
            v_task.id, v_task.agent_id, v_task.runtime_id, OLD.project_id);
        IF TG_OP = 'UPDATE' THEN
            PERFORM task_usage_hourly_enqueue_task(
                v_task.id, v_task.agent_id, v_task.runtime_id, NEW.project_id);
        END IF;
    END LOOP;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$trg$;

CREATE TRIGGER issue_hourly_enqueue
    BEFORE DELETE OR UPDATE OF project_id ON issue
    FOR EACH ROW EXECUTE FUNCTION issue_enqueue_on_change();
