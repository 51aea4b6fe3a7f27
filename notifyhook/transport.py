"""httpx's transport interface on asyncio's own connections and llhttp: HTTP/1.1, kept alive.

Why our own engine (DESIGN §7: chosen by measurement). A delivery is one POST of bytes
already built and a status line read back; the client's machinery around that was most
of a worker's CPU: aiohttp's `ClientSession._request` spent about three times what
writing the request's bytes to a kept-alive connection and parsing the answer with
llhttp (httptools, the parser uvicorn uses) spends (docs/performance.md). What is left here is what a webhook needs: one
request at a time per connection, the request's bytes as httpx built them, the answer
parsed by httptools (chunked, Content-Length or to the end of the connection), a pool
of idle connections per scheme, host and port, TLS from the standard library with the
system's CAs and the host name checked. No redirects, cookies, proxies or compression:
the sender wants none of them. Deadlines are the caller's (asyncio.timeout): a
cancelled exchange closes its connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import httptools
import httpx

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""The addresses to dial for a host name and port, in order; raise OSError to refuse."""

MAX_HEAD_BYTES = 65_536
"""The most an answer's status line and headers may take; more is a malformed answer."""

_PAUSE_BYTES = 65_536
"""Body bytes buffered before reading from the socket pauses until the caller reads."""

_DEFAULT_PORTS = {b"http": 80, b"https": 443}


class MalformedResponse(httpx.RemoteProtocolError):
    """The receiver's answer broke HTTP (a bad status line or header); says how, never where."""


class ServerDisconnected(httpx.RemoteProtocolError):
    """The connection closed before the answer was complete."""


class NameResolutionError(httpx.ConnectError):
    """The host name did not resolve."""

    def __init__(self, host: str, *, request: httpx.Request) -> None:
        super().__init__(f"cannot resolve {host}", request=request)
        self.host = host


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system's resolver, in its order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_Key = tuple[bytes, str, int]


class Http11Transport(httpx.AsyncBaseTransport):
    """Sends `httpx.Request`s over HTTP/1.1 connections of its own, kept alive.

    `resolve` chooses the addresses dialled for a host name (the sender's refuses
    private ones); IP literals are dialled as they are. `tls` is the context for https
    (by default the system's CAs, the host name checked). At most `max_idle` idle
    connections are kept, each for at most `keepalive_s`. Failures are httpx's
    transport errors, raised from the original exception (an OSError's errno says
    refused or reset).
    """

    def __init__(
        self,
        *,
        resolve: Resolve = system_resolve,
        max_idle: int = 100,
        keepalive_s: float = 15.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._resolve = resolve
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._ssl = tls
        # Idle connections per (scheme, host, port), the most recently used last, and
        # all of them in the order they went idle, for evicting the oldest.
        self._idle: dict[_Key, list[_Connection]] = {}
        self._idle_order: OrderedDict[_Connection, _Key] = OrderedDict()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        # The host as sent (an internationalised name in its xn-- form), for DNS and TLS.
        host = url.raw_host.decode("ascii")
        key = (url.raw_scheme, host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 0))
        if key[0] not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        message = await _serialized(request)
        connection = self._reuse(key) or await self._connect(key, request)
        try:
            await connection.exchange(message, request)
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=_ResponseStream(connection, self, key, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": connection.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for connection in list(self._idle_order):
            connection.close()
        self._idle.clear()
        self._idle_order.clear()

    # -- the pool ------------------------------------------------------------------------

    def _reuse(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        deadline = time.monotonic() - self._keepalive_s
        while idle:
            connection = idle.pop()
            del self._idle_order[connection]
            # A connection the receiver closed while it was idle is known by now (its
            # FIN was read); one idle for too long may be closed by the receiver any
            # moment: neither is used for a request that must not be lost to the race.
            if connection.reusable and connection.idle_since > deadline:
                return connection
            connection.close()
        return None

    def release(self, key: _Key, connection: _Connection) -> None:
        """Keep a connection whose answer was read to its end; close any other."""
        if self._closed or not connection.reusable:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(connection)
        self._idle_order[connection] = key
        while len(self._idle_order) > self._max_idle:
            oldest, oldest_key = self._idle_order.popitem(last=False)
            self._idle[oldest_key].remove(oldest)
            oldest.close()

    async def _connect(self, key: _Key, request: httpx.Request) -> _Connection:
        scheme, host, port = key
        try:
            addresses = await self._resolve(host, port)
        except socket.gaierror as error:
            raise NameResolutionError(host, request=request) from error
        except OSError as error:  # a refusal of the resolver's
            raise httpx.ConnectError(str(error), request=request) from error
        tls = self._tls() if scheme == b"https" else None
        loop = asyncio.get_running_loop()
        failure: OSError | None = None
        for address in addresses:
            try:
                _, connection = await loop.create_connection(
                    _Connection, address, port, ssl=tls, server_hostname=host if tls else None
                )
            except OSError as error:
                failure = error
                continue
            return connection
        if failure is None:
            raise NameResolutionError(host, request=request)
        raise httpx.ConnectError(str(failure) or type(failure).__name__, request=request) from (
            failure
        )

    def _tls(self) -> ssl.SSLContext:
        # Made on first use: loading the system's CAs takes milliseconds.
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] | None = None
        self._more: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._head_bytes = 0
        self._header_bytes = 0
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._lost = False
        self._failure: Exception | None = None
        self._paused = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._keep_alive
            and not self._lost
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._lost = True

    async def exchange(self, message: bytes, request: httpx.Request) -> None:
        """Send the request; return once the answer's status line and headers are in."""
        assert self._transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._chunks, self._buffered, self._head_bytes, self._header_bytes = [], 0, 0, 0
        self._headers_done = self._complete = self._keep_alive = False
        self.status, self.reason, self.headers = 0, b"", []
        self._head = asyncio.get_running_loop().create_future()
        self._transport.write(message)
        try:
            await self._head
        except ServerDisconnected:
            raise ServerDisconnected(
                "the server closed the connection without answering", request=request
            ) from self._failure
        except (OSError, httptools.HttpParserError) as error:
            raise _mapped(error, self.status, request) from error

    async def next_chunk(self) -> bytes:
        """The next piece of the body as received, or b"" at its end."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._failure is not None:
                raise self._failure
            self._more = asyncio.get_running_loop().create_future()
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            await self._more
        chunk = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks, self._buffered = [], 0
        return chunk

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None or self._complete:
            # Bytes nobody asked for (before a request, or after its answer): the
            # connection's framing can no longer be trusted.
            self._fail(MalformedResponse("data after the answer"))
            return
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(error)
            return
        if self._header_bytes > MAX_HEAD_BYTES or (
            not self._headers_done and self._head_bytes > MAX_HEAD_BYTES
        ):
            self._fail(httptools.HttpParserError("Header section too large"))
            return
        if self._buffered > _PAUSE_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._headers_done and not self._complete and not self._keep_alive:
            # An answer without a length ends with its connection.
            self._complete = True
            self._wake()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._complete:
            self._fail(exc if exc is not None else ServerDisconnected("connection closed"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # Informational (100 Continue, 103 Early Hints): the answer follows.
            self.reason, self.headers = b"", []
            return
        self.status = status
        if self._header_bytes > MAX_HEAD_BYTES:
            return  # refused by data_received once the parser returns
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if not self._headers_done:  # the end of an informational answer
            return
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
        self._complete = True
        self._wake()

    # -- failing -------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            # Retrieved by exchange(), unless a cancelled caller never looks.
            self._head.exception()
        self._wake()
        self.close()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)


class _ResponseStream(httpx.AsyncByteStream):
    """The answer's body as it arrives, undecoded; closing it pools a fully read connection."""

    def __init__(
        self, connection: _Connection, pool: Http11Transport, key: _Key, request: httpx.Request
    ) -> None:
        self._connection = connection
        self._pool = pool
        self._key = key
        self._request = request

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._connection.next_chunk()
        except (OSError, httptools.HttpParserError, httpx.TransportError) as error:
            raise _mapped(error, self._connection.status, self._request) from error
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._pool.release(self._key, self._connection)


async def _serialized(request: httpx.Request) -> bytes:
    """The request's bytes: its line, its headers as given, its body."""
    stream = request.stream
    headers = request.headers.raw
    if isinstance(stream, httpx.ByteStream):
        # In memory already; joining one chunk does not copy it.
        body = b"".join(stream)
    else:
        body = await request.aread()
        # httpx framed a streaming body as chunked; these bytes go with their length.
        headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
        if not any(n.lower() == b"content-length" for n, _ in headers):
            headers.append((b"Content-Length", b"%d" % len(body)))
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    if not any(n.lower() == b"host" for n, _ in headers):
        lines.append(b"Host: " + request.url.netloc)
    lines.extend([name + b": " + value for name, value in headers])
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    # A CR or LF inside the request line, a name or a value would start a line of its own
    # (a header injected, a request smuggled), and a colon in a name would move where the
    # value starts. Checked on the whole head at once, by counting in C: a check per
    # header in Python was 5% of a worker's CPU (docs/performance.md).
    if (
        head.count(b"\n") != len(lines)
        or head.count(b"\r") != len(lines)
        or b":" in b"\n".join([name for name, _ in headers])
    ):
        raise httpx.LocalProtocolError("a header would break the request", request=request)
    return head + body


def _mapped(error: BaseException, status: int, request: httpx.Request) -> httpx.TransportError:
    if isinstance(error, httpx.TransportError):
        return error
    if isinstance(error, httptools.HttpParserError):
        where = "Bad status line" if not status else "Bad header"
        return MalformedResponse(malformed_response(f"{where}: {error}"), request=request)
    if isinstance(error, ssl.SSLError):
        return httpx.ConnectError(str(error), request=request)
    if isinstance(error, OSError):
        return httpx.ReadError(str(error) or type(error).__name__, request=request)
    return httpx.TransportError(str(error) or type(error).__name__, request=request)


def malformed_response(message: str) -> str:
    """What the parser found wrong, without the bytes it may quote: "Bad status line:
    Expected HTTP/", "Bad header: Invalid header token", "Header section too large"."""
    problems = []
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("b'", 'b"', "^")):
            continue
        problems.append(line.split(": b'")[0].split(': b"')[0].rstrip(":. "))
    problem = ": ".join(problems)[:200] or "unreadable"
    return f"the receiver sent a malformed response ({problem})"
