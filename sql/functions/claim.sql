-- Claiming: how a worker takes due deliveries, fairly and within each endpoint's limits.

-- Claim up to max_rows due deliveries for `worker`, leasing them for `lease`.
--
-- Fairness comes first. No endpoint, and no tenant, holds more than
-- endpoint_share of this worker's slots (the worker passes half its
-- concurrency), so another endpoint's or tenant's fresh events always find a
-- free slot however slow a backlog is. Within that, slots are filled level by
-- level: every endpoint's first slot, then every endpoint's second, …, counting
-- the rows this worker already holds, so an endpoint that holds nothing goes
-- before one that holds many, and a fresh endpoint is never queued behind old
-- backlogs. Per endpoint, the number taken is the least of:
--   * endpoint_share minus what this worker already holds of it, and of its tenant;
--   * max_in_flight minus the rows the whole fleet holds (`processing`);
--   * 1 minus the rows in flight while its circuit is open (5 or more
--     consecutive failures): a failing endpoint gets one probe at a time;
--   * the whole tokens in its rate bucket (rate_limit per second, burst of one
--     second's worth), shared by every worker through endpoint_state.
--
-- The fleet-wide limits (max_in_flight, the circuit, the bucket) are read under
-- a lock on the endpoint's endpoint_state row, taken by one statement before the
-- statement that reads and claims: see "Why two statements" below.
--
-- Returns the claimed rows, each with the exact body to send (payload merged
-- over the endpoint's extra_fields, built here so the worker never parses JSON
-- it only forwards), then ONE trailing row whose delivery_id is null and which
-- carries two hints for the worker's loop:
--   wake_in_s seconds until something not claimable now becomes claimable (a
--             retry falling due, a rate token arriving), or null; relative, so
--             that the worker's clock need not agree with the database's;
--   more_due  rows are due but held back by a cap that a finishing delivery of
--             this worker may lift: claim again when slots free up;
--   more_now  an endpoint took its even level of this claim, not its cap, and
--             may have more due: claim again at once if slots are free.
--
-- Why two statements. Under READ COMMITTED one statement reads with one
-- snapshot, taken when it starts. Were the lock taken inside the claiming
-- statement, a worker that waited for another's claim to commit would get the
-- lock, yet still count that endpoint's `processing` rows as they were before
-- the other claim: both would send max_in_flight requests (or both a probe).
-- Locking in a statement of its own means the claiming statement, which starts
-- after the lock is granted, sees every claim committed before it. Claims are
-- the only thing that adds `processing` rows, so serializing them per endpoint
-- makes the fleet-wide counts exact. Unlimited endpoints take no lock: workers
-- claim them in parallel with SKIP LOCKED.
-- Dropped first: CREATE OR REPLACE cannot change the columns a function returns.
DROP FUNCTION IF EXISTS notifyhook.claim_due(text, integer, interval, integer);
CREATE FUNCTION notifyhook.claim_due(
    worker text,
    max_rows integer,
    lease interval,
    endpoint_share integer
) RETURNS TABLE (
    delivery_id bigint,
    event_id uuid,
    endpoint_id bigint,
    attempt integer,
    url text,
    secret text,
    previous_secret text,
    headers jsonb,
    timeout_ms integer,
    body text,
    wake_in_s double precision,
    more_due boolean,
    more_now boolean
)
LANGUAGE plpgsql
-- The statements below are planned once per connection and reused: planning them
-- afresh (PostgreSQL's default for the first calls, and whenever it guesses a
-- custom plan is cheaper) costs several times what running them does.
SET plan_cache_mode = force_generic_plan
-- Every read here is meant as a probe of an index (the partial queue indexes, the
-- endpoints' keys). A plan made while the tables looked empty (analysed empty,
-- the worker's first claim before any event) chose sequential scans instead, and
-- being cached, kept them through the next burst: a 20,000-row backlog drained at
-- half speed (claims of 40 rows took 23 ms instead of 8) until autovacuum's next
-- ANALYZE. For the few rows one claim touches, index probes are also the cheaper
-- plan on a warm table: at 50 events/s, COMMIT-to-request p50 fell ~0.2 ms.
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    -- Consecutive failures at which an endpoint's circuit opens.
    circuit_threshold CONSTANT integer := 5;
    -- Enabled endpoints with pending rows.
    busy bigint[];
    -- Whether any of them has a limit (or an open circuit), so needs its lock.
    any_limited boolean;
    -- Those whose endpoint_state row this transaction has locked.
    guarded bigint[];
    -- When the rate buckets are read: after the locks, not at transaction start.
    bucket_at timestamptz;
BEGIN
    -- The claim commits synchronously, like everything else, although a claim lost in
    -- a crash would only make its rows due again: with synchronous_commit = off for
    -- it (tried; ~0.2 ms off each claim), a PostgreSQL crash that lost a claim whose
    -- request was already sent, followed by the death of that worker before it
    -- recorded, left a request that no attempts row tells of, neither the worker's
    -- nor reclaim_expired's (there was no lease to expire). The long chaos run found
    -- it. The audit log's completeness is worth the flush.

    -- Every enabled endpoint with pending rows, by a skip scan of deliveries_pending:
    -- one index probe per such endpoint, however many rows each has queued.
    WITH RECURSIVE queued(endpoint_id) AS (
        (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
         WHERE d.status = 'pending' ORDER BY d.endpoint_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
                WHERE d.status = 'pending' AND d.endpoint_id > queued.endpoint_id
                ORDER BY d.endpoint_id LIMIT 1)
        FROM queued WHERE queued.endpoint_id IS NOT NULL
    )
    SELECT coalesce(array_agg(e.id), '{}'),
           coalesce(bool_or(e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL
                            OR s.consecutive_failures >= circuit_threshold), false)
    INTO busy, any_limited
    FROM queued
    JOIN notifyhook.endpoints AS e ON e.id = queued.endpoint_id
    JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
    WHERE e.enabled;

    IF cardinality(busy) = 0 THEN
        -- Nothing pending at all: no retry to wait for, nothing held back. The hint
        -- row alone, without starting the statement below (most of a claim's cost).
        RETURN QUERY SELECT NULL::bigint, NULL::uuid, NULL::bigint, NULL::integer, NULL::text,
            NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::text,
            NULL::double precision, false, false;
        RETURN;
    END IF;

    -- Lock the state rows of the limited endpoints that have rows due, in id order
    -- (record_outcomes locks in the same order, so two transactions never deadlock).
    -- Most claims find no limited endpoint and skip this statement.
    guarded := '{}';
    IF any_limited THEN
    guarded := ARRAY(
        SELECT s.endpoint_id
        FROM notifyhook.endpoint_state AS s
        JOIN notifyhook.endpoints AS e ON e.id = s.endpoint_id
        WHERE s.endpoint_id = ANY (busy)
          AND (e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL
               OR s.consecutive_failures >= circuit_threshold)
          AND (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
               WHERE d.endpoint_id = s.endpoint_id AND d.status = 'pending'
               ORDER BY d.next_attempt_at LIMIT 1) <= now()
        ORDER BY s.endpoint_id
        FOR UPDATE OF s);
    END IF;
    bucket_at := clock_timestamp();

    RETURN QUERY
    WITH candidate AS (
        SELECT e.id AS endpoint_id, e.tenant_id, e.rate_limit, e.max_in_flight,
               s.consecutive_failures, s.tokens, s.tokens_at,
               e.rate_limit IS NOT NULL OR e.max_in_flight IS NOT NULL
                   OR s.consecutive_failures >= circuit_threshold AS limited,
               e.id = ANY (guarded) AS guarded,
               -- Read off the first entry of deliveries_pending for the endpoint. (An
               -- EXISTS lets the planner choose a sequential scan in a generic plan.)
               (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = e.id AND d.status = 'pending'
                ORDER BY d.next_attempt_at LIMIT 1) <= now() AS has_due,
               (SELECT min(d.next_attempt_at) FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at > now()
               ) AS later_at,
               flight.total AS in_flight, flight.mine
        FROM unnest(busy) AS b(endpoint_id)
        JOIN notifyhook.endpoints AS e ON e.id = b.endpoint_id AND e.enabled
        JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
        CROSS JOIN LATERAL (
            SELECT count(*) AS total, count(*) FILTER (WHERE d.locked_by = worker) AS mine
            FROM notifyhook.deliveries AS d
            WHERE d.endpoint_id = e.id AND d.status = 'processing') AS flight
    ),
    -- What this worker holds per tenant, every endpoint of it counted (not only the
    -- candidates): a tenant with many endpoints still gets one share.
    tenant_held AS (
        SELECT d.tenant_id, count(*) AS mine FROM notifyhook.deliveries AS d
        WHERE d.status = 'processing' AND d.locked_by = worker
        GROUP BY d.tenant_id
    ),
    -- The buckets of guarded endpoints only. No FOR UPDATE here: the rows are locked
    -- since the statement before, so this statement's snapshot has their latest tokens.
    bucket AS (
        SELECT c.endpoint_id, c.rate_limit,
               least(c.rate_limit::double precision,
                     coalesce(c.tokens, c.rate_limit)
                     + c.rate_limit * greatest(0, extract(epoch FROM bucket_at
                                                           - coalesce(c.tokens_at, bucket_at))))
                   AS tokens
        FROM candidate AS c
        WHERE c.rate_limit IS NOT NULL AND c.has_due AND c.guarded
    ),
    allowance AS (
        SELECT c.endpoint_id, c.tenant_id, c.mine,
               endpoint_share - coalesce(t.mine, 0) AS tenant_room,
               -- A limited endpoint not locked above (it became limited, by an
               -- operator or a failure, between the two statements) waits for the
               -- next claim, which will lock it.
               CASE WHEN c.limited AND NOT c.guarded THEN 0
               ELSE greatest(0, least(
                   max_rows,
                   endpoint_share - c.mine,
                   endpoint_share - coalesce(t.mine, 0),
                   coalesce(c.max_in_flight - c.in_flight, max_rows),
                   CASE WHEN c.consecutive_failures >= circuit_threshold
                        THEN 1 - c.in_flight ELSE max_rows END,
                   coalesce(floor(b.tokens)::integer, max_rows)
               )) END::integer AS allowed,
               c.limited AND NOT c.guarded AS unguarded,
               b.tokens, b.rate_limit
        FROM candidate AS c
        LEFT JOIN bucket AS b ON b.endpoint_id = c.endpoint_id
        LEFT JOIN tenant_held AS t ON t.tenant_id = c.tenant_id
        WHERE c.has_due
    ),
    -- How many rows each endpoint takes in this claim: up to an even level of slots
    -- across the endpoints with rows due (what it holds counted), within its cap.
    -- Locking only what the level admits matters: locking every endpoint's whole
    -- cap and keeping the first max_rows would lock (and write) rows for nothing.
    -- An endpoint stopped by the level rather than its cap may have more due:
    -- the worker is told (more_now) and claims again at once.
    share AS (
        SELECT a.*,
               least(a.allowed, greatest(0,
                   ceil((max_rows + sum(a.mine) OVER ())::numeric / count(*) OVER ())::integer
                   - a.mine::integer)) AS take
        FROM allowance AS a
    ),
    picked AS (
        SELECT d.id, d.next_attempt_at, a.tenant_id, a.tenant_room,
               -- The slot of this worker's that the row would fill for its endpoint.
               a.mine + row_number() OVER (PARTITION BY d.endpoint_id
                                           ORDER BY d.next_attempt_at, d.id) AS slot
        FROM share AS a
        CROSS JOIN LATERAL (
            SELECT d.id, d.endpoint_id, d.next_attempt_at FROM notifyhook.deliveries AS d
            WHERE d.endpoint_id = a.endpoint_id AND d.status = 'pending' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT a.take
            FOR UPDATE SKIP LOCKED) AS d
        WHERE a.take > 0
    ),
    -- The tenant's cap, applied in the same level order across its endpoints.
    ranked AS (
        SELECT p.*, row_number() OVER (PARTITION BY p.tenant_id
                                       ORDER BY p.slot, p.next_attempt_at, p.id) AS tenant_turn
        FROM picked AS p
    ),
    chosen AS (
        SELECT r.id FROM ranked AS r
        WHERE r.tenant_turn <= r.tenant_room
        ORDER BY r.slot, r.next_attempt_at, r.id
        LIMIT max_rows
    ),
    claimed AS (
        UPDATE notifyhook.deliveries AS d
        SET status = 'processing', attempts = d.attempts + 1, locked_by = worker,
            locked_until = now() + lease, updated_at = now()
        FROM chosen WHERE d.id = chosen.id
        RETURNING d.id, d.event_id, d.endpoint_id, d.attempts
    ),
    claimed_per_endpoint AS (
        SELECT claimed.endpoint_id, count(*) AS taken FROM claimed GROUP BY claimed.endpoint_id
    ),
    -- Endpoints that used all they were allowed, with the tokens they have left.
    held_back AS (
        SELECT a.endpoint_id, a.rate_limit, a.tokens - coalesce(n.taken, 0) AS tokens_left
        FROM allowance AS a
        LEFT JOIN claimed_per_endpoint AS n ON n.endpoint_id = a.endpoint_id
        WHERE coalesce(n.taken, 0) >= a.allowed AND NOT a.unguarded
    ),
    spent AS (
        UPDATE notifyhook.endpoint_state AS s
        SET tokens = b.tokens - n.taken, tokens_at = bucket_at
        FROM bucket AS b JOIN claimed_per_endpoint AS n ON n.endpoint_id = b.endpoint_id
        WHERE s.endpoint_id = b.endpoint_id
    )
    SELECT c.id, c.event_id, c.endpoint_id, c.attempts, e.url, e.secret,
           CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END,
           e.headers, e.timeout_ms, (e.extra_fields || ev.payload)::text,
           NULL::double precision, NULL::boolean, NULL::boolean
    FROM claimed AS c
    JOIN notifyhook.endpoints AS e ON e.id = c.endpoint_id
    JOIN notifyhook.events AS ev ON ev.id = c.event_id
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           -- The worker waits at least a few ms, so 0 cannot spin.
           CASE WHEN EXISTS (SELECT FROM allowance AS a WHERE a.unguarded) THEN 0
           ELSE extract(epoch FROM least(
               (SELECT min(c.later_at) FROM candidate AS c) - now(),
               -- The next token of a bucket that held rows back.
               (SELECT min(make_interval(secs => (1 - h.tokens_left) / h.rate_limit))
                FROM held_back AS h WHERE h.tokens_left < 1)))
           END::double precision,
           EXISTS (SELECT FROM held_back AS h WHERE coalesce(h.tokens_left, 1) >= 1)
           OR EXISTS (SELECT FROM ranked AS r WHERE r.tenant_turn > r.tenant_room),
           EXISTS (SELECT FROM share AS a
                   JOIN claimed_per_endpoint AS n ON n.endpoint_id = a.endpoint_id
                   WHERE a.take < a.allowed AND n.taken >= a.take);
END
$$;
