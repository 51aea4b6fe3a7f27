"""One chaos run: its own PostgreSQL, a receiver, a worker fleet, a producer, and the faults."""

from __future__ import annotations

import asyncio
import json
import random
import time
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
    """kill: the victim's claims in flight; terminate: connections cut."""


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
    with Cluster() as cluster:
        url = cluster.url()
        asyncio.run(_migrate(url))
        receiver = Receiver().start_in_thread()
        fleet = Fleet(url, workdir, config.workers)
        producer: Producer | None = None
        try:
            plans = {plan.name: plan for plan in endpoints(config)}
            endpoint_ids = _create_endpoints(url, receiver, plans)
            fleet.start()
            say(f"chaos[{config.name}]: PostgreSQL on port {cluster.port}, logs in {workdir}")
            _wait_until_ready(fleet, workdir)
            origin = time.monotonic()
            producer = Producer(url, config.rate, config.seconds, config.seed, origin)
            producer.start()
            faults = _unleash(config, rng, cluster, fleet, origin, say)
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
    cluster: Cluster,
    fleet: Fleet,
    start: float,
    say: Any,
) -> list[Fault]:
    """Play the timeline of faults against the fleet and the server."""
    url = cluster.url()
    faults = []
    for step in timeline(config, rng):
        time.sleep(max(0.0, start + step.at - time.monotonic()))
        fault = _inflict(step, url, rng, cluster, fleet)
        fault.at = time.monotonic() - start
        faults.append(fault)
        say(f"  {fault.at:6.1f}s  {fault.action:<18} {fault.detail}")
    return faults


def _inflict(step: Step, url: str, rng: random.Random, cluster: Cluster, fleet: Fleet) -> Fault:
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
