"""The demo's and the bench's receiver, in a process of its own so that it competes with the
worker for no interpreter lock; driven over a pipe: a JSON spec in, the arrivals out.

    parent ──stdin: spec (one JSON line), then "drain" lines──▶ child
    parent ◀──stdout: {"port": N}, then one JSON list of hits per "drain"── child

The child exits when its stdin closes, so it never outlives the demo or the bench.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import IO, Any, cast
from urllib.parse import unquote

from notifyhook import signing


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How one path answers. kind: ok, slow (after `seconds`), always (`status`), or
    first-fails: `status` (with `retry_after`) on the first attempt of a `share` of the
    deliveries, chosen by their webhook-id, then 200."""

    kind: str = "ok"
    status: int = 200
    seconds: float = 0.0
    share: float = 1.0
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class PathSpec:
    behaviour: Behaviour = field(default_factory=Behaviour)
    secrets: tuple[str, ...] = ()
    """Verify requests to this path with these; none: not checked."""


@dataclass(frozen=True, slots=True)
class Hit:
    """One request as the receiver saw it (the slim form of receiver.Arrival)."""

    path: str
    webhook_id: str
    received_at: float
    verified: bool | None
    answered: int | None


# -- the child ---------------------------------------------------------------------------
#
# A bare HTTP/1.1 server on asyncio.Protocol rather than aiohttp's: the receiver shares the
# bench machine's two cores with the worker and PostgreSQL it measures, and aiohttp's server
# spent over three times its CPU per request (docs/performance.md). It speaks only what
# the workers' client sends: keep-alive, bodies with a Content-Length, one request at a
# time per connection (several in one read are still answered in order).
#
# Answering needs only the request's framing and its path (and for first-fails its
# webhook-id); the signature is checked afterwards, for many requests in one go (see
# _Receiver.check).

_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024
"""What aiohttp's receiver accepted (client_max_size); the workers send at most 256 KiB."""
_CHECK_AFTER_S = 0.02
_CHECK_AT_MOST = 32
"""Requests checked in one go, at most: bounds the pause in reading (about a millisecond)
and the bodies held."""
_SIGNED = {
    name: b"\r\n" + name.encode() + b":"
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
}
"""The headers signing.verify reads, each as found in a lowered head (see _field)."""


class _Answer:
    """One way of answering, its bytes built once: answering a request is then one write."""

    __slots__ = ("closing", "delay", "keeping", "status")

    def __init__(self, status: int = 200, delay: float = 0.0, headers: str = "") -> None:
        self.status = status
        self.delay = delay
        """Seconds to wait before answering (slow)."""
        self.keeping = _response(status, headers)
        self.closing = _response(status, headers + "Connection: close\r\n")


def _response(status: int, headers: str) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    body = b"ok" if status < 300 else b"no"  # as aiohttp's receiver answered
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode("latin-1") + body


_OK = _Answer()
_BAD_REQUEST = _Answer(400)
_NOT_FOUND = _Answer(404)
_NOT_ALLOWED = _Answer(405, headers="Allow: POST\r\n")
_LENGTH_REQUIRED = _Answer(411)
_TOO_LARGE = _Answer(413)
_HEAD_TOO_LARGE = _Answer(431)

_Script = Callable[[bytes], _Answer]
"""Given a request's head, how to answer it."""


def _script(behaviour: Behaviour) -> _Script:
    if behaviour.kind == "slow":
        slow = _Answer(delay=behaviour.seconds)
        return lambda head: slow
    if behaviour.kind == "always":
        failing = _Answer(behaviour.status)
        return lambda head: failing
    if behaviour.kind == "first-fails":
        return _first_fails(behaviour)
    return lambda head: _OK


def _first_fails(behaviour: Behaviour) -> _Script:
    retry_after = f"Retry-After: {behaviour.retry_after}\r\n" if behaviour.retry_after else ""
    first = _Answer(behaviour.status, headers=retry_after)
    seen: set[str] = set()
    threshold = int(behaviour.share * 1000)

    def first_fails(head: bytes) -> _Answer:
        webhook_id = _field(head, head.lower(), _SIGNED["webhook-id"]) or ""
        if webhook_id in seen or not _chosen(webhook_id, threshold):
            return _OK
        seen.add(webhook_id)
        return first

    return first_fails


def _chosen(webhook_id: str, threshold: int) -> bool:
    # By the id rather than at random, so that a delivery's retries are told apart from
    # other deliveries and the share is the same from one run to the next.
    try:
        return uuid.UUID(webhook_id).int % 1000 < threshold
    except ValueError:
        return False  # no webhook-id, or not a delivery's


@dataclass(frozen=True, slots=True)
class _Path:
    script: _Script
    secrets: tuple[str, ...]


# Any other /{name} is answered 200 and recorded unchecked, as aiohttp's receiver did.
_UNKNOWN = _Path(lambda head: _OK, ())


# -- reading requests


@dataclass(slots=True)
class _Request:
    """What answering a request needs from its head, and the head itself."""

    # Not frozen: a frozen dataclass sets each field through object.__setattr__, a cost
    # paid on every request.
    method: str
    target: str
    length: int
    """Of the body."""
    keep_alive: bool
    head: bytes
    """Request line and header lines, for checking the signature later."""


class _Refused(Exception):
    """A request that cannot be read: answer this, then close the connection."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


def _parse_head(head: bytes) -> _Request:
    request_line = head.partition(b"\r\n")[0]
    method, _, rest = request_line.decode("latin-1").partition(" ")
    target, _, version = rest.partition(" ")
    if not version.startswith("HTTP/1."):  # a malformed request line lands here too
        raise _Refused(_BAD_REQUEST)
    # Header names match in any case; bytes.lower() changes ASCII letters only, so offsets
    # found in the lowered copy hold in the original (whose values keep their case).
    lowered = head.lower()
    if lowered.find(b"\r\ntransfer-encoding:") >= 0:
        raise _Refused(_BAD_REQUEST)  # chunked bodies are refused: the workers never send one
    return _Request(
        method,
        target,
        _body_length(method, _field(head, lowered, b"\r\ncontent-length:")),
        _keep_alive(version, _field(head, lowered, b"\r\nconnection:")),
        head,
    )


def _field(head: bytes, lowered: bytes, name: bytes) -> str | None:
    """The value of the first header `name` (given as CRLF, lower-case name, colon)."""
    start = lowered.find(name)
    if start < 0:
        return None
    start += len(name)
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip().decode("latin-1")


def _body_length(method: str, content_length: str | None) -> int:
    if content_length is None:
        if method == "POST":
            raise _Refused(_LENGTH_REQUIRED)
        return 0
    if not (content_length.isascii() and content_length.isdigit()):
        raise _Refused(_BAD_REQUEST)
    length = int(content_length)
    if length > _MAX_BODY:
        raise _Refused(_TOO_LARGE)
    return length


def _keep_alive(version: str, connection: str | None) -> bool:
    if connection is None:  # the usual case: HTTP/1.1's default
        return version != "HTTP/1.0"
    tokens = {t.strip() for t in connection.lower().split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _path_name(target: str) -> str | None:
    """The name in /{name}[?query]; None when the target has no such form (404)."""
    path = target.partition("?")[0]
    if not path.startswith("/"):
        return None
    name = unquote(path[1:]) if "%" in path else path[1:]
    return name if name and "/" not in name else None


# -- checking and recording

_Row = tuple[str, str, float, bool | None, int]
"""A Hit as it crosses the pipe."""
_Unchecked = tuple[str, float, int, tuple[str, ...], bytes, bytes]
"""A Hit's path, received_at and answered, then the path's secrets, the request's head and
body."""


def _verify(secrets: tuple[str, ...], headers: dict[str, str], body: bytes) -> bool | None:
    return signing.verified_by_any(secrets, headers, body) if secrets else None


def _signature_headers(head: bytes) -> dict[str, str]:
    """The headers signing.verify reads (webhook-id among them); one missing is left out,
    for it to say so."""
    lowered = head.lower()
    headers = {}
    for name, marker in _SIGNED.items():
        value = _field(head, lowered, marker)
        if value is not None:
            headers[name] = value
    return headers


class _Receiver:
    """What requests mean: their path's answers, their signatures checked, rows recorded."""

    def __init__(self, paths: dict[str, _Path], loop: asyncio.AbstractEventLoop) -> None:
        self.paths = paths
        self.connections: set[_Connection] = set()
        self._loop = loop
        self._unchecked: list[_Unchecked] = []
        self._check_timer: asyncio.TimerHandle | None = None
        self._hits: list[_Row] = []

    def handle(self, request: _Request, body: bytes) -> _Answer:
        # Latency figures run up to here: the request is read, nothing checked yet.
        received_at = time.time()
        if request.method != "POST":
            return _NOT_ALLOWED
        name = _path_name(request.target)
        if name is None:
            return _NOT_FOUND
        path = self.paths.get(name, _UNKNOWN)
        answer = path.script(request.head)
        self._unchecked.append((name, received_at, answer.status, path.secrets, request.head, body))
        if len(self._unchecked) >= _CHECK_AT_MOST:
            self.check()
        elif self._check_timer is None:
            self._check_timer = self._loop.call_later(_CHECK_AFTER_S, self.check)
        return answer

    def check(self) -> None:
        """Check the signatures of the requests since the last check and record them.

        In one go rather than as each request is answered: back to back, the checks find the
        CPU's caches warm rather than cooled by the client that ran in between (measured
        with a client like the bench's ceiling scenario: docs/performance.md). The cost of
        signing.verify itself is then most of what is left above the event loop's and the
        kernel's."""
        if self._check_timer is not None:
            self._check_timer.cancel()
            self._check_timer = None
        for name, received_at, status, secrets, head, body in self._unchecked:
            headers = _signature_headers(head)
            verified = _verify(secrets, headers, body)
            webhook_id = headers.get("webhook-id", "")
            self._hits.append((name, webhook_id, received_at, verified, status))
        self._unchecked.clear()

    def drain(self) -> list[_Row]:
        """Every request received since the last drain."""
        self.check()
        hits, self._hits = self._hits, []
        return hits


# -- connections


class _Connection(asyncio.Protocol):
    """One client connection: bytes in, requests out to the receiver, its answers back."""

    def __init__(self, receiver: _Receiver) -> None:
        self._receiver = receiver
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._request: _Request | None = None
        """A request whose body is still arriving."""
        self._later: asyncio.TimerHandle | None = None
        """A slow answer's timer: nothing more is answered on this connection until it fires."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self._receiver.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A client that leaves mid-request or before a slow answer is no error: the demo and
        # the bench stop their workers while requests are in flight.
        self._transport = None
        self._receiver.connections.discard(self)
        if self._later is not None:
            self._later.cancel()
            self._later = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve()

    def _serve(self) -> None:
        """Answer each complete request buffered, in order, until one must wait."""
        while self._later is None and self._open():
            try:
                taken = self._next_request()
            except _Refused as refused:
                self._send(refused.answer, keep_alive=False)
                return
            if taken is None:
                return
            request, body = taken
            answer = self._receiver.handle(request, body)
            keep_alive = request.keep_alive
            if answer.delay > 0:
                # A timer rather than a sleeping task: other connections go on being served.
                loop = asyncio.get_running_loop()
                self._later = loop.call_later(answer.delay, self._answer_late, answer, keep_alive)
            else:
                self._send(answer, keep_alive)

    def _open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _next_request(self) -> tuple[_Request, bytes] | None:
        """The next complete request in the buffer, taken out of it; None until there is one."""
        if self._request is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    raise _Refused(_HEAD_TOO_LARGE)
                return None
            self._request = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
        request = self._request
        if len(self._buffer) < request.length:
            return None
        body = bytes(self._buffer[: request.length])
        del self._buffer[: request.length]
        self._request = None
        return request, body

    def _answer_late(self, answer: _Answer, keep_alive: bool) -> None:
        self._later = None
        self._send(answer, keep_alive)
        self._serve()  # whatever arrived meanwhile

    def _send(self, answer: _Answer, keep_alive: bool) -> None:
        if not self._open():
            return  # the client has gone
        assert self._transport is not None
        self._transport.write(answer.keeping if keep_alive else answer.closing)
        if not keep_alive:
            self._transport.close()  # after what is written has been sent


async def _serve(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    paths = {
        name: _Path(_script(Behaviour(**path["behaviour"])), tuple(path["secrets"]))
        for name, path in spec.items()
    }
    receiver = _Receiver(paths, loop)
    server = await loop.create_server(lambda: _Connection(receiver), "127.0.0.1", 0, backlog=1024)
    _reply({"port": server.sockets[0].getsockname()[1]})
    try:
        while await loop.run_in_executor(None, sys.stdin.readline):
            _reply(receiver.drain())
    finally:
        server.close()
        for connection in list(receiver.connections):
            connection.abort()
        await server.wait_closed()


def _reply(value: Any) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(spec))
    else:
        uvloop.run(_serve(spec))


# -- the parent --------------------------------------------------------------------------


class ReceiverProcess:
    """Start the receiver child, learn its port, fetch what it received."""

    def __init__(self, paths: dict[str, PathSpec]) -> None:
        self._spec = {
            name: {"behaviour": asdict(p.behaviour), "secrets": list(p.secrets)}
            for name, p in paths.items()
        }
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> ReceiverProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "notifyhook.tools.receiver_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Its own session: a Ctrl-C meant for the demo is the demo's to handle.
            start_new_session=True,
        )
        self.port = int(self._exchange(json.dumps(self._spec))["port"])
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def drain(self) -> list[Hit]:
        """Every request received since the last drain."""
        return [Hit(*row) for row in self._exchange("drain")]

    def _exchange(self, line: str) -> Any:
        assert self._process is not None
        stdin: IO[str] | None = self._process.stdin
        stdout: IO[str] | None = self._process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(line + "\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the receiver process exited ({self._process.poll()})")
        return json.loads(answer)

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            if self._process.stdin is not None:
                self._process.stdin.close()
            self._process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait(5)
        finally:
            if self._process.stdout is not None:
                self._process.stdout.close()


if __name__ == "__main__":
    main()
