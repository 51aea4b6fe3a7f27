"""httpx's transport interface on aiohttp's engine, doing per request only what a webhook needs.

httpx-aiohttp's general-purpose transport builds a `ClientTimeout`, converts the headers
and goes through aiohttp's context managers for every request; with httpx's own header
normalising that was ~15% of a worker's CPU, against 24% for aiohttp's request machinery
itself (docs/performance.md). This one passes the request's bytes through and leaves
everything else (timeouts, pool limits, cookies, proxies) to the session it is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx

# Most specific first: aiohttp's exception classes inherit from one another.
_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.TimeoutException),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.NetworkError),
)
_TRANSFER_ENCODING = "transfer-encoding"


class MalformedResponse(httpx.RemoteProtocolError):
    """The receiver's answer broke HTTP (a bad status line or header); says how, never where."""


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends `httpx.Request`s over an `aiohttp.ClientSession`, as HTTP/1.1.

    What the session is configured with applies to every request: its connector's
    pool and resolver, its cookie jar, its timeouts. Redirects are never followed. The
    request body is sent from memory (a streaming one is read first). The response's
    stream yields the body as it arrives on the wire, undecoded; closing it returns a
    fully read connection to the pool and closes one that is not.
    Failures are httpx's transport errors, raised from aiohttp's original exception.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body, headers = await _body_and_headers(request)
        try:
            # _request, not request(): the context manager request() wraps it in is not
            # needed to await it, and costs a little for each request.
            response = await self._session._request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                # httpx.Response decodes a Content-Encoding itself: its stream is the raw body.
                auto_decompress=False,
            )
        except aiohttp.ClientError as error:
            raise _mapped(error, request) from error
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("ascii", "replace"),
            },
        )

    async def aclose(self) -> None:
        await self._session.close()


class _ResponseStream(httpx.AsyncByteStream):
    """The response body as aiohttp receives it, undecoded.

    Its own iterator rather than an async generator: a generator left unfinished (the
    reader stopped at what it wanted) lingers until the event loop finalises it, and
    each one costs a registration with the loop's generator hooks.
    """

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except aiohttp.ClientError as error:
            raise _mapped(error, self._request) from error
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        # release() first: it cancels a request body still being written (the receiver
        # answered early), which wait_for_close() would otherwise wait for. aiohttp
        # pools the connection only if the body was read to its end.
        self._response.release()
        await self._response.wait_for_close()


async def _body_and_headers(request: httpx.Request) -> tuple[bytes, list[tuple[str, str]]]:
    headers = _text_headers(request)
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):
        # In memory already, and joining one chunk does not copy it. request.read() would
        # return the same after an isinstance check against typing.Iterable that costs
        # more than the join.
        return b"".join(stream), headers
    body = await request.aread()
    # httpx framed the streaming body as chunked; aiohttp gives these bytes a length.
    return body, [(name, value) for name, value in headers if name.lower() != _TRANSFER_ENCODING]


def _text_headers(request: httpx.Request) -> list[tuple[str, str]]:
    """The request's headers as aiohttp takes them: names as given, values as sent."""
    try:
        # UTF-8 round-trips: aiohttp encodes header text as UTF-8 (ASCII, in practice).
        return [(name.decode(), value.decode()) for name, value in request.headers.raw]
    except UnicodeDecodeError:
        raise httpx.LocalProtocolError(
            "header bytes that are not UTF-8 cannot be sent", request=request
        ) from None


def _mapped(error: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    if type(error) is aiohttp.ClientResponseError:
        # Its text ends with url='…', the endpoint's whole URL with any token in its
        # path or query: that must not reach attempts.error or a log (DESIGN §8).
        return MalformedResponse(malformed_response(error.message), request=request)
    kind = next((to for origin, to in _ERROR_MAP if isinstance(error, origin)), None)
    return (kind or httpx.TransportError)(str(error) or type(error).__name__, request=request)


def malformed_response(message: str) -> str:
    """What aiohttp's parser found wrong, without the bytes it quotes: "Bad status line:
    Invalid status code", "Invalid header token", "Got more than 8190 bytes when reading"."""
    problems = []
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("b'", 'b"', "^")):
            continue
        problems.append(line.split(": b'")[0].split(': b"')[0].rstrip(":. "))
    problem = ": ".join(problems)[:200] or "unreadable"
    return f"the receiver sent a malformed response ({problem})"
