-- Claiming: how a worker takes due deliveries, fairly and within each endpoint's limits.

-- Claim up to max_rows due deliveries for `worker`, leasing them for `lease`.
--
-- Fairness comes first: rows are taken per endpoint and interleaved (every
-- endpoint's oldest row, then every endpoint's second, …), so a backlog of one
-- slow endpoint never stands in front of another endpoint's fresh events. Per
-- endpoint, the number taken is the least of:
--   * endpoint_share minus what this worker already holds of it (no endpoint
--     takes more than its share of one worker's delivery slots);
--   * max_in_flight minus the rows the whole fleet holds (`processing`);
--   * 1 minus the rows in flight while its circuit is open (5 or more
--     consecutive failures): a failing endpoint gets one probe at a time;
--   * the whole tokens in its rate bucket (rate_limit per second, burst of one
--     second's worth), shared by every worker through endpoint_state.
--
-- Returns the claimed rows, each with the exact body to send (payload merged
-- over the endpoint's extra_fields, built here so the worker never parses JSON
-- it only forwards), then ONE trailing row whose delivery_id is null and which
-- carries two hints for the worker's loop:
--   wake_in_s seconds until something not claimable now becomes claimable (a
--             retry falling due, a rate token arriving), or null; relative, so
--             that the worker's clock need not agree with the database's;
--   more_due  rows are due but held back by a cap that a finishing delivery of
--             this worker may lift: claim again when slots free up.
CREATE OR REPLACE FUNCTION notifyhook.claim_due(
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
    more_due boolean
)
LANGUAGE sql AS $$
    WITH RECURSIVE
    -- Every endpoint with pending rows, by a skip scan of deliveries_pending: one
    -- index probe per such endpoint, however many rows each has queued.
    busy(endpoint_id) AS (
        (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
         WHERE d.status = 'pending' ORDER BY d.endpoint_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
                WHERE d.status = 'pending' AND d.endpoint_id > busy.endpoint_id
                ORDER BY d.endpoint_id LIMIT 1)
        FROM busy WHERE busy.endpoint_id IS NOT NULL
    ),
    candidate AS (
        SELECT e.id AS endpoint_id, e.rate_limit, e.max_in_flight, s.consecutive_failures,
               EXISTS (
                   SELECT FROM notifyhook.deliveries AS d
                   WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
               ) AS has_due,
               (SELECT min(d.next_attempt_at) FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at > now()
               ) AS later_at,
               flight.total AS in_flight, flight.mine
        FROM busy
        JOIN notifyhook.endpoints AS e ON e.id = busy.endpoint_id AND e.enabled
        JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
        CROSS JOIN LATERAL (
            SELECT count(*) AS total, count(*) FILTER (WHERE d.locked_by = worker) AS mine
            FROM notifyhook.deliveries AS d
            WHERE d.endpoint_id = e.id AND d.status = 'processing') AS flight
    ),
    -- Rate buckets are locked (in id order, so two workers never deadlock) and
    -- read after the lock: under READ COMMITTED a locked row is its latest version,
    -- so two workers cannot both spend the same token.
    bucket AS (
        SELECT s.endpoint_id, c.rate_limit,
               least(c.rate_limit::double precision,
                     coalesce(s.tokens, c.rate_limit)
                     + c.rate_limit * greatest(0, extract(epoch FROM clock_timestamp()
                                                           - coalesce(s.tokens_at, clock_timestamp()))))
                   AS tokens
        FROM notifyhook.endpoint_state AS s
        JOIN candidate AS c ON c.endpoint_id = s.endpoint_id
        WHERE c.rate_limit IS NOT NULL AND c.has_due
        ORDER BY s.endpoint_id
        FOR UPDATE OF s
    ),
    allowance AS (
        SELECT c.endpoint_id,
               greatest(0, least(
                   max_rows,
                   endpoint_share - c.mine,
                   coalesce(c.max_in_flight - c.in_flight, max_rows),
                   CASE WHEN c.consecutive_failures >= 5 THEN 1 - c.in_flight ELSE max_rows END,
                   coalesce(floor(b.tokens)::integer, max_rows)
               ))::integer AS allowed,
               b.tokens, b.rate_limit
        FROM candidate AS c LEFT JOIN bucket AS b ON b.endpoint_id = c.endpoint_id
        WHERE c.has_due
    ),
    picked AS (
        SELECT d.id, d.endpoint_id, d.next_attempt_at,
               row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) AS turn
        FROM allowance AS a
        CROSS JOIN LATERAL (
            SELECT d.id, d.endpoint_id, d.next_attempt_at FROM notifyhook.deliveries AS d
            WHERE d.endpoint_id = a.endpoint_id AND d.status = 'pending' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT a.allowed
            FOR UPDATE SKIP LOCKED) AS d
        WHERE a.allowed > 0
    ),
    chosen AS (
        SELECT picked.id FROM picked ORDER BY picked.turn, picked.next_attempt_at LIMIT max_rows
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
    spent AS (
        UPDATE notifyhook.endpoint_state AS s
        SET tokens = b.tokens - n.taken, tokens_at = clock_timestamp()
        FROM bucket AS b JOIN claimed_per_endpoint AS n ON n.endpoint_id = b.endpoint_id
        WHERE s.endpoint_id = b.endpoint_id
    )
    SELECT c.id, c.event_id, c.endpoint_id, c.attempts, e.url, e.secret,
           CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END,
           e.headers, e.timeout_ms, (e.extra_fields || ev.payload)::text,
           NULL::double precision, NULL::boolean
    FROM claimed AS c
    JOIN notifyhook.endpoints AS e ON e.id = c.endpoint_id
    JOIN notifyhook.events AS ev ON ev.id = c.event_id
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           extract(epoch FROM least(
               (SELECT min(c.later_at) FROM candidate AS c),
               (SELECT min(now() + make_interval(secs => (1 - a.tokens) / a.rate_limit))
                FROM allowance AS a WHERE a.tokens < 1)) - now())::double precision,
           EXISTS (
               SELECT FROM allowance AS a
               LEFT JOIN claimed_per_endpoint AS n ON n.endpoint_id = a.endpoint_id
               WHERE coalesce(a.tokens, 1) >= 1 AND coalesce(n.taken, 0) >= a.allowed)
$$;
