"""What the demo and the bench share: a server to work in, their workers' settings, the producer."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from notifyhook.errors import NotifyhookError
from notifyhook.migrate import migrate
from notifyhook.store import (
    connect,
    create_database,
    drop_database,
    json_param,
    run_dicts,
    with_dbname,
)
from notifyhook.store import (
    statements as load_statements,
)
from notifyhook.tools import cluster, usage
from notifyhook.tools.workers import WorkerProcess

Connection = Any
"""An open psycopg.AsyncConnection (from notifyhook.store.connect)."""


class ScenarioError(NotifyhookError):
    """The demo or the bench could not go on: a worker died, or a wait ran out of time."""


def statements() -> dict[str, str]:
    """The named statements of notifyhook/tools/scenario.sql."""
    return load_statements("tools/scenario.sql")


async def fetch(
    conn: Connection, name: str, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run a statement of scenario.sql; its rows as dicts (none for a statement without)."""
    return await run_dicts(conn, statements()[name], params)


# -- where the scenario runs ---------------------------------------------------------------


class Server(cluster.Server):
    """A PostgreSQL server to make scenario databases in: a throwaway cluster started here,
    or the server of a given URL. Everything made is removed by `close`."""

    def __init__(self, url: str | None, prefix: str) -> None:
        super().__init__(url, fsync=True)
        self._prefix = prefix
        self.databases: list[str] = []
        self.postmaster: int | None = None
        self.version = ""

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str | None, prefix: str) -> AsyncIterator[Server]:
        server = cls(url, prefix)
        try:
            await server._start()
            yield server
        finally:
            await server.close()

    async def _start(self) -> None:
        await _uninterrupted(self.start)
        await self._learn_facts()

    async def _learn_facts(self) -> None:
        async with connect(self.admin_url) as conn:
            facts = (await fetch(conn, "server_facts"))[0]
            # While the connection is open: a closed session's backend may be gone from /proc.
            self.postmaster = usage.postmaster_of(int(facts["backend_pid"]))
        self.version = str(facts["version"])

    async def restart(self) -> None:
        """Restart our own cluster (to load a library); a no-op on a given server."""
        if self.cluster is not None:
            await _uninterrupted(self.cluster.restart)
            await self._learn_facts()

    def describe(self) -> str:
        if self.cluster is not None:
            return (
                f"a throwaway PostgreSQL {self.version} cluster in {self.cluster.root} "
                f"on port {self.cluster.port}"
            )
        return f"PostgreSQL {self.version} at NOTIFYHOOK_DATABASE_URL, in databases of our own"

    async def create_database(self) -> tuple[str, str]:
        """A fresh database, migrated: (name, url)."""
        name = f"{self._prefix}_{secrets.token_hex(4)}"
        await create_database(self.admin_url, name)
        self.databases.append(name)
        url = with_dbname(self.admin_url, name)
        async with connect(url) as conn:
            await migrate(conn, max_payload_bytes=262_144)
        return name, url

    async def drop_database(self, name: str) -> None:
        await drop_database(self.admin_url, name)
        self.databases.remove(name)

    async def close(self) -> None:
        try:
            for name in list(self.databases):
                if self.cluster is None:
                    await self.drop_database(name)
        finally:
            await asyncio.to_thread(self.stop)


async def _uninterrupted(action: Callable[[], Any]) -> None:
    """Run a blocking cluster command in a thread, and on Ctrl-C let it finish before
    cleaning up: stopping a cluster that initdb or pg_ctl is still creating could leave a
    server running."""
    running = asyncio.ensure_future(asyncio.to_thread(action))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


# -- worker processes ----------------------------------------------------------------------

WORKER_DEFAULTS = {
    "ALLOW_PRIVATE_NETWORKS": "true",
    "LOG_LEVEL": "INFO",
    "SHUTDOWN_GRACE": "5",
}


def start_worker(
    url: str, worker_id: str, directory: Path, settings: Mapping[str, str]
) -> WorkerProcess:
    """A worker process that reports READY as it would to systemd (`await wait_ready()`),
    in a session of its own: a Ctrl-C meant for the demo is the demo's to handle."""
    return WorkerProcess(
        url,
        worker_id,
        directory,
        {**WORKER_DEFAULTS, **settings},
        ready_socket=True,
        own_session=True,
    )


def stop_workers(workers: Iterable[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


# -- the producer ----------------------------------------------------------------------------


async def insert_event(
    conn: Connection,
    tenant_id: str,
    event_type: str,
    payload: dict[str, Any],
    endpoint_id: int | None = None,
) -> tuple[str, float]:
    """INSERT one event on an autocommit connection: (its id, time.time() once committed)."""
    cursor = await conn.execute(
        statements()["insert_event"],
        {
            "tenant_id": tenant_id,
            "event_type": event_type,
            "payload": json_param(payload),
            "endpoint_id": endpoint_id,
        },
    )
    row = await cursor.fetchone()
    return str(row[0]), time.time()


async def paced(
    count: int, rate: float, insert: Callable[[int], Awaitable[None]], stop_at: float | None = None
) -> float:
    """Call `insert(n)` for n in 0..count-1 at `rate` per second (catching up, never bursting
    ahead); stop early at monotonic time `stop_at`. Returns the rate achieved."""
    start = time.monotonic()
    done = 0
    for n in range(count):
        due = start + n / rate
        if stop_at is not None and due > stop_at:
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await insert(n)
        done += 1
    elapsed = time.monotonic() - start
    return done / elapsed if elapsed > 0 else 0.0


async def wait_for(
    check: Callable[[], Awaitable[bool]], within_s: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise ScenarioError(f"timed out after {within_s:g}s waiting for {what}")
        await asyncio.sleep(interval)
