# Usage, from the repository's root after scripts/setup:
#   .venv/bin/python benchmarks/dashboard_queries.py [--attempts 1000000] [--endpoints 100] [--runs 7]
# docs/dashboard.md quotes its output.
"""How long each dashboard page's queries take over a large history.

A throwaway PostgreSQL cluster (notifyhook.tools.cluster.Cluster, fsync off: nothing is
written while timing), migrated, loaded by benchmarks/dashboard_history.sql through
psql, then VACUUM ANALYZE. Each of the dashboard's statements is run `--runs` times on
one read-only connection, as the pages run them, and the median is printed; then each
page is fetched `--runs` times over HTTP from the real app (build_app, in this
process), the median printed: connection, queries and rendering. Last, for
comparison, what the plain views and a queue-wide chart without the per-endpoint
probes would cost on the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from notifyhook.dashboard.app import build_app
from notifyhook.dashboard.data import open_reader
from notifyhook.migrate import migrate
from notifyhook.store import connect, run_dicts
from notifyhook.tools.cluster import Cluster, find_bindir

HISTORY = Path(__file__).with_name("dashboard_history.sql")

# Only for comparison: what the dashboard does not run.
ALTERNATIVES = {
    "queue_stats view": "SELECT * FROM notifyhook.queue_stats",
    "endpoint_stats view": "SELECT * FROM notifyhook.endpoint_stats",
    "chart, queue-wide, one scan by started_at": """
        SELECT (extract(epoch FROM date_trunc('minute', now()) - date_trunc('minute', started_at)) / 60)::int,
               count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL)
        FROM notifyhook.attempts
        WHERE started_at >= date_trunc('minute', now()) - interval '59 minutes'
        GROUP BY 1""",
}


def load(cluster: Cluster, endpoints: int, attempts: int) -> None:
    url = cluster.url()

    async def schema() -> None:
        async with connect(url) as conn:
            await migrate(conn, max_payload_bytes=None)

    asyncio.run(schema())
    started = time.monotonic()
    subprocess.run(
        [str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url,
         "-v", f"endpoints={endpoints}", "-v", f"attempts={attempts}", "-f", str(HISTORY),
         "-o", "/dev/null", "-c", "VACUUM ANALYZE"],
        check=True,
    )  # fmt: skip
    print(
        f"loaded {attempts:,} attempts over {endpoints} endpoints in {time.monotonic() - started:.0f} s"
    )


async def median_ms(call: Callable[[], Awaitable[Any]], runs: int) -> float:
    await call()  # warm: the figures are for a cache that holds the indexes
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def time_queries(url: str, runs: int) -> None:
    async with connect(url) as conn:
        sample = await run_dicts(
            conn, "SELECT delivery_id FROM notifyhook.attempts ORDER BY id DESC LIMIT 1"
        )
    delivery_id = sample[0]["delivery_id"]
    async with open_reader(url) as reader:
        cases: dict[str, Callable[[], Awaitable[Any]]] = {
            "queue": reader.queue,
            "tenants": reader.tenants,
            "endpoints (all)": reader.endpoints,
            "endpoints (one tenant)": lambda: reader.endpoints(tenant_id="tenant-3"),
            "endpoints (one endpoint)": lambda: reader.endpoints(endpoint_id=1),
            "chart, queue-wide": reader.minute_counts,
            "chart, one endpoint": lambda: reader.minute_counts(1),
            "endpoint attempts (50)": lambda: reader.endpoint_attempts(1),
            "dead letters (100, all)": lambda: reader.dead_letters(limit=100),
            "dead letters (20, one endpoint)": lambda: reader.dead_letters(endpoint_id=1, limit=20),
            "delivery": lambda: reader.delivery(delivery_id),
            "delivery attempts": lambda: reader.delivery_attempts(delivery_id),
        }
        print("\n| query | median ms |\n|---|---:|")
        for name, call in cases.items():
            print(f"| {name} | {await median_ms(call, runs):.1f} |")
    await time_pages(url, runs, delivery_id)
    async with connect(url) as conn:
        print("\n| not used, for comparison | median ms |\n|---|---:|")
        for name, statement in ALTERNATIVES.items():
            ms = await median_ms(lambda s=statement: run_dicts(conn, s), runs)  # type: ignore[misc]
            print(f"| {name} | {ms:.1f} |")


async def time_pages(url: str, runs: int, delivery_id: int) -> None:
    runner = web.AppRunner(build_app(url, None), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pages = [
        "/",
        "/?tenant=tenant-3",
        "/endpoints/1",
        f"/deliveries/{delivery_id}",
        "/dead-letters",
    ]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            print(
                "\n| page over HTTP (connect, queries, render) | median ms | bytes |\n|---|---:|---:|"
            )
            for page in pages:
                answer = await client.get(page)
                answer.raise_for_status()
                ms = await median_ms(lambda p=page: client.get(p), runs)  # type: ignore[misc]
                print(f"| `{page}` | {ms:.1f} | {len(answer.content):,} |")
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attempts", type=int, default=1_000_000)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with Cluster(fsync=False) as cluster:
        load(cluster, args.endpoints, args.attempts)
        asyncio.run(time_queries(cluster.url(), args.runs))


if __name__ == "__main__":
    main()
