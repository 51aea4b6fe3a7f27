-- The statements the Python code runs, each under a `-- name:` line; loaded by
-- notifyhook.store. The heavy lifting is in functions under sql/functions/.

-- name: applied_migrations
-- What `notifyhook migrate` has applied, if the schema exists at all.
SELECT name, version, checksum FROM notifyhook.migrations
WHERE to_regclass('notifyhook.migrations') IS NOT NULL;

-- name: schema_exists
SELECT to_regclass('notifyhook.migrations') IS NOT NULL;

-- name: schema_version
SELECT max(version) FROM notifyhook.migrations;

-- name: record_migration
INSERT INTO notifyhook.migrations (name, version, checksum) VALUES (%(name)s, %(version)s, %(checksum)s)
ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now();

-- name: lock_migrations
-- Session-level advisory lock: a second `migrate` waits, then finds nothing to do.
SELECT pg_advisory_lock(7305872156748263001);

-- name: unlock_migrations
SELECT pg_advisory_unlock(7305872156748263001);

-- name: set_max_payload_bytes
UPDATE notifyhook.config SET max_payload_bytes = %(max_payload_bytes)s
WHERE max_payload_bytes IS DISTINCT FROM %(max_payload_bytes)s;

-- name: claim_due
SELECT * FROM notifyhook.claim_due(
    %(worker)s, %(max_rows)s, %(lease)s, %(concurrency)s,
    %(held_endpoints)s::bigint[], %(held_counts)s::integer[], %(held_tenants)s::text[]);

-- name: take_over
SELECT notifyhook.take_over(%(worker)s, %(max_attempts)s);

-- name: release_lost_claims
SELECT notifyhook.release_lost_claims(%(worker)s, %(known)s::bigint[]);

-- name: repair_turns
SELECT notifyhook.repair_turns();

-- name: hold_worker_id
-- The lock notifyhook.take_over tests, taken again by a claim connection made anew.
SELECT pg_try_advisory_lock(notifyhook.worker_lock_key(%(worker)s));

-- name: record_outcomes
-- Casts spell the array types out: a list of all-None values carries no type. The
-- arrays go in binary format: written as text, a list of timestamps made this
-- statement's parameters cost a worker more than the statement costs the database
-- (binary is about twenty times cheaper; docs/performance.md). started_ats (the
-- worker's wall clock, kept in the function for callers of an older version) is null:
-- the database dates each attempt from started_ago_s on its own clock.
SELECT * FROM notifyhook.record_outcomes(
    %(worker)s, %(delivery_ids)b::bigint[], %(endpoint_ids)b::bigint[],
    %(attempt_numbers)b::integer[], %(statuses)b::text[], %(retry_in_s)b::double precision[],
    NULL::timestamptz[], %(durations_ms)b::double precision[],
    %(status_codes)b::integer[], %(errors)b::text[], %(excerpts)b::text[], %(gone)b::boolean[],
    %(disable_after)s, %(retried)s, %(attempt_keys)b::uuid[], %(sent)b::boolean[],
    %(started_ago_s)b::double precision[]);

-- name: record_rejected_outcome
SELECT notifyhook.record_rejected_outcome(
    %(worker)s, %(delivery_id)s, %(attempt)s, %(status)s, %(retry_in_s)s::double precision,
    %(reason)s, %(attempt_key)s, %(endpoint_id)s, %(started_ago_s)s::double precision) AS recorded;

-- name: release_claims
SELECT notifyhook.release_claims(%(worker)s, %(delivery_ids)s::bigint[], %(attempt_numbers)s::integer[]);

-- name: reclaim_expired
SELECT notifyhook.reclaim_expired(%(max_attempts)s);

-- name: prune
SELECT notifyhook.prune(%(older_than)s, %(batch_size)s);

-- name: try_lock_prune
-- One worker of the fleet prunes at a time; the others skip their turn.
SELECT pg_try_advisory_xact_lock(7305872156748263002);

-- name: try_lock_prune_session
-- The same lock, held across the statements of a partition's retirement, which run
-- outside a transaction block (DETACH … CONCURRENTLY).
SELECT pg_try_advisory_lock(7305872156748263002);

-- name: unlock_prune_session
SELECT pg_advisory_unlock(7305872156748263002);

-- name: create_partitions
-- Day partitions of the history made ahead (sql/functions/partitions.sql): the number made.
SELECT notifyhook.create_partitions(%(ahead)s);

-- name: partitions_ahead_s
SELECT extract(epoch FROM notifyhook.partitions_until() - now())::float8;

-- name: retired_partitions
SELECT parent, partition, detach_pending FROM notifyhook.retired_partitions(%(older_than)s);

-- name: database_time
-- The database's clock now, for the worker's reading of it (notifyhook/clock.py).
SELECT extract(epoch FROM clock_timestamp())::float8;

-- name: queue_depth
-- Cheap enough to sample every few seconds: reads only the partial indexes (and the
-- few endpoints). Disabled endpoints' rows are counted apart, as in queue_stats.
-- The workers' gauges and the dashboard's queue both read it.
WITH paused AS (SELECT id FROM notifyhook.endpoints WHERE NOT enabled)
SELECT
    (SELECT count(*) FROM notifyhook.deliveries
     WHERE status = 'pending' AND next_attempt_at <= now()
       AND endpoint_id NOT IN (SELECT id FROM paused)) AS pending_due,
    (SELECT count(*) FROM notifyhook.deliveries WHERE status = 'processing') AS processing,
    (SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8
     FROM notifyhook.deliveries
     WHERE status = 'pending' AND next_attempt_at <= now()
       AND endpoint_id NOT IN (SELECT id FROM paused)) AS oldest_due_age_s,
    (SELECT count(*) FROM notifyhook.deliveries
     WHERE status = 'pending' AND endpoint_id IN (SELECT id FROM paused)) AS pending_paused,
    -- Due now or later (retries waiting): the dashboard's "pending".
    (SELECT count(*) FROM notifyhook.deliveries
     WHERE status = 'pending' AND endpoint_id NOT IN (SELECT id FROM paused)) AS pending;

-- name: queue_stats
SELECT * FROM notifyhook.queue_stats;

-- name: endpoint_stats
SELECT * FROM notifyhook.endpoint_stats ORDER BY endpoint_id;

-- name: enqueue
SELECT notifyhook.enqueue(%(tenant_id)s, %(event_type)s, %(payload)s, %(idempotency_key)s, %(endpoint_id)s);

-- name: replay_delivery
SELECT notifyhook.replay(%(delivery_id)s)::int;

-- name: replay_dead
SELECT notifyhook.replay_dead(%(endpoint_id)s, %(since)s);

-- name: add_endpoint
INSERT INTO notifyhook.endpoints
    (tenant_id, name, url, secret, event_types, extra_fields, headers, rate_limit, max_in_flight, timeout_ms,
     retry_schedule)
VALUES (%(tenant_id)s, %(name)s, %(url)s, %(secret)s, %(event_types)s, %(extra_fields)s, %(headers)s,
        %(rate_limit)s, %(max_in_flight)s, %(timeout_ms)s, %(retry_schedule)s::integer[])
RETURNING id;

-- name: list_endpoints
SELECT id, tenant_id, name, url, event_types, enabled, disabled_reason, rate_limit, max_in_flight,
       timeout_ms, created_at
FROM notifyhook.endpoints
WHERE %(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s
ORDER BY id;

-- name: show_endpoint
SELECT e.id, e.tenant_id, e.name, e.url, e.event_types, e.extra_fields, e.headers, e.enabled,
       e.disabled_reason, e.rate_limit, e.max_in_flight, e.timeout_ms, e.ordered, e.retry_schedule,
       e.previous_secret_expires_at, e.created_at, e.updated_at,
       s.consecutive_failures, s.failing_since, s.last_success_at, s.last_failure_at
FROM notifyhook.endpoints AS e
LEFT JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
WHERE e.id = %(endpoint_id)s;

-- name: endpoint_secrets
-- For the CLI to tell an endpoint's signature scheme and show ed25519 public keys;
-- the secrets themselves are never printed. The previous one only while it signs.
SELECT secret, CASE WHEN previous_secret_expires_at > now() THEN previous_secret END AS previous_secret
FROM notifyhook.endpoints
WHERE id = %(endpoint_id)s;

-- name: set_retry_schedule
UPDATE notifyhook.endpoints SET retry_schedule = %(retry_schedule)s::integer[]
WHERE id = %(endpoint_id)s
RETURNING id;

-- name: set_endpoint_enabled
UPDATE notifyhook.endpoints
SET enabled = %(enabled)s, disabled_reason = %(reason)s
WHERE id = %(endpoint_id)s
RETURNING id;

-- name: rotate_secret
-- The current secret keeps signing, beside the new one, until the grace ends.
UPDATE notifyhook.endpoints
SET previous_secret = secret,
    previous_secret_expires_at = now() + %(grace)s,
    secret = %(secret)s
WHERE id = %(endpoint_id)s
RETURNING previous_secret_expires_at;

-- name: listen
LISTEN notifyhook;

-- name: backend_wait
-- What a backend waits for (a worker's start-up schema check that takes long): the type
-- of its wait event, and the backends that block it.
SELECT a.wait_event_type, pg_blocking_pids(a.pid) FROM pg_stat_activity AS a WHERE a.pid = %(pid)s;
