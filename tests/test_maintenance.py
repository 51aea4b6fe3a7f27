"""The worker's maintenance jobs in-process, against the test's real database."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import add_endpoint, scalar

from notifyhook.maintenance import Maintenance
from notifyhook.metrics import Metrics
from notifyhook.settings import Settings
from notifyhook.store import Store


def run_maintenance(database_url: str, job: str, **settings: Any) -> tuple[Any, Metrics]:
    """Run one pass of `job` (reclaim_once or prune); returns its result and the metrics."""
    metrics = Metrics()

    async def run() -> Any:
        config = Settings(database_url=database_url, **settings)  # type: ignore[arg-type]
        async with Store.open(database_url) as store:
            return await getattr(Maintenance(config, store, metrics), job)()

    return asyncio.run(run()), metrics


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def test_reclaim_takes_back_expired_leases_only_and_samples_the_queue(db, database_url):
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't', 'x', '{}' FROM generate_series(1, 3)"
    )
    expired, live, _ = (
        r[0] for r in db.execute("SELECT id FROM notifyhook.deliveries ORDER BY id")
    )
    for delivery, lease in ((expired, "-1 second"), (live, "1 minute")):
        db.execute(
            "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 1, "
            "locked_by = 'gone-worker', locked_until = now() + %s::interval WHERE id = %s",
            [lease, delivery],
        )
    reclaimed, metrics = run_maintenance(database_url, "reclaim_once")
    assert reclaimed == 1
    rows = dict(db.execute("SELECT id, status FROM notifyhook.deliveries").fetchall())
    assert rows[expired] == "pending"
    assert rows[live] == "processing"
    error = scalar(db, "SELECT error FROM notifyhook.attempts WHERE delivery_id = %s", [expired])
    assert error.startswith("lease expired")
    # Two due now (the one taken back and the untouched one), one in flight.
    assert gauge(metrics, "notifyhook_queue_pending_due") == 2
    assert gauge(metrics, "notifyhook_queue_processing") == 1
    assert endpoint


def test_prune_drops_day_partitions_older_than_retention(db, database_url):
    add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    db.execute("SELECT notifyhook.create_partitions(since => now() - interval '2 days')")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't', 'x', '{}' FROM generate_series(1, 4)"
    )
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'delivered', "
        "updated_at = now() - interval '2 days' "
        "WHERE id IN (SELECT id FROM notifyhook.deliveries ORDER BY id LIMIT 3)"
    )
    db.execute("UPDATE notifyhook.events SET created_at = now() - interval '2 days'")
    deleted, _ = run_maintenance(database_url, "prune", retention="1d")
    # The day partitions of deliveries and attempts two days ago, then three events.
    assert deleted == 5
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries") == 1
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 1


def test_the_heartbeat_pings_the_watchdog_only_while_the_claim_loop_cycles(
    db, database_url, tmp_path
):
    import socket
    import time

    from notifyhook.systemd import SystemdNotifier

    path = str(tmp_path / "notify")
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})

        async def beat(last_cycle: float) -> None:
            config = Settings(database_url=database_url)  # type: ignore[call-arg]
            async with Store.open(database_url) as store:
                job = Maintenance(config, store, Metrics()).heartbeat(
                    notifier, lambda: last_cycle, lambda: 7
                )
                try:
                    async with asyncio.timeout(0.35):
                        await job
                except TimeoutError:
                    pass

        asyncio.run(beat(time.monotonic()))
        asyncio.run(beat(time.monotonic() - 3600))  # a loop stuck for an hour
        systemd.settimeout(0.2)
        while True:
            try:
                received.append(systemd.recv(4096).decode())
            except TimeoutError:
                break
    pings = [message for message in received if message == "WATCHDOG=1"]
    statuses = [message for message in received if message.startswith("STATUS=")]
    assert len(pings) >= 1
    assert len(statuses) > len(pings)  # the stuck loop still reports, but is not pinged for
    assert "7 in flight" in statuses[0]


def test_repair_turns_wakes_an_endpoint_whose_due_rows_a_hand_written_update_left_unseen(
    db, database_url
):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES ('t', 'x.y', '{}')"
    )
    # The rows come back by hand, and the claims' view of the endpoint is cleared.
    db.execute("DELETE FROM notifyhook.endpoint_wakes")
    db.execute("UPDATE notifyhook.endpoint_turns SET turn_at = NULL")
    woken, _ = run_maintenance(database_url, "repair_turns")
    assert woken == 1
    assert scalar(db, "SELECT endpoint_id FROM notifyhook.endpoint_wakes") == endpoint
