-- notifyhook schema version 9: event ids rise in the order the events were inserted.
--
-- An ordered (FIFO) endpoint gets its events in events.created_at, events.id order
-- (DESIGN §8). created_at is the inserting transaction's start, the same for every
-- event of one transaction, and ids were random (gen_random_uuid()): the events of one
-- multi-row INSERT, or of several INSERTs in one transaction, went to a FIFO endpoint
-- in a random order. New ids are UUIDv7 (RFC 9562): the time in milliseconds, a 12-bit
-- fraction of the millisecond, then random bits. A session never uses the same or an
-- earlier microsecond twice (the last one is kept in the session setting
-- notifyhook.event_us), so the ids of one transaction rise in insertion order even when
-- two inserts fall in one microsecond or the host's clock steps back. What an id tells
-- a receiver: when the event was enqueued, to the millisecond (on a retry or a replay,
-- webhook-timestamp is the attempt's time, not this), and, for ids a few microseconds
-- apart, that they came from one producer's burst, in this order. Existing events keep
-- their ids; an id given in the INSERT is kept as given. The events' primary key now
-- grows at its right edge rather than at random pages. DESIGN §1 names
-- gen_random_uuid() as the default: this is a recorded deviation (docs/operations.md).
--
-- plpgsql rather than SQL: an SQL function with a FROM cannot be inlined, and its body
-- was parsed and planned at every INSERT (~100 µs more a one-row INSERT); plpgsql keeps
-- its plans for the session (~10-30 µs more than gen_random_uuid()).
CREATE OR REPLACE FUNCTION notifyhook.event_id() RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $$
DECLARE
    us bigint := greatest(
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
        coalesce(nullif(current_setting('notifyhook.event_us', true), '')::bigint + 1, 0));
    ms text := lpad(to_hex(us / 1000), 12, '0');
BEGIN
    PERFORM set_config('notifyhook.event_us', us::text, false);
    RETURN (substr(ms, 1, 8) || '-' || substr(ms, 9, 4) || '-7'
            || lpad(to_hex((us % 1000) * 4096 / 1000), 3, '0')
            -- '-', the variant and 62 random bits, from a random (version 4) uuid.
            || substr(gen_random_uuid()::text, 19))::uuid;
END
$$;

ALTER TABLE notifyhook.events ALTER COLUMN id SET DEFAULT notifyhook.event_id();
