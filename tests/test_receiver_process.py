"""The demo's and the bench's receiver, driven from the parent side as they drive it: its
answers over HTTP (httpx, or a raw socket for what a client library will not send) and its
hits through drain()."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from notifyhook import signing
from notifyhook.tools.receiver_process import Behaviour, Hit, PathSpec, ReceiverProcess

SECRET = signing.generate_secret()
OTHER_SECRET = signing.generate_secret()
SLOW_S = 0.5

PATHS = {
    "ok": PathSpec(),
    "signed": PathSpec(Behaviour(), (OTHER_SECRET, SECRET)),
    "slow": PathSpec(Behaviour("slow", seconds=SLOW_S)),
    "gone": PathSpec(Behaviour("always", status=410)),
    "busy": PathSpec(Behaviour("first-fails", status=429, share=0.5, retry_after=2)),
}

# uuid int % 1000 below share * 1000 picks a delivery for first-fails.
CHOSEN = str(uuid.UUID(int=1_000_000 + 7))
SPARED = str(uuid.UUID(int=1_000_000 + 993))


@pytest.fixture
def receiver() -> Iterator[ReceiverProcess]:
    process = ReceiverProcess(PATHS).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as session:
        yield session


def signed(secret: str, body: bytes) -> dict[str, str]:
    return signing.webhook_headers([secret], str(uuid.uuid4()), int(time.time()), body)


def drain_until(receiver: ReceiverProcess, count: int, timeout: float = 10.0) -> list[Hit]:
    hits: list[Hit] = []
    deadline = time.monotonic() + timeout
    while len(hits) < count:
        assert time.monotonic() < deadline, f"{len(hits)} hits of {count}: {hits}"
        hits += receiver.drain()
    return hits


# -- raw HTTP, for what httpx will not send ---------------------------------------------


class Connection:
    """A raw HTTP/1.1 connection: bytes out, responses read back one at a time."""

    def __init__(self, receiver: ReceiverProcess) -> None:
        self.socket = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
        self._reader = self.socket.makefile("rb")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.close()
        self.socket.close()

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of the next response."""
        status_line = self._reader.readline().decode("latin-1")
        headers = {}
        while (line := self._reader.readline().decode("latin-1").strip()) != "":
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        body = self._reader.read(int(headers["content-length"]))
        return int(status_line.split(" ")[1]), headers, body

    def closed(self) -> bool:
        return self._reader.read(1) == b""


def request(path: str, body: bytes = b"{}", extra: str = "") -> bytes:
    head = f"POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


# -- the tests ----------------------------------------------------------------------------


def test_answers_many_requests_on_one_connection(receiver, client):
    addresses = set()
    for _ in range(5):
        response = client.post(receiver.url("ok"), content=b'{"n": 1}')
        assert (response.status_code, response.text) == (200, "ok")
        assert response.http_version == "HTTP/1.1"
        addresses.add(response.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(addresses) == 1
    assert [h.answered for h in drain_until(receiver, 5)] == [200] * 5


def test_two_requests_in_one_write_get_two_answers_in_order(receiver):
    with Connection(receiver) as conn:
        conn.send(request("gone") + request("ok"))
        assert conn.response()[0] == 410
        assert conn.response()[0] == 200
    assert [h.path for h in drain_until(receiver, 2)] == ["gone", "ok"]


def test_connection_close_is_honoured(receiver):
    with Connection(receiver) as conn:
        conn.send(request("ok", extra="Connection: close\r\n"))
        status, headers, _ = conn.response()
        assert status == 200
        assert headers["connection"] == "close"
        assert conn.closed()


def test_a_slow_answer_holds_up_no_other_connection(receiver, client):
    with Connection(receiver) as slow:
        started = time.monotonic()
        slow.send(request("slow"))
        assert client.post(receiver.url("ok"), content=b"{}").status_code == 200
        assert time.monotonic() - started < SLOW_S
        assert slow.response()[0] == 200
        assert time.monotonic() - started >= SLOW_S


def test_always_answers_its_status(receiver, client):
    for _ in range(3):
        assert client.post(receiver.url("gone"), content=b"{}").status_code == 410
    assert [h.answered for h in drain_until(receiver, 3)] == [410] * 3


def test_first_fails_fails_the_first_attempt_of_chosen_deliveries_only(receiver, client):
    def attempt(webhook_id: str) -> httpx.Response:
        return client.post(receiver.url("busy"), content=b"{}", headers={"webhook-id": webhook_id})

    first = attempt(CHOSEN)
    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    assert attempt(CHOSEN).status_code == 200
    assert attempt(SPARED).status_code == 200
    hits = drain_until(receiver, 3)
    assert [(h.webhook_id, h.answered) for h in hits] == [
        (CHOSEN, 429),
        (CHOSEN, 200),
        (SPARED, 200),
    ]


def test_signatures_are_checked_against_any_of_the_paths_secrets(receiver, client):
    body = b'{"type": "call.completed", "n": 1}'
    good = signed(SECRET, body)
    client.post(receiver.url("signed"), content=body, headers=good)
    # Header names in another case are the same headers.
    client.post(
        receiver.url("signed"), content=body, headers={k.title(): v for k, v in good.items()}
    )
    client.post(
        receiver.url("signed"), content=body, headers=signed(signing.generate_secret(), body)
    )
    client.post(receiver.url("signed"), content=body + b" ", headers=signed(SECRET, body))
    client.post(receiver.url("signed"), content=body)  # no signature at all
    client.post(receiver.url("ok"), content=body, headers=signed(SECRET, body))  # not checked
    hits = drain_until(receiver, 6)
    assert [h.verified for h in hits] == [True, True, False, False, False, None]
    assert hits[0].webhook_id == good["webhook-id"]


def test_hits_say_when_each_request_was_read(receiver, client):
    before = time.time()
    client.post(receiver.url("ok"), content=b"{}", headers={"webhook-id": "abc"})
    after = time.time()
    (hit,) = drain_until(receiver, 1)
    assert hit == Hit("ok", "abc", hit.received_at, None, 200)
    assert before <= hit.received_at <= after
    assert receiver.drain() == []


def test_unknown_names_are_answered_and_recorded_other_targets_are_not(receiver, client):
    assert client.post(receiver.url("nobody"), content=b"{}").status_code == 200
    assert client.post(receiver.url("nobody/else"), content=b"{}").status_code == 404
    assert client.get(receiver.url("ok")).status_code == 405
    assert [(h.path, h.verified) for h in drain_until(receiver, 1)] == [("nobody", None)]
    assert receiver.drain() == []


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"POST /ok HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /ok HTTP/1.1\r\nHost: x\r\n\r\n{}", 411),
        (b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: two\r\n\r\n{}", 400),
        (b"NONSENSE\r\n\r\n", 400),
    ],
)
def test_requests_it_cannot_read_are_refused_and_the_connection_closed(receiver, raw, status):
    with Connection(receiver) as conn:
        conn.send(raw)
        assert conn.response()[0] == status
        assert conn.closed()
    assert receiver.drain() == []


def test_clients_leaving_early_leave_no_trace(capfd):
    process = ReceiverProcess(PATHS).start()  # here, so that its stderr is captured
    try:
        with Connection(process) as conn:  # mid-head
            conn.send(b"POST /ok HTTP/1.1\r\nContent-")
        with Connection(process) as conn:  # mid-body
            conn.send(request("ok", body=b'{"n": 1}')[:-3])
        with Connection(process) as conn:  # waiting for a slow answer
            conn.send(request("slow"))
            drain_until(process, 1)
        with httpx.Client(timeout=10) as client:  # still serving
            assert client.post(process.url("ok"), content=b"{}").status_code == 200
        time.sleep(SLOW_S)  # the slow answer falls due with its client gone
        assert [h.path for h in drain_until(process, 1)] == ["ok"]
    finally:
        process.stop()
    assert capfd.readouterr().err == ""
