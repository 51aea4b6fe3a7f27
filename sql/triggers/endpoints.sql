-- Keep endpoints well-formed, and wake the workers when one comes back.

-- BEFORE INSERT OR UPDATE, per row: every column a worker relies on is checked
-- here, so a bad row is refused when it is written rather than at delivery time.
CREATE OR REPLACE FUNCTION notifyhook.validate_endpoint() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tenant_id IS NULL OR NEW.tenant_id = '' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.tenant_id must not be empty';
    END IF;
    IF NEW.name IS NULL OR NEW.name = '' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.name must not be empty';
    END IF;
    PERFORM notifyhook.check_url(NEW.url);
    PERFORM notifyhook.check_secret(NEW.secret, 'secret');
    IF NEW.previous_secret IS NOT NULL THEN
        PERFORM notifyhook.check_secret(NEW.previous_secret, 'previous_secret');
    END IF;
    IF cardinality(NEW.event_types) = 0 OR array_position(NEW.event_types, NULL) IS NOT NULL THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.event_types must list at least one pattern and no nulls',
            HINT = 'Use {*} for every event type.';
    END IF;
    IF EXISTS (SELECT FROM unnest(NEW.event_types) AS p WHERE NOT notifyhook.is_event_type_pattern(p)) THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.event_types has a malformed pattern: %s', (
                SELECT string_agg(quote_literal(p), ', ')
                FROM unnest(NEW.event_types) AS p WHERE NOT notifyhook.is_event_type_pattern(p))),
            HINT = 'A pattern is *, an exact type such as call.completed, or a prefix such as call.*';
    END IF;
    PERFORM notifyhook.check_json_object(NEW.extra_fields, 'endpoints.extra_fields');
    PERFORM notifyhook.check_json_object(NEW.headers, 'endpoints.headers');
    IF EXISTS (SELECT FROM jsonb_each(NEW.headers) AS h WHERE jsonb_typeof(h.value) <> 'string') THEN
        RAISE check_violation USING MESSAGE = 'endpoints.headers values must be strings';
    END IF;
    IF EXISTS (SELECT FROM jsonb_object_keys(NEW.headers) AS k WHERE k !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$') THEN
        RAISE check_violation USING MESSAGE = 'endpoints.headers has a name that is not a valid HTTP header name';
    END IF;
    -- These carry the signature and the framing of the body; letting an endpoint
    -- override them would send requests no verifier accepts.
    IF EXISTS (SELECT FROM jsonb_object_keys(NEW.headers) AS k
               WHERE lower(k) IN ('webhook-id', 'webhook-timestamp', 'webhook-signature',
                                  'content-type', 'content-length', 'host', 'transfer-encoding')) THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.headers must not set webhook-id, webhook-timestamp, webhook-signature, content-type, content-length, host or transfer-encoding';
    END IF;
    IF NOT NEW.enabled AND NEW.disabled_reason IS NULL THEN
        NEW.disabled_reason := 'disabled by an operator';
    ELSIF NEW.enabled THEN
        NEW.disabled_reason := NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS endpoints_validate ON notifyhook.endpoints;
CREATE TRIGGER endpoints_validate
    BEFORE INSERT OR UPDATE ON notifyhook.endpoints
    FOR EACH ROW EXECUTE FUNCTION notifyhook.validate_endpoint();

-- AFTER an endpoint is enabled again: its failing clock starts afresh (it would
-- otherwise be disabled again by the next failure) and the workers wake to send
-- the deliveries that waited.
CREATE OR REPLACE FUNCTION notifyhook.resume_endpoint() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE notifyhook.endpoint_state
    SET consecutive_failures = 0, failing_since = NULL
    WHERE endpoint_id = NEW.id;
    PERFORM pg_notify('notifyhook', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS endpoints_resume ON notifyhook.endpoints;
CREATE TRIGGER endpoints_resume
    AFTER UPDATE OF enabled ON notifyhook.endpoints
    FOR EACH ROW WHEN (NOT OLD.enabled AND NEW.enabled)
    EXECUTE FUNCTION notifyhook.resume_endpoint();

-- AFTER INSERT: every endpoint has its state row from the start, so that the
-- claim query can lock a rate bucket without first having to create it.
CREATE OR REPLACE FUNCTION notifyhook.create_endpoint_state() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notifyhook.endpoint_state (endpoint_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS endpoints_create_state ON notifyhook.endpoints;
CREATE TRIGGER endpoints_create_state
    AFTER INSERT ON notifyhook.endpoints
    FOR EACH ROW EXECUTE FUNCTION notifyhook.create_endpoint_state();
