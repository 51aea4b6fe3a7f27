-- Alerts: NOTIFY notifyhook_alerts from the transaction that records a dead letter
-- or an automatic disable, so that any program (or psql with LISTEN) can page someone.
--
-- The payload is a JSON object {"kind": "dead" | "disabled", "tenant_id",
-- "endpoint_id", "delivery_id"?, "event_type"?, "reason"}, absent keys left out,
-- always under the 8000 bytes a NOTIFY payload may hold. Like every NOTIFY it is
-- sent at COMMIT and lost by a listener that is not connected then: the tables
-- (notifyhook.dead_letters, endpoints.disabled_reason) stay the truth.

-- Send one alert.
CREATE OR REPLACE FUNCTION notifyhook.send_alert(
    kind text,
    tenant_id text,
    endpoint_id bigint,
    delivery_id bigint,
    event_type text,
    reason text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    payload := json_strip_nulls(json_build_object(
        'kind', kind, 'tenant_id', tenant_id, 'endpoint_id', endpoint_id,
        'delivery_id', delivery_id, 'event_type', event_type, 'reason', left(reason, 1000)))::text;
    IF octet_length(payload) >= 8000 THEN
        -- Only a huge tenant id, or text that JSON escapes six bytes a character, gets
        -- here; an event type is at most 255 characters (notifyhook.is_event_type).
        payload := json_strip_nulls(json_build_object(
            'kind', kind, 'tenant_id', left(tenant_id, 300), 'endpoint_id', endpoint_id,
            'delivery_id', delivery_id, 'event_type', event_type,
            'reason', left(reason, 300)))::text;
    END IF;
    PERFORM pg_notify('notifyhook_alerts', payload);
END
$$;

-- AFTER a delivery goes dead, wherever that happens (record_outcomes, reclaim_expired
-- past the budget, an operator's UPDATE): one alert per dead delivery, up to
-- `one_by_one` in a transaction. Past that, a storm (a batch of a hundred dead
-- letters to one broken endpoint) sends one summary per endpoint instead: the same
-- text for every further row of that endpoint, which PostgreSQL sends only once per
-- transaction (it drops a NOTIFY identical to one already queued). The count of the
-- transaction is kept in a transaction-local setting, gone at COMMIT or ROLLBACK.
CREATE OR REPLACE FUNCTION notifyhook.alert_dead() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    one_by_one constant integer := 10;
    sent integer := coalesce(nullif(current_setting('notifyhook.dead_alerts', true), ''), '0')::integer;
BEGIN
    PERFORM set_config('notifyhook.dead_alerts', (sent + 1)::text, true);
    IF sent < one_by_one THEN
        PERFORM notifyhook.send_alert(
            'dead', NEW.tenant_id, NEW.endpoint_id, NEW.id,
            (SELECT ev.event_type FROM notifyhook.events AS ev WHERE ev.id = NEW.event_id),
            format('dead after %s attempt%s: %s', NEW.attempts,
                   CASE WHEN NEW.attempts = 1 THEN '' ELSE 's' END,
                   coalesce(NEW.last_error, 'HTTP ' || NEW.last_status_code, 'no error recorded')));
    ELSE
        PERFORM notifyhook.send_alert(
            'dead', NEW.tenant_id, NEW.endpoint_id, NULL, NULL,
            format('more deliveries to this endpoint went dead in the same transaction than the '
                   '%s alerted one by one: see notifyhook.dead_letters', one_by_one));
    END IF;
    RETURN NULL;
END
$$;
