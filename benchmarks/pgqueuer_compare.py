# Usage, from the repository's root, in a virtualenv of its own (pgqueuer is not a dependency):
#   python3 -m venv /tmp/pgq && /tmp/pgq/bin/pip install pgqueuer==1.6.0 asyncpg aiohttp uvloop -e .
#   /tmp/pgq/bin/python benchmarks/pgqueuer_compare.py [--runs 3] [--cases ...] [--json out.json]
# docs/performance.md compares its figures with `notifyhook bench`'s, taken in the same window.
"""pgqueuer on notifyhook's bench workload, measured with notifyhook's own pieces.

One throwaway PostgreSQL 15 cluster (notifyhook.tools.scenario.Server -> notifyhook.tools.cluster.Cluster,
fsync on), one receiver process (notifyhook.tools.receiver_process, a path with no secrets,
behaviour ok), pgqueuer workers as separate processes of this script (`--worker`), each a
QueueManager over one asyncpg connection (AsyncpgDriver) on uvloop (as `pgq run` does when
uvloop is installed), with an entrypoint that POSTs the job's payload with one shared aiohttp
ClientSession (keep-alive) and raises unless the answer is 2xx.

Measurements (each run `--runs` times):
  backlog: 20,000 jobs enqueued in one statement (one transaction, 10 tenants, ~500-byte JSON
           payload), drained by 1 worker at concurrency 50, 1 worker at 100, 2 workers at 100
           each. Timed from the enqueue's COMMIT (the call returning) until the receiver has
           all 20,000 requests and pgqueuer's queue table is empty (every job logged done).
           CPU of the workers, of PostgreSQL (postmaster + all children, reaped ones too:
           notifyhook.tools.usage.Meter) and of the receiver over that stretch.
  latency: 500 jobs, one per transaction at 50/s, one worker at concurrency 100; COMMIT
           (producer's time.time() right after the enqueue returns) to the receiver reading
           the request (its time.time()).
  notifyhook-peer (not run by default): notifyhook's own `bench` peer scenario (the backlog
           to one endpoint, one worker at CONCURRENCY 50) on this script's PostgreSQL,
           under the same wait below: `--cases notifyhook-peer,backlog-1x50 --runs 5`
           gives five pairs taken by one rule, one after the other.
Before each measurement: wait (<= 120 s, polling every 10 s) for the 1-min loadavg < 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

BACKLOG = 20_000
TENANTS = [f"bench-{n}" for n in range(10)]
LATENCY_RATE = 50
LATENCY_S = 10.0
ENTRYPOINT = "deliver"
PATH = "pgq"
LOAD_LIMIT = 0.5
LOAD_WAIT_S = 120
LOAD_POLL_S = 10


# -- the worker process ----------------------------------------------------------------------


async def worker_main(dsn: str, url: str, concurrency: int, batch_size: int, limit: str) -> None:
    import aiohttp
    import asyncpg
    from pgqueuer import errors as pgq_errors  # noqa: F401
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.domain.errors import FailingListenerError
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=30),
    )
    headers_base = {"Content-Type": "application/json"}

    # limit "worker": run(max_concurrent_tasks=concurrency), a cap on this worker's picked
    # jobs; "entrypoint": @entrypoint(concurrency_limit=concurrency), fleet-wide, in SQL.
    by_entrypoint = limit == "entrypoint"

    @qm.entrypoint(ENTRYPOINT, concurrency_limit=concurrency if by_entrypoint else 0)
    async def deliver(job: Job) -> None:
        headers = {**headers_base, "webhook-id": str(job.id)}
        async with session.post(url, data=job.payload, headers=headers) as response:
            await response.read()
            if not 200 <= response.status < 300:
                raise RuntimeError(f"HTTP {response.status}")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    loop.add_signal_handler(signal.SIGINT, qm.shutdown.set)

    async def announce_ready() -> None:
        # Ready once a NOTIFY round trip through the manager's listener works.
        for _ in range(100):
            try:
                await qm.listener_healthy(timeout=timedelta(seconds=0.2))
            except FailingListenerError:
                continue
            print("READY", flush=True)
            return
        print("NOT READY", flush=True)

    ready = asyncio.create_task(announce_ready())
    try:
        await qm.run(
            batch_size=batch_size, max_concurrent_tasks=None if by_entrypoint else concurrency
        )
    finally:
        ready.cancel()
        await session.close()
        await conn.close()


# -- the bench side --------------------------------------------------------------------------


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def wait_for_quiet(progress) -> dict[str, Any]:
    """Poll the 1-min load every 10 s, up to 120 s, until it is below 0.5."""
    started = time.monotonic()
    seen = [loadavg()]
    while seen[-1] >= LOAD_LIMIT and time.monotonic() - started < LOAD_WAIT_S - 1:
        progress(f"  load {seen[-1]:.2f} >= {LOAD_LIMIT}, waiting…")
        await asyncio.sleep(LOAD_POLL_S)
        seen.append(loadavg())
    return {
        "load_at_start": seen[-1],
        "load_first_seen": seen[0],
        "waited_s": round(time.monotonic() - started, 1),
        "quiet": seen[-1] < LOAD_LIMIT,
    }


def cpu_totals() -> tuple[float, float, float]:
    """(busy, steal, all) seconds of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return busy / tick, steal / tick, sum(fields[:8]) / tick


def payload(i: int) -> bytes:
    tenant = TENANTS[i % len(TENANTS)]
    body = {
        "type": "bench.backlog",
        "tenant_id": tenant,
        "event_id": f"evt_{i:08d}",
        "created_at": "2026-11-28T12:00:00.000000+00:00",
        "data": {"i": i, "call_id": f"{i:032x}", "padding": "x" * 300},
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw + b" " * max(0, 500 - len(raw))  # trailing whitespace: still JSON, 500 bytes


class Worker:
    def __init__(
        self, dsn: str, url: str, concurrency: int, batch_size: int, limit: str, log: Path
    ) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                dsn,
                url,
                str(concurrency),
                str(batch_size),
                limit,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 30)
        if line.strip() != b"READY":
            raise RuntimeError(f"worker not ready ({line!r}): {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
        finally:
            self._log.close()
            if self.process.stdout is not None:
                self.process.stdout.close()


class Context:
    def __init__(self, server, receiver, directory: Path, batch_size: int | None, progress):
        self.server = server
        self.receiver = receiver
        self.directory = directory
        self.batch_size = batch_size
        self.progress = progress
        self.serial = 0

    def batch_for(self, concurrency: int) -> int:
        # pgqueuer requires max_concurrent_tasks >= 2 * batch_size.
        return self.batch_size if self.batch_size else max(1, concurrency // 2)

    async def database(self) -> tuple[str, str]:
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        self.serial += 1
        name = f"pgq_bench_{self.serial}"
        admin = await asyncpg.connect(self.server.admin_url)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        url = self.server.admin_url.rsplit("/", 1)[0] + f"/{name}"
        conn = await asyncpg.connect(url)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
        return name, url

    async def drop(self, name: str) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.server.admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()

    async def start_workers(
        self, url: str, count: int, concurrency: int, limit: str = "worker"
    ) -> list[Worker]:
        workers: list[Worker] = []
        try:
            for n in range(count):
                workers.append(
                    Worker(
                        url,
                        self.receiver.url(PATH),
                        concurrency,
                        self.batch_for(concurrency),
                        limit,
                        self.directory / f"worker-{self.serial}-{n}.log",
                    )
                )
            for w in workers:
                await w.wait_ready()
        except BaseException:
            for w in workers:
                w.stop()
            raise
        return workers

    def meter(self, workers: list[Worker]):
        from notifyhook.tools.usage import Meter

        return Meter([w.pid for w in workers], self.server.postmaster, self.receiver.pid)

    async def drain(self):
        return await asyncio.to_thread(self.receiver.drain)


def other_cpu(before, after, used, bench_cpu: float) -> dict[str, float]:
    busy = after[0] - before[0]
    ours = used.worker_cpu_s + (used.postgres_cpu_s or 0) + used.receiver_cpu_s + bench_cpu
    return {
        "machine_busy_s": round(busy, 3),
        "bench_process_cpu_s": round(bench_cpu, 3),
        "other_cpu_s": round(busy - ours, 3),
        "steal_s": round(after[1] - before[1], 3),
    }


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def backlog(
    ctx: Context, workers_n: int, concurrency: int, limit: str = "worker"
) -> dict[str, Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    from notifyhook.tools.bench_context import collect_hits

    name, url = await ctx.database()
    workers: list[Worker] = []
    try:
        workers = await ctx.start_workers(url, workers_n, concurrency, limit)
        await ctx.drain()
        producer = await asyncpg.connect(url)
        monitor = await asyncpg.connect(url)
        try:
            queries = Queries(AsyncpgDriver(producer))
            payloads = [payload(i) for i in range(BACKLOG)]
            entrypoints = [ENTRYPOINT] * BACKLOG
            priorities = [0] * BACKLOG
            load = await wait_for_quiet(ctx.progress)
            t_enqueue = time.monotonic()
            # One statement on an autocommit connection: one transaction, COMMITted on return.
            ids = await queries.enqueue(entrypoints, payloads, priorities)
            meter = ctx.meter(workers)
            machine0, self0 = cpu_totals(), self_cpu()
            enqueue_s = time.monotonic() - t_enqueue
            assert len(ids) == BACKLOG
            deadline = time.monotonic() + 180
            hits = await collect_hits(ctx.drain, BACKLOG, 180, PATH)
            last_arrival_wall = time.monotonic()
            while True:
                left = await monitor.fetchval("SELECT count(*) FROM pgqueuer")
                if left == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{left} jobs still in pgqueuer after 180 s")
                await asyncio.sleep(0.05)
            used = meter.read()
            machine1, self1 = cpu_totals(), self_cpu()
            lag_s = time.monotonic() - last_arrival_wall
            log_rows = await monitor.fetch(
                "SELECT status::text, count(*) AS n FROM pgqueuer_log GROUP BY 1 ORDER BY 1"
            )
        finally:
            await producer.close()
            await monitor.close()
        rss = [peak_rss(w.pid) for w in workers]
    finally:
        for w in workers:
            w.stop()
        await ctx.drop(name)
    rate = BACKLOG / used.wall_s
    non2xx = sum(1 for h in hits if h.answered is not None and not 200 <= h.answered < 300)
    distinct = len({h.webhook_id for h in hits})
    return {
        "scenario": "backlog",
        "workers": workers_n,
        "concurrency_per_worker": concurrency,
        "limit": limit,
        "batch_size": ctx.batch_for(concurrency),
        "jobs": BACKLOG,
        "seconds": round(used.wall_s, 3),
        "jobs_per_s": round(rate, 1),
        "worker_cpu_s": round(used.worker_cpu_s, 3),
        "postgres_cpu_s": round(used.postgres_cpu_s or 0, 3),
        "receiver_cpu_s": round(used.receiver_cpu_s, 3),
        "worker_cpu_us_per_job": round(used.worker_cpu_s / BACKLOG * 1e6, 1),
        "postgres_cpu_us_per_job": round((used.postgres_cpu_s or 0) / BACKLOG * 1e6, 1),
        "receiver_cpu_us_per_job": round(used.receiver_cpu_s / BACKLOG * 1e6, 1),
        "enqueue_statement_s": round(enqueue_s, 3),
        "last_arrival_to_queue_empty_s": round(lag_s, 3),
        "requests_received": len(hits),
        "distinct_jobs_received": distinct,
        "non_2xx": non2xx,
        "pgqueuer_log_rows": {r["status"]: r["n"] for r in log_rows},
        "worker_peak_rss_mb": [round(r / 2**20) if r else None for r in rss],
        **other_cpu(machine0, machine1, used, self1 - self0),
        **load,
    }


def peak_rss(pid: int) -> int | None:
    from notifyhook.tools.usage import peak_rss_bytes

    return peak_rss_bytes(pid)


async def latency_run(ctx: Context, concurrency: int = 100) -> dict[str, Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    from notifyhook.tools import latency
    from notifyhook.tools.bench_context import collect_hits
    from notifyhook.tools.scenario import paced

    count = round(LATENCY_RATE * LATENCY_S)
    name, url = await ctx.database()
    workers: list[Worker] = []
    try:
        workers = await ctx.start_workers(url, 1, concurrency)
        producer = await asyncpg.connect(url)
        try:
            queries = Queries(AsyncpgDriver(producer))
            # Warm the producer's connection (statement preparation) outside the window.
            await producer.execute("SELECT 1")
            load = await wait_for_quiet(ctx.progress)
            await asyncio.sleep(0.5)
            await ctx.drain()
            committed: dict[str, float] = {}

            async def insert(n: int) -> None:
                (job_id,) = await queries.enqueue(ENTRYPOINT, payload(n))
                committed[str(job_id)] = time.time()

            meter = ctx.meter(workers)
            machine0, self0 = cpu_totals(), self_cpu()
            achieved = await paced(count, LATENCY_RATE, insert)
            hits = await collect_hits(ctx.drain, count, 60, PATH)
            used = meter.read()
            machine1, self1 = cpu_totals(), self_cpu()
        finally:
            await producer.close()
        rss = peak_rss(workers[0].pid)
    finally:
        for w in workers:
            w.stop()
        await ctx.drop(name)
    lat = latency.latencies(committed, latency.first_arrivals(hits), [PATH])
    figures = latency.summarize(lat)
    return {
        "scenario": "latency",
        "rate_per_s": LATENCY_RATE,
        "jobs": count,
        "matched": len(lat),
        "achieved_per_s": round(achieved, 1),
        "concurrency": concurrency,
        "batch_size": ctx.batch_for(concurrency),
        **{k: round(v, 2) for k, v in figures.items()},
        "min_ms": round(lat[0] * 1000, 2) if lat else None,
        "worker_cpu_s": round(used.worker_cpu_s, 3),
        "postgres_cpu_s": round(used.postgres_cpu_s or 0, 3),
        "receiver_cpu_s": round(used.receiver_cpu_s, 3),
        "wall_s": round(used.wall_s, 2),
        "worker_peak_rss_mb": round(rss / 2**20) if rss else None,
        **other_cpu(machine0, machine1, used, self1 - self0),
        **load,
    }


def fmt(r: dict[str, Any]) -> str:
    load = f"load {r['load_at_start']:.2f} (first seen {r['load_first_seen']:.2f}, waited {r['waited_s']:.0f}s{'' if r['quiet'] else ', NOT QUIET'})"
    if r["scenario"] == "notifyhook-peer":
        return f"notifyhook peer (1 endpoint, 1 worker, c50): {r['summary']}; {load}"
    other = f"other CPU {r['other_cpu_s']:.2f}s, steal {r['steal_s']:.2f}s"
    if r["scenario"] == "backlog":
        return (
            f"backlog {r['workers']}w x c{r['concurrency_per_worker']} (batch {r['batch_size']}"
            f"{', entrypoint limit' if r['limit'] == 'entrypoint' else ''}): "
            f"{r['jobs_per_s']:,.0f}/s ({r['jobs']:,} in {r['seconds']:.2f}s); CPU worker "
            f"{r['worker_cpu_s']:.2f}s = {r['worker_cpu_us_per_job']:.0f} µs/job, PostgreSQL "
            f"{r['postgres_cpu_s']:.2f}s = {r['postgres_cpu_us_per_job']:.0f} µs/job, receiver "
            f"{r['receiver_cpu_us_per_job']:.0f} µs/job; {other}; {load}; "
            f"non-2xx {r['non_2xx']}, distinct {r['distinct_jobs_received']}"
        )
    return (
        f"latency {r['rate_per_s']}/s ({r['matched']}/{r['jobs']} jobs at {r['achieved_per_s']}/s): "
        f"p50 {r['p50_ms']:.2f} / p95 {r['p95_ms']:.2f} / p99 {r['p99_ms']:.2f} / max "
        f"{r['max_ms']:.2f} ms (min {r['min_ms']:.2f}); CPU worker {r['worker_cpu_s']:.2f}s, "
        f"PostgreSQL {r['postgres_cpu_s']:.2f}s; {other}; {load}"
    )


async def notifyhook_peer(ctx: Context) -> dict[str, Any]:
    """notifyhook's own peer scenario (`notifyhook bench --scenarios peer`: the backlog to one
    endpoint, one worker at CONCURRENCY 50, a receiver path that checks no signature) on
    this script's PostgreSQL, after the same wait for a quiet machine as pgqueuer's cases:
    with backlog-1x50 beside it, pairs taken under one rule in one window."""
    from notifyhook.tools.bench_context import Bench, Size, receiver_paths
    from notifyhook.tools.bench_scenarios import peer
    from notifyhook.tools.receiver_process import ReceiverProcess

    load: dict[str, Any] = {}

    async def settle() -> None:
        load.update(await wait_for_quiet(ctx.progress))

    receiver = ReceiverProcess(receiver_paths()).start()
    try:
        bench = Bench(ctx.server, receiver, ctx.directory, Size(), 1, ctx.progress)
        bench.settle = settle
        (result,) = await peer(bench)
    finally:
        receiver.stop()
    return {
        "scenario": "notifyhook-peer",
        "deliveries_per_s": result.figures["deliveries_per_s"],
        "summary": result.summary,
        **load,
    }


CASES = {
    "backlog-1x50": lambda ctx: backlog(ctx, 1, 50),
    "backlog-1x100": lambda ctx: backlog(ctx, 1, 100),
    "backlog-2x100": lambda ctx: backlog(ctx, 2, 100),
    "latency": lambda ctx: latency_run(ctx, 100),
}
EXTRA_CASES = {
    # notifyhook's peer scenario under this script's rules, to pair with backlog-1x50.
    "notifyhook-peer": notifyhook_peer,
    # Not run by default: the concurrency cap as pgqueuer's entrypoint concurrency_limit
    # (enforced in the dequeue SQL with capacity slots) rather than max_concurrent_tasks.
    "backlog-1x100-eplimit": lambda ctx: backlog(ctx, 1, 100, "entrypoint"),
    "backlog-2x50": lambda ctx: backlog(ctx, 2, 50),
}


async def bench_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    import shutil
    import tempfile

    import pgqueuer

    from notifyhook.tools.receiver_process import Behaviour, PathSpec, ReceiverProcess
    from notifyhook.tools.scenario import Server

    def progress(text: str) -> None:
        print(f"pgq-bench: {text}", file=sys.stderr, flush=True)

    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    results: list[dict[str, Any]] = []
    directory = Path(tempfile.mkdtemp(prefix="pgq-bench-"))
    started = time.monotonic()
    async with Server.open(None, "pgq_bench") as server:
        progress(f"{server.describe()}; pgqueuer {pgqueuer.__version__}")
        receiver = ReceiverProcess({PATH: PathSpec(Behaviour(), ())}).start()
        try:
            ctx = Context(server, receiver, directory, args.batch_size, progress)
            for run in range(1, args.runs + 1):
                for case in chosen:
                    progress(f"run {run}: {case}…")
                    result = await {**CASES, **EXTRA_CASES}[case](ctx)
                    result["run"] = run
                    result["case"] = case
                    results.append(result)
                    progress("  " + fmt(result))
        finally:
            receiver.stop()
            shutil.rmtree(directory, ignore_errors=True)
    progress(f"done in {time.monotonic() - started:.0f}s (PostgreSQL stopped, receiver stopped)")
    return results


def main() -> None:
    global BACKLOG, LOAD_WAIT_S
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        dsn, url, concurrency, batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        import uvloop

        uvloop.run(worker_main(dsn, url, concurrency, batch, sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every case (3)")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated from {', '.join(CASES)} (default: these), {', '.join(EXTRA_CASES)}",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pgqueuer dequeue batch_size (default: concurrency // 2, the most pgqueuer allows)",
    )
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="jobs in the backlog (20000)")
    parser.add_argument(
        "--load-wait",
        type=float,
        default=LOAD_WAIT_S,
        help="longest wait (s) for the 1-min load to fall below 0.5 before each measurement (120)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    BACKLOG = args.backlog
    LOAD_WAIT_S = args.load_wait
    import pgqueuer

    results = asyncio.run(bench_main(args))
    print(f"pgqueuer {pgqueuer.__version__}; python {sys.version.split()[0]}")
    for r in results:
        print(f"run {r['run']}: " + fmt(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
