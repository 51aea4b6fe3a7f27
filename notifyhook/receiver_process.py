"""The demo's and the bench's receiver, in a process of its own so that it competes with the
worker for no interpreter lock; driven over a pipe: a JSON spec in, the arrivals out.

    parent ──stdin: spec (one JSON line), then "drain" lines──▶ child
    parent ◀──stdout: {"port": N}, then one JSON list of hits per "drain"── child

The child exits when its stdin closes, so it never outlives the demo or the bench.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from aiohttp import web

from notifyhook.receiver import Answer, Receiver, Script


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

_webhook_id: contextvars.ContextVar[str] = contextvars.ContextVar("webhook_id", default="")


class _PerDeliveryReceiver(Receiver):
    """A Receiver whose scripts can tell deliveries apart: aiohttp runs each request in a task
    of its own, so a context variable set here is what the script sees for this request."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        _webhook_id.set(request.headers.get("webhook-id", ""))
        return await super()._handle(request)


def _script(behaviour: Behaviour) -> Script:
    ok = Answer()
    if behaviour.kind == "slow":
        slow = Answer(kind="slow", seconds=behaviour.seconds)
        return lambda n: slow
    if behaviour.kind == "always":
        failing = Answer(status=behaviour.status)
        return lambda n: failing
    if behaviour.kind == "first-fails":
        headers = {"Retry-After": str(behaviour.retry_after)} if behaviour.retry_after else {}
        first = Answer(status=behaviour.status, headers=headers)
        seen: set[str] = set()
        threshold = int(behaviour.share * 1000)

        def first_fails(n: int) -> Answer:
            webhook_id = _webhook_id.get()
            chosen = webhook_id and uuid.UUID(webhook_id).int % 1000 < threshold
            if not chosen or webhook_id in seen:
                return ok
            seen.add(webhook_id)
            return first

        return first_fails
    return lambda n: ok


async def _serve(spec: dict[str, Any]) -> None:
    receiver = _PerDeliveryReceiver()
    for name, path in spec.items():
        receiver.script(name, _script(Behaviour(**path["behaviour"])))
        if path["secrets"]:
            receiver.trust(name, *path["secrets"])
    await receiver.start()
    _reply({"port": receiver.port})
    loop = asyncio.get_running_loop()
    try:
        while await loop.run_in_executor(None, sys.stdin.readline):
            hits = [
                (a.path, a.webhook_id, a.received_at, a.verified, a.answered)
                for a in receiver.arrivals
            ]
            receiver.arrivals.clear()
            _reply(hits)
    finally:
        await receiver.stop()


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
            [sys.executable, "-m", "notifyhook.receiver_process"],
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
