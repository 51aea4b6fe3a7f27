-- A history for timing the dashboard's queries (benchmarks/dashboard_queries.py):
-- :endpoints endpoints over 10 tenants, :attempts attempts spread evenly over the last
-- 24 hours (two per delivery), so that every 24-hour figure reads all of them.
-- 90% of attempts succeed, 8% get a 5xx, 2% get no answer. Of the deliveries 90% are
-- delivered, 5% dead, 5% pending (half of those due). Triggers are off while loading
-- (session_replication_role = replica): the rows are written as the workers would have.
SET session_replication_role = replica;

INSERT INTO notifyhook.endpoints (id, tenant_id, name, url)
SELECT n, 'tenant-' || (n % 10), 'endpoint-' || n,
       'https://hooks-' || n || '.example.com/in?token=secret-' || n
FROM generate_series(1, :endpoints) AS n;

INSERT INTO notifyhook.events (id, tenant_id, event_type, payload, endpoint_id, created_at)
SELECT gen_random_uuid(), 'tenant-' || (d % :endpoints % 10), 'call.completed',
       jsonb_build_object('n', d), d % :endpoints + 1,
       now() - interval '24 hours' * (d::float8 / (:attempts / 2))
FROM generate_series(1, :attempts / 2) AS d;

INSERT INTO notifyhook.deliveries
    (id, event_id, tenant_id, endpoint_id, status, attempts, next_attempt_at,
     created_at, updated_at, delivered_at, last_status_code, last_error)
SELECT row_number() OVER (), ev.id, ev.tenant_id, ev.endpoint_id,
       CASE WHEN r < 0.90 THEN 'delivered' WHEN r < 0.95 THEN 'dead' ELSE 'pending' END,
       2,
       CASE WHEN r < 0.975 THEN ev.created_at ELSE now() + interval '5 minutes' END,
       ev.created_at, ev.created_at + interval '1 second',
       CASE WHEN r < 0.90 THEN ev.created_at + interval '1 second' END,
       CASE WHEN r >= 0.90 THEN 503 END,
       CASE WHEN r >= 0.90 THEN 'HTTP 503' END
FROM (SELECT e.*, random() AS r FROM notifyhook.events AS e) AS ev;

INSERT INTO notifyhook.attempts
    (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error,
     response_excerpt, worker)
SELECT d.id, d.endpoint_id, a.n, d.created_at + interval '0.5 second' * (a.n - 1),
       5 + 200 * random() ^ 4,
       CASE WHEN r < 0.90 THEN 200 WHEN r < 0.98 THEN 503 END,
       CASE WHEN r < 0.90 THEN NULL WHEN r < 0.98 THEN 'HTTP 503'
            ELSE 'connection refused' END,
       CASE WHEN r < 0.98 THEN 'ok' END,
       'bench-worker'
FROM notifyhook.deliveries AS d
CROSS JOIN LATERAL (SELECT n, random() AS r FROM generate_series(1, 2) AS n) AS a;

INSERT INTO notifyhook.endpoint_state (endpoint_id, consecutive_failures, last_success_at, last_failure_at)
SELECT e.id, (e.id % 7), now() - interval '1 minute',
       (SELECT max(a.started_at) FROM notifyhook.attempts AS a
        WHERE a.endpoint_id = e.id AND a.error IS NOT NULL)
FROM notifyhook.endpoints AS e;

SELECT setval(pg_get_serial_sequence('notifyhook.deliveries', 'id'), (SELECT max(id) FROM notifyhook.deliveries));
SELECT setval(pg_get_serial_sequence('notifyhook.endpoints', 'id'), (SELECT max(id) FROM notifyhook.endpoints));
RESET session_replication_role;
