"""NOTIFY notifyhook_alerts: a dead letter or an automatic disable notifies a real LISTEN
connection from the transaction that records it; storms are bounded; payloads stay small."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import add_endpoint, scalar
from test_worker import statuses

from notifyhook.tools.receiver import Answer

END = "end of test"


@pytest.fixture
def alerts(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection listening on notifyhook_alerts, as an operator's pager would."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("LISTEN notifyhook_alerts")
        yield conn


def received(alerts: psycopg.Connection[Any], db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every alert committed so far. A marker NOTIFY sent now arrives after all of them
    (notifications come in commit order), so reading up to it needs no quiet period."""
    db.execute("SELECT pg_notify('notifyhook_alerts', %s)", [END])
    found = []
    for notification in alerts.notifies(timeout=30):
        if notification.payload == END:
            return found
        assert len(notification.payload.encode()) < 8000
        found.append(json.loads(notification.payload))
    raise AssertionError(f"the marker never came; alerts so far: {found}")


def insert_event(db, tenant: str = "t", event_type: str = "call.completed") -> None:
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES (%s, %s, '{}')",
        [tenant, event_type],
    )


def delivery_of(db, endpoint: int) -> int:
    return int(
        scalar(db, "SELECT id FROM notifyhook.deliveries WHERE endpoint_id = %s", [endpoint])
    )


def test_a_worker_alerts_once_per_dead_letter_and_for_410_gone(db, alerts, receiver, run_worker):
    receiver.sequence("failing", Answer(status=500))
    receiver.sequence("refusing", Answer(status=400))
    receiver.sequence("gone", Answer(status=410))
    failing = add_endpoint(db, "acme", "failing", receiver.url("failing"), retry_schedule="{1}")
    refusing = add_endpoint(db, "acme", "refusing", receiver.url("refusing"))
    gone = add_endpoint(db, "acme", "gone", receiver.url("gone"))
    worker = run_worker()
    insert_event(db, "acme", "invoice.paid")
    worker.wait_recorded(lambda: statuses(db) == {"dead": 3}, what="three dead letters")
    found = received(alerts, db)
    disabled = [a for a in found if a["kind"] == "disabled"]
    dead = sorted((a for a in found if a["kind"] == "dead"), key=lambda a: a["endpoint_id"])
    assert dead == [
        {
            "kind": "dead",
            "tenant_id": "acme",
            "endpoint_id": endpoint,
            "delivery_id": delivery_of(db, endpoint),
            "event_type": "invoice.paid",
            "reason": reason,
        }
        for endpoint, reason in [
            (failing, "dead after 2 attempts: HTTP 500"),
            (refusing, "dead after 1 attempt: HTTP 400"),
            (gone, "dead after 1 attempt: HTTP 410"),
        ]
    ]
    assert len(disabled) == 1
    assert disabled[0]["endpoint_id"] == gone
    assert disabled[0]["tenant_id"] == "acme"
    assert disabled[0]["reason"].startswith("410 Gone received at ")
    assert "delivery_id" not in disabled[0]
    assert len(receiver.received("failing")) == 2


def test_an_endpoint_failing_too_long_alerts_when_disabled_and_an_operator_does_not(
    db, alerts, receiver, run_worker
):
    receiver.sequence("down", Answer(status=503))
    down = add_endpoint(db, "t", "down", receiver.url("down"))
    paused = add_endpoint(db, "t", "paused", receiver.url("paused"), event_types="{job.*}")
    db.execute("UPDATE notifyhook.endpoints SET enabled = false WHERE id = %s", [paused])
    worker = run_worker(disable_after="1", retry_schedule=",".join(["0.2"] * 40))
    insert_event(db)
    worker.wait_recorded(
        lambda: not scalar(db, "SELECT enabled FROM notifyhook.endpoints WHERE id = %s", [down]),
        what="automatic disabling",
    )
    found = received(alerts, db)
    assert [(a["kind"], a["endpoint_id"]) for a in found] == [("disabled", down)]
    assert found[0]["reason"].startswith("every attempt failed since ")


def expire_leases(db, endpoint: int, count: int, attempts: int) -> None:
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "SELECT 't', 'call.completed', '{}', %s FROM generate_series(1, %s)",
        [endpoint, count],
    )
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'processing', attempts = %s, "
        "locked_by = 'w1', locked_until = now() - interval '1 second' WHERE endpoint_id = %s",
        [attempts, endpoint],
    )


def test_a_lease_expiring_on_the_last_attempt_alerts(db, alerts):
    endpoint = add_endpoint(db, "t", "n", "https://example.com/", retry_schedule="{5}")
    expire_leases(db, endpoint, 1, attempts=2)
    assert received(alerts, db) == []
    assert scalar(db, "SELECT notifyhook.reclaim_expired(6)") == 1
    [alert] = received(alerts, db)
    assert alert["delivery_id"] == delivery_of(db, endpoint)
    assert alert["reason"] == (
        "dead after 2 attempts: lease expired: worker w1 stopped before recording attempt 2"
    )


def test_a_storm_sends_ten_alerts_then_one_summary_per_endpoint(db, alerts):
    storming = add_endpoint(db, "t", "storming", "https://example.com/a", retry_schedule="{5}")
    expire_leases(db, storming, 30, attempts=2)
    assert scalar(db, "SELECT notifyhook.reclaim_expired(6)") == 30
    found = received(alerts, db)
    one_by_one = [a for a in found if "delivery_id" in a]
    summaries = [a for a in found if "delivery_id" not in a]
    assert len(one_by_one) == 10
    assert len({a["delivery_id"] for a in one_by_one}) == 10
    assert summaries == [
        {
            "kind": "dead",
            "tenant_id": "t",
            "endpoint_id": storming,
            "reason": "more deliveries to this endpoint went dead in the same transaction than "
            "the 10 alerted one by one: see notifyhook.dead_letters",
        }
    ]
    # The count is per transaction: the next one alerts one by one again.
    db.execute("UPDATE notifyhook.deliveries SET status = 'pending'")
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'dead' WHERE id = %s",
        [one_by_one[0]["delivery_id"]],
    )
    assert [a.get("delivery_id") for a in received(alerts, db)] == [one_by_one[0]["delivery_id"]]


def test_an_alert_stays_under_8000_bytes_whatever_it_carries(db, alerts):
    tenant = "t" * 9000
    endpoint = add_endpoint(db, tenant, "n", "https://example.com/")
    insert_event(db, tenant)
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'dead', last_error = repeat(E'\\u00e9\\n', 5000)"
    )
    [alert] = received(alerts, db)  # received() checks the size of each
    assert alert["endpoint_id"] == endpoint
    assert tenant.startswith(alert["tenant_id"])
    assert alert["reason"].startswith("dead after 0 attempts: é\né\n")


def test_nothing_alerts_for_deliveries_that_succeed_or_stay_dead(db, alerts):
    endpoint = add_endpoint(db, "t", "n", "https://example.com/")
    insert_event(db)
    db.execute("UPDATE notifyhook.deliveries SET status = 'delivered'")
    assert received(alerts, db) == []
    db.execute("UPDATE notifyhook.deliveries SET status = 'dead'")
    assert len(received(alerts, db)) == 1
    db.execute("UPDATE notifyhook.deliveries SET status = 'dead', last_error = 'again'")
    assert received(alerts, db) == []
    assert (
        scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE endpoint_id = %s", [endpoint])
        == 1
    )
