-- Target-database schema fixture for the task_usage repair tool.
--
-- Written from the facts in shared/docs/target-database.md.  It creates the
-- subset of the hosted application's schema that the repair reads and writes,
-- as of the platform's migration 213: the tables, the hourly rollup with its
-- cost columns, the cron tick and the queueing triggers.  The rebuild function
-- rollup_task_usage_hourly_window() is in rollup_window_213.sql (and, as of
-- migration 102, in rollup_window_102.sql); sandbox.target installs it.
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
    -- Since the platform's migration 213: the token sums over the key's rows without a cost
    -- (cost_usd_ticks IS NULL), which the dashboards price from the static rate table.  NULL
    -- means "not recomputed since 213" (readers COALESCE it to the token column).
    uncosted_input_tokens bigint NULL,
    uncosted_output_tokens bigint NULL,
    uncosted_cache_read_tokens bigint NULL,
    uncosted_cache_write_tokens bigint NULL,
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
