"""POST one signed webhook and turn the answer into an `AttemptResult`: the only HTTP code."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

import httpx

from notifyhook import signing
from notifyhook.delivery import AttemptResult, Delivery, Verdict
from notifyhook.errors import SecretError
from notifyhook.retry import parse_retry_after
from notifyhook.transport import (
    Http11Transport,
    MalformedResponse,
    NameResolutionError,
    ServerDisconnected,
    system_resolve,
)

EXCERPT_BYTES = 1024
"""How much of a response body is read and kept; the rest is never read."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_HeaderPairs = tuple[tuple[bytes, bytes], ...]

_ALLOW_HINT = "set NOTIFYHOOK_ALLOW_PRIVATE_NETWORKS to allow"
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
# Endpoint headers add to ours; they never replace one we set (the signature would no longer
# describe the request, or the contract's user-agent would lie) nor reframe the request.
# The endpoints trigger refuses these names, and headers these patterns refuse, at INSERT
# (notifyhook.reserved_headers() and check_headers() in sql/functions/validation.sql, which
# say why each name is reserved; tests keep the two sides equal). Here they are the second
# line, for rows written before a rule was added.
_RESERVED_HEADERS = frozenset(
    {"webhook-id", "webhook-timestamp", "webhook-signature", "user-agent", "accept-encoding"}
    | {"content-type", "content-length", "content-encoding", "transfer-encoding"}
    | {"host", "connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_RETRY_STATUSES = frozenset({408, 425, 429})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EPIPE: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}
# Failures from a half-read body: the status already decided the verdict.
_BODY_ERRORS = (TimeoutError, httpx.HTTPError, OSError)


class _Refused(OSError):
    """A request we will not send; an OSError, as the transport expects of a resolver."""


def refusal_reason(address: IPAddress) -> str | None:
    """What puts `address` off limits ("loopback", "private", …), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return refusal_reason(address.ipv4_mapped)
        # 6to4 (2002::/16) is routed to the IPv4 address it embeds: 2002:7f00:1:: is
        # 127.0.0.1 to a host with a 6to4 relay, and the ipaddress module calls it global.
        if address.sixtofour is not None:
            embedded = refusal_reason(address.sixtofour)
            return None if embedded is None else f"{embedded} (6to4)"
        # Deprecated (RFC 3879), but still routed inside some sites; not "private" to
        # the ipaddress module.
        if address.is_site_local:
            return "site-local"
    # Most specific first: 127/8, 169.254/16 and 0/8 are also "private" to the ipaddress module.
    for reason, applies in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared (100.64.0.0/10)", address in _SHARED_ADDRESS_SPACE),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if applies:
            return reason
    return None if address.is_global else "non-public"


def _check_address(address: IPAddress, subject: str) -> None:
    reason = refusal_reason(address)
    if reason is not None:
        article = "an" if reason[0] in "aeiou" else "a"
        raise _Refused(f"refused: {subject} is {article} {reason} address ({_ALLOW_HINT})")


async def _public_addresses(host: str, port: int) -> list[str]:
    """The system resolver's addresses for `host`, refused when any of them is not public.

    The transport dials the addresses returned here, so what is checked is what is
    connected to: a rebinding DNS server gets no second lookup to answer differently.
    """
    addresses = await system_resolve(host, port)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # without an IPv6 zone
        _check_address(address, f"{host} resolves to {address}, which")
    return addresses


@dataclass(frozen=True, slots=True)
class _Target:
    """An endpoint URL, parsed and checked once."""

    url: httpx.URL
    host: tuple[bytes, bytes]
    """The Host header, which httpx.Request adds only for `content=` bodies."""


class Sender:
    """Sends deliveries over one keep-alive pool: httpx's API on notifyhook.transport's engine.

    Create it inside the running event loop, and use it there only (its connections are
    that loop's).
    """

    def __init__(
        self,
        *,
        allow_private_networks: bool,
        user_agent: str,
        max_connections: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: unix seconds for `webhook-timestamp` (the worker's: the database's,
        notifyhook.clock)."""
        self._allow_private_networks = allow_private_networks
        self._clock = clock
        # The delivery of each exchange whose answer's status line is in and whose body
        # is being read, by the exchange's deadline: a stopping worker ends those reads
        # early by moving the deadlines (cut_reads_short).
        self._reading: dict[asyncio.Timeout, int] = {}
        # Set by cut_reads_short: an answer whose head comes later is cut at once too.
        self._cutting = False
        # httpx's API (Request, Response, transports) on an HTTP/1.1 engine of our own,
        # without httpx.AsyncClient: its request merging and cookie handling cost ~0.4 ms
        # of CPU per request here, as much as everything else in a delivery together
        # (docs/performance.md). Nothing it adds is wanted: no cookies (a receiver's must
        # never travel to the next tenant's endpoint on the same host), no redirects, no
        # proxies from the environment (one would be dialled instead of the checked
        # address), one deadline per attempt. Per-endpoint concurrency is the worker's
        # business: the pool keeps up to max_connections idle connections, any host.
        self._transport = Http11Transport(
            resolve=system_resolve if allow_private_networks else _public_addresses,
            max_idle=max_connections,
        )
        self._fixed_headers: _HeaderPairs = (
            (b"user-agent", user_agent.encode("ascii")),
            # The excerpt is raw bytes, so don't invite a compressed answer.
            (b"accept-encoding", b"identity"),
            (b"content-type", b"application/json"),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self._transport.aclose()

    async def send(self, delivery: Delivery) -> AttemptResult:
        """Make one attempt; every way it can end, network failures included, is a value."""
        started_monotonic = time.monotonic()
        try:
            request = self._request(delivery)
            status, retry_after_s, excerpt = await self._exchange(
                request, delivery.timeout_s, delivery.id
            )
        except TimeoutError:
            verdict, error = Verdict.RETRY, f"timeout after {delivery.timeout_s}s"
        except (httpx.HTTPError, OSError, SecretError) as failure:
            verdict, error = _describe_failure(failure)
            error = without_url(error, delivery.url)
        else:
            verdict = _status_verdict(status)
            return AttemptResult(
                verdict,
                _elapsed_ms(started_monotonic),
                status_code=status,
                error=None if verdict is Verdict.DELIVERED else f"HTTP {status}",
                # Receivers often echo the path of a request they refuse ("Cannot POST
                # /in/…"): the excerpt is read on the dashboard, which never shows it.
                response_excerpt=without_url(excerpt, delivery.url, shortest=MIN_ECHOED_PATH),
                retry_after_s=retry_after_s,
                started_monotonic=started_monotonic,
            )
        return AttemptResult(
            verdict,
            _elapsed_ms(started_monotonic),
            error=error,
            started_monotonic=started_monotonic,
        )

    def _request(self, delivery: Delivery) -> httpx.Request:
        target = _target(delivery.url, self._allow_private_networks)
        body = delivery.body
        signed = signing.webhook_headers(
            delivery.secrets, delivery.event_id, int(self._clock()), body
        )
        headers = [
            target.host,
            *_endpoint_headers(delivery.headers),
            *self._fixed_headers,
            *[(name.encode(), value.encode()) for name, value in signed.items()],
            (b"content-length", b"%d" % len(body)),
        ]
        # stream= rather than content=: httpx then takes the headers as they are instead
        # of merging its own in (Host and Content-Length, given above), which is most of
        # what a Request costs (docs/performance.md, "Costs the code's comments refer to").
        return httpx.Request("POST", target.url, headers=headers, stream=httpx.ByteStream(body))

    def cut_reads_short(self) -> set[int]:
        """End now every body still being read of an answer whose status line is in (a
        stopping worker, past its grace): those attempts end as answered, with the excerpt
        read so far. Returns their delivery ids."""
        self._cutting = True
        now = asyncio.get_running_loop().time()
        for deadline in self._reading:
            # One whose own time came in this same turn is expiring already (and may not
            # be rescheduled: RuntimeError): it ends the read as answered by itself.
            if not deadline.expired():
                deadline.reschedule(now)
        return set(self._reading.values())

    async def _exchange(
        self, request: httpx.Request, timeout_s: float, delivery_id: int
    ) -> tuple[int, float | None, str]:
        """Status, Retry-After in seconds (429 and 503 only) and body excerpt, all within
        one deadline."""
        response: httpx.Response | None = None
        body = bytearray()
        deadline = asyncio.timeout(timeout_s)
        try:
            # One deadline, not per-phase timeouts: a per-read timeout restarts at every
            # byte, so a receiver dripping its answer would hold a delivery slot indefinitely.
            # One context for both phases, too: each costs a timer on the event loop.
            async with deadline:
                response = await self._transport.handle_async_request(request)
                self._reading[deadline] = delivery_id
                if self._cutting:
                    deadline.reschedule(asyncio.get_running_loop().time())
                await _read_excerpt(response, body)
        except _BODY_ERRORS:
            if response is None:
                raise
            # The status line has decided the verdict; the body is only kept for the audit
            # log, so one cut short by the deadline or the network still counts as answered.
        finally:
            self._reading.pop(deadline, None)
            if response is not None:
                # Closing pools a connection whose answer was read to its end, and closes
                # one with a body left unread.
                await response.aclose()
        assert response is not None  # for mypy: no response means an exception above
        excerpt = body[:EXCERPT_BYTES].decode("utf-8", errors="replace")
        status = response.status_code
        # Only 429 and 503 carry a meaningful Retry-After, and a lookup in httpx.Headers
        # is not free.
        retry_after_s = None
        if status in _RETRY_AFTER_STATUSES:
            # Without the answer's Date, against the database's clock (notifyhook.clock),
            # not this host's, which may be off by hours.
            retry_after_s = parse_retry_after(
                response.headers.get("retry-after"),
                datetime.fromtimestamp(self._clock(), UTC),
                date=response.headers.get("date"),
            )
        return status, retry_after_s, excerpt


@functools.lru_cache(maxsize=signing.ENDPOINT_CACHE_SIZE)
def _target(text: str, allow_private_networks: bool) -> _Target:
    """The parsed URL, or _Refused. Cached per endpoint: parsing is ~8% of a send.

    Only literal addresses are checked here, and they cannot change; names are
    checked by the resolver at every connection, so caching never skips a lookup.
    """
    try:
        url = httpx.URL(text)
        host = url.host  # decoded from its xn-- form here, which may be malformed
    except (httpx.InvalidURL, UnicodeError) as error:
        raise _Refused(f"invalid URL: {error}") from None
    if url.scheme not in ("http", "https"):
        raise _Refused(f"refused: only http and https URLs are delivered, not {url.scheme!r}")
    if not host:
        raise _Refused("invalid URL: no host")
    _check_host_name(url.raw_host.decode("ascii", "replace"))
    if not allow_private_networks:
        _check_literal_host(host)
    return _Target(url, (b"host", url.netloc))


_NAME_RULE = "labels of 1 to 63 characters between dots, at most 253 characters in all"


def _check_host_name(host: str) -> None:
    """Refuse a host name that IDNA cannot encode: an empty label or one over 63
    characters (the codec raises a bare UnicodeError at send time), or a name over 253.
    The same rule as notifyhook.check_url_host, which refuses such URLs at INSERT."""
    if ":" in host:  # an IPv6 literal, checked by the URL parser
        return
    name = host.removesuffix(".")  # one trailing dot: a fully qualified name
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise _Refused(f"invalid URL: a host name has {_NAME_RULE}")


def _check_literal_host(host: str) -> None:
    # The transport dials IP literals without asking the resolver, so they are checked here.
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # What a socket would take for an IP literal (digits and dots, or a colon) must be one
        # we understand: legacy forms like 127.1 would otherwise reach the socket unchecked.
        if ":" in host or host.replace(".", "").isdigit():
            raise _Refused(f"refused: {host!r} is not a canonical IP address") from None
        return  # a name: the resolver checks every address it resolves to
    _check_address(address, host)


def _endpoint_headers(headers: Mapping[str, str]) -> _HeaderPairs:
    """The endpoint's own headers, validated and encoded, without those reserved to us."""
    items = tuple(headers.items())
    try:
        # Keyed by content, not by endpoint: a changed header set is a new key.
        return _cached_endpoint_headers(items)
    except TypeError:  # an unhashable value (a JSON list or object), which is refused below
        return _checked_endpoint_headers(items)


def _checked_endpoint_headers(items: tuple[tuple[str, str], ...]) -> _HeaderPairs:
    kept: list[tuple[bytes, bytes]] = []
    for name, value in items:
        # Stored as JSON, so a value may be a number; a CR/LF would inject headers.
        valid = isinstance(name, str) and isinstance(value, str)
        if not (valid and _HEADER_NAME.fullmatch(name) and _HEADER_VALUE.fullmatch(value)):
            raise _Refused(f"endpoint header {name!r} is not a valid HTTP header")
        if name.lower() not in _RESERVED_HEADERS:
            kept.append((name.encode("ascii"), value.encode("ascii")))
    return tuple(kept)


# Cached: endpoints are few, and their headers change rarely. Only valid sets are kept
# (a refusal is an exception, which lru_cache does not store), and only str equals str,
# so a cached set never answers for a different one.
_cached_endpoint_headers = functools.lru_cache(maxsize=4096)(_checked_endpoint_headers)


async def _read_excerpt(response: httpx.Response, into: bytearray) -> None:
    # Stop at the limit: a 10 MB answer must cost neither the memory nor the time to read it.
    # The transport's stream itself, not aiter_raw(): the same raw bytes, without the
    # re-chunking and state keeping aiter_raw adds (a third of what httpx costs a send).
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)  # what an async transport returns
    async for chunk in stream:
        into += chunk
        if len(into) >= EXCERPT_BYTES:
            return


def _status_verdict(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 410:
        return Verdict.GONE
    if status in _RETRY_STATUSES or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.PERMANENT


def _describe_failure(failure: BaseException) -> tuple[Verdict, str]:
    """The verdict and a short reason for a failed exchange, read from its chain of causes."""
    # The transport's httpx errors are coarse (a reset is a ReadError), so the original
    # exceptions further down the chain are what tell us what happened. A refusal is
    # looked for first: the resolver's comes wrapped in a connection error.
    causes = _causes(failure)
    if refusal := _first(causes, _Refused):
        return Verdict.PERMANENT, str(refusal)
    if secret_error := _first(causes, SecretError):
        return Verdict.PERMANENT, f"cannot sign: {secret_error}"
    if _first(causes, httpx.UnsupportedProtocol):
        return Verdict.PERMANENT, "invalid URL: the HTTP client cannot send to it"
    if dns_error := _first(causes, NameResolutionError):
        return Verdict.RETRY, f"DNS lookup failed for {getattr(dns_error, 'host', 'the host')}"
    if tls_error := _first(causes, ssl.SSLError):
        return Verdict.RETRY, f"TLS failure: {tls_error}"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in _ERRNO_REASONS:
            return Verdict.RETRY, _ERRNO_REASONS[cause.errno]
    if _first(causes, ServerDisconnected):
        return Verdict.RETRY, "connection closed by the server"
    if malformed := _first(causes, MalformedResponse):
        return Verdict.RETRY, str(malformed)
    return Verdict.RETRY, f"network error: {failure or type(failure).__name__}"


def _first(
    causes: list[BaseException], kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    return next((cause for cause in causes if isinstance(cause, kinds)), None)


def _causes(failure: BaseException) -> list[BaseException]:
    causes: list[BaseException] = []
    current: BaseException | None = failure
    while current is not None and current not in causes and len(causes) < 10:
        causes.append(current)
        current = current.__cause__ or current.__context__
    return causes


MIN_ECHOED_PATH = 8
"""Shortest path that without_url replaces when it appears without its query, or in a
receiver's answer."""


def without_url(text: str, url: str, *, shortest: int = 2) -> str:
    """`text` (an error, a response's excerpt) without the endpoint's URL, nor its path
    and query: they may hold tokens, and attempts, dead_letters, the dashboard and the log
    are read by more people than the endpoint's owner. For errors, a second line behind
    the descriptions above, for texts they do not foresee. A path shorter than `shortest`
    is left: in a receiver's answer a short one ("hooks") would replace common words."""
    if url in text:
        text = text.replace(url, "<the endpoint's URL>")
    for path_and_query in _paths_and_queries(url):
        if len(path_and_query) >= shortest and path_and_query in text:
            text = text.replace(path_and_query, "<path>")
        # The path without its query, and the query without its path, as a receiver
        # echoes them; only long ones, which may be tokens.
        path, _, query = path_and_query.partition("?")
        for part in (path, query):
            if len(part) >= max(shortest, MIN_ECHOED_PATH) and part in text:
                text = text.replace(part, "<path>")
    # And a token alone: "invalid token tok_9f8e…" is a common 401 body (review s12-rev2).
    for piece in url_pieces(url):
        if piece in text:
            text = text.replace(piece, "<part of the URL>")
    return text


def _token_like(piece: str) -> bool:
    """A token rather than a word a receiver would write anyway ("subscriptions"): at
    least MIN_ECHOED_PATH characters, with a digit or with capitals inside it."""
    if len(piece) < MIN_ECHOED_PATH:
        return False
    return any(c.isdigit() for c in piece) or sum(c.isupper() for c in piece[1:]) >= 2


@functools.lru_cache(maxsize=signing.ENDPOINT_CACHE_SIZE)
def url_pieces(url: str) -> tuple[str, ...]:
    """The path's segments and the query's values that may be tokens, as written, as sent
    and percent-decoded; the longest first, so that none is cut by a shorter one."""
    pieces: set[str] = set()
    for path_and_query in _paths_and_queries(url):
        path, _, query = path_and_query.partition("?")
        values = [pair.partition("=")[2] for pair in query.split("&")]
        for piece in (*path.split("/"), *values):
            pieces.update((piece, urllib.parse.unquote(piece), urllib.parse.unquote_plus(piece)))
    return tuple(sorted((p for p in pieces if _token_like(p)), key=len, reverse=True))


@functools.lru_cache(maxsize=signing.ENDPOINT_CACHE_SIZE)
def _paths_and_queries(url: str) -> tuple[str, ...]:
    """What follows the host, without the leading slash: as written, and as sent when
    that differs (httpx percent-encodes "{", "|", spaces and non-ASCII, and a receiver
    echoes what it got). A query alone counts (https://hooks.example?token=…, sent as
    "POST /?token=…"). Cached: an excerpt of every answer is checked against it."""
    after_scheme = url.split("://", 1)[-1]
    ends = [i for i in (after_scheme.find("/"), after_scheme.find("?")) if i >= 0]
    written = after_scheme[min(ends) :].lstrip("/") if ends else ""
    try:
        sent = httpx.URL(url).raw_path.decode("ascii").lstrip("/")
    except (httpx.InvalidURL, UnicodeDecodeError):
        return (written,)
    return (written,) if sent in (written, "") else (written, sent)


def _elapsed_ms(started_monotonic: float) -> float:
    return (time.monotonic() - started_monotonic) * 1000
