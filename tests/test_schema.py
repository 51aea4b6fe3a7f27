"""The SQL surface: migrations, fan-out, validation, idempotency, NOTIFY, views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from conftest import add_endpoint, psql, run_cli, scalar
from databases import with_dbname

from notifyhook.migrate import code_schema_version, migration_files


@pytest.fixture
def empty_database(server) -> Any:
    name = f"notifyhook_empty_{os.getpid()}"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_dbname(server.admin_url, name)
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrations(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT name, version, checksum, applied_at FROM notifyhook.migrations ORDER BY name"
        ).fetchall()


def test_migrate_from_empty_records_the_version(empty_database):
    result = run_cli(empty_database, "migrate")
    assert result.returncode == 0, result.stderr
    assert f"schema version {code_schema_version()}" in result.stdout
    with psycopg.connect(empty_database) as conn:
        assert (
            scalar(conn, "SELECT max(version) FROM notifyhook.migrations") == code_schema_version()
        )
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'notifyhook'")
        }
    assert {"endpoints", "events", "deliveries", "attempts"} <= tables
    assert {name for name, *_ in migrations(empty_database)} == {f.name for f in migration_files()}


def test_migrating_twice_changes_nothing(empty_database):
    assert run_cli(empty_database, "migrate").returncode == 0
    before = migrations(empty_database)
    second = run_cli(empty_database, "migrate")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert migrations(empty_database) == before


def test_two_concurrent_migrations_are_safe(empty_database):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
    environment["NOTIFYHOOK_DATABASE_URL"] = empty_database
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "notifyhook", "migrate"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("up to date" in out for out, _ in outputs) == 1
    assert len(migrations(empty_database)) == len(migration_files())


def test_max_payload_bytes_is_written_by_migrate(empty_database):
    assert run_cli(empty_database, "migrate", NOTIFYHOOK_MAX_PAYLOAD_BYTES="100").returncode == 0
    with psycopg.connect(empty_database, autocommit=True) as conn:
        add_endpoint(conn, "t", "a", "http://example.com/hook")
        with pytest.raises(psycopg.errors.CheckViolation, match="more than the limit of 100"):
            conn.execute(
                "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES ('t', 'x', %s)",
                [json.dumps({"text": "y" * 200})],
            )


# -- bad input fails its own INSERT, naming the problem ------------------------------------

BAD_EVENTS = [
    ("'[1, 2]'", "x.y", "NULL", "payload must be a JSON object, got array"),
    ("'\"text\"'", "x.y", "NULL", "payload must be a JSON object, got string"),
    ("'null'", "x.y", "NULL", "payload must be a JSON object, got null"),
    (
        "jsonb_build_object('big', repeat('x', 300000))",
        "x.y",
        "NULL",
        "more than the limit of 262144",
    ),
    ("'{}'", "", "NULL", "event_type must not be empty"),
    ("'{}'", "call..completed", "NULL", "event_type 'call..completed' is malformed"),
    ("'{}'", "call completed", "NULL", "is malformed"),
    ("'{}'", "x.y", "999999", "endpoint_id 999999 does not exist"),
    (
        "'{}'",
        "x.y",
        "(SELECT id FROM notifyhook.endpoints WHERE tenant_id = 'other')",
        "belongs to another tenant",
    ),
]


@pytest.mark.parametrize(("payload", "event_type", "endpoint", "message"), BAD_EVENTS)
def test_a_malformed_event_fails_its_insert(
    db, database_url, payload, event_type, endpoint, message
):
    add_endpoint(db, "t", "mine", "http://example.com/a")
    add_endpoint(db, "other", "theirs", "http://example.com/b")
    result = psql(
        database_url,
        f"INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        f"VALUES ('t', '{event_type}', {payload}, {endpoint})",
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 0
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 0


def test_one_bad_row_fails_the_whole_statement(db):
    add_endpoint(db, "t", "a", "http://example.com/a")
    with pytest.raises(psycopg.errors.CheckViolation, match="payload must be a JSON object"):
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "VALUES ('t', 'ok', '{}'), ('t', 'bad', '[]')"
        )
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 0


BAD_ENDPOINTS = [
    ({"url": "ftp://example.com/x"}, "must be an http:// or https:// URL"),
    ({"url": "example.com/x"}, "must be an http:// or https:// URL"),
    ({"url": "http:///path"}, "has no host"),
    ({"url": "https://user:pw@example.com/x"}, "must not carry credentials"),
    ({"url": "http://exa mple.com/"}, "white space"),
    ({"secret": "secret123"}, "must start with whsec_"),
    ({"secret": "whsec_!!!notbase64"}, "not valid base64"),
    ({"secret": "whsec_" + "QUJD" * 4}, "24 to 64 bytes, got 12"),
    ({"secret": "whsec_" + "QUJD" * 30}, "24 to 64 bytes, got 90"),
    ({"event_types": ["call.*", "bad pattern"]}, "malformed pattern: 'bad pattern'"),
    ({"event_types": ["*.call"]}, "malformed pattern"),
    ({"event_types": []}, "at least one pattern"),
    (
        {"extra_fields": psycopg.types.json.Jsonb([1])},
        "extra_fields must be a JSON object, got array",
    ),
    ({"headers": psycopg.types.json.Jsonb("x")}, "headers must be a JSON object, got string"),
    ({"headers": psycopg.types.json.Jsonb({"X-Count": 1})}, "headers values must be strings"),
    (
        {"headers": psycopg.types.json.Jsonb({"webhook-signature": "v1,x"})},
        'must not set "webhook-signature" (notifyhook signs every request itself)',
    ),
    ({"name": ""}, "name must not be empty"),
]


@pytest.mark.parametrize(("columns", "message"), BAD_ENDPOINTS)
def test_a_malformed_endpoint_is_refused(db, columns, message):
    values = {"tenant_id": "t", "name": "n", "url": "https://example.com/hook", **columns}
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        add_endpoint(db, values.pop("tenant_id"), values.pop("name"), values.pop("url"), **values)
    assert message in str(raised.value)
    assert scalar(db, "SELECT count(*) FROM notifyhook.endpoints") == 0


def test_an_endpoint_gets_a_standard_webhooks_secret(db):
    from notifyhook.signing import decode_secret

    endpoint = add_endpoint(db, "t", "a", "https://example.com/hook")
    secret = scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [endpoint])
    assert len(decode_secret(secret)) == 32
    other = add_endpoint(db, "t", "b", "https://example.com/hook")
    assert secret != scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [other])


# -- fan-out ---------------------------------------------------------------------------------


def deliveries_of(conn, event_id) -> set[int]:
    rows = conn.execute(
        "SELECT endpoint_id FROM notifyhook.deliveries WHERE event_id = %s", [event_id]
    )
    return {r[0] for r in rows}


def enqueue(
    conn, tenant: str, event_type: str, payload: dict[str, Any] | None = None, **named: Any
) -> Any:
    extra = "".join(f", {k} => %({k})s" for k in named)
    return scalar(
        conn,
        f"SELECT notifyhook.enqueue(%(tenant)s, %(type)s, %(payload)s{extra})",
        {"tenant": tenant, "type": event_type, "payload": json.dumps(payload or {}), **named},
    )


def test_fan_out_follows_event_type_patterns(db):
    everything = add_endpoint(db, "t", "all", "https://a.example/h")
    calls = add_endpoint(db, "t", "calls", "https://b.example/h", event_types=["call.*"])
    exact = add_endpoint(
        db, "t", "completed", "https://c.example/h", event_types=["call.completed", "sms.sent"]
    )
    off = add_endpoint(db, "t", "off", "https://d.example/h", event_types=["call.*"], enabled=False)
    add_endpoint(db, "someone-else", "all", "https://e.example/h")

    assert deliveries_of(db, enqueue(db, "t", "call.completed")) == {everything, calls, exact, off}
    assert deliveries_of(db, enqueue(db, "t", "call.x.y")) == {everything, calls, off}
    assert deliveries_of(db, enqueue(db, "t", "call")) == {everything}
    assert deliveries_of(db, enqueue(db, "t", "sms.sent")) == {everything, exact}


def test_an_event_matching_nothing_is_kept_without_deliveries(db):
    add_endpoint(db, "t", "calls", "https://b.example/h", event_types=["call.*"])
    event = enqueue(db, "t", "invoice.paid")
    assert scalar(db, "SELECT count(*) FROM notifyhook.events WHERE id = %s", [event]) == 1
    assert deliveries_of(db, event) == set()


def test_a_delivery_is_due_by_the_databases_clock_not_the_producers(db):
    # An ORM fills created_at from the app server's clock (Rails timestamps, Django's
    # auto_now_add). One an hour fast held every webhook back an hour (review s12-rev2);
    # a backdated event is due at once, as before, and keeps its order.
    add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, created_at) "
        "VALUES ('t', 'x', '{\"ahead\": 1}', now() + interval '1 hour'), "
        "       ('t', 'x', '{\"behind\": 1}', now() - interval '1 hour')"
    )
    due = dict(
        db.execute(
            "SELECT ev.payload::text, round(extract(epoch FROM d.next_attempt_at - now()))::int "
            "FROM notifyhook.deliveries AS d JOIN notifyhook.events AS ev ON ev.id = d.event_id"
        ).fetchall()
    )
    assert due == {'{"ahead": 1}': 0, '{"behind": 1}': -3600}


def test_a_targeted_event_goes_to_that_endpoint_only(db):
    add_endpoint(db, "t", "a", "https://a.example/h")
    target = add_endpoint(db, "t", "b", "https://b.example/h", event_types=["other.thing"])
    event = enqueue(db, "t", "call.completed", endpoint_id=target)
    assert deliveries_of(db, event) == {target}


def test_idempotency_key_through_enqueue_returns_the_first_id(db):
    add_endpoint(db, "t", "a", "https://a.example/h")
    first = enqueue(db, "t", "call.completed", {"n": 1}, idempotency_key="k-1")
    again = enqueue(db, "t", "call.completed", {"n": 2}, idempotency_key="k-1")
    assert again == first
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 1
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 1
    assert enqueue(db, "other-tenant", "x", idempotency_key="k-1") != first


def test_enqueue_returns_an_id_when_retention_deletes_the_keyed_event_meanwhile(db):
    # Between enqueue's INSERT (which met the key) and its SELECT (which looks for the
    # event that holds it), retention may delete that event: enqueue returned NULL. A
    # statement trigger of the test's, run after the INSERT, deletes it at that moment.
    add_endpoint(db, "t", "a", "https://a.example/h")
    first = enqueue(db, "t", "call.completed", {"n": 1}, idempotency_key="k-1")
    db.execute(
        """CREATE FUNCTION public.vanish() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('test.vanish', true) = 'on' THEN
                PERFORM set_config('test.vanish', 'off', false);
                DELETE FROM notifyhook.events WHERE idempotency_key = 'k-1';
            END IF;
            RETURN NULL;
        END $$"""
    )
    db.execute(
        "CREATE TRIGGER vanish AFTER INSERT ON notifyhook.events "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.vanish()"
    )
    db.execute("SELECT set_config('test.vanish', 'on', false)")
    again = enqueue(db, "t", "call.completed", {"n": 2}, idempotency_key="k-1")
    assert again is not None
    assert again != first
    assert scalar(db, "SELECT id FROM notifyhook.events WHERE idempotency_key = 'k-1'") == again
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 1


def test_idempotency_key_through_a_plain_insert_raises(db):
    insert = "INSERT INTO notifyhook.events (tenant_id, event_type, payload, idempotency_key) VALUES ('t', 'x', '{}', 'k')"
    db.execute(insert)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(insert)


def test_a_thousand_row_insert_sends_one_notification(db, database_url):
    add_endpoint(db, "t", "a", "https://a.example/h")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN notifyhook")
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "SELECT 't', 'call.completed', jsonb_build_object('n', n) FROM generate_series(1, 1000) AS n"
        )
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')"
        )
        received = list(listener.notifies(timeout=1.0))
    assert len(received) == 2
    assert {n.channel for n in received} == {"notifyhook"}
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 1001


def test_an_insert_through_psql_creates_deliveries(db, database_url):
    endpoint = add_endpoint(db, "acme", "a", "https://a.example/h")
    result = psql(
        database_url,
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "VALUES ('acme', 'call.completed', '{\"call_id\": 42}')",
    )
    assert result.returncode == 0, result.stderr
    row = db.execute("SELECT endpoint_id, status, attempts FROM notifyhook.deliveries").fetchall()
    assert row == [(endpoint, "pending", 0)]


def test_views_agree_with_the_tables(db):
    endpoint = add_endpoint(db, "t", "a", "https://a.example/h")
    for n in range(5):
        enqueue(db, "t", "call.completed", {"n": n})
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'delivered', delivered_at = now() WHERE id IN (1, 2)"
    )
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'dead', attempts = 6, last_error = 'HTTP 500' WHERE id = 3"
    )
    db.execute(
        "UPDATE notifyhook.deliveries SET attempts = 1, next_attempt_at = now() + interval '1 minute' WHERE id = 4"
    )
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        queue = cur.execute("SELECT * FROM notifyhook.queue_stats").fetchone()
        endpoints = cur.execute("SELECT * FROM notifyhook.endpoint_stats").fetchall()
        dead = cur.execute("SELECT * FROM notifyhook.dead_letters").fetchall()
    assert queue is not None
    assert (queue["pending_due"], queue["pending_retry"], queue["processing"]) == (1, 1, 0)
    assert (
        queue["delivered_1h"],
        queue["delivered_total"],
        queue["dead_1h"],
        queue["dead_total"],
    ) == (2, 2, 1, 1)
    assert queue["oldest_due_age_s"] >= 0
    assert [(e["endpoint_id"], e["pending"], e["dead"]) for e in endpoints] == [(endpoint, 2, 1)]
    assert [(d["delivery_id"], d["event_type"], d["attempts"], d["last_error"]) for d in dead] == [
        (3, "call.completed", 6, "HTTP 500")
    ]


def test_replay_puts_dead_deliveries_back_with_a_fresh_budget(db):
    add_endpoint(db, "t", "a", "https://a.example/h")
    for _ in range(3):
        enqueue(db, "t", "x")
    db.execute("UPDATE notifyhook.deliveries SET status = 'dead', attempts = 6")
    assert scalar(db, "SELECT notifyhook.replay(1)") is True
    assert scalar(db, "SELECT notifyhook.replay(1)") is False
    assert scalar(db, "SELECT notifyhook.replay_dead()") == 2
    assert db.execute("SELECT DISTINCT status, attempts FROM notifyhook.deliveries").fetchall() == [
        ("pending", 0)
    ]


def test_queue_indexes_keep_no_posting_lists(db):
    """Migration 0002: the queue's partial indexes are built without deduplication, so that
    a claimed row's entry can be marked dead on its own (docs/architecture.md)."""
    rows = db.execute(
        "SELECT c.relname, c.reloptions FROM pg_class AS c "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'notifyhook' "
        "AND c.relname IN ('deliveries_pending', 'deliveries_processing') ORDER BY c.relname"
    ).fetchall()
    assert rows == [
        ("deliveries_pending", ["deduplicate_items=off"]),
        ("deliveries_processing", ["deduplicate_items=off"]),
    ]


def test_the_claim_probes_indexes_even_when_planned_on_tables_analysed_empty(db):
    # Plans are cached per connection: one made while the tables looked empty must not
    # scan every queued row of the burst that follows.
    for n in range(3):
        add_endpoint(db, f"t{n}", "e", f"https://example.com/{n}")
    db.execute("VACUUM ANALYZE notifyhook.events, notifyhook.deliveries, notifyhook.attempts")
    claim = (
        "SELECT cardinality(deliveries) FROM "
        "notifyhook.claim_due('w', 100, interval '1 minute', 200, '{}', '{}', '{}')"
    )
    db.execute(claim)  # planned now, on empty tables
    for n in range(3):
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "SELECT %s, 'x.y', jsonb_build_object('n', n) FROM generate_series(1, 500) AS n",
            [f"t{n}"],
        )
    plans: list[str] = []
    db.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    db.execute("LOAD 'auto_explain'")
    db.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; "
        "SET auto_explain.log_level = notice; SET client_min_messages = notice"
    )
    assert scalar(db, claim) == 100
    statements = [p for p in plans if "notifyhook.deliveries" in p]
    assert statements
    assert not [p for p in statements if "Seq Scan on deliveries" in p]
