"""The bench's load on the database: paced and bulk events, history, and statement counts."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from notifyhook.store import DatabaseError, connect
from notifyhook.tools import scenario
from notifyhook.tools.scenario import ScenarioError, Server, fetch, statements

log = logging.getLogger("notifyhook.bench")


async def paced_producer(
    url: str, tenant: str, rate: float, count: int, endpoint_id: int | None = None
) -> tuple[dict[str, float], float]:
    """One event per transaction at `rate`, from enough connections to keep up (to one
    endpoint of the tenant when `endpoint_id` is set): {event id: commit time}, and the
    rate achieved."""
    connections = max(1, math.ceil(rate / 100))
    committed: dict[str, float] = {}

    async def produce(offset: int) -> float:
        async with connect(url) as conn:
            await asyncio.sleep(offset / rate)

            async def insert(n: int) -> None:
                event_id, at = await scenario.insert_event(
                    conn, tenant, "bench.latency", {"n": n * connections + offset}, endpoint_id
                )
                committed[event_id] = at

            share = count // connections + (1 if offset < count % connections else 0)
            return await scenario.paced(share, rate / connections, insert)

    rates = await asyncio.gather(*(produce(k) for k in range(connections)))
    return committed, sum(rates)


async def insert_backlog(
    url: str, count: int, tenants: Sequence[str], endpoint_id: int | None = None
) -> None:
    async with connect(url) as conn:
        await conn.execute(
            scenario.statements()["insert_backlog"],
            {"count": count, "tenants": list(tenants), "endpoint_id": endpoint_id},
        )


async def wal_position(url: str) -> int:
    """The server's WAL position in bytes: the difference of two is the WAL written between."""
    async with connect(url) as conn:
        return int((await fetch(conn, "wal_position"))[0]["wal_bytes"])


async def wait_delivered(url: str, count: int, within_s: float) -> None:
    async with connect(url) as conn:

        async def done() -> bool:
            totals = (await fetch(conn, "delivery_totals"))[0]
            return int(totals["delivered"]) >= count

        await scenario.wait_for(done, within_s, f"{count} deliveries recorded", 0.05)


# -- counting an idle worker's statements ----------------------------------------------------


@asynccontextmanager
async def preloaded_statement_counts(server: Server) -> AsyncIterator[None]:
    """pg_stat_statements loaded into our own cluster for the block, a restart each way; a
    server at NOTIFYHOOK_DATABASE_URL is not ours to restart, and is left as it is."""
    if server.cluster is None:
        yield
        return
    await _restart_with(server, "preload_statement_counts")
    try:
        yield
    finally:
        await _restart_with(server, "reset_preload")


async def _restart_with(server: Server, statement: str) -> None:
    async with connect(server.admin_url) as conn:
        await conn.execute(statements()[statement])
    await server.restart()


async def install_statement_counts(conn: scenario.Connection) -> bool:
    try:
        await conn.execute(statements()["install_statement_counts"])
    except DatabaseError:
        return False
    return bool((await fetch(conn, "statement_counts_available"))[0]["available"])


async def start_statement_count(conn: scenario.Connection, counting: bool) -> int:
    """Zero pg_stat_statements when `counting`, else the transactions committed so far."""
    if counting:
        await fetch(conn, "reset_statement_counts")
        return 0
    return await _commit_count(conn)


async def statements_since(
    conn: scenario.Connection, counting: bool, before: int
) -> tuple[int, str]:
    """The statements run since `start_statement_count`, and how they were counted."""
    if counting:
        rows = await fetch(conn, "statement_counts")
        run = sum(int(r["calls"]) for r in rows)
        return run, f"pg_stat_statements: {_statement_breakdown(rows)}"
    run = await _commit_count(conn) - before
    return run, "committed transactions (pg_stat_database), pg_stat_statements not loaded"


async def _commit_count(conn: scenario.Connection) -> int:
    return int((await fetch(conn, "commit_count"))[0]["xact_commit"])


def _statement_breakdown(rows: Sequence[dict[str, Any]]) -> str:
    names = []
    for row in rows[:4]:
        query = str(row["query"])
        called = re.search(r"notifyhook\.(\w+)\(", query)
        label = called.group(1) if called else query[:50]
        names.append(f"{label}: {row['calls']}")
    return ", ".join(names)


async def load_history(url: str, count: int, tenants: Sequence[str]) -> float:
    """`count` delivered deliveries with their events and attempts, written straight in."""
    started = time.monotonic()
    params = {"count": count, "tenants": list(tenants)}
    async with connect(url) as conn:
        try:
            await conn.execute(statements()["history_without_triggers"])
        except DatabaseError as error:
            raise ScenarioError(
                f"writing history needs session_replication_role ({error.sqlstate})"
            ) from None
        for step in (
            "history_partitions",
            "history_events",
            "history_deliveries",
            "history_attempts",
        ):
            await conn.execute(statements()[step], params)
        await conn.execute(statements()["history_done"])
        await conn.execute(statements()["history_vacuum"])
        try:
            await conn.execute(statements()["history_checkpoint"])
        except DatabaseError as error:  # not a superuser, nor pg_checkpoint: measured anyway
            log.warning("history loaded without a CHECKPOINT after it (%s)", error.sqlstate)
    return time.monotonic() - started
