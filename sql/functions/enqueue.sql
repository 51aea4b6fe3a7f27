-- The functions producers and operators call from psql or any client.

-- Enqueue one event; the same as an INSERT into notifyhook.events, except that
-- a repeated idempotency key inserts nothing and returns the first event's id
-- instead of raising a unique violation.
CREATE OR REPLACE FUNCTION notifyhook.enqueue(
    tenant_id text,
    event_type text,
    payload jsonb,
    idempotency_key text DEFAULT NULL,
    endpoint_id bigint DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    found_id uuid;
BEGIN
    -- ON CONFLICT waits for a concurrent insert of the same key to commit or
    -- roll back, so two racing callers both get the one id that exists.
    LOOP
        INSERT INTO notifyhook.events AS e (tenant_id, event_type, payload, idempotency_key, endpoint_id)
        VALUES (enqueue.tenant_id, enqueue.event_type, enqueue.payload,
                enqueue.idempotency_key, enqueue.endpoint_id)
        ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING e.id INTO found_id;
        EXIT WHEN found_id IS NOT NULL;
        SELECT e.id INTO found_id FROM notifyhook.events AS e
        WHERE e.tenant_id = enqueue.tenant_id AND e.idempotency_key = enqueue.idempotency_key;
        EXIT WHEN found_id IS NOT NULL;
        -- (hardening, issue 13) The event that held the key was deleted between the two
        -- statements (retention): the key is free again, so insert once more rather
        -- than return NULL.
    END LOOP;
    RETURN found_id;
END
$$;

-- Put dead deliveries back in the queue with a fresh attempt budget. Their
-- earlier attempts stay in notifyhook.attempts; numbering starts again at 1.
CREATE OR REPLACE FUNCTION notifyhook.replay_deliveries(ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    replayed integer;
BEGIN
    WITH replayed_rows AS (
        UPDATE notifyhook.deliveries
        SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
        WHERE id = ANY (ids) AND status = 'dead'
        RETURNING endpoint_id
    ), woken AS (
        -- For the claims: these endpoints have rows due (functions/claim.sql).
        INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
        SELECT DISTINCT r.endpoint_id, now() FROM replayed_rows AS r
    )
    SELECT count(*) INTO replayed FROM replayed_rows;
    IF replayed > 0 THEN
        PERFORM pg_notify('notifyhook', '');
    END IF;
    RETURN replayed;
END
$$;

CREATE OR REPLACE FUNCTION notifyhook.replay(delivery_id bigint) RETURNS boolean
LANGUAGE sql AS $$
    SELECT notifyhook.replay_deliveries(ARRAY[delivery_id]) = 1
$$;

-- Replay every dead delivery, or an endpoint's, or those that died since a time.
CREATE OR REPLACE FUNCTION notifyhook.replay_dead(
    endpoint_id bigint DEFAULT NULL,
    since timestamptz DEFAULT NULL
) RETURNS integer
LANGUAGE sql AS $$
    SELECT notifyhook.replay_deliveries(array(
        SELECT d.id FROM notifyhook.deliveries AS d
        WHERE d.status = 'dead'
          AND (replay_dead.endpoint_id IS NULL OR d.endpoint_id = replay_dead.endpoint_id)
          AND (replay_dead.since IS NULL OR d.updated_at >= replay_dead.since)))
$$;
