-- Keep endpoints well-formed, and wake the workers when one comes back.

-- BEFORE INSERT OR UPDATE, per row: every column a worker relies on is checked
-- here, so a bad row is refused when it is written rather than at delivery time.
-- An UPDATE checks the url, the secrets and the headers only when it changes them:
-- their rules have grown stricter, and disabling an endpoint (an operator, or a
-- worker on 410 Gone) must not fail on a value written under older rules.
CREATE OR REPLACE FUNCTION notifyhook.validate_endpoint() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    inserting constant boolean := TG_OP = 'INSERT';
BEGIN
    IF NEW.tenant_id IS NULL OR NEW.tenant_id = '' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.tenant_id must not be empty';
    END IF;
    IF NEW.name IS NULL OR NEW.name = '' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.name must not be empty';
    END IF;
    IF inserting OR NEW.url IS DISTINCT FROM OLD.url THEN
        PERFORM notifyhook.check_url(NEW.url);
    END IF;
    IF inserting OR NEW.secret IS DISTINCT FROM OLD.secret THEN
        PERFORM notifyhook.check_secret(NEW.secret, 'secret');
    END IF;
    IF inserting OR (NEW.previous_secret, NEW.previous_secret_expires_at)
                    IS DISTINCT FROM (OLD.previous_secret, OLD.previous_secret_expires_at) THEN
        PERFORM notifyhook.check_previous_secret(NEW.previous_secret, NEW.previous_secret_expires_at);
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
    IF inserting OR NEW.headers IS DISTINCT FROM OLD.headers THEN
        PERFORM notifyhook.check_headers(NEW.headers);
    END IF;
    IF inserting OR NEW.retry_schedule IS DISTINCT FROM OLD.retry_schedule THEN
        PERFORM notifyhook.check_retry_schedule(NEW.retry_schedule);
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
    IF NOT OLD.enabled THEN
        UPDATE notifyhook.endpoint_state
        SET consecutive_failures = 0, failing_since = NULL
        WHERE endpoint_id = NEW.id;
    END IF;
    -- For the claims (functions/claim.sql): this endpoint may have rows due, or room
    -- for more in flight.
    INSERT INTO notifyhook.endpoint_wakes (endpoint_id, due_at) VALUES (NEW.id, now());
    PERFORM pg_notify('notifyhook', '');
    RETURN NULL;
END
$$;

-- Also when a limit is raised or lifted, or FIFO order turned off: rows held back
-- may be sendable now.
DROP TRIGGER IF EXISTS endpoints_resume ON notifyhook.endpoints;
CREATE TRIGGER endpoints_resume
    AFTER UPDATE OF enabled, max_in_flight, rate_limit, ordered ON notifyhook.endpoints
    FOR EACH ROW WHEN (NEW.enabled AND (NOT OLD.enabled
                                        OR OLD.max_in_flight IS DISTINCT FROM NEW.max_in_flight
                                        OR OLD.rate_limit IS DISTINCT FROM NEW.rate_limit
                                        OR OLD.ordered IS DISTINCT FROM NEW.ordered))
    EXECUTE FUNCTION notifyhook.resume_endpoint();

-- AFTER INSERT: every endpoint has its state and turn rows from the start, so that
-- the claim can lock a turn and a rate bucket without first having to create them.
CREATE OR REPLACE FUNCTION notifyhook.create_endpoint_state() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notifyhook.endpoint_state (endpoint_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    INSERT INTO notifyhook.endpoint_turns (endpoint_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS endpoints_create_state ON notifyhook.endpoints;
CREATE TRIGGER endpoints_create_state
    AFTER INSERT ON notifyhook.endpoints
    FOR EACH ROW EXECUTE FUNCTION notifyhook.create_endpoint_state();

-- AFTER DELETE: the endpoint's turn row goes with it. A trigger rather than a foreign
-- key (0008): a claim that folds a wake into a turn row and then gives it its next turn
-- updates that row twice in one transaction, and PostgreSQL checks a foreign key again
-- on the second update of a row its own transaction wrote, taking a key-share lock on
-- the endpoint row. An operator's lock on that row (SELECT ... FOR UPDATE, a DELETE
-- held open) then held up the claim, every endpoint's.
CREATE OR REPLACE FUNCTION notifyhook.delete_endpoint_turn() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM notifyhook.endpoint_turns WHERE endpoint_id = OLD.id;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS endpoints_delete_turn ON notifyhook.endpoints;
CREATE TRIGGER endpoints_delete_turn
    AFTER DELETE ON notifyhook.endpoints
    FOR EACH ROW EXECUTE FUNCTION notifyhook.delete_endpoint_turn();
