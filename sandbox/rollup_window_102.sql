-- The platform's rollup_task_usage_hourly_window as of its migration 102
-- (shared/docs/target-database.md, "The rollup function the repair must call").
-- Before 213 the hourly table had no cost columns: the function writes the four token
-- sums, task_count and event_count.
--
-- sandbox.target installs it: create_target_schema() the current one (213), and
-- install_platform_version() switches a database between 102 and 213 (the tests do).  The
-- tool recognises each definition by a fingerprint of its tokens (usage.repair.rollup.versions),
-- as "this project's fixture of migration N", never as the platform's own: changing a token
-- here changes it, and the test that pins the known ones fails until the table is updated.
--
-- 1. Returns 0 when p_from >= p_to.  (A NULL bound is not refused, as on the platform: with
--    p_from NULL the queued keys before p_to are still recomputed and drained.)
-- 2. Dirty keys: keys of task_usage rows with updated_at in [p_from, p_to), or with
--    updated_at IS NULL and created_at in [p_from, p_to), plus the queued keys with
--    enqueued_at < p_to.
-- 3. Each dirty key's hourly row is REPLACED by sums over all task_usage rows of that key;
--    hourly rows whose key has no source rows left are deleted; queue rows with
--    enqueued_at < p_to are drained.  Returns the number of hourly rows upserted plus
--    deleted.
-- 4. Idempotent: re-running an overlapping window gives the same state.
--
-- As on the platform, the dirty keys and the recompute are one statement and the queue is
-- drained by a second one, with a snapshot of its own: under READ COMMITTED a key queued
-- (with enqueued_at < p_to) between the two is drained without being recomputed.  Checked
-- against the platform's own migrations 102 and 213: tests/test_platform_as_it_ships.py.
--
-- The recompute is shaped like the platform's (fact 6 of the function's contract): each
-- dirty key is joined to *every* task of its agent and runtime, then each task's usage rows
-- are looked up by task_id and filtered to the key's bucket, provider and model.  With the
-- default planner settings that is a nested loop per key (keys x tasks-per-agent index
-- probes); with enable_nestloop off the planner scans the joined tables whole and hashes
-- them, so the cost grows with the table instead.  The statement takes p_from and p_to as
-- parameters, so PL/pgSQL caches its plan per session like any other (plan_cache_mode).
CREATE OR REPLACE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
RETURNS bigint
LANGUAGE plpgsql
AS $rollup$
DECLARE
    v_changed bigint;
BEGIN
    IF p_from >= p_to THEN
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
            task_count, event_count, updated_at
        )
        SELECT r.bucket_hour, r.workspace_id, r.runtime_id, r.agent_id, r.project_id,
               r.provider, r.model,
               r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens,
               r.task_count, r.event_count, now()
        FROM recomputed r
        WHERE r.event_count > 0
        ON CONFLICT ON CONSTRAINT uq_task_usage_hourly_key DO UPDATE SET
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            cache_read_tokens = EXCLUDED.cache_read_tokens,
            cache_write_tokens = EXCLUDED.cache_write_tokens,
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
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted)
    INTO v_changed;

    DELETE FROM task_usage_hourly_dirty d WHERE d.enqueued_at < p_to;

    RETURN v_changed;
END;
$rollup$;
