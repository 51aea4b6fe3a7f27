"""What the bench's scenarios share: sizes, results, and a context with the server, the
receiver and helpers to make databases, start workers and collect what arrived."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from notifyhook import scenario, signing
from notifyhook.receiver_process import Behaviour, Hit, PathSpec, ReceiverProcess
from notifyhook.scenario import ScenarioError, Server, WorkerProcess, fetch, statements
from notifyhook.store import DatabaseError, connect, fetch_dicts, json_param
from notifyhook.usage import Meter, Usage

SECRET = signing.generate_secret()
"""One secret for every bench endpoint, so that the receiver checks one HMAC per request."""
FAST, SLOW, CEILING_PATH = "fast", "slow", "ceiling"
SLOW_S = 2.0
TENANTS = [f"bench-{n}" for n in range(10)]


def receiver_paths() -> dict[str, PathSpec]:
    return {
        FAST: PathSpec(Behaviour(), (SECRET,)),
        SLOW: PathSpec(Behaviour("slow", seconds=SLOW_S), (SECRET,)),
        CEILING_PATH: PathSpec(Behaviour(), (SECRET,)),
    }


@dataclass(frozen=True, slots=True)
class Size:
    """How big each scenario is; the defaults are the full bench."""

    backlog: int = 20_000
    latency_s: float = 10.0
    idle_s: float = 20.0
    idle_poll_s: float = 5.0
    noisy_slow: int = 10_000
    noisy_fast: int = 1_000
    history: int = 1_000_000
    ceiling: int = 20_000

    def scaled(self, factor: float) -> Size:
        def count(n: int) -> int:
            return max(10, round(n * factor))

        return replace(
            self,
            backlog=count(self.backlog),
            latency_s=max(1.0, self.latency_s * factor),
            idle_s=max(2.0, self.idle_s * factor),
            noisy_slow=count(self.noisy_slow),
            noisy_fast=count(self.noisy_fast),
            history=count(self.history),
            ceiling=count(self.ceiling),
        )


@dataclass(slots=True)
class Result:
    """One line of the report."""

    scenario: str
    case: str
    summary: str
    target: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    usage: Usage | None = None
    peak_rss_bytes: int | None = None
    note: str = ""


class Bench:
    """What every scenario needs: the server, the receiver, a scratch directory, the sizes."""

    def __init__(
        self,
        server: Server,
        receiver: ReceiverProcess,
        directory: Path,
        size: Size,
        workers: int,
        progress: Callable[[str], None],
    ) -> None:
        self.server = server
        self.receiver = receiver
        self.directory = directory
        self.size = size
        self.workers = workers
        self.progress = progress
        self.empty_backlog_rate: float | None = None
        self._started = 0

    async def database(self, paths: Sequence[tuple[str, str]]) -> tuple[str, str, list[int]]:
        """A fresh migrated database with one endpoint per (tenant, receiver path)."""
        name, url = await self.server.create_database()
        ids = []
        async with connect(url) as conn:
            for n, (tenant, path) in enumerate(paths):
                params = {
                    "tenant_id": tenant,
                    "name": f"endpoint-{n}",
                    "url": self.receiver.url(path),
                    "secret": SECRET,
                    "event_types": ["*"],
                    "extra_fields": json_param({}),
                    "headers": json_param({}),
                    "rate_limit": None,
                    "max_in_flight": None,
                    "timeout_ms": None,
                }
                ids.append(int((await fetch_dicts(conn, "add_endpoint", params))[0]["id"]))
        return name, url, ids

    async def start_workers(
        self, url: str, count: int, settings: dict[str, str] | None = None
    ) -> list[WorkerProcess]:
        workers = []
        try:
            for _ in range(count):
                self._started += 1
                workers.append(
                    WorkerProcess(url, f"bench-{self._started}", self.directory, settings or {})
                )
            for worker in workers:
                await worker.wait_ready()
        except BaseException:
            scenario.stop_workers(workers)
            raise
        return workers

    def meter(self, workers: Sequence[WorkerProcess]) -> Meter:
        return Meter([w.pid for w in workers], self.server.postmaster, self.receiver.pid)

    async def drain(self) -> list[Hit]:
        return await asyncio.to_thread(self.receiver.drain)

    async def collect(self, count: int, within_s: float, path: str | None = None) -> list[Hit]:
        """Receiver hits until `count` of them are on `path` (or on any path)."""
        hits: list[Hit] = []
        seen = 0
        deadline = time.monotonic() + within_s
        while seen < count:
            if time.monotonic() > deadline:
                raise ScenarioError(f"only {seen} of {count} requests arrived in {within_s:g}s")
            await asyncio.sleep(0.05)
            fresh = await self.drain()
            hits += fresh
            seen += sum(1 for h in fresh if path is None or h.path == path)
        return hits


Scenario = Callable[[Bench], Awaitable[list[Result]]]


def peak_rss(workers: Sequence[WorkerProcess]) -> int | None:
    peaks = [p for p in (w.peak_rss_bytes() for w in workers) if p is not None]
    return max(peaks) if peaks else None


def latency_summary(figures: dict[str, float]) -> str:
    return (
        f"p50 {figures['p50_ms']:.1f} / p95 {figures['p95_ms']:.1f} / "
        f"p99 {figures['p99_ms']:.1f} / max {figures['max_ms']:.1f} ms"
    )


async def paced_producer(
    url: str, tenant: str, rate: float, count: int
) -> tuple[dict[str, float], float]:
    """One event per transaction at `rate`, from enough connections to keep up:
    {event id: commit time}, and the rate achieved."""
    connections = max(1, math.ceil(rate / 100))
    committed: dict[str, float] = {}

    async def produce(offset: int) -> float:
        async with connect(url) as conn:
            await asyncio.sleep(offset / rate)

            async def insert(n: int) -> None:
                event_id, at = await scenario.insert_event(
                    conn, tenant, "bench.latency", {"n": n * connections + offset}
                )
                committed[event_id] = at

            share = count // connections + (1 if offset < count % connections else 0)
            return await scenario.paced(share, rate / connections, insert)

    rates = await asyncio.gather(*(produce(k) for k in range(connections)))
    return committed, sum(rates)


def statement_breakdown(rows: Sequence[dict[str, Any]]) -> str:
    names = []
    for row in rows[:4]:
        query = str(row["query"])
        called = re.search(r"notifyhook\.(\w+)\(", query)
        label = called.group(1) if called else query[:50]
        names.append(f"{label}: {row['calls']}")
    return ", ".join(names)


async def insert_backlog(url: str, count: int, tenants: Sequence[str]) -> None:
    async with connect(url) as conn:
        await conn.execute(
            scenario.statements()["insert_backlog"], {"count": count, "tenants": list(tenants)}
        )


async def wait_delivered(url: str, count: int, within_s: float) -> None:
    async with connect(url) as conn:

        async def done() -> bool:
            totals = (await fetch(conn, "delivery_totals"))[0]
            return int(totals["delivered"]) >= count

        await scenario.wait_for(done, within_s, f"{count} deliveries recorded", 0.05)


async def preload_statement_counts(bench: Bench) -> bool:
    """Load pg_stat_statements into our own cluster (a restart); True if we did."""
    if bench.server.cluster is None:
        return False
    async with connect(bench.server.admin_url) as conn:
        await conn.execute(statements()["preload_statement_counts"])
    await bench.server.restart()
    return True


async def unload_statement_counts(bench: Bench) -> None:
    async with connect(bench.server.admin_url) as conn:
        await conn.execute(statements()["reset_preload"])
    await bench.server.restart()


async def install_statement_counts(conn: scenario.Connection) -> bool:
    try:
        await conn.execute(statements()["install_statement_counts"])
    except DatabaseError:
        return False
    return bool((await fetch(conn, "statement_counts_available"))[0]["available"])


async def load_history(url: str, count: int) -> float:
    """`count` delivered deliveries with their events and attempts, written straight in."""
    started = time.monotonic()
    params = {"count": count, "tenants": TENANTS}
    async with connect(url) as conn:
        try:
            await conn.execute(statements()["history_without_triggers"])
        except DatabaseError as error:
            raise ScenarioError(
                f"writing history needs session_replication_role ({error.sqlstate})"
            ) from None
        for step in ("history_events", "history_deliveries", "history_attempts"):
            await conn.execute(statements()[step], params)
        await conn.execute(statements()["history_done"])
        await conn.execute(statements()["history_vacuum"])
    return time.monotonic() - started
