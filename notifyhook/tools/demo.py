"""`notifyhook demo`: PostgreSQL, a receiver, a worker and a producer, shown live, then a summary."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notifyhook import signing
from notifyhook.errors import UsageError
from notifyhook.settings import optional_database_url
from notifyhook.store import connect, fetch_dicts, json_param
from notifyhook.tools import scenario
from notifyhook.tools.cluster import find_bindir
from notifyhook.tools.demo_view import Progress, print_summary
from notifyhook.tools.receiver_process import Behaviour, Hit, PathSpec, ReceiverProcess
from notifyhook.tools.scenario import Server, start_worker, statements
from notifyhook.tools.workers import WorkerProcess

TENANT = "demo"
RETRY_SCHEDULE = (1, 2, 4)
WORKER_SETTINGS = {"RETRY_SCHEDULE": ",".join(map(str, RETRY_SCHEDULE)), "POLL_INTERVAL": "1"}
EVENT_TYPES = ("call.started", "call.completed", "invoice.paid")
EVENT_WEIGHTS = (3, 4, 3)


@dataclass(frozen=True, slots=True)
class DemoEndpoint:
    name: str
    event_types: tuple[str, ...]
    behaviour: Behaviour
    says: str
    ordered: bool = False


ENDPOINTS = (
    DemoEndpoint(
        "healthy", ("*",), Behaviour(), "answers 200 to everything; ordered (FIFO)", ordered=True
    ),
    DemoEndpoint(
        "flaky",
        ("call.*",),
        Behaviour("first-fails", status=500, share=0.5),
        "500 to the first attempt of half the deliveries, then 200",
    ),
    DemoEndpoint(
        "throttled",
        ("invoice.*",),
        Behaviour("first-fails", status=429, share=0.5, retry_after=2),
        "429 with Retry-After: 2 to the first attempt of half, then 200",
    ),
    DemoEndpoint(
        "broken",
        ("call.completed",),
        Behaviour("always", status=503),
        f"always 503: dead after {len(RETRY_SCHEDULE) + 1} attempts",
    ),
    DemoEndpoint(
        "retired",
        ("legacy.ping",),
        Behaviour("always", status=410),
        "410 Gone: dead at once, endpoint disabled",
    ),
)


def demo_command(args: argparse.Namespace) -> int:
    from notifyhook.console import run_async

    url = optional_database_url()
    if url is None:
        find_bindir()  # fail at once, naming what to install
    if args.events < 10 or args.duration <= 0:
        raise UsageError("--events must be at least 10 and --duration positive")
    directory = Path(tempfile.mkdtemp(prefix="notifyhook-demo-"))
    try:
        code = int(
            run_async(_demo(url, args.events, args.duration, directory), sigterm_as_ctrl_c=True)
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("Cleaned up: worker and receiver stopped, " + _removed(url))
    return code


def _removed(url: str | None) -> str:
    if url is None:
        return "PostgreSQL cluster stopped and its directory removed."
    return "demo database dropped."


async def _demo(url: str | None, events: int, duration: float, directory: Path) -> int:
    print("Starting PostgreSQL…" if url is None else "Making a database of our own…", flush=True)
    async with Server.open(url, "notifyhook_demo") as server:
        print(f"  {server.describe()}", flush=True)
        _, db_url = await server.create_database()
        print("  migrated (notifyhook migrate)", flush=True)
        keys = {e.name: signing.generate_secret() for e in ENDPOINTS}
        receiver = ReceiverProcess(
            {e.name: PathSpec(e.behaviour, (keys[e.name],)) for e in ENDPOINTS}
        ).start()
        worker: WorkerProcess | None = None
        try:
            ids = await _add_endpoints(db_url, receiver, keys)
            worker = start_worker(db_url, "demo-worker", directory, WORKER_SETTINGS)
            await worker.wait_ready()
            print(
                f"  worker started (pid {worker.pid}, retry schedule "
                f"{'s, '.join(map(str, RETRY_SCHEDULE))}s)",
                flush=True,
            )
            return await _show(db_url, receiver, ids, events, duration)
        except asyncio.CancelledError:
            print("\nInterrupted: removing what the demo started…", flush=True)
            raise
        finally:
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            receiver.stop()


async def _add_endpoints(
    url: str, receiver: ReceiverProcess, keys: dict[str, str]
) -> dict[str, int]:
    ids = {}
    async with connect(url) as conn:
        for endpoint in ENDPOINTS:
            params = {
                "tenant_id": TENANT,
                "name": endpoint.name,
                "url": receiver.url(endpoint.name),
                "secret": keys[endpoint.name],
                "event_types": list(endpoint.event_types),
                "extra_fields": json_param({"source": "notifyhook demo"}),
                "headers": json_param({}),
                "rate_limit": None,
                "max_in_flight": None,
                "timeout_ms": None,
                "retry_schedule": None,
            }
            ids[endpoint.name] = int((await fetch_dicts(conn, "add_endpoint", params))[0]["id"])
            if endpoint.ordered:
                await conn.execute(
                    statements()["mark_ordered"], {"endpoint_id": ids[endpoint.name]}
                )
            print(f"  endpoint {endpoint.name:<9} {endpoint.says}", flush=True)
    print(
        f"  receiver on http://127.0.0.1:{receiver.port}/ (pid {receiver.pid}), "
        "checking every signature",
        flush=True,
    )
    return ids


# -- the producer ------------------------------------------------------------------------------


class Producer:
    """Plain SQL INSERTs from a connection of its own: a trickle of small transactions over
    `duration` seconds, and a burst of many events in one INSERT a third of the way in."""

    def __init__(self, url: str, events: int, duration: float, retired_id: int) -> None:
        self._url = url
        self._duration = duration
        self._retired_id = retired_id
        self.burst = events * 2 // 5
        self.trickle = events - 1 - self.burst
        self.committed: dict[str, float] = {}
        self.done = False
        self._random = random.Random(7)

    def _types(self, count: int) -> list[str]:
        return self._random.choices(EVENT_TYPES, EVENT_WEIGHTS, k=count)

    async def run(self) -> None:
        try:
            await asyncio.gather(self._trickle(), self._burst())
        finally:
            self.done = True

    async def _trickle(self) -> None:
        async with connect(self._url) as conn:
            event_id, at = await scenario.insert_event(
                conn, TENANT, "legacy.ping", {"hello": "old friend"}, self._retired_id
            )
            self.committed[event_id] = at
            # Every tenth transaction carries three events, as an order with its items would.
            sizes = [3 if n % 10 == 9 else 1 for n in range(self.trickle)]
            while sum(sizes) > self.trickle:
                sizes.pop()
            sizes += [1] * (self.trickle - sum(sizes))

            async def insert(n: int) -> None:
                payload = {"call_id": f"call-{n}", "n": n}
                async with conn.transaction():
                    ids = [
                        (await scenario.insert_event(conn, TENANT, event_type, payload))[0]
                        for event_type in self._types(sizes[n])
                    ]
                committed_at = time.time()  # the transaction block has just committed
                self.committed.update((i, committed_at) for i in ids)

            await scenario.paced(len(sizes), len(sizes) / self._duration, insert)

    async def _burst(self) -> None:
        await asyncio.sleep(self._duration / 3)
        async with connect(self._url) as conn:
            cursor = await conn.execute(
                statements()["insert_events"],
                {"tenant_id": TENANT, "event_types": self._types(self.burst)},
            )
            ids = [str(row[0]) for row in await cursor.fetchall()]
            committed_at = time.time()
        self.committed.update((i, committed_at) for i in ids)


async def _show(
    url: str, receiver: ReceiverProcess, ids: dict[str, int], events: int, duration: float
) -> int:
    producer = Producer(url, events, duration, ids["retired"])
    print(
        f"Enqueueing {events} events with SQL INSERTs over {duration:g}s: "
        f"{producer.trickle} in small transactions, {producer.burst} in one INSERT, "
        "1 to the retired endpoint",
        flush=True,
    )
    hits: list[Hit] = []
    alerts = Alerts()
    async with connect(url) as conn, connect(url) as listening:
        await listening.execute(statements()["listen_alerts"])
        # The display is set up before the producer starts: its imports would hold up the
        # event loop, and with it the producer's reading of the clock after a COMMIT.
        with Progress() as progress:
            producing = asyncio.create_task(producer.run())
            alerting = asyncio.create_task(alerts.receive(listening))
            try:
                totals = await _follow(conn, receiver, producer, progress, hits, alerts)
                await producing
            finally:
                producing.cancel()
                alerting.cancel()
        stats = await fetch_dicts(conn, "endpoint_stats")
        dead = await scenario.fetch(conn, "dead_letter_reasons")
    print_summary(producer.committed, totals, hits, stats, dead, _says(ids), alerts.received)
    return 1 if totals["deliveries"] > totals["delivered"] + totals["dead"] else 0


async def _follow(
    conn: scenario.Connection,
    receiver: ReceiverProcess,
    producer: Producer,
    progress: Progress,
    hits: list[Hit],
    alerts: Alerts,
) -> dict[str, Any]:
    """Refresh the progress until every delivery is delivered or dead (or time runs out)."""
    give_up_at: float | None = None
    while True:
        totals = (await scenario.fetch(conn, "delivery_totals"))[0]
        hits += await asyncio.to_thread(receiver.drain)
        progress.update(len(producer.committed), totals, hits, len(alerts.received))
        if producer.done:
            give_up_at = give_up_at or time.monotonic() + 20 + 2 * sum(RETRY_SCHEDULE)
            finished = totals["delivered"] + totals["dead"] == totals["deliveries"]
            if finished or time.monotonic() > give_up_at:
                return totals
        await asyncio.sleep(0.25)


class Alerts:
    """NOTIFY notifyhook_alerts as a pager would get them, on a connection of its own."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def receive(self, listening: scenario.Connection) -> None:
        async for notification in listening.notifies():
            self.received.append(json.loads(notification.payload))


def _says(ids: dict[str, int]) -> dict[int, Sequence[str]]:
    return {ids[e.name]: (e.name, e.says) for e in ENDPOINTS}
