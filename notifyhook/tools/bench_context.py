"""What the bench's scenarios share: sizes, results, and a context with the server, the
receiver and a trial to run workers in: a database of its own, stopped and dropped after."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from notifyhook import signing
from notifyhook.store import connect, fetch_dicts, json_param
from notifyhook.tools import scenario
from notifyhook.tools.receiver_process import Behaviour, Hit, PathSpec, ReceiverProcess
from notifyhook.tools.scenario import ScenarioError, Server, start_worker
from notifyhook.tools.usage import Meter, Usage
from notifyhook.tools.workers import WorkerProcess

SECRET = signing.generate_secret()
"""One secret for every bench endpoint, so that the receiver checks one HMAC per request."""
FAST, SLOW, CEILING_PATH = "fast", "slow", "ceiling"
PEER_PATH = "peer"
"""The peer scenario's path: answered as FAST, with no signature checked, as
benchmarks/pgqueuer_compare.py's path is (pgqueuer signs nothing). The receiver shares the
two cores with the system under test; checking an HMAC per request there would charge
notifyhook for work the peer's receiver never does (docs/performance.md). The other
scenarios check every request."""
SLOW_S = 2.0
TENANTS = [f"bench-{n}" for n in range(10)]


def receiver_paths() -> dict[str, PathSpec]:
    return {
        FAST: PathSpec(Behaviour(), (SECRET,)),
        SLOW: PathSpec(Behaviour("slow", seconds=SLOW_S), (SECRET,)),
        CEILING_PATH: PathSpec(Behaviour(), (SECRET,)),
        PEER_PATH: PathSpec(Behaviour(), ()),
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
    endpoints_backlog: int = 50_000

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
            endpoints_backlog=count(self.endpoints_backlog),
        )


SMALL = Size(
    backlog=500,
    latency_s=2.0,
    idle_s=3.0,
    idle_poll_s=1.0,
    noisy_slow=200,
    noisy_fast=200,
    history=10_000,
    ceiling=2_000,
    endpoints_backlog=2_000,
)
"""`--small`: a quick smoke run (bench.py's help for the option quotes two of these)."""


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


async def _no_wait() -> None:
    return None


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
        self.settle: Callable[[], Awaitable[object]] = _no_wait
        """Awaited just before a measured stretch starts (the peer scenario's): nothing,
        or benchmarks/pgqueuer_compare.py's wait for a quiet machine, which its own
        cases make too, so that their figures are taken under one rule."""
        # Numbers worker ids (and so their log files) across every trial of the run.
        self.worker_numbers = itertools.count(1)

    @asynccontextmanager
    async def trial(self, paths: Sequence[tuple[str, str]]) -> AsyncIterator[Trial]:
        """A fresh migrated database with one endpoint per (tenant, receiver path), for the
        workers a scenario starts in it: they are stopped, and it dropped, when the block ends."""
        name, url = await self.server.create_database()
        trial = Trial(self, url)
        try:
            trial.endpoint_ids = await self._add_endpoints(url, paths)
            yield trial
        finally:
            scenario.stop_workers(trial.workers)
            await self.server.drop_database(name)

    async def _add_endpoints(self, url: str, paths: Sequence[tuple[str, str]]) -> list[int]:
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
                    "retry_schedule": None,
                }
                ids.append(int((await fetch_dicts(conn, "add_endpoint", params))[0]["id"]))
        return ids

    async def drain(self) -> list[Hit]:
        return await asyncio.to_thread(self.receiver.drain)

    async def collect(self, count: int, within_s: float, path: str | None = None) -> list[Hit]:
        """Receiver hits until `count` of them are on `path` (or on any path)."""
        return await collect_hits(self.drain, count, within_s, path)


async def collect_hits(
    drain: Callable[[], Awaitable[list[Hit]]], count: int, within_s: float, path: str | None
) -> list[Hit]:
    """What `drain` returns, polled, until `count` hits are on `path` (or on any path)."""
    hits: list[Hit] = []
    seen = 0
    deadline = time.monotonic() + within_s
    while seen < count:
        if time.monotonic() > deadline:
            raise ScenarioError(f"only {seen} of {count} requests arrived in {within_s:g}s")
        await asyncio.sleep(0.05)
        fresh = await drain()
        hits += fresh
        seen += sum(1 for h in fresh if path is None or h.path == path)
    return hits


@dataclass(slots=True)
class Trial:
    """One scenario's database (from `Bench.trial`) and the workers started in it."""

    bench: Bench
    url: str
    endpoint_ids: list[int] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    async def start_workers(self, count: int, settings: Mapping[str, str] | None = None) -> None:
        """`count` more workers, each ready when this returns."""
        started = []
        for _ in range(count):
            worker_id = f"bench-{next(self.bench.worker_numbers)}"
            worker = start_worker(self.url, worker_id, self.bench.directory, settings or {})
            # Listed at once, so that the trial stops it even if a later one fails to start.
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            await worker.wait_ready()

    def meter(self) -> Meter:
        """CPU from now on of the workers, PostgreSQL and the receiver."""
        bench = self.bench
        return Meter([w.pid for w in self.workers], bench.server.postmaster, bench.receiver.pid)

    def peak_rss(self) -> int | None:
        """The workers' peak memory; read it before the trial ends, while they still run."""
        peaks = [p for p in (w.peak_rss_bytes() for w in self.workers) if p is not None]
        return max(peaks) if peaks else None


Scenario = Callable[[Bench], Awaitable[list[Result]]]


def latency_summary(figures: dict[str, float]) -> str:
    return (
        f"p50 {figures['p50_ms']:.1f} / p95 {figures['p95_ms']:.1f} / "
        f"p99 {figures['p99_ms']:.1f} / max {figures['max_ms']:.1f} ms"
    )
