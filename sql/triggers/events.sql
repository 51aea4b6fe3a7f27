-- The enqueue path: validate each event, then fan out and wake the workers.

-- BEFORE INSERT, per row: reject a malformed event so that its own INSERT fails,
-- with a message naming the problem, and nothing of it is stored.
CREATE OR REPLACE FUNCTION notifyhook.validate_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    limit_bytes integer;
    size_bytes integer;
    owner text;
BEGIN
    IF NEW.tenant_id IS NULL OR NEW.tenant_id = '' THEN
        RAISE check_violation USING MESSAGE = 'events.tenant_id must not be empty';
    END IF;
    IF NEW.event_type IS NULL OR NEW.event_type = '' THEN
        RAISE check_violation USING MESSAGE = 'events.event_type must not be empty';
    END IF;
    IF NOT notifyhook.is_event_type(NEW.event_type) THEN
        RAISE check_violation USING
            MESSAGE = format('events.event_type %L is malformed', left(NEW.event_type, 100)),
            HINT = 'Use dot-separated words of letters, digits, _ and -, such as call.completed.';
    END IF;
    IF jsonb_typeof(NEW.payload) IS DISTINCT FROM 'object' THEN
        RAISE check_violation USING
            MESSAGE = format('events.payload must be a JSON object, got %s',
                             coalesce(jsonb_typeof(NEW.payload), 'null'));
    END IF;
    SELECT max_payload_bytes INTO limit_bytes FROM notifyhook.config;
    size_bytes := octet_length(NEW.payload::text);
    IF size_bytes > limit_bytes THEN
        RAISE check_violation USING
            MESSAGE = format('events.payload is %s bytes, more than the limit of %s', size_bytes, limit_bytes),
            HINT = 'The limit is notifyhook.config.max_payload_bytes (NOTIFYHOOK_MAX_PAYLOAD_BYTES at migrate).';
    END IF;
    IF NEW.endpoint_id IS NOT NULL THEN
        SELECT tenant_id INTO owner FROM notifyhook.endpoints WHERE id = NEW.endpoint_id;
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('events.endpoint_id %s does not exist', NEW.endpoint_id);
        END IF;
        IF owner <> NEW.tenant_id THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('events.endpoint_id %s belongs to another tenant than %L',
                                 NEW.endpoint_id, NEW.tenant_id);
        END IF;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS events_validate ON notifyhook.events;
CREATE TRIGGER events_validate
    BEFORE INSERT ON notifyhook.events
    FOR EACH ROW EXECUTE FUNCTION notifyhook.validate_event();

-- AFTER INSERT, once per statement: one delivery per (event, matching endpoint),
-- disabled endpoints included (their deliveries wait), and a single NOTIFY for the
-- whole statement, so a 10,000-row INSERT costs one notification. The payload is
-- constant: it is only a hint to look at the table, which is the truth. One wake per
-- endpoint tells the claims which endpoints have rows due (functions/claim.sql); an
-- INSERT of wakes waits for no other transaction, so producers never queue behind
-- each other or behind a claim.
CREATE OR REPLACE FUNCTION notifyhook.fan_out_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    woken bigint;
BEGIN
    WITH created AS (
        INSERT INTO notifyhook.deliveries (event_id, tenant_id, endpoint_id, created_at, next_attempt_at)
        -- Due now, by the database's clock: created_at may come from the producer's (an
        -- ORM fills it from the app server's), and one an hour fast made every webhook
        -- wait an hour. least(): a batch of backdated events keeps its order.
        SELECT event.id, event.tenant_id, endpoint.id, event.created_at,
               least(event.created_at, now())
        FROM new_events AS event
        JOIN notifyhook.endpoints AS endpoint ON endpoint.tenant_id = event.tenant_id
        WHERE CASE WHEN event.endpoint_id IS NULL
                   THEN notifyhook.event_type_matches(endpoint.event_types, event.event_type)
                   ELSE endpoint.id = event.endpoint_id
              END
        RETURNING endpoint_id, next_attempt_at
    )
    INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at)
    SELECT created.endpoint_id, min(created.next_attempt_at) FROM created GROUP BY created.endpoint_id;
    GET DIAGNOSTICS woken = ROW_COUNT;
    IF woken > 0 THEN
        PERFORM pg_notify('notifyhook', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS events_fan_out ON notifyhook.events;
CREATE TRIGGER events_fan_out
    AFTER INSERT ON notifyhook.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION notifyhook.fan_out_events();
