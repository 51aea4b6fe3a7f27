"""The bench's scenarios: each makes a database of its own, runs real workers against it, and
returns its figures with the CPU and memory they cost."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid

import aiohttp

from notifyhook import signing
from notifyhook.store import connect
from notifyhook.tools import latency, scenario
from notifyhook.tools.bench_context import (
    CEILING_PATH,
    FAST,
    PEER_PATH,
    SECRET,
    SLOW,
    SLOW_S,
    TENANTS,
    Bench,
    Result,
    Scenario,
    Trial,
    latency_summary,
)
from notifyhook.tools.bench_workload import (
    insert_backlog,
    install_statement_counts,
    load_history,
    paced_producer,
    preloaded_statement_counts,
    start_statement_count,
    statements_since,
    wait_delivered,
    wal_position,
)
from notifyhook.tools.cluster import free_port
from notifyhook.tools.receiver_process import Hit
from notifyhook.tools.scenario import ScenarioError
from notifyhook.tools.usage import Meter, Usage
from notifyhook.tools.workers import WorkerError

LATENCY_RATES = (50, 500)
NOISY_RATE = 100


async def ceiling(bench: Bench) -> Result:
    """The receiver's own ceiling: an aiohttp client posting signed requests straight at it."""
    total, parallel = bench.size.ceiling, 64
    body = b'{"type":"bench.ceiling","padding":"' + b"x" * 200 + b'"}'
    url = bench.receiver.url(CEILING_PATH)
    meter = Meter([], None, bench.receiver.pid)
    left = iter(range(total))

    async def post(session: aiohttp.ClientSession) -> None:
        for _ in left:
            headers = signing.webhook_headers([SECRET], str(uuid.uuid4()), int(time.time()), body)
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=parallel)) as session:
        await asyncio.gather(*(post(session) for _ in range(parallel)))
    used = meter.read()
    hits = await bench.collect(total, 30, CEILING_PATH)
    rate = total / used.wall_s
    cpu_per_request = used.receiver_cpu_s / total
    one_core = 1 / cpu_per_request if cpu_per_request else math.inf
    return Result(
        "receiver",
        "ceiling",
        f"{one_core:,.0f} requests/s per core of receiver CPU ({cpu_per_request * 1e6:.0f} µs "
        f"per request); {rate:,.0f}/s measured with {parallel} POSTs at a time",
        "above the workers' rate",
        {
            "requests_per_s_per_core": one_core,
            "receiver_cpu_us_per_request": cpu_per_request * 1e6,
            "measured_requests_per_s": rate,
            "verified": sum(1 for h in hits if h.verified),
        },
        used,
        note="measured by an aiohttp client in the bench process, which shares the cores with "
        "the receiver: the measured rate is the client's as much as the receiver's",
    )


async def peer(bench: Bench) -> list[Result]:
    """benchmarks/pgqueuer_compare.py's shape: the backlog to ONE endpoint, one worker at
    CONCURRENCY 50, to be read beside that script's figures taken in the same window; the
    receiver does what that script's does (PEER_PATH: answers, checks no signature)."""
    count = bench.size.backlog
    async with bench.trial([(TENANTS[0], PEER_PATH)]) as trial:
        port = free_port()
        await trial.start_workers(1, {"CONCURRENCY": "50", "METRICS_PORT": str(port)})
        await bench.settle()
        await insert_backlog(trial.url, count, TENANTS[:1])
        meter = trial.meter()
        hits = await bench.collect(count, 120 + count / 50, PEER_PATH)
        await wait_delivered(trial.url, count, 60)
        used, rss = meter.read(), trial.peak_rss()
        claims = await claim_percentiles(port)
    result = _backlog_result("1 endpoint, 1 worker, CONCURRENCY 50", count, used, rss, "")
    result.scenario, result.target = "peer", "≥ 1.5 x pgqueuer + aiohttp (same window)"
    # One endpoint's claims take turns on its turn row, so this rate is about the rows a
    # claim takes divided by how long a claim cycle lasts (docs/performance.md).
    result.figures.update(claims)
    result.summary += "; " + _claims_summary(claims)
    result.note = _with_unverified("", hits)
    return [result]


async def _drain_backlog(
    bench: Bench, workers: int, case: str, history: int | None = None
) -> Result:
    """`size.backlog` deliveries queued by one INSERT, timed from its COMMIT until all are
    recorded as delivered. `history`: delivered rows written first (0 too), then VACUUM
    ANALYZE as autovacuum would have done; None: the fresh database as it is."""
    count, note = bench.size.backlog, ""
    async with bench.trial([(tenant, FAST) for tenant in TENANTS]) as trial:
        if history is not None:
            loaded = await load_history(trial.url, history, TENANTS)
            note = f"{history:,} delivered rows of history loaded in {loaded:.0f}s, vacuumed"
        await trial.start_workers(workers)
        wal = [await wal_position(trial.url)]
        await insert_backlog(trial.url, count, TENANTS)
        meter = trial.meter()
        wal.append(await wal_position(trial.url))
        hits = await bench.collect(count, 120 + count / 50, FAST)
        await wait_delivered(trial.url, count, 60)
        used, rss = meter.read(), trial.peak_rss()
        wal.append(await wal_position(trial.url))
    result = _backlog_result(case, count, used, rss, _with_unverified(note, hits))
    # WAL per event enqueued (event, delivery row, index entries) and per delivery made
    # (claim, attempt row, outcome): what a standby must receive, and what archives keep.
    result.figures["wal_bytes_per_enqueue"] = (wal[1] - wal[0]) / count
    result.figures["wal_bytes_per_delivery"] = (wal[2] - wal[1]) / count
    result.summary += (
        f"; WAL per event {result.figures['wal_bytes_per_enqueue']:,.0f} B enqueued, "
        f"{result.figures['wal_bytes_per_delivery']:,.0f} B delivered"
    )
    return result


def _with_unverified(note: str, hits: list[Hit]) -> str:
    # None: a path with no secret to check against (PEER_PATH).
    unverified = sum(1 for h in hits if h.verified is False)
    if unverified:
        note += f"; {unverified} requests failed verification"
    return note.strip("; ")


def _backlog_result(case: str, count: int, used: Usage, rss: int | None, note: str) -> Result:
    rate = count / used.wall_s
    figures = {
        "deliveries": count,
        "seconds": used.wall_s,
        "deliveries_per_s": rate,
        "worker_cpu_us_per_delivery": used.worker_cpu_s / count * 1e6,
        "postgres_cpu_us_per_delivery": (used.postgres_cpu_s or 0) / count * 1e6,
    }
    summary = (
        f"{rate:,.0f} deliveries/s ({count:,} in {used.wall_s:.1f}s; CPU per delivery: worker "
        f"{figures['worker_cpu_us_per_delivery']:.0f} µs, PostgreSQL "
        f"{figures['postgres_cpu_us_per_delivery']:.0f} µs)"
    )
    return Result("backlog", case, summary, "", figures, used, rss, note)


async def backlog(bench: Bench) -> list[Result]:
    one = await _drain_backlog(bench, 1, "1 worker")
    one.target = "≥ 2,000/s; RSS < 150 MB"
    many = await _drain_backlog(bench, bench.workers, f"{bench.workers} workers")
    many.target = "≥ 3,000/s with 2"
    return [one, many]


async def steady_rate(bench: Bench) -> list[Result]:
    """Events one per transaction at a steady rate; COMMIT to the first request for each."""
    async with bench.trial([(TENANTS[0], FAST)]) as trial:
        await trial.start_workers(1)
        return [await _latency_at(bench, trial, rate) for rate in LATENCY_RATES]


async def _latency_at(bench: Bench, trial: Trial, rate: int) -> Result:
    count = max(10, round(rate * bench.size.latency_s))
    meter = trial.meter()
    committed, achieved = await paced_producer(trial.url, TENANTS[0], rate, count)
    hits = await bench.collect(count, 60, FAST)
    used = meter.read()
    figures = latency.summarize(latency.latencies(committed, latency.first_arrivals(hits)))
    figures["achieved_per_s"] = achieved
    return Result(
        "latency",
        f"{rate}/s",
        f"{latency_summary(figures)} ({count:,} events at {achieved:,.0f}/s)",
        "p50 ≤ 2 ms, p99 ≤ 6 ms" if rate == 50 else "",
        dict(figures),
        used,
        trial.peak_rss(),
    )


async def idle(bench: Bench) -> list[Result]:
    """What a worker with nothing to do costs the database, counted by pg_stat_statements
    where it can be loaded, else by committed transactions."""
    poll = bench.size.idle_poll_s
    async with (
        preloaded_statement_counts(bench.server),
        bench.trial([(TENANTS[0], FAST)]) as trial,
        connect(trial.url) as conn,
    ):
        counting = await install_statement_counts(conn)
        await trial.start_workers(1, {"POLL_INTERVAL": f"{poll:g}"})
        await asyncio.sleep(1.0)  # start-up's own queries are not idling
        before = await start_statement_count(conn, counting)
        meter = trial.meter()
        await asyncio.sleep(bench.size.idle_s)
        used = meter.read()
        statements_run, how = await statements_since(conn, counting, before)
        rss = trial.peak_rss()
    per_minute = statements_run * 60 / used.wall_s
    per_poll = statements_run * poll / used.wall_s
    return [
        Result(
            "idle",
            f"1 worker, POLL_INTERVAL {poll:g}s",
            f"{per_minute:.0f} statements/min = {per_poll:.1f} per poll interval "
            f"(over {used.wall_s:.0f}s)",
            "a few per POLL_INTERVAL",
            {"statements_per_min": per_minute, "statements_per_poll": per_poll},
            used,
            rss,
            how,
        )
    ]


async def noisy(bench: Bench) -> list[Result]:
    """Endpoint A answers in 2 s and has a backlog; B, another endpoint of the SAME tenant,
    gets fresh events, which must not wait behind A's."""
    count = bench.size.noisy_fast
    async with bench.trial([("noisy", SLOW), ("noisy", FAST)]) as trial:
        slow, fast = trial.endpoint_ids
        await insert_backlog(trial.url, bench.size.noisy_slow, ["noisy"], slow)
        await trial.start_workers(1, {"SHUTDOWN_GRACE": "3"})
        await asyncio.sleep(SLOW_S * 1.5)  # A's requests fill the slots it may take
        await bench.drain()
        meter = trial.meter()
        committed, _ = await paced_producer(trial.url, "noisy", NOISY_RATE, count, fast)
        hits = await bench.collect(count, 60, FAST)
        used, rss = meter.read(), trial.peak_rss()
    figures = latency.summarize(latency.latencies(committed, latency.first_arrivals(hits), [FAST]))
    served = sum(1 for h in hits if h.path == SLOW) / used.wall_s
    figures["slow_served_per_s"] = served
    return [
        Result(
            "noisy",
            f"B at {NOISY_RATE}/s beside A (2 s/request), one tenant",
            f"B: {latency_summary(figures)}; A meanwhile {served:.0f}/s of "
            f"{bench.size.noisy_slow:,} queued",
            "B's p99 < 100 ms",
            dict(figures),
            used,
            rss,
        )
    ]


async def history(bench: Bench) -> list[Result]:
    """The backlog over `size.history` delivered rows against the same backlog over none,
    run back to back, each database vacuumed and analysed first: compared with the backlog
    scenario's run instead (a fresh database that autovacuum analyses mid-drain, or not,
    minutes earlier) the ratio moved by ±20% with the machine and the statistics."""
    try:
        empty = await _drain_backlog(bench, 1, "1 worker, no history", 0)
        result = await _drain_backlog(
            bench, 1, f"1 worker over {bench.size.history:,} rows", bench.size.history
        )
    except (ScenarioError, WorkerError) as error:
        return [Result("history", "1 worker", f"skipped: {error}")]
    result.scenario, result.target = "history", "within 10% of empty"
    empty_rate = empty.figures["deliveries_per_s"]
    ratio = result.figures["deliveries_per_s"] / empty_rate
    result.figures["vs_empty"] = ratio
    result.figures["empty_deliveries_per_s"] = empty_rate
    result.summary += (
        f"; {ratio:.0%} of the same backlog over no history ({empty_rate:,.0f}/s, just before)"
    )
    return [result]


ENDPOINT_COUNTS = (10, 1_000, 10_000, 10)
"""The 10-endpoint run comes first and last: the machine's speed drifts over a minute (±20%
between runs on the project's VM), and a ratio to one run before the others would carry
the drift to the 10,000-endpoint case, which runs last."""


async def endpoints(bench: Bench) -> list[Result]:
    """The multi-tenant shape: the same backlog spread over 10, 1,000 and 10,000 endpoints,
    each its own tenant, drained by one worker; with how long its claims took. Rates are
    compared with the mean of the two 10-endpoint runs, one before and one after."""
    count = bench.size.endpoints_backlog
    results = []
    for run, spread in enumerate(ENDPOINT_COUNTS):
        async with bench.trial([]) as trial:
            async with connect(trial.url) as conn:
                await conn.execute(
                    scenario.statements()["add_tenant_endpoints"],
                    {"url": bench.receiver.url(FAST), "secret": SECRET, "count": spread},
                )
            port = free_port()
            await trial.start_workers(1, {"METRICS_PORT": str(port)})
            await insert_backlog(trial.url, count, [f"tenant-{n}" for n in range(1, spread + 1)])
            meter = trial.meter()
            hits = await bench.collect(count, 120 + count / 50, FAST)
            await wait_delivered(trial.url, count, 60)
            used, rss = meter.read(), trial.peak_rss()
            claims = await claim_percentiles(port)
        again = ", again" if spread in ENDPOINT_COUNTS[:run] else ""
        result = _backlog_result(f"{spread:,} endpoints{again}", count, used, rss, "")
        result.scenario = "endpoints"
        result.figures.update(claims)
        result.summary += "; " + _claims_summary(claims)
        result.note = _with_unverified("", hits)
        results.append(result)
    base = (results[0].figures["deliveries_per_s"] + results[-1].figures["deliveries_per_s"]) / 2
    for result in results[1:-1]:
        ratio = result.figures["deliveries_per_s"] / base
        result.figures["vs_10_endpoints"] = ratio
        result.summary += f"; {ratio:.0%} of the 10-endpoint rate ({base:,.0f}/s, before and after)"
    results[-2].target = "≥ 80% of the 10-endpoint rate"
    return results


def _claims_summary(claims: dict[str, float]) -> str:
    return (
        f"{claims['claims']:,.0f} claims of {claims['rows_per_claim']:.1f} rows, "
        f"p50 {claims['claim_p50_ms']:.1f} / p99 {claims['claim_p99_ms']:.1f} ms"
    )


async def claim_percentiles(port: int) -> dict[str, float]:
    """Claim time p50/p99 from a worker's notifyhook_claim_duration_seconds histogram,
    interpolated within its buckets, and the rows a claim took on average."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    buckets = [
        (float(bound), float(value))
        for bound, value in re.findall(
            r'^notifyhook_claim_duration_seconds_bucket\{le="([^"+]+)"\} (\S+)$', text, re.M
        )
    ]
    total = float(re.findall(r"^notifyhook_claim_duration_seconds_count (\S+)$", text, re.M)[0])
    rows = float(re.findall(r"^notifyhook_claim_batch_size_sum (\S+)$", text, re.M)[0])
    return {
        "claims": total,
        "rows_per_claim": rows / total if total else 0.0,
        "claim_p50_ms": _bucket_quantile(buckets, total, 0.5) * 1000,
        "claim_p99_ms": _bucket_quantile(buckets, total, 0.99) * 1000,
    }


def _bucket_quantile(buckets: list[tuple[float, float]], total: float, q: float) -> float:
    wanted, below, lower = q * total, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= wanted:
            inside = cumulative - below
            return lower + (bound - lower) * ((wanted - below) / inside if inside else 1.0)
        below, lower = cumulative, bound
    return lower


RATE_LIMIT = 20
RATE_LIMITED = 100


async def rate_limited(bench: Bench) -> list[Result]:
    """100 deliveries to one endpoint limited to 20/s, shared by two workers (same size always)."""
    async with bench.trial([("limited", FAST)]) as trial:
        await _limit_rate(trial.url, trial.endpoint_ids[0], RATE_LIMIT)
        await trial.start_workers(2)
        await bench.drain()
        meter = trial.meter()
        await insert_backlog(trial.url, RATE_LIMITED, ["limited"])
        hits = await bench.collect(RATE_LIMITED, 60, FAST)
        used, rss = meter.read(), trial.peak_rss()
    times = sorted(h.received_at for h in hits if h.path == FAST)
    span = times[-1] - times[0]
    busiest = _busiest_second(times)
    return [
        Result(
            "ratelimit",
            f"{RATE_LIMITED} at rate_limit {RATE_LIMIT}/s, 2 workers",
            f"first to last {span:.2f}s; at most {busiest} in any second "
            f"(bucket: {RATE_LIMIT} burst + {RATE_LIMIT}/s)",
            f"≥ {(RATE_LIMITED - RATE_LIMIT) / RATE_LIMIT:.0f} s; ≤ {2 * RATE_LIMIT} in a second",
            {"span_s": span, "busiest_second": busiest},
            used,
            rss,
        )
    ]


async def _limit_rate(url: str, endpoint_id: int, per_s: int) -> None:
    async with connect(url) as conn:
        await conn.execute(
            scenario.statements()["set_rate_limit"],
            {"rate_limit": per_s, "endpoint_id": endpoint_id},
        )


def _busiest_second(times: list[float]) -> int:
    """The most requests the receiver saw in any one-second window (`times` sorted)."""
    return max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times))


SCENARIOS: dict[str, Scenario] = {
    "backlog": backlog,
    "latency": steady_rate,
    "idle": idle,
    "noisy": noisy,
    "ratelimit": rate_limited,
    "history": history,
    "endpoints": endpoints,
    "peer": peer,
}
"""Every scenario by its name, in the order they run; bench.SCENARIO_NAMES lists the same."""
