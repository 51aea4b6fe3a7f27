-- Views for operators in psql. Re-created (not replaced) so that a change of
-- columns applies cleanly.

-- One row: the queue at a glance. Rows of disabled endpoints are counted apart
-- (pending_paused): a backlog kept for a 410 Gone or an auto-disabled endpoint is
-- not work waiting for the workers, and an alert on oldest_due_age_s must not fire
-- for it forever.
DROP VIEW IF EXISTS notifyhook.queue_stats;
CREATE VIEW notifyhook.queue_stats AS
SELECT
    count(*) FILTER (WHERE d.status = 'pending' AND e.enabled AND d.next_attempt_at <= now()) AS pending_due,
    count(*) FILTER (WHERE d.status = 'pending' AND e.enabled AND d.attempts > 0
                     AND d.next_attempt_at > now()) AS pending_retry,
    count(*) FILTER (WHERE d.status = 'processing') AS processing,
    count(*) FILTER (WHERE d.status = 'delivered' AND d.delivered_at > now() - interval '1 hour') AS delivered_1h,
    count(*) FILTER (WHERE d.status = 'dead' AND d.updated_at > now() - interval '1 hour') AS dead_1h,
    count(*) FILTER (WHERE d.status = 'delivered') AS delivered_total,
    count(*) FILTER (WHERE d.status = 'dead') AS dead_total,
    round(extract(epoch FROM now() - min(d.next_attempt_at)
          FILTER (WHERE d.status = 'pending' AND e.enabled AND d.next_attempt_at <= now()))::numeric, 3)
        AS oldest_due_age_s,
    count(*) FILTER (WHERE d.status = 'pending' AND NOT e.enabled) AS pending_paused
FROM notifyhook.deliveries AS d
JOIN notifyhook.endpoints AS e ON e.id = d.endpoint_id;

-- One row per endpoint: how it is doing. Attempt figures cover the last 24 h
-- (1 h where named); `delivered_*` counts successful attempts. A failed attempt
-- is one the endpoint failed: rows without a duration (a worker shut down, or
-- died, before it had an answer) say nothing about the endpoint and are left out.
DROP VIEW IF EXISTS notifyhook.endpoint_stats;
CREATE VIEW notifyhook.endpoint_stats AS
SELECT
    e.id AS endpoint_id,
    e.tenant_id,
    e.name,
    e.enabled,
    coalesce(a.delivered_1h, 0) AS delivered_1h,
    coalesce(a.failed_attempts_1h, 0) AS failed_attempts_1h,
    coalesce(a.delivered_24h, 0) AS delivered_24h,
    coalesce(a.failed_attempts_24h, 0) AS failed_attempts_24h,
    round(a.delivered_24h::numeric / nullif(a.delivered_24h + a.failed_attempts_24h, 0), 4)
        AS success_rate_24h,
    round(a.p50_ms::numeric, 2) AS p50_ms,
    round(a.p95_ms::numeric, 2) AS p95_ms,
    s.last_success_at,
    s.last_failure_at,
    coalesce(s.consecutive_failures, 0) AS consecutive_failures,
    (SELECT count(*) FROM notifyhook.deliveries AS d
     WHERE d.endpoint_id = e.id AND d.status = 'pending') AS pending,
    (SELECT count(*) FROM notifyhook.deliveries AS d
     WHERE d.endpoint_id = e.id AND d.status = 'dead') AS dead
FROM notifyhook.endpoints AS e
LEFT JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
LEFT JOIN LATERAL (
    SELECT
        count(*) FILTER (WHERE t.error IS NULL AND t.started_at > now() - interval '1 hour') AS delivered_1h,
        count(*) FILTER (WHERE t.error IS NOT NULL AND t.duration_ms IS NOT NULL
                         AND t.started_at > now() - interval '1 hour') AS failed_attempts_1h,
        count(*) FILTER (WHERE t.error IS NULL) AS delivered_24h,
        count(*) FILTER (WHERE t.error IS NOT NULL AND t.duration_ms IS NOT NULL) AS failed_attempts_24h,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms) AS p50_ms,
        percentile_cont(0.95) WITHIN GROUP (ORDER BY t.duration_ms) AS p95_ms
    FROM notifyhook.attempts AS t
    WHERE t.endpoint_id = e.id AND t.started_at > now() - interval '24 hours'
) AS a ON true;

-- Deliveries that gave up, newest first: what `notifyhook replay` can bring back.
DROP VIEW IF EXISTS notifyhook.dead_letters;
CREATE VIEW notifyhook.dead_letters AS
SELECT
    d.id AS delivery_id,
    d.endpoint_id,
    d.tenant_id,
    d.event_id,
    ev.event_type,
    d.attempts,
    d.last_status_code,
    d.last_error,
    d.updated_at AS died_at
FROM notifyhook.deliveries AS d
JOIN notifyhook.events AS ev ON ev.id = d.event_id
WHERE d.status = 'dead'
ORDER BY d.updated_at DESC, d.id DESC;
