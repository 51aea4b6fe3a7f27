"""One chaos run: its own PostgreSQL, a receiver, a worker fleet, a producer, and the faults."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from notifyhook.migrate import migrate
from notifyhook.tools.cluster import Cluster
from notifyhook.tools.receiver import Arrival, Receiver

from .fleet import Fleet
from .plan import Config, EndpointPlan, Step, endpoints, matches, timeline
from .producer import Event, Producer

SETTLED = """
SELECT count(*) FILTER (WHERE d.status = 'processing' OR (d.status = 'pending' AND e.enabled)),
       count(*)
FROM notifyhook.deliveries AS d JOIN notifyhook.endpoints AS e ON e.id = d.endpoint_id
"""
IN_FLIGHT = (
    "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'processing' AND locked_by = %s"
)
PROCESSING = "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'processing'"
SYNCHRONOUS = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
TERMINATE = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE application_name = 'notifyhook' AND pid <> pg_backend_pid()"
)
SNAPSHOT = {
    "deliveries": "SELECT id, event_id::text, endpoint_id, status, attempts, last_status_code, "
    "last_error FROM notifyhook.deliveries",
    "attempts": "SELECT delivery_id, attempt, status_code, error, worker FROM notifyhook.attempts",
    "events": "SELECT id::text, extract(epoch FROM created_at)::float8 FROM notifyhook.events",
    "endpoints": "SELECT id, name, enabled, disabled_reason FROM notifyhook.endpoints",
}


@dataclass
class Fault:
    at: float
    """Seconds since production started."""
    action: str
    detail: str
    count: int | None = None
    """kill: the victim's claims in flight; terminate: connections cut; failover: deliveries
    in flight on the primary just before it stopped."""


@dataclass
class Observed:
    """Everything a run saw, for the checks: the receivers' records and the database's."""

    config: Config
    plans: dict[str, EndpointPlan]
    endpoint_ids: dict[str, int]
    events: list[Event]
    arrivals: list[Arrival]
    faults: list[Fault]
    exit_codes: dict[str, int | None]
    settled: bool
    producer_errors: int
    seconds: float
    logs: list[Path] = field(default_factory=list)
    tables: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def expected(self) -> set[tuple[str, str]]:
        return expected_deliveries(self.plans, self.events)


def expected_deliveries(
    plans: dict[str, EndpointPlan], events: list[Event]
) -> set[tuple[str, str]]:
    """(endpoint name, event id) of every delivery the subscriptions call for."""
    return {
        (plan.name, event.event_id)
        for event in events
        for plan in plans.values()
        if plan.tenant == event.tenant and matches(plan.event_types, event.event_type)
    }


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=3, application_name="chaos")


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]] | None:
    """Rows, or None while the server is away (restarting)."""
    try:
        with connect(url) as conn:
            return conn.execute(sql, params).fetchall()
    except psycopg.OperationalError:
        return None


def wait_for(predicate: Any, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def run(config: Config, workdir: Path, say: Any = print) -> Observed:
    """Run the scenario described by `config`; worker logs go to `workdir`."""
    rng = random.Random(config.seed)
    began = time.monotonic()
    with _servers(config) as (cluster, standby):
        url = _database_url(cluster, standby)
        asyncio.run(_migrate(url))
        receiver = Receiver().start_in_thread()
        fleet = Fleet(url, workdir, config.workers)
        producer: Producer | None = None
        try:
            plans = {plan.name: plan for plan in endpoints(config)}
            endpoint_ids = _create_endpoints(url, receiver, plans)
            fleet.start()
            say(
                f"chaos[{config.name}]: PostgreSQL at {url} (cluster in {cluster.root} on port "
                f"{cluster.port}), logs in {workdir}"
            )
            _wait_until_ready(fleet, workdir)
            origin = time.monotonic()
            producer = Producer(url, config.rate, config.seconds, config.seed, origin)
            producer.start()
            faults = _unleash(config, rng, (cluster, standby), fleet, origin, say)
            producer.join(config.seconds + 60)
            if producer.failure is not None:
                raise producer.failure
            expected = len(expected_deliveries(plans, producer.events))
            settled = wait_for(lambda: _settled(url, expected), config.drain_timeout)
            say(
                f"chaos[{config.name}]: {'settled' if settled else 'NOT settled'}; stopping the workers"
            )
            exit_codes = fleet.stop()
            observed = Observed(
                config=config,
                plans=plans,
                endpoint_ids=endpoint_ids,
                events=producer.events,
                arrivals=receiver.received(),
                faults=faults,
                exit_codes=exit_codes,
                settled=settled,
                producer_errors=producer.errors,
                seconds=time.monotonic() - began,
                logs=[worker.log_path for worker in fleet.gone],
            )
            with connect(url) as conn:
                observed.tables = {
                    name: conn.execute(sql).fetchall() for name, sql in SNAPSHOT.items()
                }
            return observed
        finally:
            if producer is not None:
                producer.stop()
                producer.join(10)
            fleet.kill_all()
            receiver.stop_thread()


@contextmanager
def _servers(config: Config) -> Iterator[tuple[Cluster, Cluster | None]]:
    """The primary, and for a failover run its synchronous streaming standby.

    fsync is off (failover here is a process stop, not a power cut: the page cache
    survives), but synchronous_commit stays on: a commit returns only once the
    standby has the WAL, which is what makes the failover lose nothing.
    """
    if config.failover_at is None:
        with Cluster() as cluster:
            yield cluster, None
        return
    with Cluster(fsync=False, settings={"synchronous_commit": "on"}) as primary:
        standby = primary.start_standby()
        try:
            with connect(primary.url()) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
                if not wait_for(lambda: conn.execute(SYNCHRONOUS).fetchone() == (1,), 30):
                    raise RuntimeError("the standby did not become synchronous")
            yield primary, standby
        finally:
            standby.stop()


def _database_url(cluster: Cluster, standby: Cluster | None) -> str:
    """The workers' DATABASE_URL: with a standby, both hosts, and only a writable one will do."""
    if standby is None:
        return cluster.url()
    return (
        f"postgresql://postgres@127.0.0.1:{cluster.port},127.0.0.1:{standby.port}/postgres"
        "?target_session_attrs=read-write"
    )


async def _migrate(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await migrate(conn, max_payload_bytes=262144)


def _create_endpoints(
    url: str, receiver: Receiver, plans: dict[str, EndpointPlan]
) -> dict[str, int]:
    ids = {}
    with connect(url) as conn:
        for plan in plans.values():
            columns = {
                "tenant_id": plan.tenant,
                "name": plan.name,
                "url": receiver.url(plan.name),
                "event_types": list(plan.event_types),
                "extra_fields": json.dumps({"endpoint": plan.name}),
                **plan.columns,
            }
            names = ", ".join(columns)
            marks = ", ".join(["%s"] * len(columns))
            row = conn.execute(
                f"INSERT INTO notifyhook.endpoints ({names}) VALUES ({marks}) RETURNING id, secret",
                list(columns.values()),
            ).fetchone()
            assert row is not None
            ids[plan.name] = int(row[0])
            receiver.script(plan.name, plan.script)
            receiver.trust(plan.name, row[1])
    return ids


def _unleash(
    config: Config,
    rng: random.Random,
    servers: tuple[Cluster, Cluster | None],
    fleet: Fleet,
    start: float,
    say: Any,
) -> list[Fault]:
    """Play the timeline of faults against the fleet and the server."""
    url = _database_url(*servers)
    faults = []
    for step in timeline(config, rng):
        time.sleep(max(0.0, start + step.at - time.monotonic()))
        fault = _inflict(step, url, rng, servers, fleet)
        fault.at = time.monotonic() - start
        faults.append(fault)
        say(f"  {fault.at:6.1f}s  {fault.action:<18} {fault.detail}")
    return faults


def _inflict(
    step: Step,
    url: str,
    rng: random.Random,
    servers: tuple[Cluster, Cluster | None],
    fleet: Fleet,
) -> Fault:
    cluster, standby = servers
    if step.action == "failover" and standby is not None:
        return _fail_over(step, cluster, standby)
    if step.action == "kill":
        victim = rng.choice(fleet.live)
        rows = query(url, IN_FLIGHT, [victim.worker_id])
        in_flight = int(rows[0][0]) if rows else None
        fleet.kill(victim)
        return Fault(step.at, "SIGKILL", f"{victim.worker_id} holding {in_flight}", in_flight)
    if step.action == "terminate":
        rows = query(url, TERMINATE)
        cut = int(rows[0][0]) if rows else 0
        return Fault(step.at, "pg_terminate_backend", f"{cut} connections", cut)
    mode = step.action.removeprefix("restart-")
    started = time.monotonic()
    cluster.restart(mode)
    return Fault(step.at, f"restart {mode}", f"took {time.monotonic() - started:.1f}s")


def _fail_over(step: Step, primary: Cluster, standby: Cluster) -> Fault:
    """Stop the primary as a crash would (no shutdown checkpoint, connections cut), then
    promote the standby, as an operator or a failover manager would."""
    rows = query(primary.url(), PROCESSING)
    in_flight = int(rows[0][0]) if rows else None
    started = time.monotonic()
    primary.pg_ctl("stop", "-m", "immediate", "-w")
    standby.promote()
    took = time.monotonic() - started
    return Fault(
        step.at, "failover", f"{in_flight} in flight; standby promoted in {took:.1f}s", in_flight
    )


def _settled(url: str, expected: int) -> bool:
    rows = query(url, SETTLED)
    return rows is not None and rows[0][0] == 0 and rows[0][1] == expected


def _wait_until_ready(fleet: Fleet, workdir: Path) -> None:
    def ready() -> bool:
        for worker in fleet.live:
            if worker.process.poll() is not None:
                raise RuntimeError(
                    f"{worker.worker_id} exited at start: {_log(worker.log_path)[-2000:]}"
                )
        return all("ready" in _log(worker.log_path) for worker in fleet.live)

    if not wait_for(ready, 60):
        raise RuntimeError(f"the workers did not get ready; see {workdir}")


def _log(path: Path) -> str:
    return path.read_text(errors="replace")
