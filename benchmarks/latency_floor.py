# Usage, from the repository's root:  .venv/bin/python benchmarks/latency_floor.py [--rounds 3]
# docs/performance.md ("Where 50/s latency goes") has figures and what they say.
"""Commit-to-request at 50 events/s with the least a worker can do: the machine's floor, the claim's share.

One throwaway PostgreSQL (fsync on, as `notifyhook bench`), one receiver process (the
bench's, a path that checks no signature), notifyhook's schema with one endpoint, and a
producer inserting one event per transaction at 50/s: notifyhook's own INSERT, triggers
and NOTIFY. A claimer process LISTENs and, at each notification, claims and POSTs each
delivery over one kept-alive connection: no signing, no recording, no pool, nothing else.
It claims in one of two ways:

  one-statement  one UPDATE … SKIP LOCKED … RETURNING of the due rows (a minimal queue's
                 claim: what pgqueuer does), on notifyhook's tables;
  claim_due      notifyhook.claim_due, as a worker calls it.

Each way in turn, `--rounds` times interleaved, each in a fresh database. What separates
the two is what claim_due costs on the path; what separates claim_due from `notifyhook
bench --scenarios latency` is the worker's own code (signing, the HTTP engine, recording).

With `--statements` the cluster runs pg_stat_statements, nested statements counted too,
and each measurement prints the mean execution time of every statement run about once
per event: the claim as called, the statements inside claim_due (and inside the
producer's triggers), so that what a cold claim spends is read statement by statement.
What the top-level claim takes beyond the sum of its statements is their executor set-up
and tear-down, which pg_stat_statements leaves out of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from urllib.parse import urlsplit

from notifyhook.store import connect, queries
from notifyhook.tools.bench_context import SECRET, collect_hits
from notifyhook.tools.bench_workload import install_statement_counts, preloaded_statement_counts
from notifyhook.tools.latency import first_arrivals, latencies, summarize
from notifyhook.tools.receiver_process import Behaviour, Hit, PathSpec, ReceiverProcess
from notifyhook.tools.scenario import Server, fetch, insert_event, paced, statements

RATE = 50
PATH = "floor"
TENANT = "tenant-1"  # the one endpoint's, from add_tenant_endpoints
MAX_ROWS = 10
CLAIMS = {"one-statement": "floor_claim", "claim_due": "claim_due_rows"}


# -- the claimer process -----------------------------------------------------------------------


async def claimer(mode: str, url: str, target: str) -> None:
    claim = statements()[CLAIMS[mode]]
    parts = urlsplit(target)
    async with connect(url) as listening, connect(url) as claiming:
        await listening.execute(queries()["listen"])
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        head = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n" % (
            parts.path.encode(),
            parts.netloc.encode(),
        )
        print("ready", flush=True)
        async for _ in listening.notifies():
            cursor = await claiming.execute(claim, {"max_rows": MAX_ROWS}, prepare=True)
            for event_id, body in await cursor.fetchall():
                data = body.encode()
                writer.write(
                    head
                    + b"webhook-id: %s\r\ncontent-length: %d\r\n\r\n"
                    % (event_id.encode(), len(data))
                    + data
                )
                await _read_answer(reader)


async def _read_answer(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            await reader.readexactly(int(value))


# -- the measurement ---------------------------------------------------------------------------


async def measure(
    server: Server, receiver: ReceiverProcess, mode: str, events: int, statements_too: bool
) -> list[float]:
    """Seconds from each event's COMMIT to its request, with the claimer claiming by `mode`
    (and, with `statements_too`, the statements' mean times printed)."""
    name, url = await server.create_database()
    try:
        async with connect(url) as conn:
            await fetch(
                conn,
                "add_tenant_endpoints",
                {"count": 1, "url": receiver.url(PATH), "secret": SECRET},
            )
            if statements_too:
                if not await install_statement_counts(conn):
                    raise RuntimeError("pg_stat_statements could not be loaded")
                await fetch(conn, "track_nested_statements")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--claimer",
            mode,
            url,
            receiver.url(PATH),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            if (await process.stdout.readline()).strip() != b"ready":
                raise RuntimeError(f"the {mode} claimer exited ({process.returncode})")
            receiver.drain()
            if statements_too:
                async with connect(url) as conn:
                    await fetch(conn, "reset_statement_counts")
            committed: dict[str, float] = {}
            async with connect(url) as producer:

                async def insert(n: int) -> None:
                    event_id, at = await insert_event(producer, TENANT, "floor.test", {"n": n})
                    committed[event_id] = at

                await paced(events, RATE, insert)

            async def drain() -> list[Hit]:
                return receiver.drain()

            hits = await collect_hits(drain, events, 30, PATH)
            if statements_too:
                async with connect(url) as conn:
                    timed = await fetch(conn, "statement_times", {"calls": events * 9 // 10})
                for row in timed:
                    print(f"      {row['mean_us']:>6,.0f} µs {row['nested']:>6} {row['query']}")
        finally:
            process.terminate()
            await process.wait()
    finally:
        await server.drop_database(name)
    return latencies(committed, first_arrivals(hits), [PATH])


def summary_line(mode: str, seconds: list[float]) -> str:
    figures = summarize(seconds)
    return (
        f"{mode:>13}: p50 {figures['p50_ms']:.2f} / p95 {figures['p95_ms']:.2f} / "
        f"p99 {figures['p99_ms']:.2f} / max {figures['max_ms']:.1f} ms ({len(seconds)} requests)"
    )


async def main(rounds: int, events: int, statements_too: bool) -> None:
    async with Server.open(None, "latency_floor") as server, contextlib.AsyncExitStack() as stack:
        print(server.describe(), file=sys.stderr)
        if statements_too:
            await stack.enter_async_context(preloaded_statement_counts(server))
        receiver = ReceiverProcess({PATH: PathSpec(Behaviour(), ())}).start()
        medians: dict[str, list[float]] = {mode: [] for mode in CLAIMS}
        try:
            for round_number in range(1, rounds + 1):
                print(f"round {round_number}, {events} events at {RATE}/s:")
                for mode in CLAIMS:
                    seconds = await measure(server, receiver, mode, events, statements_too)
                    medians[mode].append(summarize(seconds)["p50_ms"])
                    print("  " + summary_line(mode, seconds), flush=True)
        finally:
            receiver.stop()
        for mode, p50s in medians.items():
            print(f"{mode:>13}: median of the rounds' p50, {statistics.median(p50s):.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--claimer":
        import uvloop

        uvloop.run(claimer(*sys.argv[2:5]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rounds", type=int, default=3, help="each way this many times (3)")
        parser.add_argument("--events", type=int, default=500, help="events per measurement (500)")
        parser.add_argument(
            "--statements",
            action="store_true",
            help="print each statement's mean time (pg_stat_statements, nested statements too)",
        )
        arguments = parser.parse_args()
        asyncio.run(main(arguments.rounds, arguments.events, arguments.statements))
