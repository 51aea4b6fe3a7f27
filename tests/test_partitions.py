"""Partitioned history (issue 16, sql/0006_partitioned_history.sql): the migration of a
populated database, partitions made ahead, retention by partition, and the races that
partitions bring."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from itertools import count
from typing import Any

import psycopg
import psycopg.sql
import pytest
from conftest import add_endpoint, scalar, wait_until
from databases import with_dbname

from notifyhook.maintenance import Maintenance
from notifyhook.metrics import Metrics
from notifyhook.migrate import migrate, migration_files
from notifyhook.settings import Settings
from notifyhook.store import Store, queries, retire_partitions

_names = count()


@pytest.fixture
def bare_database(server: Any) -> Iterator[str]:
    """A database without any notifyhook schema."""
    name = f"notifyhook_bare_{os.getpid()}_{next(_names)}"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_dbname(server.admin_url, name)
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate_to_version(url: str, version: int) -> None:
    """The schema as `notifyhook migrate` of a release that shipped up to `version` left
    it: the numbered files up to it, recorded. (Not the definitions: today's are written
    against today's tables.)"""
    with psycopg.connect(url, autocommit=True) as conn:
        for file in migration_files():
            if file.version is not None and file.version <= version:
                with conn.transaction():
                    conn.execute(file.text)
                    conn.execute(
                        queries()["record_migration"],
                        {"name": file.name, "version": file.version, "checksum": file.checksum},
                    )


def migrate_now(url: str) -> list[str]:
    async def run() -> list[str]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await migrate(conn, max_payload_bytes=None)

    return asyncio.run(run())


def rows(conn: psycopg.Connection[Any], table: str, key: str = "id") -> dict[Any, dict[str, Any]]:
    """Every row of a table as JSON objects, by key."""
    found = conn.execute(f"SELECT to_jsonb(t) FROM notifyhook.{table} AS t").fetchall()
    return {str(row[0][key]): row[0] for (row) in found}


def statuses(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(
        conn.execute("SELECT status, count(*) FROM notifyhook.deliveries GROUP BY 1").fetchall()
    )


def placed(conn: psycopg.Connection[Any], table: str) -> dict[str, int]:
    """Rows per partition."""
    return dict(
        conn.execute(
            f"SELECT tableoid::regclass::text, count(*) FROM notifyhook.{table} GROUP BY 1"
        ).fetchall()
    )


# A populated version-1 database: 2 endpoints (the second disabled), 3,000 events over
# three days, their deliveries (2,400 delivered, 590 dead, a replayed dead letter now
# pending, 6 pending, a lease of a worker that died, a pending row of the disabled
# endpoint) and one attempt per attempt made.
SEED = """
INSERT INTO notifyhook.endpoints (id, tenant_id, name, url, secret, enabled, disabled_reason)
VALUES (1, 't', 'live', %(url)s, notifyhook.generate_secret(), true, NULL),
       (2, 't', 'paused', %(url)s, notifyhook.generate_secret(), false, 'disabled by an operator');
SELECT setval(pg_get_serial_sequence('notifyhook.endpoints', 'id'), 2);
INSERT INTO notifyhook.endpoint_state (endpoint_id) VALUES (1), (2);
INSERT INTO notifyhook.events (tenant_id, event_type, payload, created_at)
SELECT 't', 'call.completed', jsonb_build_object('n', i),
       now() - interval '3 days' + i * interval '80 seconds'
FROM generate_series(1, 3000) AS i;
INSERT INTO notifyhook.deliveries
    (event_id, tenant_id, endpoint_id, status, attempts, next_attempt_at, last_status_code,
     last_error, created_at, updated_at, delivered_at)
SELECT e.id, 't', 1, CASE WHEN e.n <= 2400 THEN 'delivered' ELSE 'dead' END,
       CASE WHEN e.n <= 2400 THEN 1 ELSE 3 END, e.created_at,
       CASE WHEN e.n <= 2400 THEN 200 ELSE 500 END,
       CASE WHEN e.n <= 2400 THEN NULL ELSE 'HTTP 500' END,
       e.created_at, e.created_at + interval '1 second',
       CASE WHEN e.n <= 2400 THEN e.created_at + interval '1 second' END
FROM (SELECT id, created_at, row_number() OVER (ORDER BY created_at) AS n
      FROM notifyhook.events) AS e
WHERE e.n <= 2990;
-- The replayed dead letter: pending again with a fresh budget, its three attempts kept.
UPDATE notifyhook.deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),
    updated_at = now()
WHERE id = (SELECT max(id) FROM notifyhook.deliveries WHERE status = 'dead');
INSERT INTO notifyhook.deliveries
    (event_id, tenant_id, endpoint_id, status, attempts, locked_by, locked_until, created_at,
     updated_at)
SELECT e.id, 't', CASE WHEN e.n = 2998 THEN 2 ELSE 1 END,
       CASE WHEN e.n = 2999 THEN 'processing' ELSE 'pending' END,
       CASE WHEN e.n = 2999 THEN 1 ELSE 0 END,
       CASE WHEN e.n = 2999 THEN 'a-worker-that-died' END,
       CASE WHEN e.n = 2999 THEN now() - interval '1 minute' END,
       e.created_at, e.created_at
FROM (SELECT id, created_at, row_number() OVER (ORDER BY created_at) AS n
      FROM notifyhook.events) AS e
WHERE e.n > 2990 AND e.n < 3000;
INSERT INTO notifyhook.attempts
    (delivery_id, endpoint_id, attempt, started_at, duration_ms, status_code, error, worker)
SELECT d.id, d.endpoint_id, a, d.updated_at - interval '1 second', 12.5,
       CASE WHEN d.status = 'delivered' THEN 200 ELSE 500 END,
       CASE WHEN d.status = 'delivered' THEN NULL ELSE 'HTTP 500' END, 'old-worker'
FROM notifyhook.deliveries AS d
CROSS JOIN LATERAL generate_series(1, CASE WHEN d.status = 'pending' AND d.attempts = 0
                                                AND d.updated_at > now() - interval '1 minute'
                                           THEN 3 ELSE d.attempts END) AS a
WHERE d.status <> 'pending' OR d.attempts = 0;
"""


def test_migration_from_version_1_keeps_every_row_and_the_queue_is_delivered(
    bare_database, receiver, start_worker
):
    migrate_to_version(bare_database, 1)
    with psycopg.connect(bare_database, autocommit=True) as db:
        with db.transaction():
            url = psycopg.sql.Literal(receiver.url("live")).as_string(db)
            db.execute(SEED.replace("%(url)s", url))
        before = {table: rows(db, table) for table in ("events", "deliveries", "attempts")}
        before_state = rows(db, "endpoint_state", "endpoint_id")
        statuses_before = dict(
            db.execute("SELECT status, count(*) FROM notifyhook.deliveries GROUP BY 1").fetchall()
        )
    assert statuses_before == {"delivered": 2400, "dead": 589, "pending": 9, "processing": 1}
    assert len(before["attempts"]) == 2400 + 3 * 589 + 3 + 1

    applied = migrate_now(bare_database)
    assert "0006_partitioned_history.sql" in applied

    with psycopg.connect(bare_database, autocommit=True) as db:
        after = {table: rows(db, table) for table in ("events", "deliveries", "attempts")}
        # Every row, every column it had: the columns added since version 1 are new.
        for table in before:
            assert after[table].keys() == before[table].keys(), table
            for key, row in before[table].items():
                assert {k: after[table][key][k] for k in row} == row, (table, key)
        assert all(row["attempt_key"] is None for row in after["attempts"].values())
        state_after = rows(db, "endpoint_state", "endpoint_id")
        # (The columns version 1 had and later versions kept.)
        assert {
            k: {c: v[c] for c in v if c in before_state[k]} for k, v in state_after.items()
        } == {k: {c: v[c] for c in v if c in state_after[k]} for k, v in before_state.items()}
        # The queue moved; the history stayed in the old table, attached whole.
        assert placed(db, "deliveries") == {
            "notifyhook.deliveries_active": 10,
            "notifyhook.deliveries_legacy": 2989,
        }
        assert placed(db, "attempts") == {"notifyhook.attempts_legacy": 2400 + 3 * 589 + 4}
        # The legacy range ends at a UTC midnight after now; day partitions follow it.
        legacy_upper, first_day, days_ahead = db.execute(
            "SELECT (SELECT upper FROM notifyhook.partition_bounds("
            "            'notifyhook.deliveries_finished') WHERE lower IS NULL),"
            "       (SELECT min(lower) FROM notifyhook.partition_bounds("
            "            'notifyhook.deliveries_finished')),"
            "       notifyhook.partitions_until() - now()"
        ).fetchone()
        assert legacy_upper == first_day
        assert days_ahead.days >= 7
        # The views read the same rows as version 1's tables held.
        queue = db.execute(
            "SELECT pending_due, processing, delivered_total, dead_total, pending_paused "
            "FROM notifyhook.queue_stats"
        ).fetchone()
        assert queue == (8, 1, 2400, 589, 1)
        assert scalar(db, "SELECT count(*) FROM notifyhook.dead_letters") == 589
        # New rows take ids after the old ones.
        max_id = max(int(k) for k in before["deliveries"])
        scalar(db, "SELECT notifyhook.enqueue('t', 'call.completed', '{\"n\": 3001}')")
        assert scalar(db, "SELECT max(id) FROM notifyhook.deliveries") > max_id

    # A worker delivers the queue: 7 pending rows of the live endpoint, the replayed
    # letter, the dead worker's lease once it is taken back, and the new event.
    start_worker(url=bare_database)
    with psycopg.connect(bare_database, autocommit=True) as db:
        wait_until(
            lambda: (
                scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'delivered'")
                == 2400 + 10
            ),
            what="the queue delivered",
        )
        assert len(receiver.received("live")) == 10
        # The paused endpoint's two (the new event fanned out to it too).
        assert placed(db, "deliveries")["notifyhook.deliveries_active"] == 2
        # The replayed letter's three old attempts and its new one.
        replayed = scalar(
            db,
            "SELECT id FROM notifyhook.deliveries WHERE status = 'delivered' AND id IN "
            "(SELECT delivery_id FROM notifyhook.attempts GROUP BY 1 HAVING count(*) = 4)",
        )
        assert replayed is not None


def retention_pass(url: str, retention: str) -> int:
    async def run() -> int:
        config = Settings(database_url=url, retention=retention)  # type: ignore[arg-type]
        async with Store.open(url) as store:
            return await Maintenance(config, store, Metrics()).prune()

    return asyncio.run(run())


def test_retention_drops_days_past_it_and_a_pending_row_as_old_survives(db, database_url):
    live = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    paused = add_endpoint(db, "t", "b", "http://127.0.0.1:9/b", enabled=False)
    db.execute("SELECT notifyhook.create_partitions(since => now() - interval '3 days')")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id, created_at) "
        "SELECT 't', 'x', '{}', CASE WHEN i = 0 THEN %s ELSE %s END, "
        "       now() - interval '3 days' + (i %% 4) * interval '1 day' "
        "FROM generate_series(0, 399) AS i",
        [paused, live],
    )
    # Finished rows a day apart, 3 days old to today, with an attempt each; the paused
    # endpoint's row stays pending, as old as the oldest day.
    db.execute(
        "UPDATE notifyhook.deliveries AS d SET status = 'delivered', attempts = 1, "
        "updated_at = e.created_at, created_at = e.created_at "
        "FROM notifyhook.events AS e WHERE e.id = d.event_id AND d.endpoint_id = %s",
        [live],
    )
    db.execute(
        "UPDATE notifyhook.deliveries AS d SET updated_at = e.created_at, "
        "created_at = e.created_at FROM notifyhook.events AS e "
        "WHERE e.id = d.event_id AND d.endpoint_id = %s",
        [paused],
    )
    db.execute(
        "INSERT INTO notifyhook.attempts (delivery_id, endpoint_id, attempt, started_at, worker) "
        "SELECT id, endpoint_id, 1, updated_at, 'w' FROM notifyhook.deliveries"
    )
    old_pending = scalar(db, "SELECT id FROM notifyhook.deliveries WHERE status = 'pending'")
    days = [
        r[0]
        for r in db.execute(
            "SELECT to_char((now() - n * interval '1 day') AT TIME ZONE 'UTC', 'YYYYMMDD') "
            "FROM generate_series(3, 1, -1) AS n"
        )
    ]
    # A day detached by an earlier pass whose DROP was cut short: dropped now.
    db.execute("CREATE TABLE notifyhook.attempts_20200101 (LIKE notifyhook.attempts)")

    # A day of retention: the days 3 and 2 days ago end before it, yesterday does not.
    # Four partitions dropped, then the 199 events left without deliveries.
    assert retention_pass(database_url, "86400") == 5 + 199
    assert scalar(db, "SELECT to_regclass('notifyhook.attempts_20200101')") is None
    dropped = {f"deliveries_{day}" for day in days[:2]} | {f"attempts_{day}" for day in days[:2]}
    left = {r[0] for r in db.execute("SELECT relname FROM pg_class WHERE relkind = 'r'")}
    # Dropped whole (gone from the catalog), not emptied row by row. (WAL is not
    # measured here: the cluster's WAL counts every parallel test's writes, and 200
    # rows' DELETE would write less than the noise; docs/scaling.md has the figures.)
    assert not dropped & left
    assert {f"deliveries_{days[2]}", f"attempts_{days[2]}"} <= left
    # The finished rows of the days dropped are gone, with their attempts and events;
    # the pending row as old as the oldest is still there, with its attempt's partition
    # gone (attempts go by their own age).
    assert dict(
        db.execute("SELECT status, count(*) FROM notifyhook.deliveries GROUP BY 1").fetchall()
    ) == {"pending": 1, "delivered": 200}
    assert scalar(db, "SELECT status FROM notifyhook.deliveries WHERE id = %s", [old_pending]) == (
        "pending"
    )
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 200
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 201
    # Nothing more to drop.
    assert retention_pass(database_url, "86400") == 0


def test_the_legacy_partition_is_pruned_row_by_row_until_dropped_whole(bare_database):
    migrate_to_version(bare_database, 5)
    with psycopg.connect(bare_database, autocommit=True) as db:
        db.execute(
            "INSERT INTO notifyhook.endpoints (tenant_id, name, url, secret) "
            "VALUES ('t', 'a', 'http://127.0.0.1:9/a', notifyhook.generate_secret())"
        )
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload, created_at) "
            "SELECT 't', 'x', '{}', now() - i * interval '1 hour' + interval '30 minutes' "
            "FROM generate_series(1, 72) AS i"
        )
        db.execute(
            "INSERT INTO notifyhook.deliveries (event_id, tenant_id, endpoint_id, status, "
            "attempts, created_at, updated_at) "
            "SELECT id, 't', 1, 'delivered', 1, created_at, created_at FROM notifyhook.events"
        )
        db.execute(
            "INSERT INTO notifyhook.attempts (delivery_id, endpoint_id, attempt, started_at, "
            "worker) SELECT id, 1, 1, updated_at, 'w' FROM notifyhook.deliveries"
        )
    migrate_now(bare_database)
    with psycopg.connect(bare_database, autocommit=True) as db:
        # A day of retention: the rows older than a day are deleted, their attempts with
        # them; the legacy partition stays (its range ends after tomorrow's midnight).
        assert retention_pass(bare_database, "86400") == 48 + 48
        assert placed(db, "deliveries") == {"notifyhook.deliveries_legacy": 24}
        assert placed(db, "attempts") == {"notifyhook.attempts_legacy": 24}

        # Once its range is past retention (here: a retention of "minus two days"), it
        # is dropped whole like any day, and prune no longer looks for it.
        async def retire() -> list[str] | None:
            async with await psycopg.AsyncConnection.connect(
                bare_database, autocommit=True
            ) as conn:
                return await retire_partitions(conn, -2 * 86400.0)

        dropped = asyncio.run(retire())
        assert dropped is not None
        assert {"deliveries_legacy", "attempts_legacy"} <= set(dropped)
        assert scalar(db, "SELECT to_regclass('notifyhook.deliveries_legacy')") is None
        assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 0
        assert scalar(db, "SELECT notifyhook.prune('1 day', 100)") >= 0
    # Partitions made again for today on: outcomes still have a place to go.
    with psycopg.connect(bare_database, autocommit=True) as db:
        assert scalar(db, "SELECT notifyhook.create_partitions()") >= 2


def test_migrate_and_workers_make_partitions_ahead(db, database_url, start_worker):
    until = scalar(db, "SELECT notifyhook.partitions_until() - now()")
    assert until.days >= 7
    assert scalar(db, "SELECT notifyhook.create_partitions()") == 0  # idempotent
    # Drop all but today's: a worker starting makes them again before its first claim.
    for (name,) in db.execute(
        "SELECT b.partition::text FROM notifyhook.partition_bounds("
        "    'notifyhook.deliveries_finished') AS b WHERE b.lower > now() "
        "UNION ALL SELECT b.partition::text FROM notifyhook.partition_bounds("
        "    'notifyhook.attempts') AS b WHERE b.lower > now()"
    ).fetchall():
        db.execute(f"DROP TABLE {name}")
    assert scalar(db, "SELECT notifyhook.partitions_until() - now()").days == 0
    worker = start_worker()
    wait_until(lambda: "day partitions ahead" in worker.log(), what="the worker's warning")
    assert "made 14" in worker.log()
    assert scalar(db, "SELECT notifyhook.partitions_until() - now()").days >= 7


def test_an_outcome_finding_no_partition_makes_it_and_is_recorded(
    db, database_url, receiver, start_worker
):
    endpoint = add_endpoint(db, "t", "a", receiver.url("a"))
    worker = start_worker()
    db.execute("SELECT notifyhook.enqueue('t', 'x', '{\"n\": 0}')")
    wait_until(lambda: statuses(db) == {"delivered": 1}, what="a first delivery")
    # Today's partitions go (the first delivery with them) after the worker made them:
    # its next outcome finds no partition.
    for parent in ("deliveries_finished", "attempts"):
        name = scalar(
            db,
            "SELECT b.partition::text FROM notifyhook.partition_bounds(%s::regclass) AS b "
            "WHERE b.lower <= now() AND b.upper > now()",
            [f"notifyhook.{parent}"],
        )
        db.execute(f"ALTER TABLE notifyhook.{parent} DETACH PARTITION {name}")
        db.execute(f"DROP TABLE {name}")
    db.execute("SELECT notifyhook.enqueue('t', 'x', '{\"n\": 1}')")
    wait_until(lambda: statuses(db) == {"delivered": 1}, what="the second delivery recorded")
    # Recorded whole, once: the answer's status code, one request, one attempt.
    assert len(receiver.received("a")) == 2
    attempt = db.execute(
        "SELECT status_code, error, endpoint_id FROM notifyhook.attempts"
    ).fetchall()
    assert attempt == [(200, None, endpoint)]
    assert "made 2 missing day partitions" in worker.log()


def test_a_recording_racing_a_reclaim_that_moved_its_row_records_it_on_retry(db, database_url):
    """reclaim_expired makes a delivery dead, moving it to a day partition, while a late
    record_outcomes comes for its row: the record does not wait for the row (since
    session 8: it used to wait, then fail with 40001, the row moved to another
    partition), but hands the outcome back as deferred; the worker's next call, once the
    reclaim has committed, records the attempt and leaves the row dead."""
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    db.execute("SELECT notifyhook.enqueue('t', 'x', '{}')")
    delivery = scalar(
        db,
        "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 3, "
        "locked_by = 'late', locked_until = now() - interval '1 second' RETURNING id",
    )
    record = (
        "SELECT * FROM notifyhook.record_outcomes('late', ARRAY[%(d)s]::bigint[], "
        "ARRAY[%(e)s]::bigint[], ARRAY[3], ARRAY['delivered'], ARRAY[NULL]::float8[], "
        "ARRAY[now()], ARRAY[15.0]::float8[], ARRAY[200], ARRAY[NULL]::text[], "
        "ARRAY['ok'], ARRAY[false], interval '1 hour', %(retried)s, ARRAY[%(k)s]::uuid[])"
    )
    key = "7a1c1f2e-5d3b-4c4e-9f00-000000000001"
    params = {"d": delivery, "e": endpoint, "k": key, "retried": False}
    with psycopg.connect(database_url) as reclaimer:
        # The reclaim holds the row (it is the delivery's third attempt: dead).
        assert scalar(reclaimer, "SELECT notifyhook.reclaim_expired(3)") == 1
        with psycopg.connect(database_url, autocommit=True, options="-c lock_timeout=2s") as late:
            deferred = late.execute(record, params).fetchall()
        assert deferred == [(None, None, delivery)]
        assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 0
        reclaimer.commit()
    db.execute(record, params)
    assert db.execute(
        "SELECT status, last_error LIKE 'lease expired%%' FROM notifyhook.deliveries"
    ).fetchall() == [("dead", True)]
    attempts = db.execute(
        "SELECT worker, status_code, attempt_key::text FROM notifyhook.attempts ORDER BY id"
    ).fetchall()
    assert attempts == [("late", None, None), ("late", 200, key)]
    # And a third call, its answer lost, records nothing twice.
    db.execute(record, {**params, "retried": True})
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 2


def test_a_dead_letter_moved_to_the_history_still_alerts(db):
    add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    db.execute("SELECT notifyhook.enqueue('t', 'x', '{}')")
    db.execute("LISTEN notifyhook_alerts")
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'dead', attempts = 3, last_error = 'HTTP 500'"
    )
    assert scalar(db, "SELECT tableoid::regclass::text FROM notifyhook.deliveries").startswith(
        "notifyhook.deliveries_2"
    )
    alerts = [json.loads(n.payload) for n in db.notifies(timeout=1, stop_after=2)]
    assert [(a["kind"], a["reason"]) for a in alerts] == [
        ("dead", "dead after 3 attempts: HTTP 500")
    ]
