-- The dashboard's statements, each under a `-- name:` line; loaded by
-- notifyhook.dashboard.data. Read-only, and each one index probes: the history
-- (attempts, finished deliveries) grows to millions of rows, and a page must cost
-- what it shows, not what is stored. Per-endpoint figures go through the indexes
-- that lead with endpoint_id, one probe per endpoint (LATERAL), rather than a scan
-- of the whole table. Timings with a million attempts: docs/dashboard.md.

-- name: finished_last_hour
-- Beside queries.sql's queue_depth (the partial indexes only), which the dashboard's
-- queue reads too; not the queue_stats view, whose FILTERs count every delivery ever
-- kept. deliveries_finished (updated_at): only the last hour's rows are read.
SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered_1h,
       count(*) FILTER (WHERE status = 'dead') AS dead_1h
FROM notifyhook.deliveries
WHERE status IN ('delivered', 'dead') AND updated_at > now() - interval '1 hour';

-- name: tenants
-- For the filter: endpoints_tenant_name_key leads with tenant_id.
SELECT DISTINCT tenant_id FROM notifyhook.endpoints ORDER BY tenant_id;

-- name: endpoints
-- Every endpoint of a tenant (or of all), with its health. The URL never leaves
-- the database whole: its path and query may hold tokens, so only the host (and
-- port) is selected. Success rate and percentiles read the endpoint's attempts of
-- the last 24 h through attempts_endpoint_started; the circuit is the claim's
-- (sql/functions/claim.sql: 5 failures in a row). The last error is found by
-- walking back from endpoint_state.last_failure_at, so a healthy endpoint's
-- successes are never scanned for it.
SELECT
    e.id AS endpoint_id,
    e.tenant_id,
    e.name,
    regexp_replace(substring(e.url FROM '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)'), '^.*@', '') AS host,
    e.enabled,
    e.disabled_reason,
    coalesce(s.consecutive_failures, 0) AS consecutive_failures,
    coalesce(s.consecutive_failures, 0) >= 5 AS circuit_open,
    s.last_success_at,
    s.last_failure_at,
    a.attempts_1h, a.delivered_1h, a.failed_1h, a.p50_ms_1h, a.p99_ms_1h,
    a.attempts_24h, a.delivered_24h, a.failed_24h, a.p50_ms_24h, a.p99_ms_24h,
    last_error.error AS last_error,
    last_error.started_at AS last_error_at,
    -- Counted here, on the database's clock, as every other time of the page: the
    -- dashboard's host may be any host, its clock off.
    extract(epoch FROM now() - last_error.started_at)::float8 AS last_error_age_s,
    (SELECT count(*) FROM notifyhook.deliveries AS d
     WHERE d.endpoint_id = e.id AND d.status = 'pending') AS pending,
    (SELECT count(*) FROM notifyhook.deliveries AS d
     WHERE d.endpoint_id = e.id AND d.status = 'dead') AS dead
FROM notifyhook.endpoints AS e
LEFT JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
CROSS JOIN LATERAL (
    -- As in the endpoint_stats view: an attempt without a duration (a worker shut
    -- down or died before the answer) says nothing about the endpoint.
    SELECT
        count(*) FILTER (WHERE t.started_at > now() - interval '1 hour') AS attempts_1h,
        count(*) FILTER (WHERE t.error IS NULL AND t.started_at > now() - interval '1 hour') AS delivered_1h,
        count(*) FILTER (WHERE t.error IS NOT NULL AND t.duration_ms IS NOT NULL
                         AND t.started_at > now() - interval '1 hour') AS failed_1h,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms)
            FILTER (WHERE t.started_at > now() - interval '1 hour') AS p50_ms_1h,
        percentile_cont(0.99) WITHIN GROUP (ORDER BY t.duration_ms)
            FILTER (WHERE t.started_at > now() - interval '1 hour') AS p99_ms_1h,
        count(*) AS attempts_24h,
        count(*) FILTER (WHERE t.error IS NULL) AS delivered_24h,
        count(*) FILTER (WHERE t.error IS NOT NULL AND t.duration_ms IS NOT NULL) AS failed_24h,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms) AS p50_ms_24h,
        percentile_cont(0.99) WITHIN GROUP (ORDER BY t.duration_ms) AS p99_ms_24h
    FROM notifyhook.attempts AS t
    WHERE t.endpoint_id = e.id AND t.started_at > now() - interval '24 hours'
) AS a
LEFT JOIN LATERAL (
    SELECT t.error, t.started_at
    FROM notifyhook.attempts AS t
    WHERE t.endpoint_id = e.id AND t.started_at <= s.last_failure_at AND t.error IS NOT NULL
    ORDER BY t.started_at DESC
    LIMIT 1
) AS last_error ON true
WHERE (%(tenant_id)s::text IS NULL OR e.tenant_id = %(tenant_id)s)
  AND (%(endpoint_id)s::bigint IS NULL OR e.id = %(endpoint_id)s)
ORDER BY e.tenant_id, e.name
LIMIT %(limit)s;

-- name: endpoint_attempts
-- An endpoint's latest attempts: a backward walk of attempts_endpoint_started.
SELECT t.delivery_id, t.attempt, t.started_at, t.duration_ms, t.status_code, t.error,
       left(t.response_excerpt, 200) AS response_excerpt, t.worker
FROM notifyhook.attempts AS t
WHERE t.endpoint_id = %(endpoint_id)s
ORDER BY t.started_at DESC, t.id DESC
LIMIT %(limit)s;

-- name: minute_counts
-- Attempts per minute by outcome over the last hour (the current minute is the
-- 60th), one endpoint or every one. Queue-wide, it still goes endpoint by endpoint
-- through attempts_endpoint_started (one range probe each), reading the last hour's
-- rows only: an index on attempts(started_at) would serve it too, but every attempt
-- the workers write would pay for it, to speed up a page an operator opens now and
-- then. OFFSET 0 keeps the planner from flattening the LATERAL into a join over the
-- whole table, which it prefers (a parallel scan of every attempt ever kept) while
-- the table is small. minutes_ago: 0 is the current minute.
SELECT
    (extract(epoch FROM date_trunc('minute', now()) - date_trunc('minute', t.started_at)) / 60)::int
        AS minutes_ago,
    count(*) FILTER (WHERE t.error IS NULL) AS delivered,
    count(*) FILTER (WHERE t.error IS NOT NULL AND t.status_code IS NOT NULL) AS http_error,
    count(*) FILTER (WHERE t.error IS NOT NULL AND t.status_code IS NULL) AS no_answer
FROM notifyhook.endpoints AS e
CROSS JOIN LATERAL (
    SELECT a.started_at, a.error, a.status_code
    FROM notifyhook.attempts AS a
    WHERE a.endpoint_id = e.id
      AND a.started_at >= date_trunc('minute', now()) - interval '59 minutes'
    OFFSET 0
) AS t
WHERE %(endpoint_id)s::bigint IS NULL OR e.id = %(endpoint_id)s
GROUP BY 1
ORDER BY 1;

-- name: delivery
-- One delivery, by primary key, with its event's type and its endpoint's label.
SELECT d.id AS delivery_id, d.event_id, ev.event_type, ev.created_at AS enqueued_at,
       d.tenant_id, d.endpoint_id, e.name AS endpoint_name,
       regexp_replace(substring(e.url FROM '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)'), '^.*@', '') AS host,
       d.status, d.attempts, d.next_attempt_at, d.locked_by, d.last_status_code, d.last_error,
       d.delivered_at, d.updated_at
FROM notifyhook.deliveries AS d
JOIN notifyhook.events AS ev ON ev.id = d.event_id
JOIN notifyhook.endpoints AS e ON e.id = d.endpoint_id
WHERE d.id = %(delivery_id)s;

-- name: delivery_attempts
-- Its whole story, through attempts_delivery. attempts is partitioned by day
-- (0006_partitioned_history.sql): no attempt starts before its delivery was created, so
-- the days before are pruned when the query starts (an hour of slack) instead of probed
-- one by one. But created_at is the event's, which a producer may date by its own clock:
-- `pruned` false reads every day (notifyhook/dashboard/data.py asks for it when the
-- pruned read finds fewer attempts than the delivery counts).
SELECT t.attempt, t.started_at, t.duration_ms, t.status_code, t.error, t.response_excerpt,
       t.worker
FROM notifyhook.attempts AS t
WHERE t.delivery_id = %(delivery_id)s
  AND t.started_at >= CASE WHEN %(pruned)s
                           THEN (SELECT d.created_at - interval '1 hour'
                                 FROM notifyhook.deliveries AS d WHERE d.id = %(delivery_id)s)
                           ELSE '-infinity' END
ORDER BY t.attempt, t.id;

-- name: dead_letters
-- The newest dead deliveries of a tenant's (or every) endpoint: the newest few of
-- each endpoint through deliveries_dead (endpoint_id, updated_at), then the newest
-- of those, and only then their events. The dead_letters view would sort every dead
-- row ever kept.
WITH newest AS (
    SELECT d.delivery_id, d.endpoint_id, e.tenant_id, e.name AS endpoint_name, d.event_id,
           d.attempts, d.last_status_code, d.last_error, d.died_at
    FROM notifyhook.endpoints AS e
    CROSS JOIN LATERAL (
        SELECT x.id AS delivery_id, x.endpoint_id, x.event_id, x.attempts, x.last_status_code,
               x.last_error, x.updated_at AS died_at
        FROM notifyhook.deliveries AS x
        WHERE x.endpoint_id = e.id AND x.status = 'dead'
        ORDER BY x.updated_at DESC
        LIMIT %(limit)s
    ) AS d
    WHERE (%(tenant_id)s::text IS NULL OR e.tenant_id = %(tenant_id)s)
      AND (%(endpoint_id)s::bigint IS NULL OR e.id = %(endpoint_id)s)
    ORDER BY d.died_at DESC, d.delivery_id DESC
    LIMIT %(limit)s
)
SELECT n.delivery_id, n.endpoint_id, n.tenant_id, n.endpoint_name, n.event_id, ev.event_type,
       n.attempts, n.last_status_code, n.last_error, n.died_at
FROM newest AS n
JOIN notifyhook.events AS ev ON ev.id = n.event_id
ORDER BY n.died_at DESC, n.delivery_id DESC;
