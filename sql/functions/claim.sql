-- Claiming: how a worker takes due deliveries, fairly, within each endpoint's limits,
-- at a cost that follows the rows it takes, never waiting for a lock.

-- Claim up to max_rows due deliveries for `worker`, leasing them for `lease`.
--
-- In one paragraph. Every endpoint has a turn (endpoint_turns.turn_at, indexed): when
-- its oldest row fell due, or when it was last served if it still has rows due, or
-- when its next row will fall due. A claim (1) folds the wakes producers left
-- (endpoint_wakes) into the turns, (2) locks the first max_rows endpoints whose turn
-- has come, in turn order, skipping any row another transaction holds, (3) in a
-- statement of its own takes each one's rows: at most its fair part, its fleet-wide
-- limits and an even level of this claim, and (4) gives each one its next turn: now
-- if it still has rows due, which sends it to the back of the line. (When it picked one
-- endpoint without limits, the common case, steps 3 and 4 take a shorter way to as many
-- rows and the same next turn, tests/test_properties.py comparing the two.) So a claim reads
-- a few index entries per endpoint it serves, whatever the number of endpoints, and
-- a claim when nothing is due reads the head of one index.
--
-- Fair parts, between the endpoints due at this moment only (work-conserving):
-- a tenant may hold concurrency - reserve slots of this worker divided by the number
-- of tenants with rows due, and an endpoint its tenant's part divided by the number
-- of the tenant's endpoints with rows due. One endpoint alone may so hold all but
-- the reserve (a tenth of the slots); the reserve is kept for endpoints below their
-- part, so that a fresh event never waits for a slow backlog to free a slot. The
-- worker says what it holds (held_*), so a predecessor's rows under the same
-- WORKER_ID are not counted as its own. Per endpoint, the fleet-wide limits are:
--   * max_in_flight minus the rows the whole fleet holds (`processing`);
--   * one request at a time while its circuit is open (5 or more consecutive
--     failures), and always for an ordered (FIFO) endpoint, whose head goes first;
--   * the whole tokens in its rate bucket (rate_limit per second, burst of one
--     second's worth), shared by every worker through endpoint_turns.
--
-- Why the rows are taken in a statement of its own. Under READ COMMITTED one
-- statement reads with one snapshot, taken when it starts. The endpoints' turn rows
-- are locked first; the statement that counts their `processing` rows starts after,
-- so it sees every claim committed before, and no other claim can take their rows
-- until this one commits: the fleet-wide counts are exact. Locks are taken with SKIP
-- LOCKED: an endpoint whose turn row another claim (or an operator) holds is left for
-- the next claim, and the others are served. Claims lock only endpoint_turns, and the
-- recording of outcomes only endpoint_state (health), so neither waits for the other.
-- The circuit is read from endpoint_state as last committed.
--
-- Who writes turn_at: only a claim, holding the turn row's lock. Whoever makes a row
-- due or sendable (producers, replays, recorded outcomes, released and reclaimed
-- claims, an operator enabling an endpoint) inserts an endpoint_wakes row, which waits for nobody; a claim that can see the wake also
-- sees the rows it announces. An endpoint held back by a fleet-wide limit gets no
-- turn (null) until an outcome of its in-flight rows is recorded.
DROP FUNCTION IF EXISTS notifyhook.claim_due(text, integer, interval, integer);
DROP FUNCTION IF EXISTS notifyhook.claim_due(
    text, integer, interval, integer, bigint[], integer[], text[]);
CREATE FUNCTION notifyhook.claim_due(
    worker text,
    max_rows integer,
    lease interval,
    concurrency integer,
    held_endpoints bigint[],
    held_counts integer[],
    held_tenants text[]
) RETURNS TABLE (
    deliveries notifyhook.claimed_delivery[],
    -- Seconds until the next turn comes (a retry falling due, a rate token), or null;
    -- relative, so that the worker's clock need not agree with the database's.
    wake_in_s double precision,
    -- Rows are due that this claim did not take: claim again when slots free up.
    more_due boolean,
    -- An endpoint is held back by a fleet-wide limit (max_in_flight, its circuit, FIFO
    -- order) until an outcome of its in-flight rows is recorded: record without delay.
    held_back boolean,
    -- Work was passed by because another transaction held its lock for a moment (a
    -- record of outcomes, another claim, an operator): claim again shortly.
    passed_by boolean
)
LANGUAGE plpgsql
-- Planned once per connection and reused: planning afresh costs more than running.
SET plan_cache_mode = force_generic_plan
-- Every read here is meant as an index probe. A plan made while the tables looked
-- empty chose sequential scans, and being cached, kept them through the next burst.
SET enable_seqscan = off
-- endpoint_wakes has no index, so with enable_seqscan off its scan is costed at 10^10,
-- and PostgreSQL compiled the fold statement with JIT at every claim: 200 ms each.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    circuit_threshold CONSTANT integer := 5;
    -- The claim's clock: due means due by now, and the lease runs from now, not from
    -- the transaction's start.
    started CONSTANT timestamptz := clock_timestamp();
    reserve CONSTANT integer := concurrency / 10;
    held_total CONSTANT integer := coalesce((SELECT sum(n) FROM unnest(held_counts) AS n), 0);
    folded tid[];
    due_tenants text[];
    due_tenant_endpoints integer[];
    tenant_part integer;
    capped bigint[];
    picked bigint[];
    bucket_at timestamptz;
    claimed notifyhook.claimed_delivery[];
    finished timestamptz;
    lone_tenant text;
    lone_plain boolean;
    lone_endpoints integer;
    lone_mine integer;
    lone_tenant_mine integer;
    lone_take integer;
    lone_due timestamptz;
    chosen_ids bigint[];
BEGIN
    -- 1. Fold the wakes into the turns. Only wakes whose state row this claim can
    --    lock are folded (and deleted); the others wait for the next claim.
    --    Most claims of a busy endpoint find none: one look, not the fold's plan.
    passed_by := false;
    IF EXISTS (SELECT FROM notifyhook.endpoint_wakes) THEN
        WITH wake AS (
            SELECT w.ctid AS row_id, w.endpoint_id, w.due_at
            FROM notifyhook.endpoint_wakes AS w
            LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ), lockable AS (
            SELECT s.endpoint_id FROM notifyhook.endpoint_turns AS s
            WHERE s.endpoint_id IN (SELECT wake.endpoint_id FROM wake)
            FOR NO KEY UPDATE SKIP LOCKED
        ), turned AS (
            UPDATE notifyhook.endpoint_turns AS s
            SET turn_at = least(s.turn_at, m.due_at)
            FROM (SELECT wake.endpoint_id, min(wake.due_at) AS due_at
                  FROM wake JOIN lockable USING (endpoint_id)
                  GROUP BY wake.endpoint_id) AS m
            WHERE s.endpoint_id = m.endpoint_id
        )
        SELECT array_agg(wake.row_id) INTO folded
        FROM wake
        WHERE wake.endpoint_id IN (SELECT lockable.endpoint_id FROM lockable)
           -- The endpoint was deleted since: nothing to wake.
           OR NOT EXISTS (SELECT FROM notifyhook.endpoint_turns AS s
                          WHERE s.endpoint_id = wake.endpoint_id);
        IF folded IS NOT NULL THEN
            DELETE FROM notifyhook.endpoint_wakes WHERE ctid = ANY (folded);
        END IF;
        passed_by := EXISTS (SELECT FROM notifyhook.endpoint_wakes);
    END IF;

    -- 2. Who has rows due, for the fair parts: the first `concurrency` turns (beyond
    --    that every part is one slot anyway), counted per tenant.
    --    Each due endpoint's tenant is looked up by its key, one probe each: as a plain
    --    join, the generic plan (which cannot know the LIMIT's value) hashed the due
    --    endpoints and read every row of endpoints to probe the hash; with 10,000
    --    endpoints that one statement was half of a claim's time. The LIMIT 1 keeps the
    --    planner from flattening the LATERAL subquery back into that join.
    SELECT coalesce(array_agg(t.tenant_id), '{}'), coalesce(array_agg(t.endpoints), '{}')
    INTO due_tenants, due_tenant_endpoints
    FROM (SELECT e.tenant_id, count(*)::integer AS endpoints
          FROM (SELECT s.endpoint_id FROM notifyhook.endpoint_turns AS s
                WHERE s.turn_at <= started
                ORDER BY s.turn_at LIMIT concurrency) AS due
          CROSS JOIN LATERAL (
              SELECT e.tenant_id FROM notifyhook.endpoints AS e
              WHERE e.id = due.endpoint_id AND e.enabled LIMIT 1) AS e
          GROUP BY e.tenant_id) AS t;
    tenant_part := ceil((concurrency - reserve)::numeric / greatest(1, cardinality(due_tenants)));

    -- Endpoints this worker holds its part of are not picked: they keep their turn
    -- for the other workers.
    capped := '{}';
    IF held_total > 0 THEN
        capped := ARRAY(
            SELECT h.endpoint_id
            FROM unnest(held_endpoints, held_counts, held_tenants)
                AS h(endpoint_id, n, tenant_id)
            LEFT JOIN unnest(due_tenants, due_tenant_endpoints) AS t(tenant_id, endpoints)
                ON t.tenant_id = h.tenant_id
            WHERE h.n > 0 AND h.n >= ceil(tenant_part::numeric / coalesce(t.endpoints, 1)));
    END IF;

    picked := ARRAY(
        SELECT s.endpoint_id FROM notifyhook.endpoint_turns AS s
        WHERE s.turn_at <= started AND s.endpoint_id <> ALL (capped)
        ORDER BY s.turn_at
        LIMIT max_rows
        FOR NO KEY UPDATE SKIP LOCKED);
    IF cardinality(picked) < max_rows THEN
        -- Fewer endpoints than slots, yet some due and not capped were not taken: their
        -- turn rows were locked.
        passed_by := passed_by OR EXISTS (
            SELECT FROM notifyhook.endpoint_turns AS s
            WHERE s.turn_at <= started
              AND s.endpoint_id <> ALL (capped) AND s.endpoint_id <> ALL (picked));
    END IF;
    IF cardinality(picked) = 0 THEN
        -- Seconds to the earliest turn still to come, or null: the head of one index.
        -- Written out rather than called as an SQL function: PostgreSQL parses and
        -- plans an SQL function's body at every call that cannot inline it (a third
        -- of an empty claim's time); a statement here is planned once per connection.
        RETURN QUERY
        SELECT '{}'::notifyhook.claimed_delivery[],
               (SELECT extract(epoch FROM min(s.turn_at) - started)::double precision
                FROM notifyhook.endpoint_turns AS s WHERE s.turn_at > started),
               EXISTS (SELECT FROM notifyhook.endpoint_turns AS s WHERE s.turn_at <= started),
               false, passed_by;
        RETURN;
    END IF;

    -- notifyhook.general_claim = on: the general statement always. For the tests, which
    -- compare the two ways (tests/test_properties.py); not an operator's setting.
    IF cardinality(picked) = 1
       AND current_setting('notifyhook.general_claim', true) IS DISTINCT FROM 'on' THEN
        SELECT e.tenant_id,
               e.enabled AND e.rate_limit IS NULL AND e.max_in_flight IS NULL AND NOT e.ordered
               AND s.consecutive_failures < circuit_threshold
        INTO lone_tenant, lone_plain
        FROM notifyhook.endpoints AS e
        JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
        WHERE e.id = picked[1];
    END IF;
    IF lone_plain THEN
        -- One endpoint picked, with no fleet-wide limit: what step 3's statement computes
        -- for it, as a number (one endpoint's rows are a prefix of its due rows), and its
        -- next turn without the limits' cases. The common case (one busy endpoint, or
        -- one fresh event) so builds far fewer plan nodes (docs/performance.md).
        lone_endpoints := coalesce(
            due_tenant_endpoints[array_position(due_tenants, lone_tenant)], 1);
        lone_mine := coalesce(held_counts[array_position(held_endpoints, picked[1])], 0);
        IF held_total > 0 THEN
            SELECT coalesce(sum(h.n), 0) INTO lone_tenant_mine
            FROM unnest(held_tenants, held_counts) AS h(tenant_id, n)
            WHERE h.tenant_id = lone_tenant;
        ELSE
            lone_tenant_mine := 0;
        END IF;
        lone_take := greatest(0, least(
            max_rows,
            ceil(tenant_part::numeric / lone_endpoints)::integer - lone_mine,
            greatest(
                least(tenant_part - lone_tenant_mine, concurrency - held_total - reserve),
                least(greatest(1, floor(tenant_part::numeric / lone_endpoints))::integer
                      - lone_mine, reserve))));
        chosen_ids := '{}';
        IF lone_take > 0 THEN
            chosen_ids := ARRAY(
                SELECT d.id FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = picked[1] AND d.status = 'pending'
                  AND d.next_attempt_at <= started
                ORDER BY d.next_attempt_at
                LIMIT lone_take
                FOR UPDATE SKIP LOCKED);
        END IF;
    ELSE
        bucket_at := clock_timestamp();

        -- 3. Choose the rows, in a statement that starts after the locks (see above).
        --    MATERIALIZED: inlined, `candidate` copied its in-flight count subquery into
        --    every expression that reads in_flight, and each copy's plan was built at every
        --    claim (building plans is a third of a small claim's CPU: docs/performance.md).
        chosen_ids := ARRAY(
        WITH candidate AS MATERIALIZED (
            SELECT e.id AS endpoint_id, e.tenant_id, e.rate_limit, e.max_in_flight, e.ordered,
                   s.consecutive_failures >= circuit_threshold AS circuit_open,
                   notifyhook.bucket_tokens(e.rate_limit, tu.tokens, tu.tokens_at, bucket_at) AS tokens,
                   coalesce(h.n, 0) AS mine,
                   -- Counted only where a limit needs it.
                   CASE WHEN e.max_in_flight IS NOT NULL OR e.ordered
                             OR s.consecutive_failures >= circuit_threshold
                        THEN (SELECT count(*) FROM notifyhook.deliveries AS d
                              WHERE d.endpoint_id = e.id AND d.status = 'processing')
                        ELSE 0 END AS in_flight,
                   ceil(tenant_part::numeric / coalesce(t.endpoints, 1)) AS part,
                   -- The part rounded down: what the reserve may bring an endpoint up to, so
                   -- that the parts of a tenant's endpoints never add up to more than its own.
                   greatest(1, floor(tenant_part::numeric / coalesce(t.endpoints, 1))) AS floor_part
            FROM unnest(picked) AS p(endpoint_id)
            JOIN notifyhook.endpoints AS e ON e.id = p.endpoint_id AND e.enabled
            JOIN notifyhook.endpoint_turns AS tu ON tu.endpoint_id = e.id
            JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id
            LEFT JOIN unnest(held_endpoints, held_counts) AS h(endpoint_id, n) ON h.endpoint_id = e.id
            LEFT JOIN unnest(due_tenants, due_tenant_endpoints) AS t(tenant_id, endpoints)
                ON t.tenant_id = e.tenant_id
        ),
        -- What this worker holds per tenant, every endpoint of it counted.
        tenant_held AS (
            SELECT h.tenant_id, sum(h.n) AS mine
            FROM unnest(held_tenants, held_counts) AS h(tenant_id, n)
            GROUP BY h.tenant_id
        ),
        allowance AS (
            SELECT c.endpoint_id, c.tenant_id, c.mine, c.floor_part, c.ordered,
                   tenant_part - coalesce(t.mine, 0) AS tenant_room,
                   greatest(0, least(
                       max_rows,
                       c.part - c.mine,
                       coalesce(c.max_in_flight - c.in_flight, max_rows),
                       CASE WHEN c.ordered OR c.circuit_open THEN 1 - c.in_flight ELSE max_rows END,
                       coalesce(floor(c.tokens)::integer, max_rows)
                   ))::integer AS allowed
            FROM candidate AS c
            LEFT JOIN tenant_held AS t ON t.tenant_id = c.tenant_id
        ),
        -- How many rows each endpoint takes: up to an even level of slots across the
        -- picked endpoints (what it holds counted), within what it is allowed.
        share AS (
            SELECT a.*,
                   least(a.allowed, greatest(0,
                       ceil((max_rows + sum(a.mine) OVER ())::numeric / count(*) OVER ())::integer
                       - a.mine::integer)) AS take
            FROM allowance AS a
        ),
        picked_rows AS (
            SELECT d.id, d.next_attempt_at, a.tenant_id, a.tenant_room, a.floor_part,
                   -- The slot of this worker's that the row would fill for its endpoint.
                   a.mine + row_number() OVER (PARTITION BY a.endpoint_id
                                               ORDER BY d.next_attempt_at, d.id) AS slot
            FROM share AS a
            CROSS JOIN LATERAL (
                SELECT d.id, d.next_attempt_at FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = a.endpoint_id AND d.status = 'pending'
                  AND d.next_attempt_at <= started AND NOT a.ordered
                ORDER BY d.next_attempt_at
                LIMIT a.take
                FOR UPDATE SKIP LOCKED) AS d
            WHERE a.take > 0
            UNION ALL
            -- A FIFO endpoint sends its head, and only when the head is due: a head waiting
            -- for its retry holds the rest back.
            SELECT d.id, d.next_attempt_at, a.tenant_id, a.tenant_room, a.floor_part, a.mine + 1
            FROM share AS a
            CROSS JOIN LATERAL (
                SELECT d.id, d.next_attempt_at FROM notifyhook.deliveries AS d
                WHERE d.id = notifyhook.fifo_head(a.endpoint_id)
                  AND d.status = 'pending' AND d.next_attempt_at <= started
                FOR UPDATE SKIP LOCKED) AS d
            WHERE a.ordered AND a.take > 0
        ),
        -- The tenant's part, applied in the same level order across its endpoints, within
        -- the slots outside the reserve. The reserve brings endpoints up to their part,
        -- whatever their tenant holds: a slow endpoint's backlog never keeps a sibling's
        -- fresh events waiting for a slot.
        ranked AS (
            SELECT p.*,
                   row_number() OVER (PARTITION BY p.tenant_id
                                      ORDER BY p.slot, p.next_attempt_at, p.id) AS tenant_turn,
                   row_number() OVER (ORDER BY p.slot, p.next_attempt_at, p.id) AS claim_turn,
                   row_number() OVER (PARTITION BY p.slot <= p.floor_part
                                      ORDER BY p.slot, p.next_attempt_at, p.id) AS under_turn
            FROM picked_rows AS p
        ),
        chosen AS (
            SELECT r.id FROM ranked AS r
            WHERE r.claim_turn <= max_rows
              AND ((r.tenant_turn <= r.tenant_room
                    AND r.claim_turn <= concurrency - held_total - reserve)
                   OR (r.slot <= r.floor_part AND r.under_turn <= reserve))
        )
        SELECT chosen.id FROM chosen);
    END IF;

    -- The rows chosen either way, taken and handed over with what sending them needs: one
    -- statement for both ways, so that what a worker is given is written once.
    IF cardinality(chosen_ids) > 0 THEN
        WITH claimed_rows AS (
            UPDATE notifyhook.deliveries AS d
            SET status = 'processing', attempts = d.attempts + 1, locked_by = worker,
                locked_until = started + lease, updated_at = started
            -- The status list names the partition (0006): one primary-key probe of
            -- deliveries_active per row. Not "status = 'pending'": that matches the
            -- deliveries_pending index's predicate, and the planner read the whole of it
            -- (a bitmap scan of every pending row of a lone endpoint, 20,000 in a peer run)
            -- to find the claimed few, nearly doubling PostgreSQL's CPU per delivery
            -- (docs/performance.md).
            -- And an array, not a join: the generic plan cannot know how many rows are
            -- chosen, and until the turns were analysed hash-joined them with every
            -- active row (and the events' with every event).
            WHERE d.id = ANY (chosen_ids)
              AND d.status IN ('pending', 'processing')
            RETURNING d.id, d.event_id, d.endpoint_id, d.tenant_id, d.attempts
        )
        SELECT array_agg(ROW(c.id, c.event_id, c.endpoint_id, c.tenant_id, c.attempts, e.url,
                             e.secret,
                             CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END,
                             e.headers, e.timeout_ms, e.retry_schedule,
                             -- The exact body to send, built here so that the worker never
                             -- parses JSON it only forwards.
                             (e.extra_fields || ev.payload)::text,
                             e.max_in_flight IS NOT NULL OR e.ordered
                                 OR s.consecutive_failures >= circuit_threshold
                         )::notifyhook.claimed_delivery)
        INTO claimed
        FROM claimed_rows AS c
        JOIN notifyhook.endpoints AS e ON e.id = c.endpoint_id
        JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = c.endpoint_id
        JOIN notifyhook.events AS ev ON ev.id = c.event_id;
    END IF;

    IF lone_plain THEN
        lone_due := (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                     WHERE d.endpoint_id = picked[1] AND d.status = 'pending'
                     ORDER BY d.next_attempt_at LIMIT 1);
        UPDATE notifyhook.endpoint_turns AS s
        SET turn_at = CASE WHEN lone_due IS NULL THEN NULL
                           WHEN lone_due > clock_timestamp() THEN lone_due
                           ELSE clock_timestamp() END
        WHERE s.endpoint_id = picked[1];
        held_back := false;
    ELSE
        -- 4. The picked endpoints' next turns (this statement sees the rows just taken),
        --    and what their buckets have left.
        WITH taken AS (
            SELECT c.endpoint_id, count(*) AS n FROM unnest(claimed) AS c GROUP BY c.endpoint_id
        ), upcoming AS (
            SELECT s.endpoint_id, e.enabled, e.rate_limit,
                   notifyhook.bucket_tokens(e.rate_limit, tu.tokens, tu.tokens_at, bucket_at)
                       - coalesce(t.n, 0) AS tokens_left,
                   CASE WHEN e.ordered
                        THEN (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                              WHERE d.id = notifyhook.fifo_head(e.id)
                                AND d.status IN ('pending', 'processing'))
                        ELSE (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                              WHERE d.endpoint_id = e.id AND d.status = 'pending'
                              ORDER BY d.next_attempt_at LIMIT 1) END AS due_at,
                   CASE WHEN e.max_in_flight IS NOT NULL OR e.ordered
                             OR s.consecutive_failures >= circuit_threshold
                        THEN (SELECT count(*) FROM notifyhook.deliveries AS d
                              WHERE d.endpoint_id = e.id AND d.status = 'processing')
                             >= CASE WHEN e.ordered OR s.consecutive_failures >= circuit_threshold
                                     THEN 1 ELSE e.max_in_flight END
                        ELSE false END AS at_limit
            FROM unnest(picked) AS p(endpoint_id)
            JOIN notifyhook.endpoint_turns AS tu ON tu.endpoint_id = p.endpoint_id
            JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = p.endpoint_id
            JOIN notifyhook.endpoints AS e ON e.id = p.endpoint_id
            LEFT JOIN taken AS t ON t.endpoint_id = p.endpoint_id
        ), turned AS (
            UPDATE notifyhook.endpoint_turns AS s
            SET tokens = CASE WHEN n.rate_limit IS NULL THEN s.tokens ELSE n.tokens_left END,
                tokens_at = CASE WHEN n.rate_limit IS NULL THEN s.tokens_at ELSE bucket_at END,
                turn_at = CASE
                    -- Disabled, nothing pending, or held back until an in-flight row is recorded.
                    WHEN NOT n.enabled OR n.due_at IS NULL OR n.at_limit THEN NULL
                    -- The bucket is empty: the turn comes with the next token.
                    WHEN n.tokens_left < 1
                        THEN greatest(n.due_at,
                                      bucket_at + make_interval(secs => (1 - n.tokens_left) / n.rate_limit))
                    WHEN n.due_at > clock_timestamp() THEN n.due_at
                    -- Rows still due: to the back of the line.
                    ELSE clock_timestamp() END
            FROM upcoming AS n
            WHERE s.endpoint_id = n.endpoint_id
        )
        SELECT coalesce(bool_or(n.at_limit AND n.enabled AND n.due_at IS NOT NULL), false)
        INTO held_back
        FROM upcoming AS n;
    END IF;

    finished := clock_timestamp();
    RETURN QUERY
    SELECT coalesce(claimed, '{}'),
           (SELECT extract(epoch FROM min(s.turn_at) - finished)::double precision
            FROM notifyhook.endpoint_turns AS s WHERE s.turn_at > finished),
           EXISTS (SELECT FROM notifyhook.endpoint_turns AS s WHERE s.turn_at <= finished),
           held_back, passed_by;
END
$$;

-- The tokens in a rate bucket at `at`: what was left at tokens_at, plus rate_limit per
-- second since, at most rate_limit (a burst of one second's worth). Null: no limit.
CREATE OR REPLACE FUNCTION notifyhook.bucket_tokens(
    rate_limit integer, tokens double precision, tokens_at timestamptz, at timestamptz
) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(rate_limit::double precision,
                 coalesce(tokens, rate_limit)
                 + rate_limit * greatest(0, extract(epoch FROM at - coalesce(tokens_at, at))))
$$;

-- The head of a FIFO endpoint's queue: its first pending row in events.created_at,
-- events.id order (deliveries carry both: created_at is the event's). It sorts the
-- endpoint's pending rows: an ordered endpoint pays for its order, no other does.
CREATE OR REPLACE FUNCTION notifyhook.fifo_head(endpoint bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT d.id FROM notifyhook.deliveries AS d
    WHERE d.endpoint_id = endpoint AND d.status = 'pending'
    ORDER BY d.created_at, d.event_id
    LIMIT 1
$$;

-- Written out in claim_due since 2026-12-04 (an SQL function is parsed at every call).
DROP FUNCTION IF EXISTS notifyhook.next_turn_in_s(timestamptz);

-- The key of the session advisory lock a worker's claim connection holds on its worker
-- id for its whole life: one claimant per id (take_over, release_lost_claims, and the
-- worker's own hold_worker_id query, notifyhook/queries.sql).
CREATE OR REPLACE FUNCTION notifyhook.worker_lock_key(worker text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended('notifyhook worker ' || worker, 0);

-- At a worker's start: take back what a dead predecessor with the same WORKER_ID
-- (a systemd instance restarted after a crash) still holds, at once rather than when
-- its leases run out, and leave its rows nobody's share. The worker's claim session
-- keeps an advisory lock on its id for its whole life: if the lock is free, no live
-- session claims under this id, so every row leased to it is a dead process's. Its
-- leases are ended here and reclaim_expired takes the rows back as for any expired
-- lease (the attempt is recorded, charged: the receiver may have got it). Returns
-- the number of rows taken back, or null when another live session holds the id.
CREATE OR REPLACE FUNCTION notifyhook.take_over(worker text, max_attempts integer)
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_lock(notifyhook.worker_lock_key(worker)) THEN
        RETURN NULL;
    END IF;
    UPDATE notifyhook.deliveries AS d
    SET locked_until = now() - interval '1 second'  -- reclaim_expired compares with now()
    WHERE d.status = 'processing' AND d.locked_by = worker;
    -- Its lock is this session's now: say the rows' worker is dead all the same.
    RETURN notifyhook.reclaim_expired(max_attempts, worker);
END
$$;

-- Give back what `worker` holds but does not know it holds: the rows of a claim whose
-- answer it never got (the connection dropped after the claim committed). They were
-- never sent, so their attempt is not charged (release_claims); left to their leases,
-- they would wait the whole lease and be charged an attempt that never happened, and
-- one on its last attempt would go dead without a request. `known`: the deliveries
-- the worker is sending or has outcomes of still to record. Like take_over, only
-- while no other live session claims under this id (its advisory lock is free or this
-- session's). Returns the number given back, or null when the id is in use elsewhere.
CREATE OR REPLACE FUNCTION notifyhook.release_lost_claims(worker text, known bigint[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    id_lock bigint := notifyhook.worker_lock_key(worker);
    lost_ids bigint[];
    lost_attempts integer[];
BEGIN
    IF NOT pg_try_advisory_lock(id_lock) THEN
        RETURN NULL;
    END IF;
    -- Taken once more by this call (session locks count): give that one back.
    PERFORM pg_advisory_unlock(id_lock);
    SELECT array_agg(d.id), array_agg(d.attempts) INTO lost_ids, lost_attempts
    FROM notifyhook.deliveries AS d
    WHERE d.status = 'processing' AND d.locked_by = worker AND d.id <> ALL (known);
    IF lost_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN notifyhook.release_claims(
        worker, lost_ids, lost_attempts,
        'claim lost: the worker lost its database connection before the claim''s answer '
        'reached it; never sent, given back without charging the attempt');
END
$$;

-- The turns' safety net, run by one worker of the fleet every few minutes: an enabled
-- endpoint whose first pending row is due before its turn (or that has no turn) gets a
-- wake. notifyhook's own writers never need it (each leaves a wake or writes the turn
-- under the state row's lock); a hand-written UPDATE of notifyhook.deliveries does. It
-- visits every endpoint with a pending row (a skip scan of deliveries_pending), which is
-- why it runs every few minutes and not in the claim. A wake it leaves for an endpoint
-- that is rightly waiting (at its max_in_flight, or for a rate token) costs one look.
-- Returns the number of endpoints woken.
CREATE OR REPLACE FUNCTION notifyhook.repair_turns() RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    woken integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7305872156748263003) THEN
        RETURN 0;  -- another worker is at it
    END IF;
    WITH RECURSIVE queued(endpoint_id) AS (
        (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
         WHERE d.status = 'pending' ORDER BY d.endpoint_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.endpoint_id FROM notifyhook.deliveries AS d
                WHERE d.status = 'pending' AND d.endpoint_id > queued.endpoint_id
                ORDER BY d.endpoint_id LIMIT 1)
        FROM queued WHERE queued.endpoint_id IS NOT NULL
    ), due AS (
        SELECT q.endpoint_id,
               (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                WHERE d.endpoint_id = q.endpoint_id AND d.status = 'pending'
                ORDER BY d.next_attempt_at LIMIT 1) AS due_at
        FROM queued AS q WHERE q.endpoint_id IS NOT NULL
    )
    INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
    SELECT due.endpoint_id, due.due_at
    FROM due
    JOIN notifyhook.endpoints AS e ON e.id = due.endpoint_id AND e.enabled
    JOIN notifyhook.endpoint_turns AS s ON s.endpoint_id = due.endpoint_id
    WHERE due.due_at <= now() AND (s.turn_at IS NULL OR s.turn_at > due.due_at);
    GET DIAGNOSTICS woken = ROW_COUNT;
    RETURN woken;
END
$$;
