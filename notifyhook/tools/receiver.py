"""An HTTP receiver on 127.0.0.1 for the tests and the chaos run: verifies, records, misbehaves on cue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from notifyhook import signing


@dataclass(frozen=True, slots=True)
class Answer:
    """How to answer one request. `kind`: status, hang, reset, slow, big, raw, drip."""

    kind: str = "status"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    """hang: how long to hang; slow: how long before answering; drip: how long the body
    takes to end after the status line and headers are sent."""
    size: int = 0
    """big: bytes of body to send."""
    body: bytes | None = None
    """status: the body to answer with (default "ok" or "no"); raw: the bytes to send as
    they are, status line and headers included, before closing the connection (for an
    answer no HTTP server would write)."""


OK = Answer()


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request as the receiver saw it."""

    path: str
    webhook_id: str
    received_at: float
    """time.time() when the request was read."""
    headers: dict[str, str]
    """The first value of each header name; `header_lines` has every one, in order."""
    body: bytes
    verified: bool | None
    """Signature checked against the path's secret: True, False, or None when no secret is known."""
    answered: int | None
    """The status sent back; None for hang, reset and raw."""
    peer: tuple[str, int] | None = None
    """The client's address and port: one connection or several."""
    header_lines: tuple[tuple[str, str], ...] = ()
    """Every header as sent, a name repeated as often as it came."""


Script = Callable[[int], Answer]
"""Given how many requests this path has had before (0, 1, …), how to answer this one."""


class Receiver:
    """An aiohttp server: POST /{name} is answered by the script for `name` (200 by default).

    In a thread of its own (`start_in_thread`) for synchronous callers, or on the
    caller's loop (`running`). The demo and the bench use receiver_process instead: a
    process of its own, with a bare HTTP server that spends less CPU per request
    (docs/performance.md), and fewer answers."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self._scripts: dict[str, Script] = {}
        self._secrets: dict[str, list[str]] = {}
        self._counts: dict[str, int] = {}
        self.heads_sent: list[str] = []
        """The paths of drip answers whose status line and headers have left."""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def script(self, name: str, script: Script) -> None:
        self._scripts[name] = script

    def sequence(self, name: str, *answers: Answer) -> None:
        """Answer `name` with these in turn, then the last one forever."""
        self._scripts[name] = lambda n: answers[min(n, len(answers) - 1)]

    def trust(self, name: str, *secrets: str) -> None:
        """Verify requests to `name` against any of these secrets."""
        self._secrets[name] = list(secrets)

    def received(self, name: str | None = None) -> list[Arrival]:
        return [a for a in list(self.arrivals) if name is None or a.path == name]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        count = self._counts.get(name, 0)
        self._counts[name] = count + 1
        script = self._scripts.get(name)
        answer = script(count) if script is not None else OK
        headers = dict(request.headers)
        self.arrivals.append(
            Arrival(
                path=name,
                webhook_id=headers.get("webhook-id", headers.get("Webhook-Id", "")),
                received_at=time.time(),
                headers=headers,
                body=body,
                verified=self._verify(name, headers, body),
                answered=answer.status
                if answer.kind in ("status", "slow", "big", "drip")
                else None,
                peer=request.transport.get_extra_info("peername") if request.transport else None,
                header_lines=tuple(request.headers.items()),
            )
        )
        return await self._answer(request, answer)

    def _verify(self, name: str, headers: dict[str, str], body: bytes) -> bool | None:
        candidates = self._secrets.get(name)
        return signing.verified_by_any(candidates, headers, body) if candidates else None

    async def _answer(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        if answer.kind == "hang":
            await asyncio.sleep(answer.seconds or 3600)
        elif answer.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        elif answer.kind == "raw":
            assert request.transport is not None
            request.transport.write(answer.body or b"")
            request.transport.close()  # once the bytes are sent; aiohttp's answer goes nowhere
            return web.Response()
        elif answer.kind == "slow":
            await asyncio.sleep(answer.seconds)
        elif answer.kind == "drip":
            # The status line, the headers and a first byte now; the rest of the body
            # after `seconds`: an answer whose status is in while its body still comes.
            response = web.StreamResponse(status=answer.status, headers=answer.headers)
            await response.prepare(request)
            await response.write(b"o")
            self.heads_sent.append(request.match_info["name"])
            await asyncio.sleep(answer.seconds)
            await response.write(b"k")
            await response.write_eof()
            return response
        elif answer.kind == "big":
            response = web.StreamResponse(status=answer.status, headers=answer.headers)
            await response.prepare(request)
            chunk = b"x" * 65536
            for _ in range(answer.size // len(chunk)):
                await response.write(chunk)
            return response
        if answer.body is not None:
            return web.Response(status=answer.status, headers=answer.headers, body=answer.body)
        return web.Response(
            status=answer.status, headers=answer.headers, text="ok" if answer.status < 300 else "no"
        )

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        # A name may hold slashes: Sentry's ingest is /api/<project>/envelope/ (tests/test_reporting.py).
        app.router.add_post("/{name:.+}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Receiver]:
        """Serve on the caller's event loop for the block (for async callers)."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def start_in_thread(self) -> Receiver:
        """Run on its own event loop in a daemon thread (for synchronous callers: the tests, the chaos run)."""
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            # Handlers still hanging past the runner's shutdown_timeout: cancel them and
            # let them finish, rather than leave them to be destroyed with the loop.
            self._loop.run_until_complete(_cancel(asyncio.all_tasks(self._loop)))
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the receiver did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            # Clean up on the receiver's own loop first, so hanging handlers are
            # cancelled rather than destroyed with the loop.
            asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _cancel(tasks: set[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
