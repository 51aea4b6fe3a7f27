-- The statements `notifyhook demo` and `notifyhook bench` run, each under a
-- `-- name:` line; loaded by notifyhook.scenario. The producer statements are
-- what any program in any language would run: plain INSERTs into events.

-- name: insert_event
-- One event, in a transaction of its own (autocommit): returns once committed.
INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id)
VALUES (%(tenant_id)s, %(event_type)s, %(payload)s, %(endpoint_id)s)
RETURNING id::text;

-- name: insert_events
-- Many events in one statement: one fan-out and one NOTIFY for all of them.
INSERT INTO notifyhook.events (tenant_id, event_type, payload)
SELECT %(tenant_id)s, e.event_type, jsonb_build_object('n', e.n, 'kind', 'burst')
FROM unnest(%(event_types)s::text[]) WITH ORDINALITY AS e(event_type, n)
RETURNING id::text;

-- name: insert_backlog
-- `count` events spread over the tenants round-robin, each with a padded payload
-- the size of a typical webhook (about 300 bytes of JSON); to one endpoint only
-- when endpoint_id is set.
INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id)
SELECT (%(tenants)s::text[])[1 + i %% cardinality(%(tenants)s::text[])], 'bench.backlog',
       jsonb_build_object('i', i, 'call_id', md5(i::text), 'padding', repeat('x', 200)),
       %(endpoint_id)s::bigint
FROM generate_series(1, %(count)s) AS i;

-- name: add_tenant_endpoints
-- `count` tenants with one endpoint each: the multi-tenant shape (bench `endpoints`).
INSERT INTO notifyhook.endpoints (tenant_id, name, url, secret)
SELECT 'tenant-' || n, 'endpoint', %(url)s, %(secret)s FROM generate_series(1, %(count)s) AS n;

-- name: delivery_totals
-- Where the deliveries stand, for progress and for the summary.
SELECT
    count(*) AS deliveries,
    count(*) FILTER (WHERE status = 'delivered') AS delivered,
    count(*) FILTER (WHERE status = 'dead') AS dead,
    count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS retrying,
    count(*) FILTER (WHERE status = 'pending' AND attempts = 0) AS waiting,
    count(*) FILTER (WHERE status = 'processing') AS processing,
    (SELECT count(*) FROM notifyhook.attempts) AS attempts
FROM notifyhook.deliveries;

-- name: wal_position
-- Bytes of WAL the server has written since it was made: two readings bracket what a
-- step cost (the whole server's WAL, so nothing else may run meanwhile).
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal_bytes;

-- name: dead_letter_reasons
SELECT endpoint_id, last_status_code, count(*) AS deliveries
FROM notifyhook.dead_letters
GROUP BY endpoint_id, last_status_code
ORDER BY endpoint_id;

-- name: endpoint_disabled
SELECT id, enabled, disabled_reason FROM notifyhook.endpoints ORDER BY id;

-- name: mark_ordered
-- A FIFO endpoint: one request in flight, in event order (DESIGN §8).
UPDATE notifyhook.endpoints SET ordered = true WHERE id = %(endpoint_id)s;

-- name: listen_alerts
-- What a pager would do: dead letters and automatic disables arrive as JSON.
LISTEN notifyhook_alerts;

-- name: server_facts
SELECT current_setting('server_version') AS version, pg_backend_pid() AS backend_pid,
       current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit;

-- name: history_without_triggers
-- Bulk history bypasses the fan-out and validation triggers (and foreign-key
-- checks): the rows are written as the worker would have left them. Needs a
-- superuser or, from PostgreSQL 15, a GRANT SET on session_replication_role.
SET session_replication_role = replica;

-- name: history_partitions
-- The history's day partitions for the week it spans (migrate makes them from today on).
SELECT notifyhook.create_partitions(since => now() - interval '7 days 1 hour');

-- name: history_events
INSERT INTO notifyhook.events (id, tenant_id, event_type, payload, created_at)
SELECT gen_random_uuid(), (%(tenants)s::text[])[1 + i %% cardinality(%(tenants)s::text[])],
       'bench.history', jsonb_build_object('i', i, 'call_id', md5(i::text), 'padding', repeat('x', 200)),
       now() - interval '7 days' * (i::float8 / %(count)s) - interval '1 hour'
FROM generate_series(1, %(count)s) AS i;

-- name: history_deliveries
-- One delivered row per history event, to the endpoint of the event's tenant.
INSERT INTO notifyhook.deliveries
    (event_id, tenant_id, endpoint_id, status, attempts, next_attempt_at,
     last_status_code, created_at, updated_at, delivered_at)
SELECT ev.id, ev.tenant_id, ep.id, 'delivered', 1, ev.created_at, 200,
       ev.created_at, ev.created_at + interval '2 ms', ev.created_at + interval '2 ms'
FROM notifyhook.events AS ev
JOIN notifyhook.endpoints AS ep ON ep.tenant_id = ev.tenant_id
WHERE ev.event_type = 'bench.history';

-- name: history_attempts
INSERT INTO notifyhook.attempts
    (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, response_excerpt, worker)
SELECT d.id, d.endpoint_id, 1, d.created_at, 1.5, 200, 'ok', 'history'
FROM notifyhook.deliveries AS d
WHERE d.status = 'delivered' AND d.delivered_at < now() - interval '1 hour';

-- name: history_done
RESET session_replication_role;

-- name: statement_counts_available
-- Whether pg_stat_statements is loaded (shared_preload_libraries) and installed here.
SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_stat_statements')
       AND current_setting('shared_preload_libraries') ~ 'pg_stat_statements' AS available;

-- name: install_statement_counts
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- name: reset_statement_counts
SELECT pg_stat_statements_reset();

-- name: statement_counts
-- Statements run in this database since the last reset, but for this bench's own.
SELECT calls,
       left(regexp_replace(regexp_replace(query, '--[^\n]*\n', '', 'g'), '\s+', ' ', 'g'), 80) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query !~* 'pg_stat_statements|pg_stat_database'
ORDER BY calls DESC;

-- name: track_nested_statements
-- Sessions opened in this database from now on count nested statements too (a
-- function's own): the default counts the call only.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET pg_stat_statements.track = ''all''', current_database());
END
$$;

-- name: statement_times
-- benchmarks/latency_floor.py --statements: the statements run at least %(calls)s times
-- in this database since the last reset, nested ones included (pg_stat_statements.track
-- = all), with their mean execution time, the costliest first.
SELECT round(mean_exec_time * 1000) AS mean_us,
       CASE WHEN toplevel THEN 'top' ELSE 'nested' END AS nested,
       left(regexp_replace(regexp_replace(query, '--[^\n]*\n', '', 'g'), '\s+', ' ', 'g'), 90) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND calls >= %(calls)s
  AND query !~* 'pg_stat_statements|pg_stat_database'
ORDER BY total_exec_time DESC
LIMIT 16;

-- name: commit_count
-- Committed transactions in this database: every statement of an autocommit
-- session is one. Backends report at most once a second (and idle ones within
-- ten), so read it over a long enough window.
SELECT xact_commit FROM pg_stat_database WHERE datname = current_database();

-- name: preload_statement_counts
ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';

-- name: reset_preload
ALTER SYSTEM RESET shared_preload_libraries;

-- name: history_vacuum
-- What autovacuum would have done to a table of this age.
VACUUM ANALYZE notifyhook.events, notifyhook.deliveries, notifyhook.attempts;

-- name: history_checkpoint
-- What the checkpointer would have done long ago to history of this age: write it out.
-- Without it the backlog measured next shares the disk with the write-back of the
-- gigabytes just loaded, and every page it touches first costs a full-page image.
CHECKPOINT;

-- name: set_rate_limit
UPDATE notifyhook.endpoints SET rate_limit = %(rate_limit)s WHERE id = %(endpoint_id)s;

-- name: floor_claim
-- benchmarks/latency_floor.py: the claim of a minimal queue, one statement (what a job
-- queue like pgqueuer does), on notifyhook's own tables: due rows in the order of the
-- pending rows' index (oldest first, for the script's one endpoint), taken with SKIP
-- LOCKED and leased, with what a request needs.
UPDATE notifyhook.deliveries AS d
SET status = 'processing', attempts = d.attempts + 1, locked_by = 'floor',
    locked_until = now() + interval '60 seconds', updated_at = now()
FROM notifyhook.events AS e
WHERE e.id = d.event_id AND d.status IN ('pending', 'processing')
  AND d.id IN (SELECT p.id FROM notifyhook.deliveries AS p
               WHERE p.status = 'pending' AND p.next_attempt_at <= now()
               ORDER BY p.endpoint_id, p.next_attempt_at LIMIT %(max_rows)s
               FOR UPDATE SKIP LOCKED)
RETURNING d.event_id::text, e.payload::text AS body;

-- name: claim_due_rows
-- benchmarks/latency_floor.py: notifyhook.claim_due as a worker calls it (nothing held),
-- its deliveries unnested to what a request needs.
SELECT c.event_id::text, c.body
FROM notifyhook.claim_due('floor', %(max_rows)s, interval '60 seconds', 100,
                          '{}', '{}', '{}') AS f,
     unnest(f.deliveries) AS c;
