"""What operators see of a real worker: Prometheus metrics, /healthz, systemd notifications, JSON logs."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import add_endpoint, scalar, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_worker import insert_events, statuses

from notifyhook import signing
from notifyhook.tools.cluster import Cluster, free_port
from notifyhook.tools.receiver import Answer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(port: int) -> int | None:
    """/healthz's status code; None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:
        return None


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# -- metrics ---------------------------------------------------------------------


def test_in_flight_counts_the_requests_a_receiver_holds(db, receiver, run_worker):
    receiver.sequence("hang", Answer(kind="hang", seconds=30))
    add_endpoint(db, "t", "hang", receiver.url("hang"), timeout_ms=3000)
    port = free_port()
    run_worker(metrics_port=str(port), http_timeout="3")
    wait_until(lambda: health(port) == 200, what="/healthz to answer 200")
    insert_events(db, "t", 3)
    wait_until(lambda: len(receiver.received("hang")) == 3, what="three hanging requests")
    assert sample(scrape(port), "notifyhook_in_flight") == 3
    wait_until(
        lambda: sample(scrape(port), "notifyhook_in_flight") == 0,
        what="the timed-out requests to leave their slots",
    )


def test_metrics_count_what_the_worker_did(db, receiver, run_worker):
    receiver.sequence("dead", Answer(status=400))
    receiver.sequence("gone", Answer(status=410))
    add_endpoint(db, "t", "ok", receiver.url("ok"), event_types="{call.*}")
    add_endpoint(db, "t", "dead", receiver.url("dead"), event_types="{call.failed}")
    add_endpoint(db, "u", "gone", receiver.url("gone"))
    port = free_port()
    run_worker(metrics_port=str(port))
    wait_until(lambda: health(port) == 200, what="/healthz to answer 200")
    insert_events(db, "t", 5, "call.completed")
    insert_events(db, "t", 2, "call.failed")
    insert_events(db, "u", 1)
    wait_until(lambda: statuses(db) == {"delivered": 7, "dead": 3}, what="the outcomes")

    def settled() -> Samples | None:
        samples = scrape(port)
        done = sample(samples, "notifyhook_attempt_duration_seconds_count") == 10
        # The disable is counted once its record returns, a moment after the row's
        # state is visible to this test.
        recorded = (sample(samples, "notifyhook_endpoint_disables_total") or 0) >= 1
        idle = sample(samples, "notifyhook_in_flight") == 0
        return samples if done and recorded and idle else None

    samples = wait_until(settled, what="the metrics to count ten attempts")
    assert sample(samples, "notifyhook_attempts_total", outcome="delivered") == 7
    assert sample(samples, "notifyhook_attempts_total", outcome="dead") == 3
    assert sample(samples, "notifyhook_attempts_total", outcome="pending") == 0
    # Each delivery finished once: here one attempt each, so the two agree.
    assert sample(samples, "notifyhook_deliveries_total", outcome="delivered") == 7
    assert sample(samples, "notifyhook_deliveries_total", outcome="dead") == 3
    assert sample(samples, "notifyhook_deliveries_total", outcome="pending") is None
    # Every delivery was claimed exactly once, in batches.
    assert sample(samples, "notifyhook_claim_batch_size_sum") == 10
    assert (sample(samples, "notifyhook_claim_batch_size_count") or 0) >= 1
    assert (sample(samples, "notifyhook_notifications_total") or 0) >= 1
    assert sample(samples, "notifyhook_endpoint_disables_total") == 1
    assert sample(samples, "notifyhook_listener_reconnects_total") == 0


def test_queue_stats_count_a_disabled_endpoints_backlog_apart(db, receiver):
    add_endpoint(db, "t", "on", receiver.url("on"), event_types="{on.*}")
    add_endpoint(db, "t", "off", receiver.url("off"), event_types="{off.*}", enabled=False)
    insert_events(db, "t", 3, "on.created")
    insert_events(db, "t", 2, "off.created")
    row = db.execute(
        "SELECT pending_due, pending_paused, oldest_due_age_s FROM notifyhook.queue_stats"
    ).fetchone()
    assert row[:2] == (3, 2)
    assert row[2] is not None
    db.execute("UPDATE notifyhook.endpoints SET enabled = false")
    row = db.execute(
        "SELECT pending_due, pending_paused, oldest_due_age_s FROM notifyhook.queue_stats"
    ).fetchone()
    assert row == (0, 5, None)


def test_endpoint_stats_do_not_blame_the_endpoint_for_a_worker_stopping(db, receiver):
    add_endpoint(db, "t", "e", receiver.url("e"))
    insert_events(db, "t", 1)
    delivery, endpoint = db.execute("SELECT id, endpoint_id FROM notifyhook.deliveries").fetchone()
    attempts = [
        (1, 120.0, 503, "HTTP 503"),
        (2, None, None, "interrupted: the worker shut down before an answer"),
        (2, None, None, "lease expired: the worker stopped before recording an outcome"),
        (2, 80.0, 200, None),
    ]
    for attempt, duration, status, error in attempts:
        db.execute(
            "INSERT INTO notifyhook.attempts (delivery_id, endpoint_id, attempt, started_at, "
            "duration_ms, status_code, error, worker) VALUES (%s, %s, %s, now(), %s, %s, %s, 'w')",
            [delivery, endpoint, attempt, duration, status, error],
        )
    row = db.execute(
        "SELECT delivered_24h, failed_attempts_24h, failed_attempts_1h, success_rate_24h "
        "FROM notifyhook.endpoint_stats"
    ).fetchone()
    assert row == (1, 1, 1, 0.5)


def test_metrics_sample_the_queue_and_count_reconnects(db, receiver, run_worker):
    add_endpoint(db, "t", "paused", receiver.url("paused"), enabled=False)
    port = free_port()
    run_worker(metrics_port=str(port))
    wait_until(lambda: health(port) == 200, what="/healthz to answer 200")
    insert_events(db, "t", 4)
    # The queue is sampled on the worker's timer (every POLL_INTERVAL), not per scrape.
    samples = wait_until(
        lambda: (s := scrape(port)) and sample(s, "notifyhook_queue_pending_paused") == 4 and s,
        what="the queue depth gauge",
    )
    # A disabled endpoint's backlog is kept, not due: an alert on the oldest due
    # delivery must not fire for it.
    assert sample(samples, "notifyhook_queue_pending_due") == 0
    assert sample(samples, "notifyhook_queue_oldest_due_age_seconds") == 0
    assert sample(samples, "notifyhook_queue_processing") == 0

    killed = scalar(
        db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query LIKE 'LISTEN%%'",
    )
    assert killed == 1
    wait_until(
        lambda: sample(scrape(port), "notifyhook_listener_reconnects_total") == 1,
        what="the reconnect to be counted",
    )


@pytest.mark.slow
def test_healthz_follows_the_database(own_cluster: Cluster, start_worker):
    port = free_port()
    start_worker(own_cluster.url(), metrics_port=str(port))
    wait_until(lambda: health(port) == 200, what="a healthy worker")
    own_cluster.pg_ctl("stop", "-m", "fast", "-w")
    wait_until(lambda: health(port) == 503, timeout=10, what="/healthz to notice")
    own_cluster.pg_ctl("start", "-w", "-t", "30", "-l", str(own_cluster.log))
    wait_until(lambda: health(port) == 200, timeout=20, what="/healthz to recover")


# -- systemd ---------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd; the worker finds it in NOTIFY_SOCKET."""
    # A short directory: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="nh-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(0.5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            monkeypatch.setenv("WATCHDOG_USEC", "2000000")
            monkeypatch.delenv("WATCHDOG_PID", raising=False)
            yield sock


def receive(sock: socket.socket, seen: list[str]) -> list[str]:
    """`seen`, with the next message appended if one arrives within the socket's timeout."""
    with contextlib.suppress(TimeoutError):
        seen.append(sock.recv(4096).decode())
    return seen


@pytest.mark.slow
def test_the_worker_tells_systemd_ready_status_watchdog_and_stopping(
    db, receiver, start_worker, notify_socket
):
    receiver.sequence("slow", Answer(kind="slow", seconds=1.0))
    add_endpoint(db, "t", "slow", receiver.url("slow"))
    insert_events(db, "t", 3)
    worker = start_worker()
    seen: list[str] = []
    wait_until(lambda: "READY=1" in receive(notify_socket, seen), what="READY=1")
    # READY means: listening, and the backlog found by a first claim is under way.
    # This database's only: an earlier test's worker, stopped, may still have a backend
    # on its way out.
    listening = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN%%'"
    )
    assert scalar(db, listening) == 1
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE attempts = 1") == 3

    # WATCHDOG_USEC=2 s: a ping every second, each with the status line.
    wait_until(
        lambda: receive(notify_socket, seen).count("WATCHDOG=1") >= 3,
        timeout=10,
        what="three watchdog pings",
    )
    status = [m for m in seen if m.startswith("STATUS=")]
    assert len(status) >= 2, seen
    assert all(" in flight, " in m for m in status), status
    assert "STOPPING=1" not in seen

    worker.signal(signal.SIGTERM)
    wait_until(lambda: "STOPPING=1" in receive(notify_socket, seen), what="STOPPING=1")
    assert worker.wait(20) == 0, worker.log()


# -- logs ------------------------------------------------------------------------


def test_json_logs_are_one_object_a_line_and_never_a_secret_or_payload(
    db, database_url, receiver, start_worker
):
    receiver.sequence("strict", Answer(status=400))
    secret = signing.generate_secret()
    add_endpoint(db, "t", "strict", receiver.url("strict"), secret=secret)
    password = "log-pa55word"
    url = psycopg.conninfo.make_conninfo(database_url, password=password)
    worker = start_worker(url, log_format="json", log_level="DEBUG")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "VALUES ('t', 'call.completed', '{\"text\": \"payload-never-logged\"}')"
    )
    wait_until(lambda: statuses(db) == {"dead": 1}, what="a dead letter")
    wait_until(lambda: "dead after attempt" in worker.log(), what="the dead letter's log line")
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0

    log = worker.log()
    lines = [json.loads(line) for line in log.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    messages = "\n".join(line["message"] for line in lines)
    for expected in ("started", "ready", "dead after attempt 1", "stopping", "stopped"):
        assert expected in messages, expected
    dead = next(line for line in lines if "dead after" in line["message"])
    assert dead["level"] == "WARNING"
    assert "HTTP 400" in dead["message"]
    for never in (secret, secret.removeprefix("whsec_"), "payload-never-logged", password):
        assert never not in log, never
