-- Partitioned history (0006_partitioned_history.sql): day partitions made ahead, and
-- which ones retention may drop.
--
-- Days are UTC days. A finished delivery lands in the partition of its updated_at, an
-- attempt in that of its started_at. There is no DEFAULT partition (DETACH …
-- CONCURRENTLY refuses a parent that has one, and a plain DETACH would lock the parent
-- against every recording): `notifyhook migrate` and every worker make partitions
-- ahead (create_partitions), and a worker whose outcome finds no partition makes them
-- and records again (notifyhook/recorder.py).

-- The range partitions of `parent`: their bounds (lower null: MINVALUE), and whether a
-- DETACH … CONCURRENTLY of theirs was interrupted (it must be finalized).
CREATE OR REPLACE FUNCTION notifyhook.partition_bounds(parent regclass)
RETURNS TABLE (partition regclass, lower timestamptz, upper timestamptz, detach_pending boolean)
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass,
           (regexp_match(b.bound, 'FROM \(''([^'']*)''\)'))[1]::timestamptz,
           (regexp_match(b.bound, 'TO \(''([^'']*)''\)'))[1]::timestamptz,
           i.inhdetachpending
    FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) AS b
    WHERE i.inhparent = parent
$$;

-- Make the day partitions of deliveries_finished and attempts from the day of `since`
-- (default: today) to the day of now() + `ahead`, those not made yet. Idempotent, one
-- caller at a time. Each is made as a table of its own, then attached: ATTACH holds the
-- parent with a lock that recordings do not wait for, where CREATE TABLE … PARTITION OF
-- would lock them out. Returns the number of partitions made.
CREATE OR REPLACE FUNCTION notifyhook.create_partitions(
    ahead interval DEFAULT interval '7 days',
    since timestamptz DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    made integer := 0;
    day timestamptz;
    parent text;
    prefix text;
    name text;
BEGIN
    PERFORM pg_advisory_xact_lock(7305872156748263004);
    FOR parent, prefix IN VALUES ('deliveries_finished', 'deliveries'), ('attempts', 'attempts') LOOP
        FOR day IN
            SELECT generate_series(date_trunc('day', coalesce(since, now()), 'UTC'),
                                   date_trunc('day', now() + ahead, 'UTC'), interval '1 day')
        LOOP
            -- A day some partition covers already (the legacy one, or made before).
            CONTINUE WHEN EXISTS (
                SELECT FROM notifyhook.partition_bounds(('notifyhook.' || parent)::regclass) AS b
                WHERE coalesce(b.lower < day + interval '1 day', true) AND b.upper > day);
            name := prefix || '_' || to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD');
            EXECUTE format('CREATE TABLE notifyhook.%I (LIKE notifyhook.%I INCLUDING DEFAULTS '
                           'INCLUDING CONSTRAINTS)', name, parent);
            IF parent = 'deliveries_finished' THEN
                EXECUTE format('ALTER TABLE notifyhook.%I SET (fillfactor = 100)', name);
            END IF;
            EXECUTE format('ALTER TABLE notifyhook.%I ATTACH PARTITION notifyhook.%I '
                           'FOR VALUES FROM (%L) TO (%L)', parent, name, day, day + interval '1 day');
            made := made + 1;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

-- How far ahead partitions exist: the upper bound of the latest day partition of
-- deliveries_finished and of attempts, whichever is sooner.
CREATE OR REPLACE FUNCTION notifyhook.partitions_until() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least((SELECT max(b.upper) FROM notifyhook.partition_bounds(
                      'notifyhook.deliveries_finished'::regclass) AS b),
                 (SELECT max(b.upper) FROM notifyhook.partition_bounds(
                      'notifyhook.attempts'::regclass) AS b))
$$;

-- The partitions retention drops: every range partition of deliveries_finished and
-- attempts whose upper bound is older than `older_than`, oldest first. They are detached
-- (CONCURRENTLY, or FINALIZE when a detach was interrupted) and dropped by the caller,
-- outside a transaction block: a worker's retention pass, `notifyhook prune`.
-- Also listed, with parent null: a day table already detached whose DROP failed (a lock
-- timeout, a lost connection), which nothing else would ever drop.
CREATE OR REPLACE FUNCTION notifyhook.retired_partitions(older_than interval)
RETURNS TABLE (parent text, partition text, detach_pending boolean)
LANGUAGE sql STABLE AS $$
    SELECT r.parent, r.partition, r.detach_pending
    FROM (
        SELECT p.parent, c.relname::text AS partition, b.detach_pending, b.upper
        FROM (VALUES ('deliveries_finished'), ('attempts')) AS p(parent)
        CROSS JOIN LATERAL notifyhook.partition_bounds(('notifyhook.' || p.parent)::regclass) AS b
        JOIN pg_class AS c ON c.oid = b.partition
        WHERE b.upper <= now() - older_than
        UNION ALL
        SELECT NULL, c.relname::text, NULL, NULL
        FROM pg_class AS c
        WHERE c.relnamespace = 'notifyhook'::regnamespace AND c.relkind = 'r'
          AND NOT c.relispartition
          AND c.relname ~ '^(deliveries|attempts)_([0-9]{8}|legacy)$'
          -- Before version 6 the legacy tables were the tables themselves.
          AND to_regclass('notifyhook.deliveries_finished') IS NOT NULL
    ) AS r
    ORDER BY r.upper NULLS FIRST, r.parent, r.partition
$$;
