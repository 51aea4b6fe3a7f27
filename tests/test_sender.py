"""The sender against real HTTP servers on 127.0.0.1: signing, classification, limits, SSRF guard."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import standardwebhooks

from notifyhook.delivery import AttemptResult, Delivery, Verdict
from notifyhook.sender import (
    _RESERVED_HEADERS,
    EXCERPT_BYTES,
    MIN_ECHOED_PATH,
    Sender,
    refusal_reason,
    without_url,
)
from notifyhook.signing import generate_secret
from notifyhook.tools.receiver import Answer, Receiver
from notifyhook.transport import Http11Transport

SECRET = generate_secret()
EVENT_ID = "0b5e3c5a-6a53-4b8e-9d0c-6f3f1f0e2a11"
# Odd spacing and a non-ASCII character: any re-serialisation on the way would show.
BODY = '{"type":"call.completed",  "data": {"name": "Zoë", "n": 1}}'.encode()
TEN_MB = 10 * 1024 * 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(scenario: Coroutine[Any, Any, Any], limit_s: float = 20.0) -> Any:
    """Run one async scenario, failing rather than hanging when something never answers."""

    async def bounded() -> Any:
        async with asyncio.timeout(limit_s):
            return await scenario

    return asyncio.run(bounded())


def delivery(url: str, **overrides: Any) -> Delivery:
    fields: dict[str, Any] = {
        "id": 1,
        "event_id": EVENT_ID,
        "endpoint_id": 1,
        "attempt": 1,
        "url": url,
        "secrets": (SECRET,),
        "headers": {},
        "timeout_s": 5.0,
        "body": BODY,
    }
    return Delivery(**(fields | overrides))


async def send(url: str, *, allow_private_networks: bool = True, **overrides: Any) -> AttemptResult:
    async with Sender(
        allow_private_networks=allow_private_networks, user_agent="notifyhook/test"
    ) as s:
        return await s.send(delivery(url, **overrides))


def scripted(receiver: Receiver, name: str, status: int = 200, retry_after: str = "") -> str:
    """Script path `name` to answer `status` with "answer <status>", a cookie, a Retry-After
    when given and a Location for a redirect; its URL."""
    headers = {"Set-Cookie": "session=abc; Path=/"}
    if retry_after:
        headers["Retry-After"] = retry_after
    if 300 <= status < 400:
        headers["Location"] = receiver.url("target")
    answer = Answer(status=status, headers=headers, body=f"answer {status}".encode())
    receiver.sequence(name, answer)
    return receiver.url(name)


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A bare TCP server; yields its port and a list that grows by one per accepted connection."""
    accepted: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head (the body is read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def answering(response: bytes, heads: list[bytes] | None = None) -> Handler:
    """A raw_server handler giving `response` to every request on a connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if heads is not None:
                heads.append(head)
            writer.write(response)
            await writer.drain()

    return handle


def closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])  # bound, never listening: the kernel refuses


def test_delivered_with_exact_body_and_verifiable_headers() -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            previous = generate_secret()
            extra = {"X-Tenant": "acme", "Authorization": "Bearer t0ken"}
            url = scripted(receiver, "hook")
            result = await send(url, secrets=(SECRET, previous), headers=extra)
            assert result.verdict is Verdict.DELIVERED
            assert (result.status_code, result.error, result.response_excerpt) == (
                200,
                None,
                "answer 200",
            )
            assert result.duration_ms > 0
            # The receiver takes POST only: any other method would be answered 405, unrecorded.
            [request] = receiver.arrivals
            body = request.body
            assert body == BODY
            headers = {name.lower(): value for name, value in request.header_lines}
            assert headers["content-type"] == "application/json"
            assert headers["user-agent"] == "notifyhook/test"
            assert headers["webhook-id"] == EVENT_ID
            assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
            assert headers["x-tenant"] == "acme"
            assert headers["authorization"] == "Bearer t0ken"
            # Either secret of a rotation verifies with the reference implementation.
            for secret in (SECRET, previous):
                assert standardwebhooks.Webhook(secret).verify(body, headers)["data"]["n"] == 1

    run(scenario())


def test_endpoint_headers_cannot_replace_ours() -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            forged = {"Content-Type": "text/plain", "webhook-id": "forged", "User-Agent": "x"}
            result = await send(receiver.url("hook"), headers=forged)
            assert result.verdict is Verdict.DELIVERED
            lines = receiver.arrivals[0].header_lines

            def every(name: str) -> list[str]:
                return [value for key, value in lines if key.lower() == name]

            assert every("content-type") == ["application/json"]
            assert every("webhook-id") == [EVENT_ID]
            assert every("user-agent") == ["notifyhook/test"]

    run(scenario())


def test_invalid_endpoint_header_is_permanent_and_nothing_is_sent() -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            result = await send(receiver.url("hook"), headers={"X-Evil": "a\r\nX-Injected: 1"})
            assert result.verdict is Verdict.PERMANENT
            assert "X-Evil" in (result.error or "")
            assert receiver.arrivals == []

    run(scenario())


@pytest.mark.parametrize("url", ["http://xn--/hook", "http://xn--a.example/hook"])
def test_a_malformed_punycode_host_is_a_permanent_failure(url: str) -> None:
    # The host is decoded from its xn-- form lazily; a bad one must be an outcome,
    # not an exception that leaves the delivery leased and unrecorded.
    result = run(send(url))
    assert result.verdict is Verdict.PERMANENT
    assert (result.error or "").startswith("invalid URL")


def test_each_header_once_on_the_wire() -> None:
    # The request's headers are built once, by us; nothing on the way may add a second
    # Host or Content-Length, nor frame the body differently.
    heads: list[bytes] = []

    async def scenario() -> tuple[int, AttemptResult]:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        async with raw_server(answering(answer, heads)) as (port, _):
            url = f"http://127.0.0.1:{port}/hook?a=1"
            return port, await send(url, headers={"X-Tenant": "acme"})

    port, result = run(scenario())
    assert result.verdict is Verdict.DELIVERED
    [head] = heads
    request_line, *lines = head.decode().strip().split("\r\n")
    assert request_line == "POST /hook?a=1 HTTP/1.1"
    fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
    names = [name.lower() for name, _ in fields]
    assert len(names) == len(set(names)), names
    values = dict(zip(names, (value for _, value in fields), strict=True))
    assert values["host"] == f"127.0.0.1:{port}"
    assert values["content-length"] == str(len(BODY))
    assert values["accept-encoding"] == "identity"
    assert values["x-tenant"] == "acme"
    assert "transfer-encoding" not in values
    assert "cookie" not in values


def test_every_reserved_header_is_dropped() -> None:
    # The trigger refuses these names at INSERT; a row written before a name was added
    # still sends only our value of each, or none (tests/test_endpoint_validation.py
    # keeps this list equal to the trigger's).
    heads: list[bytes] = []
    forged = {name.title(): "forged" for name in _RESERVED_HEADERS} | {"X-Tenant": "acme"}

    async def scenario() -> AttemptResult:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        async with raw_server(answering(answer, heads)) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook", headers=forged)

    result = run(scenario())
    assert result.verdict is Verdict.DELIVERED, result.error
    [head] = heads
    fields = [line.split(":", 1) for line in head.decode().strip().split("\r\n")[1:]]
    names = [name.strip().lower() for name, _ in fields]
    assert len(names) == len(set(names)), names
    assert "forged" not in [value.strip() for _, value in fields]
    # And every header we set is reserved (aiohttp's default Accept an endpoint may replace).
    assert set(names) - {"x-tenant", "accept"} <= _RESERVED_HEADERS


def test_endpoint_headers_follow_a_changed_header_set() -> None:
    # Validated endpoint headers are cached by content: whatever the set is now is what is sent.
    sets: list[dict[str, Any]] = [
        {"X-Tenant": "a"},
        {"X-Tenant": "b", "X-Region": "eu"},
        {},
        {"X-Tenant": "a"},
    ]
    refused: list[dict[str, Any]] = [
        {"X-Evil": "a\r\nX-Injected: 1"},
        {"X-Evil": "a\r\nX-Injected: 1"},  # a refusal is not remembered as valid
        {"X-Evil": ["a"]},  # JSON, so a value may be unhashable
        {"X-Evil": 1},
    ]

    async def scenario() -> None:
        async with (
            Receiver().running() as receiver,
            Sender(allow_private_networks=True, user_agent="notifyhook/test") as sender,
        ):
            for headers in sets:
                result = await sender.send(delivery(receiver.url("hook"), headers=headers))
                assert result.verdict is Verdict.DELIVERED
            for headers in refused:
                result = await sender.send(delivery(receiver.url("hook"), headers=headers))
                assert (result.verdict, result.status_code) == (Verdict.PERMANENT, None)
                assert result.error == "endpoint header 'X-Evil' is not a valid HTTP header"
            sent = [
                {k.lower(): v for k, v in request.header_lines if k.lower().startswith("x-")}
                for request in receiver.arrivals
            ]
            assert sent == [{k.lower(): v for k, v in headers.items()} for headers in sets]

    run(scenario())


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (201, Verdict.DELIVERED),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (408, Verdict.RETRY),
        (425, Verdict.RETRY),
        (429, Verdict.RETRY),
        (400, Verdict.PERMANENT),
        (404, Verdict.PERMANENT),
        (410, Verdict.GONE),
    ],
)
def test_status_classification(code: int, verdict: Verdict) -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            result = await send(scripted(receiver, "status", code))
            assert (result.verdict, result.status_code) == (verdict, code)
            assert result.error == (None if verdict is Verdict.DELIVERED else f"HTTP {code}")
            assert result.response_excerpt == f"answer {code}"
            assert result.retry_after_s is None

    run(scenario())


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_in_seconds_and_as_a_date(code: int) -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            result = await send(scripted(receiver, "seconds", code, retry_after="7"))
            assert (result.verdict, result.retry_after_s) == (Verdict.RETRY, 7.0)
            date = email.utils.format_datetime(
                datetime.now(UTC) + timedelta(seconds=7), usegmt=True
            )
            result = await send(scripted(receiver, "date", code, retry_after=date))
            assert result.retry_after_s is not None
            assert 5.0 < result.retry_after_s <= 7.0
            # Only 429 and 503 carry a meaningful Retry-After.
            result = await send(scripted(receiver, "other", 500, retry_after="7"))
            assert result.retry_after_s is None

    run(scenario())


def test_a_retry_after_date_without_the_answers_date_is_read_on_the_databases_clock() -> None:
    # The database's clock (the sender's `clock`) an hour ahead of this host's: a
    # Retry-After date 7 s after the database's now asks for 7 s, not an hour and 7 s.
    database_now = time.time() + 3600
    date = email.utils.formatdate(database_now + 7, usegmt=True)
    answer = f"HTTP/1.1 503 Busy\r\nRetry-After: {date}\r\nContent-Length: 0\r\n\r\n"

    async def scenario() -> AttemptResult:
        async with (
            raw_server(answering(answer.encode())) as (port, _),
            Sender(
                allow_private_networks=True,
                user_agent="notifyhook/test",
                clock=lambda: time.time() + 3600,
            ) as sender,
        ):
            return await sender.send(delivery(f"http://127.0.0.1:{port}/"))

    result = run(scenario())
    assert result.retry_after_s is not None
    assert 5.0 < result.retry_after_s <= 7.0, result.retry_after_s


def test_redirect_is_a_permanent_status_not_followed() -> None:
    async def scenario() -> None:
        async with Receiver().running() as receiver:
            result = await send(scripted(receiver, "moved", 301))
            assert (result.verdict, result.status_code, result.error) == (
                Verdict.PERMANENT,
                301,
                "HTTP 301",
            )
            assert [request.path for request in receiver.arrivals] == ["moved"]

    run(scenario())


def test_connections_are_kept_alive_and_cookies_are_not() -> None:
    async def scenario() -> None:
        async with (
            Receiver().running() as receiver,
            Sender(allow_private_networks=True, user_agent="notifyhook/test") as sender,
        ):
            url = scripted(receiver, "hook")  # with a Set-Cookie
            for _ in range(3):
                assert (await sender.send(delivery(url))).verdict is Verdict.DELIVERED
            assert len({request.peer for request in receiver.arrivals}) == 1
            # A receiver's Set-Cookie must not follow the next tenant's delivery to that host.
            assert all(
                key.lower() != "cookie"
                for request in receiver.arrivals
                for key, _ in request.header_lines
            )

    run(scenario())


@pytest.mark.parametrize(
    ("status", "body"),
    [("200 OK", b""), ("200 OK", b"ok"), ("503 Busy", b"b" * EXCERPT_BYTES)],
    ids=["empty", "small", "exactly the excerpt"],
)
def test_a_connection_is_reused_after_a_fully_read_answer(status: str, body: bytes) -> None:
    answer = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body)

    async def scenario() -> None:
        async with (
            raw_server(answering(answer)) as (port, accepted),
            Sender(allow_private_networks=True, user_agent="notifyhook/test") as sender,
        ):
            for _ in range(3):
                result = await sender.send(delivery(f"http://127.0.0.1:{port}/"))
                assert (result.status_code, result.response_excerpt) == (
                    int(status[:3]),
                    body.decode(),
                )
            assert len(accepted) == 1

    run(scenario())


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..b.example", ".example"])
def test_a_host_idna_cannot_encode_is_refused_not_raised(host: str) -> None:
    # Written before the endpoints trigger refused it: the IDNA codec raised a bare
    # UnicodeError out of send(), a stack trace and a Sentry report on every attempt.
    result = run(send(f"http://{host}/hook"))
    assert result.verdict is Verdict.PERMANENT
    assert result.error == (
        "invalid URL: a host name has labels of 1 to 63 characters between dots, "
        "at most 253 characters in all"
    )


def test_a_malformed_answer_is_retried_and_described_without_the_url() -> None:
    async def scenario() -> AttemptResult:
        async with raw_server(answering(b"NOT HTTP AT ALL\r\n\r\n")) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook/TOKEN?key=TOKEN")

    result = run(scenario())
    assert (result.verdict, result.status_code) == (Verdict.RETRY, None)
    assert result.error == (
        "the receiver sent a malformed response (Bad status line: Expected HTTP/, RTSP/ or ICE/)"
    )


def test_the_transport_serves_an_httpx_client() -> None:
    # The sender's transport is httpx's interface: a stock AsyncClient works over it, with a
    # streaming body, and decodes a compressed answer once (the transport passes it raw).
    compressed = gzip.compress(b"hello")
    answer = b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(compressed),
        compressed,
    )
    heads: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    async def scenario() -> None:
        async with (
            raw_server(answering(answer, heads)) as (port, _),
            httpx.AsyncClient(transport=Http11Transport()) as client,
        ):
            response = await client.post(f"http://127.0.0.1:{port}/", content=chunks())
            assert (response.status_code, response.reason_phrase) == (201, "Created")
            assert response.http_version == "HTTP/1.1"
            assert response.text == "hello"
            with pytest.raises(httpx.ConnectError) as refused:
                await client.get(f"http://127.0.0.1:{closed_port()}/")
            assert isinstance(refused.value.__cause__, ConnectionRefusedError)
        [head] = heads
        assert b"\r\ncontent-length: 4\r\n" in head.lower()
        assert b"transfer-encoding" not in head.lower()

    run(scenario())


def test_a_compressed_answer_is_kept_as_received() -> None:
    # We ask for identity; a receiver that compresses anyway is logged as it answered.
    compressed = gzip.compress(b"hello")
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(compressed),
        compressed,
    )

    async def scenario() -> AttemptResult:
        async with raw_server(answering(answer)) as (port, _):
            return await send(f"http://127.0.0.1:{port}/")

    result = run(scenario())
    assert result.verdict is Verdict.DELIVERED
    assert result.response_excerpt == compressed.decode("utf-8", errors="replace")


def test_connection_refused_is_retried() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: the kernel refuses
        result = run(send(f"http://127.0.0.1:{port}/hook"))
    assert (result.verdict, result.error, result.status_code) == (
        Verdict.RETRY,
        "connection refused",
        None,
    )


def test_connection_reset_is_retried() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Linger 0 turns close() into a RST.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def scenario() -> AttemptResult:
        async with raw_server(reset) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook")

    result = run(scenario())
    assert result.verdict is Verdict.RETRY
    assert result.error in ("connection reset", "connection closed by the server")


def test_a_server_that_never_answers_is_cut_at_the_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up and closes

    async def scenario() -> AttemptResult:
        async with raw_server(hang) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook", timeout_s=0.5)

    began = time.monotonic()
    result = run(scenario())
    assert (result.verdict, result.error) == (Verdict.RETRY, "timeout after 0.5s")
    assert 400 < result.duration_ms < 2000
    # When the request began, not when the result was made: the record writes
    # started_at from it, on the database's clock.
    assert began <= result.started_monotonic
    assert result.started_monotonic + result.duration_ms / 1000 <= time.monotonic() + 0.001


async def drip(writer: asyncio.StreamWriter, data: bytes) -> None:
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


def test_headers_dripped_slower_than_the_timeout_are_cut_at_the_total() -> None:
    # Each byte arrives well within any per-read timeout; only a total deadline stops this.
    async def slow_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await drip(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def scenario() -> AttemptResult:
        async with raw_server(slow_head) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook", timeout_s=0.5)

    result = run(scenario())
    assert (result.verdict, result.error) == (Verdict.RETRY, "timeout after 0.5s")
    assert 400 < result.duration_ms < 2000


def test_body_dripped_slower_than_the_timeout_is_cut_and_the_status_stands() -> None:
    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\n")
        await drip(writer, b"x" * 100)

    async def scenario() -> AttemptResult:
        async with raw_server(slow_body) as (port, _):
            return await send(f"http://127.0.0.1:{port}/hook", timeout_s=0.5)

    result = run(scenario())
    assert (result.verdict, result.status_code, result.error) == (Verdict.RETRY, 503, "HTTP 503")
    assert 400 < result.duration_ms < 2000
    assert result.response_excerpt
    assert set(result.response_excerpt) == {"x"}


def test_a_huge_body_is_not_read() -> None:
    sent: list[int] = []
    finished: list[bool] = []

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A small send buffer, so that what the kernel absorbs does not hide what the client read.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TEN_MB)
        chunk = b"\xc3\xa9" * 32768  # 64 KiB of UTF-8 "é"
        sent.append(0)
        while sent[-1] < TEN_MB:
            writer.write(chunk)
            await writer.drain()
            sent[-1] += len(chunk)
        finished.append(True)

    async def scenario() -> list[AttemptResult]:
        async with (
            raw_server(huge) as (port, accepted),
            Sender(allow_private_networks=True, user_agent="notifyhook/test") as sender,
        ):
            results = [await sender.send(delivery(f"http://127.0.0.1:{port}/")) for _ in range(2)]
            # The half-read connection was closed, not pooled: the second request got a new one.
            assert len(accepted) == 2
            return results

    for result in run(scenario()):
        assert (result.verdict, result.status_code) == (Verdict.DELIVERED, 200)
        assert result.response_excerpt
        assert len(result.response_excerpt) <= EXCERPT_BYTES
        assert set(result.response_excerpt) <= {"é", "\ufffd"}
    assert finished == []
    assert len(sent) == 2
    assert all(count < TEN_MB // 5 for count in sent), sent


def test_private_destinations_are_refused_without_a_connection() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async def scenario() -> None:
        async with raw_server(answer) as (port, accepted):
            hint = " address (set NOTIFYHOOK_ALLOW_PRIVATE_NETWORKS to allow)"
            for host, words in [
                ("127.0.0.1", "refused: 127.0.0.1 is a loopback" + hint),
                ("localhost", "refused: localhost resolves to"),
                ("[::ffff:127.0.0.1]", "refused: ::ffff:127.0.0.1 is a loopback" + hint),
                ("127.1", "refused: '127.1' is not a canonical IP address"),
            ]:
                result = await send(f"http://{host}:{port}/", allow_private_networks=False)
                assert result.verdict is Verdict.PERMANENT, (host, result)
                assert words in (result.error or ""), (host, result.error)
                assert result.status_code is None
            assert accepted == []
            # The same server is reachable when private networks are allowed.
            result = await send(f"http://localhost:{port}/", allow_private_networks=True)
            assert result.verdict is Verdict.DELIVERED
            assert accepted == [1]

    run(scenario())


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1/hook", "http://"]
)
def test_urls_other_than_http_are_permanent(url: str) -> None:
    result = run(send(url))
    assert result.verdict is Verdict.PERMANENT, result
    assert result.error
    assert result.error.startswith(("refused: only http and https", "invalid URL")), result.error


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("100.64.0.1", "shared (100.64.0.0/10)"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("240.0.0.1", "reserved"),
        ("93.184.216.34", None),
        ("2606:4700::1", None),
        ("::ffff:93.184.216.34", None),
        ("fec0::1", "site-local"),
        ("feff::1", "site-local"),
        ("2002:7f00:1::", "loopback (6to4)"),
        ("2002:c0a8:101::1", "private (6to4)"),
        ("2002:a9fe:a9fe::", "link-local (6to4)"),
        ("2002:808:808::1", None),
    ],
)
def test_address_classifier(address: str, reason: str | None) -> None:
    # Classification only: nothing here connects anywhere.
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("host", ["[fec0::1]", "[2002:7f00:1::]"])
def test_site_local_and_6to4_loopback_literals_are_refused(host: str) -> None:
    result = run(send(f"http://{host}:9/hook", allow_private_networks=False))
    assert result.verdict is Verdict.PERMANENT
    assert (result.error or "").startswith("refused: "), result.error


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost only: (certificate file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


@contextlib.asynccontextmanager
async def tls_server(certificate: tuple[str, str]) -> AsyncIterator[int]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = await asyncio.start_server(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), "127.0.0.1", 0, ssl=context
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_a_certificate_the_system_does_not_trust_is_a_tls_failure(
    certificate: tuple[str, str],
) -> None:
    async def scenario() -> AttemptResult:
        async with tls_server(certificate) as port:
            return await send(f"https://localhost:{port}/hook")

    result = run(scenario())
    assert result.verdict is Verdict.RETRY
    assert (result.error or "").startswith("TLS failure: "), result.error
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "")


def test_https_to_a_trusted_certificate_checks_the_host_name(certificate: tuple[str, str]) -> None:
    import ssl

    trusted = ssl.create_default_context(cafile=certificate[0])

    async def scenario() -> None:
        async with (
            tls_server(certificate) as port,
            httpx.AsyncClient(transport=Http11Transport(tls=trusted)) as client,
        ):
            for _ in range(2):
                response = await client.post(f"https://localhost:{port}/", content=b"{}")
                assert (response.status_code, response.text) == (200, "ok")
            # A name the certificate does not carry is refused, though the server is the same.
            with pytest.raises(httpx.ConnectError) as refused:
                await client.post(f"https://127.0.0.1:{port}/", content=b"{}")
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            assert "IP address mismatch" in str(refused.value.__cause__)

    run(scenario())


# -- framing of answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n",
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok!!!", True),
        (b"HTTP/1.0 200 OK\r\n\r\nok!!!", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nok!!!", False),
    ],
    ids=["chunked", "informational first", "to the end of the connection", "connection close"],
)
def test_answers_framed_every_way_are_read_and_pooled_only_when_reusable(
    answer: bytes, reused: bool
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
            if not reused:
                return  # the connection closes: the answer's end

    async def scenario() -> list[int]:
        async with (
            raw_server(handle) as (port, accepted),
            Sender(allow_private_networks=True, user_agent="notifyhook/test") as sender,
        ):
            for _ in range(3):
                result = await sender.send(delivery(f"http://127.0.0.1:{port}/"))
                assert (result.verdict, result.status_code, result.response_excerpt) == (
                    Verdict.DELIVERED,
                    200,
                    "ok!!!",
                )
            return accepted

    assert len(run(scenario())) == (1 if reused else 3)


def test_a_percent_encoded_echo_of_the_path_is_stripped_too():
    # httpx sends "/in/tökén|{x}" as "/in/t%C3%B6k%C3%A9n|%7Bx%7D", and a receiver
    # echoes what it got: the written form alone was looked for (review, session 9).
    url = "https://hooks.example/in/tökén-{x}-abcdefgh?key=QUERY TOKEN"
    sent = httpx.URL(url).raw_path.decode()
    echoed = f"Cannot POST {sent}"
    assert without_url(echoed, url, shortest=MIN_ECHOED_PATH) == "Cannot POST /<path>"
    # And the written form, as before.
    assert without_url("no route /in/tökén-{x}-abcdefgh", url) == "no route /<path>"


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({"x-a": "1\r\nx-injected: 2"}, "/"),
        ({"x-a": "1\nx-injected: 2"}, "/"),
        ({"x-a": "1\r"}, "/"),
        ({"x-a:b": "1"}, "/"),
        ({"x-a": "1"}, "/a%0d%0aX: 1"),  # percent-encoded by httpx: must go through
    ],
)
def test_the_transport_refuses_a_request_a_header_would_break(
    headers: dict[str, str], path: str
) -> None:
    # Any client of the transport, not only the sender (whose endpoint headers are checked
    # before): a CR, LF or a colon in a name never reaches the wire as a line of its own.
    heads: list[bytes] = []
    answer = b"HTTP/1.1 204 No Content\r\n\r\n"

    async def scenario() -> httpx.Response | None:
        async with (
            raw_server(answering(answer, heads)) as (port, _),
            httpx.AsyncClient(transport=Http11Transport()) as client,
        ):
            request = client.build_request("POST", f"http://127.0.0.1:{port}{path}", content=b"{}")
            for name, value in headers.items():
                request.headers.update({name: value})
            if "%0d" in path:
                return await client.send(request)
            with pytest.raises(httpx.LocalProtocolError, match="a header would break the request"):
                await client.send(request)
            return None

    response = run(scenario())
    if "%0d" in path:
        assert response is not None
        assert response.status_code == 204
        [head] = heads
        assert head.startswith(b"POST /a%0d%0aX:%201 HTTP/1.1\r\n")
    else:
        assert response is None
        assert heads == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"error": "invalid token tok_9f8e7d6c5b4a39281706"}', '{"error": "invalid token <part of the URL>"}'),
        ("No webhook 3f9a0c1e77 here", "No webhook <part of the URL> here"),
        ("bad secret s3cr3t value+with space", "bad secret <part of the URL>"),
        ("webhooks are off", "webhooks are off"),  # a short word of the path stays
        # A long word of the path stays too (review s12-rev3).
        ("subscriptions are disabled", "subscriptions are disabled"),
    ],
)  # fmt: skip
def test_a_token_of_the_url_echoed_alone_is_stripped(answer: str, expected: str) -> None:
    # A receiver that quotes one query value or one path segment of its URL: shown on the
    # dashboard's endpoint and delivery pages (review s12-rev2).
    url = (
        "https://hooks.example/webhooks/subscriptions/3f9a0c1e77/in"
        "?token=tok_9f8e7d6c5b4a39281706&s=s3cr3t%20value%2Bwith+space&v=1"
    )
    assert without_url(answer, url, shortest=MIN_ECHOED_PATH) == expected
