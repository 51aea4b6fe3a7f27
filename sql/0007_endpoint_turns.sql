-- notifyhook schema version 7: the claims' columns of endpoint_state in a table of their own.
--
-- endpoint_state held what claims write (the turn, the rate bucket) beside what the
-- recording of outcomes writes (health), and each locked the row to write its part.
-- So a record waited for a claim's commit, and a claim passed an endpoint by while a
-- record held it: with one busy endpoint, more than half of a worker's claims came back
-- empty and its requests in flight drained to none between them (docs/performance.md).
-- Now claims lock endpoint_turns and records lock endpoint_state; a record gives an
-- endpoint its turn back with a wake (functions/outcomes.sql), as producers do.
CREATE TABLE notifyhook.endpoint_turns (
    endpoint_id  bigint PRIMARY KEY REFERENCES notifyhook.endpoints (id) ON DELETE CASCADE,
    -- The endpoint's turn (functions/claim.sql): written only by a transaction holding
    -- this row's lock (a claim); null: nothing known to be pending, or held back until
    -- an outcome of this endpoint is recorded (max_in_flight reached, a FIFO head or a
    -- circuit's probe in flight).
    turn_at      timestamptz,
    -- Token bucket for endpoints.rate_limit, shared by the whole fleet.
    tokens       double precision,
    tokens_at    timestamptz
) WITH (fillfactor = 50);  -- rewritten by every claim that serves the endpoint

INSERT INTO notifyhook.endpoint_turns (endpoint_id, turn_at, tokens, tokens_at)
SELECT s.endpoint_id, s.turn_at, s.tokens, s.tokens_at FROM notifyhook.endpoint_state AS s;

CREATE INDEX endpoint_turns_turn ON notifyhook.endpoint_turns (turn_at)
    WHERE turn_at IS NOT NULL;

DROP INDEX notifyhook.endpoint_state_turn;
ALTER TABLE notifyhook.endpoint_state
    DROP COLUMN turn_at,
    DROP COLUMN tokens,
    DROP COLUMN tokens_at;
