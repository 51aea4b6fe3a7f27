-- Recording: what workers write back after their HTTP attempts.

-- Record a batch of attempt outcomes for `worker`, in one transaction.
--
-- Every attempt gets its notifyhook.attempts row: the audit log says what was
-- sent, even by a worker that lost its lease. But a delivery's state is written
-- only while the worker still holds it (status processing, locked_by = worker,
-- and the attempt number it claimed): a worker cut off past its lease, whose row
-- another worker has since claimed, must not overwrite that worker's state.
--
-- `statuses` are the deliveries' new states: delivered, pending (a retry due
-- `retry_in_s` seconds from now, on the database's clock, so that a worker's
-- clock need not agree with it) or dead. `gone` marks a 410 Gone answer, which disables the
-- endpoint. Endpoint health (consecutive failures, failing since) is updated
-- from the batch, and endpoints failing for longer than `disable_after` are
-- disabled. Returns the endpoints this call disabled, with the reason.
--
-- Each attempt's started_at is on the database's clock, as the health's times are:
-- when this call's statement arrived, less `started_ago_s`, how long before the
-- worker sent it the attempt began by the worker's monotonic clock. A worker's
-- wall clock (`started_ats`) may be off by seconds or hours: the dashboard then
-- showed an older error than the last, and the views missed its attempts in the
-- last hour. `started_ats` is written only for an outcome without started_ago_s
-- (a caller written before it), whose health then starts at now() less its duration.
--
-- `retried` says the worker is sending this batch again after an error: the
-- first call may have committed and lost only its answer, so outcomes already
-- recorded are skipped. Only then is the audit log searched, so a normal call
-- pays nothing for it.
--
-- The arrays are read with unnest in each statement rather than copied into a
-- temporary table: a temporary table costs a truncation at every commit, more
-- than reading a hundred array elements again.
DROP FUNCTION IF EXISTS notifyhook.record_outcomes(
    text, bigint[], integer[], text[], timestamptz[], timestamptz[], double precision[],
    integer[], text[], text[], boolean[], interval);
DROP FUNCTION IF EXISTS notifyhook.record_outcomes(
    text, bigint[], bigint[], integer[], text[], timestamptz[], timestamptz[], double precision[],
    integer[], text[], text[], boolean[], interval, boolean);
DROP FUNCTION IF EXISTS notifyhook.record_outcomes(
    text, bigint[], bigint[], integer[], text[], double precision[], timestamptz[],
    double precision[], integer[], text[], text[], boolean[], interval, boolean);
DROP FUNCTION IF EXISTS notifyhook.record_outcomes(
    text, bigint[], bigint[], integer[], text[], double precision[], timestamptz[],
    double precision[], integer[], text[], text[], boolean[], interval, boolean, uuid[]);
-- Its result gained deferred_delivery_id: a result type cannot be replaced. Then it
-- gained started_ago_s, a parameter: a second function beside it would make every
-- call that leaves started_ago_s out ambiguous.
DROP FUNCTION IF EXISTS notifyhook.record_outcomes(
    text, bigint[], bigint[], integer[], text[], double precision[], timestamptz[],
    double precision[], integer[], text[], text[], boolean[], interval, boolean, uuid[],
    boolean[]);
CREATE OR REPLACE FUNCTION notifyhook.record_outcomes(
    worker text,
    delivery_ids bigint[],
    endpoint_ids bigint[],
    attempt_numbers integer[],
    statuses text[],
    retry_in_s double precision[],
    started_ats timestamptz[],
    durations_ms double precision[],
    status_codes integer[],
    errors text[],
    excerpts text[],
    gone boolean[],
    disable_after interval,
    retried boolean,
    -- Last and optional, so that callers written before it keep working; without
    -- keys a record sent again cannot be told from the first (0005_attempt_keys.sql).
    attempt_keys uuid[] DEFAULT NULL,
    -- false: the attempt ended on the worker's side before a request left (a secret it
    -- cannot decrypt, a bug in it): recorded, retried, but not the receiver's failure,
    -- so not counted in the endpoint's health. Null: every attempt was sent.
    sent boolean[] DEFAULT NULL,
    -- Seconds between each attempt's start and this call, by the worker's monotonic
    -- clock. Null (callers written before it): started_ats, the worker's wall clock.
    started_ago_s double precision[] DEFAULT NULL
) RETURNS TABLE (
    -- An endpoint this call disabled, and why.
    endpoint_id bigint,
    disabled_reason text,
    -- Or (the other two null) a delivery whose row another transaction holds: its
    -- outcome is not recorded by this call; the worker sends it again in a later one.
    deferred_delivery_id bigint
)
LANGUAGE plpgsql
-- Planned once per connection and reused (see claim_due).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    -- Positions (1-based) in the arrays of outcomes recorded by an earlier call.
    recorded integer[] := '{}';
    -- The batch's endpoints whose state rows this call could lock.
    locked bigint[];
    circuit_open bigint[];
    lock_wait text;
    -- Positions of outcomes whose rows another transaction holds: left for a later call.
    held integer[];
    -- When each attempt began on the database's clock (null without started_ago_s).
    -- statement_timestamp(), not clock_timestamp(): it is when the call arrived, the
    -- closest to when the worker measured started_ago_s; the clock moves on while this
    -- function runs (and waits for locks). Computed once: the attempts rows and the
    -- health below read the same values, so last_failure_at is a failed attempt's
    -- started_at exactly, and the dashboard finds that attempt's error by it.
    -- (Not clamped at 0 as durations are: a monotonic clock gives no negative age.)
    starts timestamptz[] := ARRAY(
        SELECT statement_timestamp() - make_interval(secs => o.ago_s)
        FROM unnest(started_ago_s) WITH ORDINALITY AS o(ago_s, n) ORDER BY o.n);
BEGIN
    -- One record of a worker at a time. A retried call's search below does not see what
    -- the call it repeats has not committed yet: that call may still be running, its
    -- answer lost with a connection cut under it. The search used to be backed by the
    -- unique index on (attempt_key, started_at), but a call made again computes another
    -- started_at. Waiting for the earlier call (at most lock_timeout) makes the search
    -- see all it did. A worker records one batch at a time, so it never waits otherwise.
    PERFORM pg_advisory_xact_lock(hashtextextended('notifyhook record ' || worker, 0));

    IF retried THEN
        -- An attempt is known by the key its worker drew for it (0005_attempt_keys.sql).
        recorded := ARRAY(
            SELECT o.n
            FROM unnest(attempt_keys) WITH ORDINALITY AS o(attempt_key, n)
            WHERE EXISTS (
                SELECT FROM notifyhook.attempts AS a WHERE a.attempt_key = o.attempt_key));
    END IF;

    -- Rows another transaction holds (an operator's DELETE of their endpoint or event
    -- held open, an UPDATE of them) are not waited for: the whole batch would wait with
    -- them, every endpoint's, until the leases ran out and answered webhooks were sent
    -- again (DESIGN §8). The other rows are locked here, so that nothing below waits
    -- for a delivery row; the held ones' outcomes are handed back and recorded by a
    -- later call, attempt and all. A row deleted and committed is not held: its
    -- attempt is written below and its update finds nothing.
    held := ARRAY(
        SELECT o.n
        FROM unnest(delivery_ids) WITH ORDINALITY AS o(delivery_id, n)
        WHERE o.n <> ALL (recorded)
          AND o.delivery_id IN (SELECT d.id FROM notifyhook.deliveries_active AS d
                                WHERE d.id = ANY (delivery_ids))
          AND o.delivery_id NOT IN (SELECT d.id FROM notifyhook.deliveries_active AS d
                                    WHERE d.id = ANY (delivery_ids)
                                    FOR NO KEY UPDATE SKIP LOCKED));
    IF held <> '{}' THEN
        recorded := recorded || held;
    END IF;

    -- (hardening, issue 13) A delivery deleted meanwhile (its endpoint or event deleted:
    -- the cascade) is skipped by the UPDATE below, which waits for a DELETE in
    -- progress and then passes its row by; its attempt is still written, as the
    -- attempts of a deleted endpoint's earlier deliveries stay (attempts hold no
    -- foreign key since 0006_partitioned_history.sql). The rows are no longer locked
    -- first (FOR KEY SHARE): that guarded an attempts foreign key that is gone, and cost
    -- a lock record per row.
    WITH batch AS (
        SELECT o.*
        FROM unnest(delivery_ids, endpoint_ids, attempt_numbers, statuses, retry_in_s,
                    started_ats, durations_ms, status_codes, errors, excerpts)
             WITH ORDINALITY AS o(delivery_id, endpoint_id, attempt, status, retry_in_s,
                                  started_at, duration_ms, status_code, error, excerpt, n)
        WHERE o.n <> ALL (recorded)
    ), settled AS (
        UPDATE notifyhook.deliveries AS d
        SET status = o.status,
            next_attempt_at = coalesce(now() + make_interval(secs => o.retry_in_s),
                                       d.next_attempt_at),
            locked_by = NULL,
            locked_until = NULL,
            last_status_code = o.status_code,
            last_error = o.error,
            delivered_at = CASE WHEN o.status = 'delivered' THEN now() END,
            updated_at = now()
        FROM batch AS o
        -- Still held: locked_by is set only while processing (deliveries_lease_held).
        -- "status = 'processing'" is left out on purpose: with it the planner may
        -- scan the deliveries_processing index once per outcome, trusting statistics
        -- from when few rows were in flight, instead of one primary-key probe each.
        -- The IN list only names the partition (0006): it is true of every row there.
        WHERE d.id = o.delivery_id AND d.locked_by = worker AND d.attempts = o.attempt
          AND d.status IN ('pending', 'processing')
    )
    INSERT INTO notifyhook.attempts
        (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error,
         response_excerpt, worker, attempt_key)
    SELECT o.delivery_id, o.endpoint_id, o.attempt, coalesce(starts[o.n], o.started_at),
           o.duration_ms, o.status_code, o.error, o.excerpt, worker, attempt_keys[o.n]
    FROM batch AS o;

    -- Lock the endpoints' state rows in id order: two workers recording for the
    -- same endpoints at once then wait for each other instead of deadlocking.
    --
    -- A state row held for longer than a moment (an operator's open transaction) is
    -- not waited for: the outcomes of every other endpoint of the batch must not wait
    -- with it, or their leases could run out and their webhooks go again (DESIGN §8).
    -- Other records hold these rows for milliseconds (claims never lock them: they
    -- lock endpoint_turns), so half a second tells one from the other; then the held
    -- ones get no health update from this batch.
    --
    -- So the rows free now are taken first, without waiting: in the usual case (no
    -- other record at this moment) that is all, with no exception block, whose
    -- subtransaction would cost a MultiXact on every row locked in it and updated
    -- outside it. Only rows that were held are then waited for, in id order. Two
    -- records that each took some of the other's rows first wait for each other at
    -- most the half second (lock_timeout comes before deadlock_timeout's second),
    -- then go on without those rows' health.
    locked := ARRAY(
        SELECT s.endpoint_id FROM notifyhook.endpoint_state AS s
        WHERE s.endpoint_id = ANY (endpoint_ids)
        ORDER BY s.endpoint_id
        FOR UPDATE SKIP LOCKED);
    IF EXISTS (SELECT FROM notifyhook.endpoint_state AS s
               WHERE s.endpoint_id = ANY (endpoint_ids) AND s.endpoint_id <> ALL (locked)) THEN
        lock_wait := current_setting('lock_timeout');
        BEGIN
            PERFORM set_config('lock_timeout', '500ms', true);
            PERFORM FROM notifyhook.endpoint_state AS s
            WHERE s.endpoint_id = ANY (endpoint_ids) AND s.endpoint_id <> ALL (locked)
            ORDER BY s.endpoint_id
            FOR UPDATE;
            locked := endpoint_ids;
        EXCEPTION WHEN lock_not_available THEN
            locked := locked || ARRAY(
                SELECT s.endpoint_id FROM notifyhook.endpoint_state AS s
                WHERE s.endpoint_id = ANY (endpoint_ids) AND s.endpoint_id <> ALL (locked)
                ORDER BY s.endpoint_id
                FOR UPDATE SKIP LOCKED);
        END;
        PERFORM set_config('lock_timeout', lock_wait, true);
    END IF;
    -- Before this batch's health is written: endpoints whose circuit was open, held
    -- to one request at a time by the claims (functions/claim.sql), whose turn an
    -- outcome gives back below.
    circuit_open := ARRAY(
        SELECT s.endpoint_id FROM notifyhook.endpoint_state AS s
        WHERE s.endpoint_id = ANY (endpoint_ids) AND s.consecutive_failures >= 5);

    -- Health: only failures that began after the endpoint's latest success count,
    -- whichever batch (or worker) recorded that success: a slow timeout recorded
    -- after a quick success began before it, and must not restart the clock at a
    -- time before the success. A success newer than any known resets the count and
    -- the clock, unless failures already counted began after it.
    --
    -- (hardening, issue 13) When an attempt began is read on the database's clock: the
    -- started_at its attempts row got, or for a caller that does not say how long ago
    -- (started_ago_s), now less the attempt's duration. A worker's started_at is its own
    -- clock, and a success recorded by a worker an hour fast would have stayed "the
    -- latest" for an hour, keeping the failure count at 0 and the circuit closed.
    WITH batch AS (
        SELECT o.endpoint_id, o.status,
               coalesce(starts[o.n], now() - make_interval(
                   secs => greatest(coalesce(o.duration_ms, 0), 0) / 1000)) AS started_at
        FROM unnest(endpoint_ids, statuses, durations_ms, sent) WITH ORDINALITY
             AS o(endpoint_id, status, duration_ms, sent, n)
        WHERE o.n <> ALL (recorded) AND o.endpoint_id = ANY (locked)
          -- An attempt that never left says nothing of the receiver.
          AND coalesce(o.sent, true)
    ), per_endpoint AS (
        SELECT o.endpoint_id,
               max(o.started_at) FILTER (WHERE o.status = 'delivered') AS success_at,
               max(o.started_at) FILTER (WHERE o.status <> 'delivered') AS failure_at
        FROM batch AS o GROUP BY o.endpoint_id
    ), latest AS (
        SELECT b.endpoint_id, b.failure_at, b.success_at,
               greatest(st.last_success_at, b.success_at) AS success_since,
               b.success_at > coalesce(st.last_success_at, '-infinity')
                   AND coalesce(st.failing_since <= b.success_at, true) AS recovered
        FROM per_endpoint AS b
        JOIN notifyhook.endpoint_state AS st ON st.endpoint_id = b.endpoint_id
    ), health AS (
        SELECT l.endpoint_id, l.success_at, l.failure_at, l.recovered,
               count(*) FILTER (WHERE o.status <> 'delivered'
                                AND o.started_at > coalesce(l.success_since, '-infinity')) AS failures,
               min(o.started_at) FILTER (WHERE o.status <> 'delivered'
                                AND o.started_at > coalesce(l.success_since, '-infinity')) AS first_failure_at
        FROM latest AS l JOIN batch AS o ON o.endpoint_id = l.endpoint_id
        GROUP BY l.endpoint_id, l.success_at, l.failure_at, l.recovered
    )
    UPDATE notifyhook.endpoint_state AS st
    SET consecutive_failures = CASE WHEN h.recovered THEN h.failures
                                    ELSE st.consecutive_failures + h.failures END,
        -- least() ignores nulls: the earliest counted failure, or null when none.
        failing_since = CASE WHEN h.recovered THEN h.first_failure_at
                             ELSE least(st.failing_since, h.first_failure_at) END,
        last_success_at = greatest(st.last_success_at, h.success_at),
        last_failure_at = greatest(st.last_failure_at, h.failure_at)
    FROM health AS h
    WHERE st.endpoint_id = h.endpoint_id;

    -- Turns (functions/claim.sql): an outcome can give an endpoint its turn back
    -- where a claim left it none or a later one: a retry just scheduled, and an
    -- endpoint held back until its in-flight rows are recorded (max_in_flight, FIFO
    -- order, its circuit: open when this batch began, so the health just written is
    -- read before this statement's own update of it counts). A wake says so; the
    -- turn rows are the claims' to write, and waiting for one would make this
    -- record wait for a claim's commit. Other endpoints' turns are left alone: a
    -- delivered or dead row makes nothing due.
    INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
    SELECT p.endpoint_id, p.due_at
    FROM (SELECT e.id AS endpoint_id,
                 (SELECT d.next_attempt_at FROM notifyhook.deliveries AS d
                  WHERE d.endpoint_id = e.id AND d.status = 'pending'
                  ORDER BY d.next_attempt_at LIMIT 1) AS due_at
          FROM notifyhook.endpoints AS e
          WHERE e.id = ANY (endpoint_ids)
            AND (e.max_in_flight IS NOT NULL OR e.ordered
                 OR e.id = ANY (circuit_open)
                 OR e.id IN (SELECT o.endpoint_id
                             FROM unnest(endpoint_ids, statuses) AS o(endpoint_id, status)
                             WHERE o.status = 'pending'))) AS p
    WHERE p.due_at IS NOT NULL;

    RETURN QUERY SELECT NULL::bigint, NULL::text, delivery_ids[h.n] FROM unnest(held) AS h(n);

    -- Only a failure can start or prolong a failing streak, or be a 410.
    IF 'delivered' = ALL (statuses) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH gone_endpoint AS (
        SELECT DISTINCT o.endpoint_id
        FROM unnest(endpoint_ids, gone) WITH ORDINALITY AS o(endpoint_id, gone, n)
        WHERE o.gone AND o.n <> ALL (recorded)
    )
    UPDATE notifyhook.endpoints AS e
    SET enabled = false,
        disabled_reason = CASE
            WHEN e.id IN (SELECT g.endpoint_id FROM gone_endpoint AS g)
            THEN format('410 Gone received at %s', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'))
            ELSE format('every attempt failed since %s, longer than %s',
                        to_char(s.failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                        disable_after)
        END
    FROM notifyhook.endpoint_state AS s
    WHERE s.endpoint_id = e.id
      -- An endpoint row an operator holds is disabled by a later batch instead.
      AND e.id IN (SELECT x.id FROM notifyhook.endpoints AS x
                   WHERE x.id = ANY (locked) FOR UPDATE SKIP LOCKED)
      AND e.enabled
      AND (e.id IN (SELECT g.endpoint_id FROM gone_endpoint AS g)
           OR s.failing_since < now() - disable_after)
    RETURNING e.id, e.disabled_reason, NULL::bigint;

    -- Alerts (features, sql/functions/alerts.sql): one NOTIFY notifyhook_alerts per
    -- endpoint this call disabled, found by the updated_at the endpoints trigger set
    -- to this transaction's now(). (Dead letters alert from a trigger on deliveries.)
    PERFORM notifyhook.send_alert('disabled', e.tenant_id, e.id, NULL, NULL, e.disabled_reason)
    FROM notifyhook.endpoints AS e
    WHERE e.id = ANY (endpoint_ids) AND NOT e.enabled AND e.updated_at = now();
END
$$;

-- (hardening, issue 13) Record an outcome that record_outcomes could not: the
-- database refused one of its values (out of range, a constraint, a trigger). The
-- worker has isolated it from its batch, whose other outcomes are recorded; this
-- writes only what cannot be refused: an attempts row naming `reason`, without
-- the outcome's status code, excerpt or times, and the delivery's next state.
-- An answered delivery stays answered (sending it again would repeat a webhook the
-- receiver took); a retry waits the outcome's delay if that is sane, else a minute.
-- The endpoint's health is left as it was. Returns whether the attempt was written
-- (false: the delivery is gone, or this was recorded by an earlier call whose
-- answer was lost).
DROP FUNCTION IF EXISTS notifyhook.record_rejected_outcome(
    text, bigint, integer, text, double precision, text, uuid);
DROP FUNCTION IF EXISTS notifyhook.record_rejected_outcome(
    text, bigint, integer, text, double precision, text, uuid, bigint);
CREATE OR REPLACE FUNCTION notifyhook.record_rejected_outcome(
    worker text,
    delivery_id bigint,
    attempt integer,
    status text,
    retry_in_s double precision,
    reason text,
    attempt_key uuid,
    -- The delivery's endpoint, for its attempt's row when the delivery is gone.
    endpoint_id bigint DEFAULT NULL,
    -- How long ago the attempt began, by the worker's monotonic clock: its started_at
    -- is written on the database's clock, as record_outcomes writes it. Null: now().
    started_ago_s double precision DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    target notifyhook.deliveries%ROWTYPE;
    gone boolean;
    started timestamptz := coalesce(
        statement_timestamp() - make_interval(secs => started_ago_s), now());
BEGIN
    -- After a record of this worker's whose answer was lost, and that may still be
    -- running: its attempt must be seen below (see record_outcomes).
    PERFORM pg_advisory_xact_lock(hashtextextended('notifyhook record ' || worker, 0));
    SELECT d.* INTO target FROM notifyhook.deliveries AS d
    WHERE d.id = record_rejected_outcome.delivery_id
    FOR NO KEY UPDATE;
    gone := NOT FOUND;
    IF EXISTS (
        SELECT FROM notifyhook.attempts AS a
        WHERE a.attempt_key = record_rejected_outcome.attempt_key
    ) THEN
        RETURN false;
    END IF;
    IF gone THEN
        -- Deleted meanwhile (its endpoint or event deleted): the request was made all the
        -- same, and its attempt is written, as record_outcomes writes it.
        IF record_rejected_outcome.endpoint_id IS NOT NULL THEN
            INSERT INTO notifyhook.attempts
                (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code,
                 error, worker, attempt_key)
            VALUES (record_rejected_outcome.delivery_id, record_rejected_outcome.endpoint_id,
                    record_rejected_outcome.attempt, started, NULL, NULL, reason, worker,
                    record_rejected_outcome.attempt_key);
        END IF;
        RETURN false;
    END IF;
    INSERT INTO notifyhook.attempts
        (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error, worker,
         attempt_key)
    VALUES (target.id, target.endpoint_id, record_rejected_outcome.attempt, started, NULL, NULL,
            reason, worker, record_rejected_outcome.attempt_key);
    IF target.locked_by = worker AND target.attempts = record_rejected_outcome.attempt THEN
        UPDATE notifyhook.deliveries AS d
        SET status = CASE WHEN record_rejected_outcome.status IN ('delivered', 'dead')
                          THEN record_rejected_outcome.status ELSE 'pending' END,
            -- NaN is larger than any number here, so it takes the minute too.
            next_attempt_at = now() + CASE WHEN retry_in_s BETWEEN 0 AND 604800
                                           THEN make_interval(secs => retry_in_s)
                                           ELSE interval '1 minute' END,
            locked_by = NULL,
            locked_until = NULL,
            last_status_code = NULL,
            last_error = reason,
            delivered_at = CASE WHEN record_rejected_outcome.status = 'delivered' THEN now() END,
            updated_at = now()
        WHERE d.id = target.id AND d.status = 'processing';
        -- For the claims (functions/claim.sql): the retry just scheduled, or the rows
        -- this outcome held back (max_in_flight, FIFO), are due from this time.
        INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
        SELECT target.endpoint_id, min(d.next_attempt_at) FROM notifyhook.deliveries AS d
        WHERE d.endpoint_id = target.endpoint_id AND d.status = 'pending'
        HAVING min(d.next_attempt_at) IS NOT NULL;
    END IF;
    RETURN true;
END
$$;

-- Give back claims a worker could not finish (graceful shutdown): pending again,
-- due now, and the attempt is not charged. Only rows the worker still holds
-- under the claim it made are touched. The request may have reached the
-- receiver, so the audit log says it was interrupted (or `reason`: see
-- release_lost_claims); the next attempt carries the same number, since this one
-- was not counted.
DROP FUNCTION IF EXISTS notifyhook.release_claims(text, bigint[], integer[]);
CREATE OR REPLACE FUNCTION notifyhook.release_claims(
    worker text,
    delivery_ids bigint[],
    attempt_numbers integer[],
    reason text DEFAULT 'interrupted: the worker shut down before an answer; given back without charging the attempt'
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    released integer;
BEGIN
    WITH held AS (
        SELECT d.id, d.endpoint_id, d.attempts, d.updated_at AS claimed_at
        FROM notifyhook.deliveries AS d
        JOIN unnest(delivery_ids, attempt_numbers) AS h(delivery_id, attempt)
          ON d.id = h.delivery_id AND d.attempts = h.attempt
        WHERE d.status = 'processing' AND d.locked_by = worker
        FOR UPDATE OF d
    ), given_back AS (
        UPDATE notifyhook.deliveries AS d
        SET status = 'pending', attempts = d.attempts - 1, locked_by = NULL, locked_until = NULL,
            next_attempt_at = least(d.next_attempt_at, now()), updated_at = now()
        FROM held WHERE d.id = held.id AND d.status = 'processing'
        RETURNING d.id
    ), woken AS (
        -- For the claims: these endpoints have rows due (functions/claim.sql).
        INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
        SELECT DISTINCT held.endpoint_id, now() FROM held
    )
    INSERT INTO notifyhook.attempts
        (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error, worker)
    SELECT held.id, held.endpoint_id, held.attempts, held.claimed_at, NULL, NULL, reason, worker
    FROM held JOIN given_back ON given_back.id = held.id;
    GET DIAGNOSTICS released = ROW_COUNT;
    IF released > 0 THEN
        PERFORM pg_notify('notifyhook', '');
    END IF;
    RETURN released;
END
$$;

-- Take back deliveries whose lease ran out: their worker died, hung or lost the
-- database. The attempt it was making is recorded as such (the receiver may have
-- got it: delivery is at-least-once), and the delivery is due again at once, or
-- dead if that was its last attempt: of the endpoint's own budget (the length of
-- its retry_schedule + 1) when it has one, else of `max_attempts`, the global
-- schedule's. Run by every worker on its timer; SKIP LOCKED lets several do it at once.
--
-- A worker still alive (its claim session holds the advisory lock on its id, see
-- take_over) keeps its rows for one lease more: past its lease it may still hold an
-- answered outcome it could not write, because another transaction held the row (an
-- operator's, rolled back at last); taken back, that delivery would be sent again
-- although the receiver took it. A live worker's rows come back after twice their
-- lease (a worker alive but stuck), a dead one's at once. `dead_worker`: a worker id
-- the caller knows to be dead although its lock is held (take_over, by its successor).
DROP FUNCTION IF EXISTS notifyhook.reclaim_expired(integer);
CREATE OR REPLACE FUNCTION notifyhook.reclaim_expired(
    max_attempts integer, dead_worker text DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    reclaimed integer;
BEGIN
    WITH live AS MATERIALIZED (
        -- The bigint advisory locks held now in this database (another notifyhook on
        -- the same cluster may have a worker of the same id): high half in classid,
        -- low half in objid.
        SELECT (l.classid::bigint << 32) | l.objid::bigint AS lock_key
        FROM pg_locks AS l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ), expired AS (
        SELECT d.id, d.endpoint_id, d.attempts, d.locked_by, d.updated_at AS claimed_at,
               coalesce((SELECT cardinality(e.retry_schedule) + 1 FROM notifyhook.endpoints AS e
                         WHERE e.id = d.endpoint_id), max_attempts) AS budget
        FROM notifyhook.deliveries AS d
        WHERE d.status = 'processing' AND d.locked_until < now()
          AND (d.locked_by IS NOT DISTINCT FROM dead_worker
               -- Claimed at updated_at, leased until locked_until: one lease more.
               OR d.locked_until + (d.locked_until - d.updated_at) < now()
               OR notifyhook.worker_lock_key(d.locked_by) NOT IN (SELECT live.lock_key FROM live))
        FOR UPDATE OF d SKIP LOCKED
    ), returned AS (
        UPDATE notifyhook.deliveries AS d
        SET status = CASE WHEN d.attempts >= expired.budget THEN 'dead' ELSE 'pending' END,
            locked_by = NULL, locked_until = NULL, next_attempt_at = now(), updated_at = now(),
            last_status_code = NULL,
            last_error = format('lease expired: worker %s stopped before recording attempt %s',
                                expired.locked_by, expired.attempts)
        FROM expired WHERE d.id = expired.id AND d.status = 'processing'
        RETURNING d.id
    ), woken AS (
        -- For the claims: these endpoints have rows due or in-flight slots free.
        INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
        SELECT DISTINCT expired.endpoint_id, now() FROM expired
    )
    INSERT INTO notifyhook.attempts
        (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error, worker)
    SELECT expired.id, expired.endpoint_id, expired.attempts, expired.claimed_at, NULL, NULL,
           'lease expired: the worker stopped before recording an outcome; the receiver may have got it',
           expired.locked_by
    FROM expired JOIN returned ON returned.id = expired.id;
    GET DIAGNOSTICS reclaimed = ROW_COUNT;
    IF reclaimed > 0 THEN
        PERFORM pg_notify('notifyhook', '');
    END IF;
    RETURN reclaimed;
END
$$;

-- Delete up to batch_size finished deliveries of deliveries_legacy (with their
-- attempts) older than `older_than`, then up to batch_size events that have no delivery
-- left and are as old. Small batches keep every lock short; the caller repeats until 0.
-- Day partitions are not touched: retention drops them whole once past `older_than`
-- (functions/partitions.sql); the legacy partition, the version-5 table attached by
-- 0006_partitioned_history.sql, is pruned row by row until it too is wholly past it.
CREATE OR REPLACE FUNCTION notifyhook.prune(older_than interval, batch_size integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    deliveries_deleted integer := 0;
    events_deleted integer;
BEGIN
    IF to_regclass('notifyhook.deliveries_legacy') IS NOT NULL THEN
        -- Attempts no longer cascade from their delivery (0006): this deletes the
        -- legacy attempts of the deliveries it deletes, as the cascade did.
        EXECUTE format($sql$
            WITH gone AS (
                DELETE FROM notifyhook.deliveries_legacy AS d
                WHERE d.ctid IN (
                    SELECT f.ctid FROM notifyhook.deliveries_legacy AS f
                    WHERE f.status IN ('delivered', 'dead') AND f.updated_at < now() - $1
                    ORDER BY f.updated_at LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                RETURNING d.id
            )%s
            SELECT count(*) FROM gone
        $sql$, CASE WHEN to_regclass('notifyhook.attempts_legacy') IS NOT NULL THEN $sql$,
            attempts_gone AS (
                DELETE FROM notifyhook.attempts_legacy AS a
                WHERE a.delivery_id IN (SELECT gone.id FROM gone)
            )$sql$ ELSE '' END)
        INTO deliveries_deleted USING older_than, batch_size;
    END IF;

    DELETE FROM notifyhook.events AS e
    WHERE e.id IN (
        SELECT o.id FROM notifyhook.events AS o
        WHERE o.created_at < now() - older_than
          AND NOT EXISTS (SELECT FROM notifyhook.deliveries AS d WHERE d.event_id = o.id)
        ORDER BY o.created_at LIMIT batch_size
        FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS events_deleted = ROW_COUNT;
    RETURN deliveries_deleted + events_deleted;
END
$$;
