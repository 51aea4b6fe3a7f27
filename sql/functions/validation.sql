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
-- Webhooks, signs v1 with HMAC-SHA256), `whsk_` + base64 of a 32-byte ed25519 seed
-- (signs v1a; the receiver holds the whpk_ public key), or `enc:` + a Fernet token
-- of either, written by the CLI with NOTIFYHOOK_SECRET_KEY set (only workers hold
-- the key, so only its shape is checked).
CREATE OR REPLACE FUNCTION notifyhook.check_secret(secret text, column_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    prefix text := substring(secret FROM '^(whsec_|whsk_|whpk_)');
    key_length integer;
BEGIN
    IF starts_with(secret, 'enc:') THEN
        IF substr(secret, 5) !~ '^[A-Za-z0-9_=-]{40,}$' THEN
            RAISE check_violation USING
                MESSAGE = format('endpoints.%s: an enc: secret must be a Fernet token', column_name);
        END IF;
        RETURN;
    END IF;
    IF prefix = 'whpk_' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s holds a whpk_ public key, which cannot sign', column_name),
            HINT = 'Store the whsk_ signing key here; the receiver verifies with the whpk_ key.';
    END IF;
    IF prefix IS NULL THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s must start with whsec_ (Standard Webhooks secret) '
                             'or whsk_ (ed25519 signing key)', column_name),
            HINT = 'Leave the column out to get a fresh secret.';
    END IF;
    BEGIN
        key_length := length(decode(substr(secret, length(prefix) + 1), 'base64'));
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s: the part after %s is not valid base64', column_name, prefix);
    END;
    IF prefix = 'whsk_' AND key_length <> 32 THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s: a whsk_ ed25519 signing key must be base64 of its '
                             '32-byte seed, got %s bytes', column_name, key_length);
    END IF;
    IF prefix = 'whsec_' AND key_length NOT BETWEEN 24 AND 64 THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.%s: the key must be 24 to 64 bytes, got %s', column_name, key_length);
    END IF;
END
$$;

-- An endpoint's own retry delays, in seconds; null means the global schedule. Its
-- length + 1 is the endpoint's attempt budget, so the length is bounded, and each
-- delay is bounded like the global NOTIFYHOOK_RETRY_SCHEDULE's (at most 7 days).
CREATE OR REPLACE FUNCTION notifyhook.check_retry_schedule(delays integer[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    longest_s constant integer := 604800;
    most_delays constant integer := 20;
BEGIN
    IF delays IS NULL THEN
        RETURN;
    END IF;
    IF cardinality(delays) = 0 OR array_ndims(delays) <> 1 THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.retry_schedule must list at least one delay in seconds, '
                      'or be null for the global schedule',
            HINT = 'For example {10,60,600}: three retries, four attempts in all.';
    END IF;
    IF cardinality(delays) > most_delays THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.retry_schedule has %s delays, more than the %s allowed',
                             cardinality(delays), most_delays);
    END IF;
    IF array_position(delays, NULL) IS NOT NULL THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.retry_schedule delay %s is null', array_position(delays, NULL));
    END IF;
    IF EXISTS (SELECT FROM unnest(delays) AS d WHERE d NOT BETWEEN 1 AND longest_s) THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.retry_schedule delay %s is %s s: each delay must be '
                             'from 1 s to 604800 s (7 days)',
                             (SELECT n FROM unnest(delays) WITH ORDINALITY AS u(d, n)
                              WHERE d NOT BETWEEN 1 AND longest_s ORDER BY n LIMIT 1),
                             (SELECT d FROM unnest(delays) WITH ORDINALITY AS u(d, n)
                              WHERE d NOT BETWEEN 1 AND longest_s ORDER BY n LIMIT 1));
    END IF;
END
$$;

-- The secret before a rotation signs beside the new one until it expires, and only
-- then (claim.sql): without an expiry it would never sign, and receivers still
-- holding it would fail every request at once.
CREATE OR REPLACE FUNCTION notifyhook.check_previous_secret(previous_secret text, expires_at timestamptz)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF previous_secret IS NULL THEN
        RETURN;
    END IF;
    PERFORM notifyhook.check_secret(previous_secret, 'previous_secret');
    IF expires_at IS NULL THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.previous_secret needs endpoints.previous_secret_expires_at: '
                      'without an expiry the previous secret never signs',
            HINT = 'Set previous_secret_expires_at = now() + interval ''24 hours'' in the same '
                   'statement, or use notifyhook endpoint rotate-secret.';
    END IF;
END
$$;

-- An IPv6 address as Python's ipaddress module reads it (which is what the sender's
-- URL parser, httpx, checks a bracketed host with): hexadecimal groups, `::`, and an
-- optional dotted IPv4 tail. The pattern first, because PostgreSQL's inet also reads
-- forms Python refuses (`::1.2.3`, `::1/128`); zone ids (`%eth0`) are refused.
CREATE OR REPLACE FUNCTION notifyhook.is_ipv6_address(candidate text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF candidate !~ '^[0-9A-Fa-f:]*(:[0-9]{1,3}(\.[0-9]{1,3}){3})?$' THEN
        RETURN false;
    END IF;
    RETURN family(candidate::inet) = 6;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN false;
END
$$;

-- The host of an endpoint URL when it is not in brackets: a dotted-quad IPv4 address,
-- or a DNS name in ASCII. Digits and dots only are taken for an IPv4 address by the
-- sender (it refuses `127.1`); an internationalised name is stored in the xn-- form
-- that is dialled, rather than left to the sender's IDNA encoding.
CREATE OR REPLACE FUNCTION notifyhook.check_url_host(host text, url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF host ~ '^[0-9.]+$'
       AND host !~ '^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url: %s is not an IPv4 address (four numbers from 0 to 255, no leading zeros)',
                             left(host, 100));
    END IF;
    IF host ~ '[^\x01-\x7f]' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url: write the host %s in its ASCII (xn--) form', left(host, 100)),
            HINT = 'Python: "bücher.example".encode("idna") gives xn--bcher-kva.example';
    END IF;
    IF host !~ '^[A-Za-z0-9._~-]+$' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url has a malformed host: %L', left(url, 200)),
            HINT = CASE WHEN host ~ '[][]' THEN 'An IPv6 address goes in brackets: http://[2001:db8::1]/'
                        ELSE 'A host name has letters, digits, ''-'', ''.'', ''_'' and ''~'' only.' END;
    END IF;
    -- (hardening, issue 13) What IDNA can encode, as the sender checks it
    -- (_check_host_name in notifyhook/sender.py): no empty label (`a..b.com`,
    -- `.com`), none over 63 characters, 253 in all; one trailing dot is a fully
    -- qualified name. Accepted here, such a host failed every attempt at send time.
    IF length(regexp_replace(host, '\.$', '')) > 253
       OR EXISTS (SELECT FROM unnest(string_to_array(regexp_replace(host, '\.$', ''), '.')) AS l(label)
                  WHERE length(l.label) NOT BETWEEN 1 AND 63) THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url: the host %s is not a DNS name', left(host, 100)),
            HINT = 'A host name has labels of 1 to 63 characters between dots, at most 253 characters in all.';
    END IF;
END
$$;

-- An endpoint URL: http:// or https://, a host, no user:password@ (credentials
-- would be sent to, and logged by, every proxy on the way; use `headers`). What is
-- accepted here must parse at send time, in httpx and in aiohttp (tests/
-- test_endpoint_validation.py feeds odd URLs to both): so no white space or control
-- characters, a host that is a DNS name in ASCII, a dotted-quad IPv4 address or an
-- IPv6 address in balanced brackets, and a port from 1 to 65535.
CREATE OR REPLACE FUNCTION notifyhook.check_url(url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    authority text := substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)');
    host text;
    port text;
BEGIN
    IF url !~* '^https?://' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url must be an http:// or https:// URL, got %L', left(url, 200));
    END IF;
    IF length(url) > 8192 THEN
        -- About what servers take in a request line; httpx refuses URLs over 64 KiB.
        RAISE check_violation USING MESSAGE = 'endpoints.url must be at most 8192 characters long';
    END IF;
    IF url ~ '\s' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.url must not contain white space';
    END IF;
    IF url ~ '[\x01-\x1f\x7f-\x9f]' THEN
        RAISE check_violation USING MESSAGE = 'endpoints.url must not contain control characters';
    END IF;
    IF position('@' IN authority) > 0 THEN
        RAISE check_violation USING
            MESSAGE = 'endpoints.url must not carry credentials (user:password@)',
            HINT = 'Put an Authorization header in endpoints.headers instead.';
    END IF;
    IF authority IS NULL OR authority = '' OR starts_with(authority, ':') THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url has no host: %L', left(url, 200)),
            HINT = CASE WHEN authority ~ ':.*:'
                        THEN 'An IPv6 address goes in brackets: http://[2001:db8::1]:8080/'
                        ELSE 'For example https://example.com/webhook' END;
    END IF;
    IF starts_with(authority, '[') THEN
        host := substring(authority FROM '^\[([^]]*)\]');
        IF host IS NULL THEN
            RAISE check_violation USING
                MESSAGE = format('endpoints.url has a [ without its ] in the host: %L', left(url, 200));
        END IF;
        IF NOT notifyhook.is_ipv6_address(host) THEN
            RAISE check_violation USING
                MESSAGE = format('endpoints.url: [%s] is not an IPv6 address', left(host, 100));
        END IF;
        port := substr(authority, length(host) + 3);
    ELSE
        host := substring(authority FROM '^[^:]*');
        port := substr(authority, length(host) + 1);
        PERFORM notifyhook.check_url_host(host, url);
    END IF;
    -- An empty port (`host:`) means the scheme's default, to httpx and aiohttp alike.
    IF port !~ '^(:[0-9]*)?$' THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url has a malformed port: %L', left(url, 200)),
            HINT = CASE WHEN authority ~ '^[^[]*:.*:'
                        THEN 'An IPv6 address goes in brackets: http://[2001:db8::1]:8080/'
                        ELSE 'A port is a number from 1 to 65535, after the host and a colon.' END;
    END IF;
    IF port ~ '[0-9]' AND substr(port, 2)::numeric NOT BETWEEN 1 AND 65535 THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.url has a port out of range (1 to 65535): %L', left(url, 200));
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

-- The request headers an endpoint may not set, and why: the reason is the error's.
-- The sender drops the same names (notifyhook/sender.py, _RESERVED_HEADERS; a test
-- keeps the two lists equal) from rows written before a name was added here.
CREATE OR REPLACE FUNCTION notifyhook.reserved_headers() RETURNS TABLE (name text, reason text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    VALUES
        -- The Standard Webhooks headers: the signature covers the id and the timestamp,
        -- so a second value of either would fail every verifier.
        ('webhook-id', 'notifyhook sets it to the event id, which the signature covers'),
        ('webhook-timestamp', 'notifyhook sets it to the attempt''s time, which the signature covers'),
        ('webhook-signature', 'notifyhook signs every request itself'),
        -- The body's description: it is always JSON, sent as it was signed.
        ('content-type', 'notifyhook sends application/json, which the body always is'),
        ('content-length', 'notifyhook sets it to the length of the body'),
        ('content-encoding', 'the body is sent uncompressed, as it was signed'),
        ('transfer-encoding', 'the body is sent whole, with a content-length'),
        -- Ours by the contract (DESIGN.md §2), or for the answer we keep: its first KiB
        -- is stored as it arrives, so it must not come compressed.
        ('user-agent', 'notifyhook sends notifyhook/<version>'),
        ('accept-encoding', 'notifyhook asks for an uncompressed answer, whose excerpt it keeps'),
        -- Framing and the connection, which are the HTTP client's: the host is the URL's,
        -- and the rest are connection-specific fields (RFC 9110 section 7.6.1) or would
        -- change how the exchange goes.
        ('host', 'it is taken from endpoints.url'),
        ('connection', 'the HTTP client manages the connection'),
        ('keep-alive', 'the HTTP client manages the connection'),
        ('proxy-connection', 'the HTTP client manages the connection'),
        ('te', 'the HTTP client manages the connection'),
        ('upgrade', 'notifyhook speaks HTTP/1.1 only'),
        ('expect', 'the body is sent at once, without waiting for 100 Continue')
$$;

-- An endpoint's headers: a JSON object of header names to string values, each a
-- valid HTTP header that the sender will send as it is (the sender checks the same
-- at send time, in _checked_endpoint_headers, as a second line). A value is tabs and
-- printable ASCII: a CR or LF would inject headers, and the sender encodes values as
-- ASCII. Values are never quoted in messages: they are often credentials.
CREATE OR REPLACE FUNCTION notifyhook.check_headers(headers jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    offending text;
BEGIN
    PERFORM notifyhook.check_json_object(headers, 'endpoints.headers');
    SELECT string_agg(to_json(left(h.key, 100))::text, ', ' ORDER BY h.key) INTO offending
    FROM jsonb_each(headers) AS h
    WHERE jsonb_typeof(h.value) <> 'string';
    IF offending IS NOT NULL THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.headers values must be strings; not a string: %s', offending);
    END IF;
    SELECT string_agg(to_json(left(k, 100))::text, ', ' ORDER BY k) INTO offending
    FROM jsonb_object_keys(headers) AS k
    WHERE k !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$';
    IF offending IS NOT NULL THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.headers has a name that is not a valid HTTP header name: %s', offending),
            HINT = 'A header name has letters, digits and !#$%&''*+-.^_`|~ only.';
    END IF;
    SELECT string_agg(format('%s (%s)', to_json(k), r.reason), '; ' ORDER BY k) INTO offending
    FROM jsonb_object_keys(headers) AS k
    JOIN notifyhook.reserved_headers() AS r ON r.name = lower(k);
    IF offending IS NOT NULL THEN
        RAISE check_violation USING MESSAGE = format('endpoints.headers must not set %s', offending);
    END IF;
    SELECT string_agg(to_json(h.key)::text, ', ' ORDER BY h.key) INTO offending
    FROM jsonb_each_text(headers) AS h
    WHERE h.value !~ '^[\t\x20-\x7e]*$';
    IF offending IS NOT NULL THEN
        RAISE check_violation USING
            MESSAGE = format('endpoints.headers %s: a value must be printable ASCII or tabs, '
                             'without line breaks, control characters or non-ASCII text', offending),
            HINT = 'Percent-encode or base64-encode anything else.';
    END IF;
END
$$;
