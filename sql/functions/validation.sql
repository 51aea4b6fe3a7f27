-- Checks shared by the validation triggers. Each raises with a message that names
-- the column and the problem, so that a bad INSERT fails on its own and says why.

-- An event type: dot-separated words of letters, digits, '_' and '-', such as
-- `call.completed` or `invoice.paid.v2`; at most 255 characters.
CREATE OR REPLACE FUNCTION notifyhook.is_event_type(candidate text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT candidate ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(candidate) <= 255
$$;

-- An endpoint's event_types entry: `*`, an exact type, or a type followed by `.*`.
CREATE OR REPLACE FUNCTION notifyhook.is_event_type_pattern(pattern text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pattern = '*'
        OR notifyhook.is_event_type(pattern)
        OR (right(pattern, 2) = '.*' AND notifyhook.is_event_type(left(pattern, -2)))
$$;

-- Does an event type match any of an endpoint's patterns? `call.*` matches
-- `call.x` and `call.x.y` but not `call` itself. Plain SQL so the planner can
-- inline it into the fan-out join.
CREATE OR REPLACE FUNCTION notifyhook.event_type_matches(patterns text[], event_type text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT FROM unnest(patterns) AS pattern
        WHERE pattern = '*'
           OR pattern = event_type
           OR (right(pattern, 2) = '.*' AND starts_with(event_type, left(pattern, -1)))
    )
$$;

-- A stored secret is either `whsec_` + base64 of 24 to 64 bytes (Standard
-- Webhooks), or `enc:` + a Fernet token of such a secret written by the CLI with
-- NOTIFYHOOK_SECRET_KEY set (only workers hold the key, so only its shape is checked).
CREATE OR REPLACE FUNCTION notifyhook.check_secret(secret text, column_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key_length integer;
BEGIN
    IF starts_with(secret, 'enc:') THEN
        IF substr(secret, 5) !~ '^[A-Za-z0-9_=-]{40,}$' THEN
            RAISE check_violation USING
                MESSAGE = format('endpoints.%s: an enc: secret must be a Fernet token', column_name);
        END IF;
        RETURN;
    END IF;
    IF NOT starts_with(secret, 'whsec_') THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s must start with whsec_ (Standard Webhooks secret)', column_name),
            HINT = 'Leave the column out to get a fresh secret.';
    END IF;
    BEGIN
        key_length := length(decode(substr(secret, 7), 'base64'));
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s: the part after whsec_ is not valid base64', column_name);
    END;
    IF key_length NOT BETWEEN 24 AND 64 THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s: the key must be 24 to 64 bytes, got %s', column_name, key_length);
    END IF;
END
$$;

-- An endpoint URL: http:// or https://, a host, no user:password@ (credentials
-- would be sent to, and logged by, every proxy on the way; use `headers`).
CREATE OR REPLACE FUNCTION notifyhook.check_url(url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    authority text := substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)');
BEGIN
    IF url !~* '^https?://' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url must be an http:// or https:// URL, got %L', left(url, 200));
    END IF;
    IF url ~ '\s' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.url must not contain white space';
    END IF;
    IF position('@' IN authority) > 0 THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.url must not carry credentials (user:password@)',
            HINT = 'Put an Authorization header in endpoints.headers instead.';
    END IF;
    IF authority IS NULL OR authority ~ '^(:\d*)?$' THEN
        RAISE check_violation USING MESSAGE = format('endpoints.url has no host: %L', left(url, 200));
    END IF;
END
$$;

-- A JSON object column (extra_fields, headers).
CREATE OR REPLACE FUNCTION notifyhook.check_json_object(value jsonb, column_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(value) IS DISTINCT FROM 'object' THEN
        RAISE check_violation USING
            MESSAGE = format('%s must be a JSON object, got %s', column_name,
                             coalesce(jsonb_typeof(value), 'null'));
    END IF;
END
$$;
