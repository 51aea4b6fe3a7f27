"""Sentry reports from a real worker, sent by the real sentry-sdk to a stand-in ingest server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import add_endpoint, wait_until
from psycopg.conninfo import make_conninfo
from test_worker import statuses

from notifyhook import __version__, signing
from notifyhook.reporting import REDACTED, scrub
from notifyhook.tools.receiver import Answer, Receiver

PASSWORD = "db-pa55word-never-shown"
PAYLOAD_TEXT = "payload-text-never-reported"


ENVELOPES = "api/1/envelope/"
"""Where the sentry-sdk posts for the DSN below: /api/<project>/envelope/."""


class Ingest:
    """Sentry's envelope endpoint on 127.0.0.1: the harness's receiver, which reads every
    envelope as sent (aiohttp undoes the SDK's gzip) and answers as Sentry does."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        json_answer = Answer(headers={"Content-Type": "application/json"}, body=b"{}")
        receiver.sequence(ENVELOPES, json_answer)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self._receiver.port}/1"

    @property
    def envelopes(self) -> list[bytes]:
        return [arrival.body for arrival in self._receiver.received(ENVELOPES)]

    def events(self) -> list[dict[str, Any]]:
        """The event items of every envelope (an envelope is header, then item header and payload lines)."""
        found = []
        for envelope in self.envelopes:
            lines = envelope.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found


@pytest.fixture
def ingest() -> Iterator[Ingest]:
    running = Receiver().start_in_thread()
    yield Ingest(running)
    running.stop_thread()


def database_lost(ingest: Ingest) -> list[dict[str, Any]]:
    return [e for e in ingest.events() if "database unavailable" in json.dumps(e)]


@pytest.mark.slow
def test_a_lost_database_is_reported_once_per_outage_without_secrets(
    own_cluster, ingest, receiver, start_worker
):
    # Trust authentication ignores the password, so it is in the DSN only to prove it never leaks.
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{own_cluster.port}/postgres"
    secret = signing.generate_secret()
    with psycopg.connect(own_cluster.url(), autocommit=True) as conn:
        add_endpoint(conn, "t", "a", receiver.url("a"), secret=secret)
        conn.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "VALUES ('t', 'call.completed', jsonb_build_object('text', %s::text))",
            [PAYLOAD_TEXT],
        )
    worker = start_worker(url, sentry_dsn=ingest.dsn, worker_id="reported-worker")
    with psycopg.connect(own_cluster.url(), autocommit=True) as conn:
        wait_until(lambda: statuses(conn) == {"delivered": 1}, what="the delivery")
    assert PAYLOAD_TEXT.encode() in receiver.received("a")[0].body

    own_cluster.pg_ctl("stop", "-m", "fast", "-w")
    first = wait_until(lambda: database_lost(ingest), what="a report of the lost database")[0]
    assert first["tags"]["worker_id"] == "reported-worker"
    assert first["release"] == f"notifyhook@{__version__}"
    assert first["level"] == "warning"

    # Back, then gone again: a second outage is a second report, the first only one.
    own_cluster.pg_ctl("start", "-w", "-t", "30", "-l", str(own_cluster.log))
    wait_until(lambda: "database available again" in worker.log(), what="the worker to recover")
    assert len(database_lost(ingest)) == 1
    own_cluster.pg_ctl("stop", "-m", "fast", "-w")
    wait_until(lambda: len(database_lost(ingest)) == 2, what="a report of the second outage")

    sent = b"\n".join(ingest.envelopes)
    for never in (PASSWORD, PAYLOAD_TEXT, secret, secret.removeprefix("whsec_")):
        assert never.encode() not in sent, never


def test_what_stops_the_worker_is_reported_before_it_exits(database_url, ingest, start_worker):
    # A metrics port already taken: the worker cannot start, and says so.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = start_worker(
            make_conninfo(database_url, password=PASSWORD),
            sentry_dsn=ingest.dsn,
            metrics_port=str(port),
            worker_id="doomed-worker",
        )
        assert worker.wait(20) == 1
    # Flushed before exit: the report is already there.
    (event,) = [e for e in ingest.events() if "exception" in e]
    assert event["tags"]["worker_id"] == "doomed-worker"
    assert event["exception"]["values"][-1]["type"] == "OSError"
    assert event["level"] == "error"
    assert PASSWORD.encode() not in b"\n".join(ingest.envelopes)
    assert worker.log().splitlines()[-1].startswith("notifyhook: ")


def test_scrub_drops_request_data_and_variables_and_redacts_secrets():
    secret = signing.generate_secret()
    event = {
        "message": f"failed for postgresql://app:{PASSWORD}@db/app with {secret}",
        "request": {"data": PAYLOAD_TEXT, "headers": {"Authorization": "Bearer x"}},
        "user": {"ip_address": "10.0.0.1"},
        "extra": {"sys.argv": ["notifyhook", "endpoint", "add", "--secret", secret]},
        "exception": {
            "values": [
                {
                    "value": f"key enc:gAAAAABm{'x' * 40} refused",
                    "stacktrace": {
                        "frames": [{"function": "send", "vars": {"body": PAYLOAD_TEXT}}]
                    },
                }
            ]
        },
        "threads": {
            "values": [
                {"name": "https://hooks.example.com/in/PATHTOKEN?k=QTOKEN"},
                # A URL as an endpoint may be written: the scheme in capitals.
                {"name": "HTTPS://hooks.example.com/in/UPPERTOKEN"},
            ]
        },
        "breadcrumbs": {
            "values": [{"message": f"password={PASSWORD} host=db", "data": {"body": PAYLOAD_TEXT}}]
        },
    }
    scrubbed = scrub(event, ["sentry-dsn-value"])
    text = json.dumps(scrubbed)
    never_sent = (PASSWORD, PAYLOAD_TEXT, secret, "gAAAAAB", "Bearer", "10.0.0.1", "TOKEN")
    for never in never_sent:
        assert never not in text, never
    assert scrubbed["message"] == f"failed for postgresql://{REDACTED}@db/app with {REDACTED}"
    assert scrubbed["exception"]["values"][0]["stacktrace"]["frames"] == [{"function": "send"}]
    # A web address keeps its host, to tell endpoints apart.
    assert scrubbed["threads"]["values"][0]["name"] == f"https://hooks.example.com/{REDACTED}"
    assert scrubbed["threads"]["values"][1]["name"] == f"HTTPS://hooks.example.com/{REDACTED}"


def test_scrub_redacts_an_ed25519_signing_key_too():
    key = signing.generate_signing_key()
    scrubbed = scrub({"message": f"bad key {key} given"})
    assert scrubbed["message"] == f"bad key {REDACTED} given"
