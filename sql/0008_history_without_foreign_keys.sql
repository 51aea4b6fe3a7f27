-- notifyhook schema version 8: no foreign key checked on a worker's path but the queue's.
--
-- Until now every partition of deliveries carried the two foreign keys (event_id ->
-- events, endpoint_id -> endpoints). A delivery's outcome moves its row from
-- deliveries_active to its day of deliveries_finished: an INSERT there, which checked
-- both keys and took a key-share lock on the event and the endpoint rows. So:
--   * an operator's lock on an endpoint row (SELECT ... FOR UPDATE, as an admin tool's
--     edit takes; a rename, which changes a unique key) made the worker's whole batch
--     of outcomes wait behind it, every endpoint's; past the lease, the rows were taken
--     back and their webhooks sent again although they had been answered 200;
--   * each delivered row cost two key checks and two tuple locks (two workers recording
--     for one endpoint share its row's lock as a MultiXact);
--   * deleting an endpoint read the whole history for its rows (the history has no
--     index on endpoint_id, on purpose).
-- The history is the audit record of what was sent, as attempts are (which lost their
-- foreign key in 0006): what it refers to may be deleted before the history's day is.
-- Deleting an endpoint now removes its queue (cascade) and leaves its history until
-- retention drops its days, as its attempts already were; prune deletes an event only
-- once no delivery of any partition refers to it (functions/outcomes.sql). Replaying a
-- finished delivery moves it back into the queue, where both keys are checked again.
--
-- Dropped on the parent, the constraints go from every partition (the legacy one
-- included); added to deliveries_active, they check the queue's rows only.
ALTER TABLE notifyhook.deliveries DROP CONSTRAINT deliveries_event_id_fkey;
ALTER TABLE notifyhook.deliveries DROP CONSTRAINT deliveries_endpoint_id_fkey;
ALTER TABLE notifyhook.deliveries_active
    ADD CONSTRAINT deliveries_event_id_fkey FOREIGN KEY (event_id)
        REFERENCES notifyhook.events (id) ON DELETE CASCADE,
    ADD CONSTRAINT deliveries_endpoint_id_fkey FOREIGN KEY (endpoint_id)
        REFERENCES notifyhook.endpoints (id) ON DELETE CASCADE;

-- endpoint_turns: its row goes with its endpoint by a trigger instead
-- (triggers/endpoints.sql). A claim updates a turn row twice in one transaction (the
-- wake folded in, then the next turn), and PostgreSQL checks a foreign key again on
-- the second update of a row its own transaction wrote: a key-share lock on the
-- endpoint row at nearly every claim, which an operator's SELECT ... FOR UPDATE of that
-- endpoint made every claim of every worker wait for.
ALTER TABLE notifyhook.endpoint_turns DROP CONSTRAINT endpoint_turns_endpoint_id_fkey;
-- Turn rows of endpoints already gone (none: the key held until now).
DELETE FROM notifyhook.endpoint_turns AS t
WHERE NOT EXISTS (SELECT FROM notifyhook.endpoints AS e WHERE e.id = t.endpoint_id);
