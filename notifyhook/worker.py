"""The worker: listen, poll, claim, send, record, shut down; one path for every delivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from notifyhook import __version__, reporting, retry, secrets
from notifyhook.clock import DatabaseClock
from notifyhook.delivery import AttemptResult, Delivery, Outcome, Verdict
from notifyhook.errors import ConfigurationError, SecretError
from notifyhook.listener import Listener
from notifyhook.maintenance import Maintenance, stuck_after_s
from notifyhook.metrics import Metrics
from notifyhook.metrics import serve as serve_metrics
from notifyhook.migrate import check_schema
from notifyhook.pacing import Pacing
from notifyhook.recorder import Recorder
from notifyhook.sender import Sender, without_url
from notifyhook.settings import Settings
from notifyhook.store import (
    UNAVAILABLE,
    ClaimedDelivery,
    DatabaseError,
    Holding,
    Store,
    Timeouts,
    Trouble,
    blocking_backends,
    connect,
    diagnose,
    is_transient,
    refusal,
    server_words,
)
from notifyhook.systemd import SystemdNotifier

log = logging.getLogger("notifyhook.worker")
# A bug met in a delivery: logged here as text, reported to Sentry as the exception itself
# (reporting.UNEXPECTED_LOGGER is not also sent as a message).
unexpected_log = logging.getLogger(reporting.UNEXPECTED_LOGGER)

WORKER_ID_RETRY_S = 1.0
"""How often a worker whose id another live session holds looks whether it is free."""

SCHEMA_CHECK_PATIENCE_S = 3.0
"""How long the start-up schema check may wait before the worker says what it waits for."""

CUT_SHORT_S = 1.0
"""After the grace, how long answered requests whose body is cut short have to end (a
few turns of the event loop)."""

SHUTDOWN_DATABASE_S = 10.0
"""After the grace, how long a stopping worker tries to record outcomes and give back
claims: SHUTDOWN_GRACE, CUT_SHORT_S and this stay within the unit's TimeoutStopSec
(30 + 1 + 10 < 45)."""


def _unsent(error: str) -> AttemptResult:
    """An attempt that ended on our side, before a request left: retried on the schedule,
    not counted against the endpoint's health."""
    return AttemptResult(Verdict.RETRY, 0.0, error=error, sent=False)


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
        recorded: Callable[[], None] | None = None,
        clock: DatabaseClock | None = None,
    ) -> None:
        """`recorded` is called after each batch of outcomes is written: a test signal
        (River's), so that an in-process test waits for the worker, not for time.
        `clock`: the one its sender stamps requests with, kept right by its maintenance."""
        self.settings = settings
        self._store = store
        self._sender = sender
        self.metrics = metrics
        self._notifier = notifier or SystemdNotifier()
        self._key = settings.secret_key.get_secret_value() if settings.secret_key else None
        self.listener = Listener(
            settings.database_url.get_secret_value(), self._wake_up, metrics.reconnects.inc
        )
        self.pacing = Pacing(settings.batch_size, settings.concurrency)
        self._stop = asyncio.Event()
        self._in_flight: dict[int, tuple[int, asyncio.Task[None]]] = {}
        # Read when scraped, not set at every start and end of a request (two locked
        # updates a delivery, for a figure read every few seconds).
        metrics.in_flight.set_function(lambda: len(self._in_flight))
        # What this worker holds per endpoint: the claim shares slots by it.
        self._holdings: dict[int, Holding] = {}
        self.recorder = Recorder(
            settings,
            store,
            metrics,
            trouble=self._database_trouble,
            recovered=self._database_recovered,
            recorded=self._recorded,
            patient=lambda buffered: self.pacing.patient(buffered, len(self._in_flight)),
        )
        self.maintenance = Maintenance(
            settings, store, metrics, wake=self.pacing.wake.set, clock=clock
        )
        self._last_cycle = time.monotonic()
        self.database_ok = True
        self._timeouts = session_timeouts(settings)
        self._last_trouble: Trouble | None = None
        self._signals = 0
        self._ready_sent = False
        # A claim failed: it may have committed with only its answer lost.
        self._claim_unanswered = False
        # Another live session holds this worker id's lock (said once in the log).
        self._id_in_use = False
        self._on_recorded = recorded

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
            await self._read_clock()
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
        self.pacing.wake.set()

    # -- claiming ----------------------------------------------------------------

    def _wake_up(self) -> None:
        self.metrics.notifications.inc()
        self.pacing.wake.set()

    async def _claim_loop(self) -> None:
        delays = retry.reconnect_delays()
        while not self._stop.is_set():
            await self.pacing.wait()
            self._last_cycle = time.monotonic()
            free = self.settings.concurrency - len(self._in_flight)
            if self._stop.is_set() or free <= 0:
                continue
            if not self._store.holds_worker_id and not await self._hold_worker_id():
                continue
            asked = min(free, self.settings.batch_size)
            began = time.perf_counter()
            try:
                if self._claim_unanswered:
                    await self._release_lost_claims()
                claim = await self._store.claim_due(
                    self.settings.worker_id,
                    asked,
                    self.settings.lease,
                    self.settings.concurrency,
                    list(self._holdings.values()),
                )
            except DatabaseError as error:
                # The claim may have committed and only its answer been lost: the next
                # cycle first gives back what this worker holds without knowing it.
                self._claim_unanswered = True
                await self._database_trouble("claim", error, next(delays))
                continue
            self._database_recovered()
            delays = retry.reconnect_delays()
            if not self._ready_sent and self.listener.connected:
                # Listening, and the backlog found by this first claim is under way.
                self._ready_sent = True
                self._notifier.ready()
                log.info("worker %s ready", self.settings.worker_id)
            self.metrics.claim_seconds.observe(time.perf_counter() - began)
            self.metrics.claim_batch.observe(len(claim.deliveries))
            for claimed in claim.deliveries:
                self._start(claimed)
            self.pacing.claimed(claim, asked, len(self._in_flight))

    async def _hold_worker_id(self) -> bool:
        """Take the worker id's lock if no other live session holds it; else wait a
        moment and say no. Two processes claiming under one id would each take the
        other's rows for their own (take_over, release_lost_claims) and send them again."""
        try:
            held = await self._store.hold_worker_id(self.settings.worker_id)
        except DatabaseError as error:
            await self._database_trouble("claim", error, WORKER_ID_RETRY_S)
            return False
        if held:
            if self._id_in_use:
                self._id_in_use = False
                log.info("worker id %s is free again: claiming", self.settings.worker_id)
            return True
        if not self._id_in_use:
            self._id_in_use = True
            log.warning(
                "another live session claims as worker %s (NOTIFYHOOK_WORKER_ID must be "
                "unique): not claiming until it ends; its rows are left to their leases",
                self.settings.worker_id,
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WORKER_ID_RETRY_S):
                await self._stop.wait()
        return False

    async def _release_lost_claims(self) -> None:
        """Give back, uncharged, the rows of a claim whose answer never came: never sent,
        they would otherwise wait out the lease and be charged an attempt not made."""
        known = {*self._in_flight, *self.recorder.delivery_ids()}
        released = await self._store.release_lost_claims(self.settings.worker_id, known)
        self._claim_unanswered = False
        if released:
            log.warning(
                "gave back %d deliveries of a claim whose answer was lost, without "
                "charging an attempt (they were never sent)",
                released,
            )

    async def _keep_partitions(self) -> None:
        """The history's day partitions a week ahead, before the first claim (0006)."""
        try:
            await self.maintenance.keep_partitions()
        except DatabaseError as error:
            log.debug("making partitions skipped: %s", error)

    async def _read_clock(self) -> None:
        """The database's clock, before the first request is stamped with it."""
        try:
            await self.maintenance.read_clock()
        except DatabaseError as error:
            log.debug("reading the database's clock skipped: %s", error)

    async def _take_over(self) -> None:
        """Take back a dead predecessor's rows (same WORKER_ID) before the first claim."""
        try:
            taken = await self._store.take_over(self.settings.worker_id, self.settings.max_attempts)
        except DatabaseError as error:
            log.debug("take-over skipped: %s", error)
            return
        # None: another live session holds the id; the claim loop waits for it
        # (_hold_worker_id), and says so.
        if taken:
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
            outcome = retry.decide(delivery, result, self.settings)
            self._note(delivery, outcome)
            if claimed.limited:
                self.pacing.limited()
            self.recorder.add(outcome)
        finally:
            del self._in_flight[claimed.delivery_id]
            self._release_holding(claimed.endpoint_id)
            self.pacing.freed(len(self._in_flight))

    async def _attempt(self, delivery: Delivery) -> AttemptResult:
        try:
            return await self._sender.send(delivery)
        except Exception as error:
            # A bug, since the sender turns every failure it knows into a value. Recorded
            # as a failed attempt that will be retried, rather than left to escape the
            # task, which would leave the row leased and its attempt unrecorded.
            # Its message may quote the endpoint's URL, whose path and query may hold
            # tokens (DESIGN §8): the log and attempts.error get it without, and the
            # traceback as frames only.
            text = without_url(f"{type(error).__name__}: {error}", delivery.url)
            frames = "".join(traceback.format_tb(error.__traceback__)).rstrip()
            unexpected_log.error(
                "delivery %d: unexpected error while sending: %s\n%s", delivery.id, text, frames
            )
            reporting.report_exception(error)
            return _unsent(f"internal error: {text}"[:500])

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
            self.pacing.scheduled_retry(outcome.retry_in_s)

    # -- recording -----------------------------------------------------------------

    def _recorded(self) -> None:
        self.pacing.recorded()
        if self._on_recorded is not None:
            self._on_recorded()

    # -- shutting down -------------------------------------------------------------

    async def _finish_in_flight(self, recorder: asyncio.Task[None]) -> None:
        """Soft stop: let requests finish within the grace, recording their outcomes as
        they come. Hard stop: give the rest back, record what is left, within a deadline."""
        tasks = [task for _, task in self._in_flight.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
        # Answered, body still coming: the status decides the attempt. Cut short and
        # recorded as answered; given back, it would be sent again (DESIGN §8).
        try:
            answered = [
                self._in_flight[delivery_id][1]
                for delivery_id in self._sender.cut_reads_short()
                if delivery_id in self._in_flight
            ]
            if answered:
                await asyncio.wait(answered, timeout=CUT_SHORT_S)
        except Exception as error:
            # A bug here must not skip the last flush and the give-back below: without
            # them, recorded outcomes are lost and answered deliveries sent again.
            unexpected_log.exception("cutting answered requests short at the stop failed")
            reporting.report_exception(error)
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
                await self.recorder.flush(final=True)
                if unfinished:
                    await self._release(unfinished)
                if self._claim_unanswered:
                    # A claim failed just before the stop: what it may have taken was
                    # never sent, and would go dead at its last attempt after the lease.
                    try:
                        await self._release_lost_claims()
                    except DatabaseError as error:
                        log.error(
                            "could not give back the rows of a claim whose answer was lost "
                            "(their leases will expire): %s",
                            error,
                        )
        except TimeoutError:
            why = (
                self._last_trouble.text
                if self._last_trouble
                else "the database did not answer in time"
            )
            log.error(
                "%s: exiting with %d outcomes unrecorded and %d claims held after %gs; "
                "their leases will expire and they will be sent again",
                why,
                len(self.recorder),
                len(unfinished),
                SHUTDOWN_DATABASE_S,
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
        """A claim or a record failed (the recorder calls this too): log and report why,
        once until a call succeeds again, then wait before the caller retries."""
        trouble = diagnose(error, self._timeouts)
        self._last_trouble = trouble
        if self.database_ok:
            # Not every failure is an outage: a statement the database refuses fails the
            # same way until something changes, and one cut short by our own timeouts was
            # slow or waited on a lock; the log says which (diagnose) rather than blame
            # the connection.
            log.warning(
                "%s failed, %s (%s); retrying",
                what,
                trouble.text,
                server_words(error),
            )
            self.metrics.database_errors.inc()
            reporting.report_database_trouble(what, trouble, error)
        self.database_ok = False
        await asyncio.sleep(wait)
        self.pacing.wake.set()

    def _database_recovered(self) -> None:
        if not self.database_ok:
            # Said as the trouble was: a statement cut by a timeout was no outage.
            outage = self._last_trouble is None or self._last_trouble.kind == UNAVAILABLE
            log.info("database available again" if outage else "database statements succeed again")
        self.database_ok = True
        self._last_trouble = None

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
    ends sooner still, and the statement is retried. Sooner, not as soon: with the two
    equal (a lease of 10 s or less), a lock wait was cut as a statement timeout and
    logged as a slow statement."""
    statement_s = min(settings.lease / 2, 30.0)
    return Timeouts(statement_s=statement_s, lock_s=min(statement_s / 2, 5.0))


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
    async with open_worker(settings, metrics) as worker:
        worker.install_signal_handlers()
        if stopping.is_set():  # a signal came after the schema check, before these handlers
            worker.request_stop()
        await worker.run()


@contextlib.asynccontextmanager
async def open_worker(
    settings: Settings, metrics: Metrics, *, recorded: Callable[[], None] | None = None
) -> AsyncIterator[Worker]:
    """A Worker with its store, its sender and, on METRICS_PORT, /metrics and /healthz:
    what `notifyhook worker` runs, and what the tests run in-process."""
    url = settings.database_url.get_secret_value()
    clock = DatabaseClock()
    async with (
        Store.open(url, timeouts=session_timeouts(settings), worker=settings.worker_id) as store,
        Sender(
            allow_private_networks=settings.allow_private_networks,
            user_agent=f"notifyhook/{__version__}",
            max_connections=settings.concurrency,
            clock=clock.now,
        ) as sender,
    ):
        worker = Worker(settings, store, sender, metrics=metrics, recorded=recorded, clock=clock)
        runner = None
        if settings.metrics_port is not None:
            runner = await serve_metrics(metrics, settings.metrics_port, lambda: worker.healthy)
        try:
            yield worker
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


async def _check_schema_saying_if_slow(url: str, conn: Any) -> None:
    """The schema check, which has no lock_timeout: a migration under way, or an
    operator's transaction holding a lock on notifyhook's tables, makes it wait as long
    as that lasts. The worker waits too, but says so, rather than sit silent."""
    check = asyncio.ensure_future(check_schema(conn))
    try:
        done, _ = await asyncio.wait({check}, timeout=SCHEMA_CHECK_PATIENCE_S)
        if not done:
            try:
                blockers = await blocking_backends(url, conn)
            except DatabaseError:
                blockers = None
            if blockers is None:
                log.warning(
                    "checking the schema has taken %gs so far; still waiting",
                    SCHEMA_CHECK_PATIENCE_S,
                )
            else:
                log.warning(
                    "checking the schema has waited %gs for a lock held by backend %s (a "
                    "migration under way, or an open transaction that locked notifyhook's "
                    "tables: see pg_stat_activity); waiting for it to end",
                    SCHEMA_CHECK_PATIENCE_S,
                    ", ".join(str(pid) for pid in blockers),
                )
        await check
    finally:
        # A stop while waiting cancels this coroutine, not the task it awaits.
        check.cancel()


async def _wait_for_schema(url: str) -> None:
    """Refuse a schema this code does not know; wait out a database that is not up yet.

    A connection of its own rather than the pool's, so that a refused connection
    is reported at once, with libpq's reason, not after the pool's timeout.
    """
    delays = retry.reconnect_delays(longest=5.0)
    while True:
        try:
            async with connect(url) as conn:
                await _check_schema_saying_if_slow(url, conn)
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
                "checking the schema failed, %s (%s); trying again in %.1fs",
                diagnose(error).text,
                server_words(error),
                wait,
            )
            await asyncio.sleep(wait)
