"""The worker: listen, poll, claim, send, record, shut down; one path for every delivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from notifyhook import __version__, reporting, retry, secrets
from notifyhook.delivery import AttemptResult, Delivery, Outcome, Verdict
from notifyhook.errors import ConfigurationError, SecretError
from notifyhook.listener import Listener
from notifyhook.maintenance import Maintenance, stuck_after_s
from notifyhook.metrics import Metrics
from notifyhook.metrics import serve as serve_metrics
from notifyhook.migrate import check_schema
from notifyhook.recorder import Recorder
from notifyhook.sender import Sender
from notifyhook.settings import Settings
from notifyhook.store import (
    Claim,
    ClaimedDelivery,
    DatabaseError,
    Holding,
    Store,
    Timeouts,
    connect,
    is_transient,
    refusal,
)
from notifyhook.systemd import SystemdNotifier

log = logging.getLogger("notifyhook.worker")

PASSED_BY_RETRY_S = 0.002
"""How soon to claim again when a claim passed work by for a lock held a moment (doubling
while it stays held, up to a second)."""

SHUTDOWN_DATABASE_S = 10.0
"""After the grace, how long a stopping worker tries to record outcomes and give back
claims: SHUTDOWN_GRACE plus this stays within the unit's TimeoutStopSec (30 + 10 < 45)."""


def decide(delivery: Delivery, result: AttemptResult, settings: Settings) -> Outcome:
    """Map an attempt's result to the delivery's next state (retry schedule, jitter, Retry-After).

    The endpoint's own schedule, when it has one, replaces the global one whole: its
    delays, its attempt budget and the cap on Retry-After (its longest delay).
    """
    status: Any = "dead"
    retry_in_s = None
    if result.verdict is Verdict.DELIVERED:
        status = "delivered"
    elif result.verdict is Verdict.RETRY:
        schedule = delivery.retry_schedule or settings.retry_schedule
        delay = retry.next_delay(delivery.attempt, schedule, settings.jitter, result.retry_after_s)
        if delay is not None:
            status, retry_in_s = "pending", delay
    return Outcome(delivery.id, delivery.endpoint_id, delivery.attempt, status, retry_in_s, result)


def _unsent(error: str) -> AttemptResult:
    """An attempt that ended on our side, before an answer: retried on the schedule."""
    return AttemptResult(Verdict.RETRY, datetime.now(UTC), 0.0, error=error)


class Worker:
    """One worker process's loop. `run` holds the whole lifecycle in one place."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sender: Sender,
        *,
        metrics: Metrics,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._sender = sender
        self.metrics = metrics
        self._notifier = notifier or SystemdNotifier()
        self._key = settings.secret_key.get_secret_value() if settings.secret_key else None
        self.listener = Listener(
            settings.database_url.get_secret_value(), self._wake_up, metrics.reconnects.inc
        )
        # Finishing deliveries trigger a new claim only every few slots, and outcomes
        # are recorded a batch at a time: a claim or a record costs the database
        # about a millisecond however few rows it carries, so one per delivery
        # would cost more than the deliveries themselves.
        self._refill_at = max(1, min(settings.batch_size, settings.concurrency) // 4)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._in_flight: dict[int, tuple[int, asyncio.Task[None]]] = {}
        # What this worker holds per endpoint: the claim shares slots by it.
        self._holdings: dict[int, Holding] = {}
        self._passed_by_streak = 0
        self.recorder = Recorder(
            settings,
            store,
            metrics,
            trouble=self._database_trouble,
            recovered=self._database_recovered,
            recorded=self._recorded,
            patient=self._patient,
        )
        self.maintenance = Maintenance(settings, store, metrics, wake=self._wake.set)
        self._more_due = False
        # Due rows wait for a cap (max_in_flight, a circuit probe, the endpoint's or
        # tenant's share) that only a recorded outcome lifts: record without delay.
        self._capped = False
        self._claim_after_record = False
        self._freed_since_claim = 0
        # When to look again without being woken (monotonic seconds): what the last
        # claim said, and the earliest retry this worker scheduled itself; the latter
        # is kept apart because a claim may run before that retry is recorded.
        self._claim_deadline: float | None = None
        self._retry_deadline: float | None = None
        self._last_cycle = time.monotonic()
        self.database_ok = True
        self._signals = 0
        self._ready_sent = False

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until asked to stop, then finish or give back what is in flight."""
        async with asyncio.TaskGroup() as tasks:
            recorder = tasks.create_task(self.recorder.run(), name="recorder")
            # Stopped with the claim loop: a stopping worker must not take back leases
            # (its own outcomes, answered during the grace, are still being recorded).
            maintenance = [
                tasks.create_task(self.maintenance.reclaim(), name="reclaim"),
                tasks.create_task(self.maintenance.retention(), name="retention"),
            ]
            # Run through the grace: systemd's watchdog, and /healthz's listener.
            background = [
                tasks.create_task(self.listener.run(), name="listener"),
                tasks.create_task(
                    self.maintenance.heartbeat(
                        self._notifier, lambda: self._last_cycle, lambda: len(self._in_flight)
                    ),
                    name="heartbeat",
                ),
            ]
            log.info(
                "worker %s started: concurrency=%d batch_size=%d lease=%gs",
                self.settings.worker_id,
                self.settings.concurrency,
                self.settings.batch_size,
                self.settings.lease,
            )
            await self._keep_partitions()
            await self._take_over()
            await self._claim_loop()
            self._notifier.stopping()
            for task in maintenance:
                task.cancel()
            await self._finish_in_flight(recorder)
            for task in background:
                task.cancel()
        log.info("worker %s stopped", self.settings.worker_id)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First signal: stop claiming and finish within the grace. Second: exit now."""
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            # Claims still held come back when their leases expire.
            os._exit(1)
        log.info(
            "%s: stopping; in-flight requests have %gs to finish",
            signal.Signals(signum).name,
            self.settings.shutdown_grace,
        )
        self._stop.set()
        self._wake.set()

    # -- claiming ----------------------------------------------------------------

    def _wake_up(self) -> None:
        self.metrics.notifications.inc()
        self._wake.set()

    async def _wait_for_work(self) -> None:
        now = time.monotonic()
        if self._retry_deadline is not None and self._retry_deadline <= now:
            self._retry_deadline = None
        deadlines = [d for d in (self._claim_deadline, self._retry_deadline) if d is not None]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()
        self._last_cycle = time.monotonic()

    async def _claim_loop(self) -> None:
        delays = retry.reconnect_delays()
        while not self._stop.is_set():
            await self._wait_for_work()
            free = self.settings.concurrency - len(self._in_flight)
            if self._stop.is_set() or free <= 0:
                continue
            asked = min(free, self.settings.batch_size)
            began = time.perf_counter()
            try:
                claim = await self._store.claim_due(
                    self.settings.worker_id,
                    asked,
                    self.settings.lease,
                    self.settings.concurrency,
                    list(self._holdings.values()),
                )
            except DatabaseError as error:
                await self._database_trouble("claim", error, next(delays))
                continue
            self._database_recovered()
            delays = retry.reconnect_delays()
            if not self._ready_sent and self.listener.connected:
                # Listening, and the backlog found by this first claim is under way.
                self._ready_sent = True
                self._notifier.ready()
                log.info("worker %s ready", self.settings.worker_id)
            taken = len(claim.deliveries)
            self.metrics.claim_seconds.observe(time.perf_counter() - began)
            self.metrics.claim_batch.observe(taken)
            for claimed in claim.deliveries:
                self._start(claimed)
            self._freed_since_claim = 0
            self._capped = claim.held_back or self._claim_after_record
            # An endpoint held back until its in-flight row is recorded (FIFO, its
            # max_in_flight, its circuit) gets its turn back from that record: claim
            # again once it is written.
            self._more_due = claim.more_due or taken == asked or claim.held_back
            self._claim_deadline = self._next_look(claim)
            # Claim again at once only when this claim was cut short by the rows asked
            # for and rows are left. One that took fewer took all it could (the rest
            # wait for parts, limits or locks): the next claim waits for slots to free
            # up, a notification or the next turn. (Claiming again at once after a lone
            # endpoint took its part came back empty every time: half of all claims.)
            if (
                taken == asked
                and self._more_due
                and len(self._in_flight) < self.settings.concurrency
            ):
                self._wake.set()

    def _next_look(self, claim: Claim) -> float | None:
        """When to claim again unwoken (monotonic): at the next turn, or shortly when work
        was passed by for a lock, backing off while the lock stays held (an operator's
        open transaction must not make the worker spin)."""
        wake_in_s = claim.wake_in_s
        if claim.passed_by:
            self._passed_by_streak += 1
            retry_s = min(PASSED_BY_RETRY_S * 2 ** (self._passed_by_streak - 1), 1.0)
            wake_in_s = retry_s if wake_in_s is None else min(wake_in_s, retry_s)
        else:
            self._passed_by_streak = 0
        if wake_in_s is None:
            return None
        return time.monotonic() + max(0.001, wake_in_s)

    async def _keep_partitions(self) -> None:
        """The history's day partitions a week ahead, before the first claim (0006)."""
        try:
            await self.maintenance.keep_partitions()
        except DatabaseError as error:
            log.debug("making partitions skipped: %s", error)

    async def _take_over(self) -> None:
        """Take back a dead predecessor's rows (same WORKER_ID) before the first claim."""
        try:
            taken = await self._store.take_over(self.settings.worker_id, self.settings.max_attempts)
        except DatabaseError as error:
            log.debug("take-over skipped: %s", error)
            return
        if taken is None:
            log.warning(
                "another live session claims as worker %s (NOTIFYHOOK_WORKER_ID must be "
                "unique); its rows are left to their leases",
                self.settings.worker_id,
            )
        elif taken:
            log.warning(
                "took back %d deliveries a previous worker %s left leased",
                taken,
                self.settings.worker_id,
            )

    def _start(self, claimed: ClaimedDelivery) -> None:
        task = asyncio.create_task(self._deliver(claimed), name=f"delivery-{claimed.delivery_id}")
        self._in_flight[claimed.delivery_id] = (claimed.attempt, task)
        held = self._holdings.get(claimed.endpoint_id)
        self._holdings[claimed.endpoint_id] = Holding(
            claimed.endpoint_id, claimed.tenant_id, (held.rows if held else 0) + 1
        )
        self.metrics.in_flight.set(len(self._in_flight))

    def _release_holding(self, endpoint_id: int) -> None:
        held = self._holdings[endpoint_id]
        if held.rows <= 1:
            del self._holdings[endpoint_id]
        else:
            self._holdings[endpoint_id] = Holding(endpoint_id, held.tenant_id, held.rows - 1)

    # -- sending -----------------------------------------------------------------

    def _delivery(self, claimed: ClaimedDelivery, *, sign: bool = True) -> Delivery:
        """What the sender needs; `sign=False` leaves the secrets out (when they cannot
        be unsealed, the attempt still needs the rest of the delivery to be recorded)."""
        plain: list[str] = []
        if sign:
            plain.append(secrets.unseal(claimed.secret, self._key))
            if claimed.previous_secret is not None:
                plain.append(secrets.unseal(claimed.previous_secret, self._key))
        timeout_s = claimed.timeout_ms / 1000 if claimed.timeout_ms else self.settings.http_timeout
        return Delivery(
            id=claimed.delivery_id,
            event_id=str(claimed.event_id),
            endpoint_id=claimed.endpoint_id,
            attempt=claimed.attempt,
            url=claimed.url,
            secrets=tuple(plain),
            headers=claimed.headers,
            timeout_s=min(timeout_s, self.settings.endpoint_timeout_cap_s),
            body=claimed.body.encode(),
            retry_schedule=tuple(claimed.retry_schedule) if claimed.retry_schedule else None,
        )

    async def _deliver(self, claimed: ClaimedDelivery) -> None:
        try:
            try:
                delivery = self._delivery(claimed)
            except SecretError as error:
                # A worker without the key cannot sign: retry on the schedule, so an
                # operator who fixes NOTIFYHOOK_SECRET_KEY in time loses nothing.
                delivery = self._delivery(claimed, sign=False)
                result = _unsent(str(error))
            else:
                result = await self._attempt(delivery)
            outcome = decide(delivery, result, self.settings)
            self._note(delivery, outcome)
            if claimed.limited:
                # Its endpoint's next row waits for this outcome: record it without
                # waiting for company, and claim again once it is written.
                self._capped = self._claim_after_record = True
            self.recorder.add(outcome)
        finally:
            del self._in_flight[claimed.delivery_id]
            self._release_holding(claimed.endpoint_id)
            self.metrics.in_flight.set(len(self._in_flight))
            self._freed_since_claim += 1
            if self._more_due and (
                self._freed_since_claim >= self._refill_at or not self._in_flight
            ):
                self._wake.set()

    async def _attempt(self, delivery: Delivery) -> AttemptResult:
        try:
            return await self._sender.send(delivery)
        except Exception as error:
            # A bug, since the sender turns every failure it knows into a value. Recorded
            # as a failed attempt that will be retried, rather than left to escape the
            # task, which would leave the row leased and its attempt unrecorded.
            log.exception("delivery %d: unexpected error while sending", delivery.id)
            reporting.report_exception(error)
            return _unsent(f"internal error: {type(error).__name__}: {error}"[:500])

    def _note(self, delivery: Delivery, outcome: Outcome) -> None:
        result = outcome.result
        self.metrics.observe_attempt(outcome.status, result.duration_ms)
        if outcome.status == "dead":
            log.warning(
                "delivery %d dead after attempt %d to endpoint %d: %s",
                delivery.id,
                delivery.attempt,
                delivery.endpoint_id,
                result.error,
            )
        elif outcome.retry_in_s is not None:
            deadline = time.monotonic() + outcome.retry_in_s
            if self._retry_deadline is None or deadline < self._retry_deadline:
                earliest = min(d for d in (deadline, self._claim_deadline) if d is not None)
                self._retry_deadline = deadline
                if earliest == deadline:
                    # The claim loop waits with a timeout computed before this
                    # retry existed: wake it to look again (rare: later retries
                    # of the same run fall due later).
                    self._wake.set()

    # -- recording ---------------------------------------------------------------

    def _patient(self, buffered: int) -> bool:
        """Whether finished outcomes may wait a moment for others to share their batch."""
        return bool(self._in_flight) and not self._capped and buffered < self._refill_at

    def _recorded(self) -> None:
        if self._more_due or self._claim_after_record:
            # A limited endpoint's slot is free only once its outcome is
            # recorded: a claim that ran before this flush saw it still held.
            self._claim_after_record = False
            self._wake.set()

    # -- shutting down -------------------------------------------------------------

    async def _finish_in_flight(self, recorder: asyncio.Task[None]) -> None:
        """Soft stop: let requests finish within the grace, recording their outcomes as
        they come. Hard stop: give the rest back, record what is left, within a deadline."""
        tasks = [task for _, task in self._in_flight.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
        unfinished = [
            (delivery_id, attempt) for delivery_id, (attempt, _) in self._in_flight.items()
        ]
        for _, task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(
            *(task for _, task in list(self._in_flight.values())), return_exceptions=True
        )
        # The recorder waits out a database outage for as long as it lasts, holding the
        # recording lock; the last flush, which has a deadline, would wait behind it
        # forever. Its call cut short counts as unconfirmed: the last flush sends it again.
        recorder.cancel()
        await asyncio.wait([recorder])
        try:
            # Bounded: systemd's TimeoutStopSec must not run out while the database is away.
            async with asyncio.timeout(SHUTDOWN_DATABASE_S):
                await self.recorder.flush()
                if unfinished:
                    await self._release(unfinished)
        except TimeoutError:
            log.error(
                "database unavailable: exiting with %d outcomes unrecorded and %d claims held; "
                "their leases will expire and they will be sent again",
                len(self.recorder),
                len(unfinished),
            )

    async def _release(self, held: Sequence[tuple[int, int]]) -> None:
        try:
            released = await self._store.release_claims(self.settings.worker_id, held)
        except DatabaseError as error:
            log.error(
                "could not give back %d claims (their leases will expire): %s", len(held), error
            )
            return
        log.info("gave back %d unfinished deliveries without charging an attempt", released)

    # -- the database -------------------------------------------------------------------

    async def _database_trouble(self, what: str, error: BaseException, wait: float) -> None:
        if self.database_ok:
            # Not every failure is an outage: a statement the database refuses fails the
            # same way until something changes, and the log must say why it was refused
            # (its SQLSTATE and message) rather than blame the connection or guess.
            sqlstate = getattr(error, "sqlstate", None)
            trouble = (
                "database unavailable"
                if is_transient(error)
                else f"the database refused the statement with SQLSTATE {sqlstate or 'unknown'}"
            )
            log.warning(
                "%s failed, %s (%s); retrying",
                what,
                trouble,
                " ".join(str(error).split())[:300],
            )
            self.metrics.database_errors.inc()
            reporting.report_database_lost(what, error)
        self.database_ok = False
        await asyncio.sleep(wait)
        self._wake.set()

    def _database_recovered(self) -> None:
        if not self.database_ok:
            log.info("database available again")
        self.database_ok = True

    @property
    def healthy(self) -> bool:
        """For /healthz: the loop cycles and the database answers."""
        return (
            self.database_ok
            and self.listener.connected
            and time.monotonic() - self._last_cycle < stuck_after_s(self.settings)
        )


def session_timeouts(settings: Settings) -> Timeouts:
    """Every statement ends well within a lease, so a stuck one cannot outlive the claims
    it records or makes; waiting for a lock (a record behind an operator's transaction)
    ends sooner still, and the statement is retried."""
    statement_s = min(settings.lease / 2, 30.0)
    return Timeouts(statement_s=statement_s, lock_s=min(statement_s, 5.0))


async def serve(settings: Settings) -> None:
    """`notifyhook worker`: check the schema, then run until SIGTERM."""
    reporting.start(settings)
    metrics = Metrics()
    url = settings.database_url.get_secret_value()
    # A signal while the database is not up yet is a request to stop, not a crash: the
    # process exits 0, as it does once running (the Worker's own handlers replace these).
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if not await _unless_stopped(_wait_for_schema(url), stopping):
        log.info("stopped while waiting for the database")
        return
    async with (
        Store.open(url, timeouts=session_timeouts(settings), worker=settings.worker_id) as store,
        Sender(
            allow_private_networks=settings.allow_private_networks,
            user_agent=f"notifyhook/{__version__}",
            max_connections=settings.concurrency,
        ) as sender,
    ):
        worker = Worker(settings, store, sender, metrics=metrics)
        worker.install_signal_handlers()
        if stopping.is_set():  # a signal came after the schema check, before these handlers
            worker.request_stop()
        runner = None
        if settings.metrics_port is not None:
            runner = await serve_metrics(metrics, settings.metrics_port, lambda: worker.healthy)
        try:
            await worker.run()
        finally:
            if runner is not None:
                await runner.cleanup()


async def _unless_stopped(work: Coroutine[Any, Any, None], stopping: asyncio.Event) -> bool:
    """Run `work` unless `stopping` is set first; whether it ran to its end."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stopping.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()  # its exception, if any (a refused schema or credentials)
        return True
    task.cancel()
    await asyncio.wait({task})
    return False


async def _wait_for_schema(url: str) -> None:
    """Refuse a schema this code does not know; wait out a database that is not up yet.

    A connection of its own rather than the pool's, so that a refused connection
    is reported at once, with libpq's reason, not after the pool's timeout.
    """
    delays = retry.reconnect_delays(longest=5.0)
    while True:
        try:
            async with connect(url) as conn:
                await check_schema(conn)
                return
        except DatabaseError as error:
            if (reason := refusal(error)) is not None:
                raise ConfigurationError(
                    f"NOTIFYHOOK_DATABASE_URL: the server refused the connection: {reason}"
                ) from None
            if not is_transient(error):
                raise
            wait = next(delays)
            log.warning(
                "database not available (%s); trying again in %.1fs",
                " ".join(str(error).split())[:300],
                wait,
            )
            await asyncio.sleep(wait)
