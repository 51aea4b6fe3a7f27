"""Prometheus metrics and /healthz, served by aiohttp on METRICS_PORT when it is set."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_ATTEMPT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


CLAIM_BUCKETS_S = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0
)  # fmt: skip
"""Fine at the low end: a claim normally takes about a millisecond."""


class Metrics:
    """The worker's counters, one registry per worker (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "notifyhook_attempts",
            "HTTP attempts, by the delivery state each led to (pending: a retry is scheduled).",
            ["outcome"],
            registry=r,
        )
        self.deliveries = Counter(
            "notifyhook_deliveries",
            "Deliveries this worker finished, by their final state.",
            ["outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "notifyhook_attempt_duration_seconds",
            "HTTP attempt duration.",
            buckets=_ATTEMPT_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge("notifyhook_in_flight", "HTTP requests in flight.", registry=r)
        self.claim_batch = Histogram(
            "notifyhook_claim_batch_size",
            "Deliveries taken per claim.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.claim_seconds = Histogram(
            "notifyhook_claim_duration_seconds",
            "How long one claim took, round trip to the database included.",
            buckets=CLAIM_BUCKETS_S,
            registry=r,
        )
        self.notifications = Counter(
            "notifyhook_notifications",
            "Wake-ups from NOTIFY (and listener reconnections).",
            registry=r,
        )
        self.reconnects = Counter(
            "notifyhook_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            registry=r,
        )
        self.database_errors = Counter(
            "notifyhook_database_errors",
            "Times the database became unavailable to the loop.",
            registry=r,
        )
        self.endpoint_disables = Counter(
            "notifyhook_endpoint_disables",
            "Endpoints this worker disabled (410, failing too long).",
            registry=r,
        )
        self.queue_pending_due = Gauge(
            "notifyhook_queue_pending_due",
            "Deliveries due and waiting, for enabled endpoints.",
            registry=r,
        )
        self.queue_pending_paused = Gauge(
            "notifyhook_queue_pending_paused",
            "Deliveries kept pending for disabled endpoints.",
            registry=r,
        )
        self.queue_processing = Gauge(
            "notifyhook_queue_processing", "Deliveries claimed fleet-wide.", registry=r
        )
        self.queue_oldest_due_age = Gauge(
            "notifyhook_queue_oldest_due_age_seconds",
            "Age of the oldest due delivery of an enabled endpoint.",
            registry=r,
        )
        self.clock_offset = Gauge(
            "notifyhook_clock_offset_seconds",
            "The database's clock less this host's, as last measured (webhook-timestamp "
            "is corrected by it).",
            registry=r,
        )
        self._attempt_children = {
            name: self.attempts.labels(outcome=name) for name in ("delivered", "pending", "dead")
        }
        self._finished_children = {
            name: self.deliveries.labels(outcome=name) for name in ("delivered", "dead")
        }
        self._rate_window: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self._delivered = 0
        self._pending_due = 0

    def observe_attempt(self, outcome: str, duration_ms: float) -> None:
        """One attempt and the state it led its delivery to: delivered, pending, dead."""
        self._attempt_children[outcome].inc()
        self.attempt_seconds.observe(duration_ms / 1000)
        if outcome in self._finished_children:
            self._finished_children[outcome].inc()
        if outcome == "delivered":
            self._delivered += 1

    def set_queue(
        self, pending_due: int, processing: int, oldest_due_age_s: float, pending_paused: int
    ) -> None:
        self._pending_due = pending_due
        self.queue_pending_due.set(pending_due)
        self.queue_processing.set(processing)
        self.queue_oldest_due_age.set(oldest_due_age_s)
        self.queue_pending_paused.set(pending_paused)

    def status_line(self, in_flight: int) -> str:
        """What systemctl status shows: deliveries/s since the last call, in flight, due."""
        now = time.monotonic()
        then, delivered_then = self._rate_window[-1]
        self._rate_window = [(now, self._delivered)]
        rate = (self._delivered - delivered_then) / max(now - then, 1e-6)
        return f"delivering {rate:.0f}/s, {in_flight} in flight, {self._pending_due} due"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: Metrics, port: int, healthy: Callable[[], bool]) -> web.AppRunner:
    """Start /metrics and /healthz on 0.0.0.0:port; the caller cleans the runner up."""

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def health_page(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", health_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
