-- notifyhook schema version 3: the scheduler's turn index, and the endpoint columns of
-- the second round (FIFO endpoints, per-endpoint retry schedules).
--
-- Until version 2 every claim walked every endpoint with a pending row: with 10,000
-- such endpoints a claim cost 200-400 ms, even when nothing was due. Now each
-- endpoint has a turn: the time from which a claim may look at it (its oldest due
-- row, or when it was last served if it still has due rows, or when its next row
-- falls due). A claim takes the few endpoints whose turn came first from a small
-- index, so what it costs follows the rows it takes. See functions/claim.sql.

ALTER TABLE notifyhook.endpoints
    -- FIFO: one request in flight, in events.created_at, events.id order.
    ADD COLUMN ordered boolean NOT NULL DEFAULT false,
    -- Seconds before each retry, for this endpoint; null: NOTIFYHOOK_RETRY_SCHEDULE.
    ADD COLUMN retry_schedule integer[];

-- Written only by a transaction holding the state row's lock (a claim, a record of
-- outcomes); null: nothing known to be pending, or held back until an outcome of
-- this endpoint is recorded (max_in_flight reached, a FIFO head in flight).
ALTER TABLE notifyhook.endpoint_state ADD COLUMN turn_at timestamptz;
CREATE INDEX endpoint_state_turn ON notifyhook.endpoint_state (turn_at)
    WHERE turn_at IS NOT NULL;
-- Claims and records rewrite these rows all the time. Room on each page lets an update
-- that leaves turn_at as it is (a record's health) stay on its page, without new index
-- entries (a HOT update).
ALTER TABLE notifyhook.endpoint_state SET (fillfactor = 50);

-- What producers and operators leave for the claims instead of writing turn_at:
-- "this endpoint has a row due at due_at". A row lock on endpoint_state would make
-- two producers' transactions for one endpoint wait for each other (and for a
-- claim); an INSERT here waits for nobody. The next claim folds these rows into
-- turn_at and deletes them; a wake left by a transaction not yet committed is
-- folded by a claim that can see it, together with the deliveries it announces.
-- No key and no index: claims take any rows, and the table stays small.
CREATE TABLE notifyhook.endpoint_wakes (
    endpoint_id  bigint NOT NULL,
    due_at       timestamptz NOT NULL
);
-- Rows live for milliseconds: vacuum as soon as a few hundred are dead.
ALTER TABLE notifyhook.endpoint_wakes SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 500,
    autovacuum_vacuum_insert_threshold = 1000
);

-- The turn of every endpoint that already has pending rows.
UPDATE notifyhook.endpoint_state AS s
SET turn_at = (SELECT min(d.next_attempt_at) FROM notifyhook.deliveries AS d
               WHERE d.endpoint_id = s.endpoint_id AND d.status = 'pending');

-- What one claim hands the worker per delivery (functions/claim.sql).
CREATE TYPE notifyhook.claimed_delivery AS (
    delivery_id      bigint,
    event_id         uuid,
    endpoint_id      bigint,
    tenant_id        text,
    attempt          integer,
    url              text,
    secret           text,
    previous_secret  text,
    headers          jsonb,
    timeout_ms       integer,
    retry_schedule   integer[],
    body             text,
    -- The endpoint is limited fleet-wide (max_in_flight, FIFO order, an open circuit):
    -- its next row may wait for this one's outcome to be recorded.
    limited          boolean
);
