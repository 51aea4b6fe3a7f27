"""What the dashboard reads: the statements of dashboard/queries.sql, as typed rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from notifyhook import store

SESSION_SETTINGS = {
    # A page that would take longer fails rather than keep working the database.
    "statement_timeout": "10s",
    # The planner's cost of a page's aggregates over a day of attempts crosses the JIT
    # threshold, and compiling took ~0.6 s of a 1.4 s query that runs in 0.9 s without.
    "jit": "off",
}

CIRCUIT_THRESHOLD = 5
"""Failures in a row after which the claim sends one request at a time (sql/functions/claim.sql)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Queue:
    pending: int
    due: int
    processing: int
    oldest_due_age_s: float
    paused: int
    delivered_1h: int
    dead_1h: int


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    endpoint_id: int
    tenant_id: str
    name: str
    host: str
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    circuit_open: bool
    last_success_at: datetime | None
    last_failure_at: datetime | None
    attempts_1h: int
    delivered_1h: int
    failed_1h: int
    p50_ms_1h: float | None
    p99_ms_1h: float | None
    attempts_24h: int
    delivered_24h: int
    failed_24h: int
    p50_ms_24h: float | None
    p99_ms_24h: float | None
    last_error: str | None
    last_error_at: datetime | None
    last_error_age_s: float | None
    """How long ago, on the database's clock."""
    pending: int
    dead: int

    @property
    def state(self) -> str:
        """disabled, failing (circuit open), degraded (failing lately) or healthy."""
        if not self.enabled:
            return "disabled"
        if self.circuit_open:
            return "failing"
        return "degraded" if self.consecutive_failures else "healthy"

    @property
    def success_rate_1h(self) -> float | None:
        return _rate(self.delivered_1h, self.failed_1h)

    @property
    def success_rate_24h(self) -> float | None:
        return _rate(self.delivered_24h, self.failed_24h)


def _rate(delivered: int, failed: int) -> float | None:
    return delivered / (delivered + failed) if delivered + failed else None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One row of the audit log; delivery_id is set in an endpoint's list of attempts."""

    attempt: int
    started_at: datetime
    duration_ms: float | None
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    worker: str
    delivery_id: int | None = None

    @property
    def outcome(self) -> str:
        if self.error is None:
            return "delivered"
        return "http_error" if self.status_code is not None else "no_answer"


@dataclass(frozen=True, slots=True)
class Delivery:
    delivery_id: int
    event_id: UUID
    event_type: str
    enqueued_at: datetime
    tenant_id: str
    endpoint_id: int
    endpoint_name: str
    host: str
    status: str
    attempts: int
    next_attempt_at: datetime
    locked_by: str | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery_id: int
    endpoint_id: int
    tenant_id: str
    endpoint_name: str
    event_id: UUID
    event_type: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    died_at: datetime


@dataclass(frozen=True, slots=True)
class MinuteCount:
    minutes_ago: int
    delivered: int
    http_error: int
    no_answer: int


class Reader:
    """The dashboard's queries on one read-only connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sql = store.statements("dashboard/queries.sql")

    async def _rows(self, shape: type[T], name: str, params: Mapping[str, Any] | None) -> list[T]:
        rows = await store.run_dicts(self._conn, self._sql[name], params)
        return [shape(**row) for row in rows]

    async def queue(self) -> Queue:
        # The depth as the workers' gauges read it (queries.sql), the last hour beside it.
        [depth] = await store.run_dicts(self._conn, store.queries()["queue_depth"])
        [finished] = await store.run_dicts(self._conn, self._sql["finished_last_hour"])
        return Queue(
            pending=depth["pending"],
            due=depth["pending_due"],
            processing=depth["processing"],
            oldest_due_age_s=depth["oldest_due_age_s"],
            paused=depth["pending_paused"],
            delivered_1h=finished["delivered_1h"],
            dead_1h=finished["dead_1h"],
        )

    async def tenants(self) -> list[str]:
        rows = await store.run_dicts(self._conn, self._sql["tenants"])
        return [row["tenant_id"] for row in rows]

    async def endpoints(
        self, tenant_id: str | None = None, endpoint_id: int | None = None, limit: int = 500
    ) -> list[EndpointHealth]:
        params = {"tenant_id": tenant_id, "endpoint_id": endpoint_id, "limit": limit}
        return await self._rows(EndpointHealth, "endpoints", params)

    async def endpoint_attempts(self, endpoint_id: int, limit: int = 50) -> list[Attempt]:
        params = {"endpoint_id": endpoint_id, "limit": limit}
        return await self._rows(Attempt, "endpoint_attempts", params)

    async def minute_counts(self, endpoint_id: int | None = None) -> list[MinuteCount]:
        return await self._rows(MinuteCount, "minute_counts", {"endpoint_id": endpoint_id})

    async def delivery(self, delivery_id: int) -> Delivery | None:
        rows = await self._rows(Delivery, "delivery", {"delivery_id": delivery_id})
        return rows[0] if rows else None

    async def delivery_attempts(self, delivery_id: int, counted: int = 0) -> list[Attempt]:
        """The delivery's attempts, the days before it was created pruned; all days read
        when that finds fewer than `counted` (its `attempts`): its created_at came from a
        producer's clock ahead of the database's."""
        params = {"delivery_id": delivery_id, "pruned": True}
        rows = await self._rows(Attempt, "delivery_attempts", params)
        if len(rows) < counted:
            rows = await self._rows(Attempt, "delivery_attempts", {**params, "pruned": False})
        return rows

    async def dead_letters(
        self, tenant_id: str | None = None, endpoint_id: int | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        params = {"tenant_id": tenant_id, "endpoint_id": endpoint_id, "limit": limit}
        return await self._rows(DeadLetter, "dead_letters", params)


@asynccontextmanager
async def open_reader(database_url: str) -> AsyncIterator[Reader]:
    """A fresh read-only connection for one page: nothing to keep alive between
    requests an operator makes now and then, and a restarted database is no matter."""
    async with store.connect(store.read_only(database_url, **SESSION_SETTINGS)) as conn:
        yield Reader(conn)
