-- What a worker's claim and record cost PostgreSQL, without Python or HTTP: pgbench runs
-- this script, one claim of 25 rows and the record of their outcomes (delivered), as a
-- worker does, in two transactions. docs/performance.md ("What a claim and a record cost
-- PostgreSQL") has the set-up and the figures; in short:
--   createdb cycle && NOTIFYHOOK_DATABASE_URL=postgresql:///cycle notifyhook migrate
--   psql cycle -c "INSERT INTO notifyhook.endpoints (tenant_id, name, url)
--                  VALUES ('t', 'e', 'http://127.0.0.1:9/')" \
--              -c "INSERT INTO notifyhook.events (tenant_id, event_type, payload)
--                  SELECT 't', 'call.completed', jsonb_build_object('n', g, 'pad', repeat('x', 300))
--                  FROM generate_series(1, 50000) AS g" -c "VACUUM ANALYZE"
--   pgbench -n -M prepared -f benchmarks/claim_record_cycle.sql -t 400 cycle
-- and read the server's CPU per transaction (all its processes, before and after).
SELECT coalesce(array_agg(c.delivery_id)::text, '{}') AS ids,
       coalesce(array_agg(c.endpoint_id)::text, '{}') AS eps,
       coalesce(array_agg(c.attempt)::text, '{}') AS atts,
       count(*) AS n
FROM notifyhook.claim_due('bench', 25, '30 s', 100, '{}', '{}', '{}') AS f,
     unnest(f.deliveries) AS c \gset
SELECT count(*) FROM notifyhook.record_outcomes(
    'bench', :ids::bigint[], :eps::bigint[], :atts::integer[],
    array_fill('delivered'::text, ARRAY[:n::int]), array_fill(NULL::float8, ARRAY[:n::int]),
    array_fill(now(), ARRAY[:n::int]), array_fill(1.5::float8, ARRAY[:n::int]),
    array_fill(200, ARRAY[:n::int]), array_fill(NULL::text, ARRAY[:n::int]),
    array_fill(''::text, ARRAY[:n::int]), array_fill(false, ARRAY[:n::int]),
    '1 hour', false, ARRAY(SELECT gen_random_uuid() FROM generate_series(1, :n::int)),
    started_ago_s => array_fill(0.002::float8, ARRAY[:n::int]));
