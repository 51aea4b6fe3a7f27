"""The recorder: buffers the worker's outcomes and writes them a batch at a time, isolating any the database refuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from notifyhook import reporting, retry
from notifyhook.delivery import Outcome
from notifyhook.metrics import Metrics
from notifyhook.settings import Settings
from notifyhook.store import PARTITIONS_AHEAD, DatabaseError, Recorded, Store

log = logging.getLogger("notifyhook.recorder")

PATIENCE_S = 0.005
"""How long finished attempts may wait for others to share their transaction."""

HELD_RETRY_S = 0.5
"""How soon an outcome whose row another transaction held is tried again."""

# SQLSTATE classes of a statement the database refused for what it holds, not for how
# it was sent or where: a value out of range or badly encoded (22), a constraint (23),
# a trigger's RAISE (P0), a row past a limit (54). Another try of the same values fails
# the same way, so the outcome that carries them is isolated from its batch. Anything
# else (a lost connection, a deadlock, a timeout, a function this worker does not know)
# is waited out and the same batch tried again.
_REFUSED_VALUES = ("22", "23", "P0", "54")

CHECK_VIOLATION = "23514"
"""Also what PostgreSQL answers for a row that no partition of its table accepts."""

Trouble = Callable[[str, BaseException, float], Awaitable[None]]
"""The worker's handler for a failed database call: log and report once, then wait."""


def refused_values(error: BaseException) -> bool:
    """Whether the database refused a statement for the values it carried."""
    state = getattr(error, "sqlstate", None)
    return isinstance(error, DatabaseError) and state is not None and state[:2] in _REFUSED_VALUES


def refused_outcome_error(error: DatabaseError) -> str:
    """What the attempt's row says: the SQLSTATE and the server's primary message only
    (its detail may quote the refused row, which can hold a URL or a response)."""
    primary = error.diag.message_primary or type(error).__name__
    text = " ".join(primary.split())
    return f"the database refused to record this attempt's outcome ({error.sqlstate}: {text})"[:500]


class Recorder:
    """Holds finished attempts' outcomes until they are written, and writes them.

    One flush at a time (the shutdown's last flush and the loop's must not both send the
    same outcomes). Until a call's answer arrives, its outcomes may or may not be
    recorded (a commit whose answer was lost, a call cut by an error or a
    cancellation): the next call sends them again and asks the database to skip those.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        trouble: Trouble,
        recovered: Callable[[], None],
        recorded: Callable[[], None] = lambda: None,
        patient: Callable[[int], bool] = lambda buffered: False,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._trouble = trouble
        self._recovered = recovered
        self._recorded = recorded
        self._patient = patient
        self._outcomes: list[Outcome] = []
        # Outcomes whose delivery rows another transaction held at their last try (an
        # operator's DELETE held open): tried again after HELD_RETRY_S, not at once.
        self._held: list[Outcome] = []
        # Deliveries whose outcome was dropped (even its bare attempt row refused): their
        # rows stay leased to this worker until the lease runs out, as they should.
        self._dropped: set[int] = set()
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._unconfirmed = False

    def __len__(self) -> int:
        """Outcomes waiting to be written."""
        return len(self._outcomes) + len(self._held)

    def delivery_ids(self) -> set[int]:
        """The deliveries whose rows are leased to this worker for the recorder's sake:
        outcomes waiting, being written, set aside, or dropped."""
        return {o.delivery_id for o in (*self._outcomes, *self._held)} | self._dropped

    def add(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._ready.set()

    async def run(self) -> None:
        """Write outcomes as they come, until cancelled."""
        while True:
            await self._ready.wait()
            if self._patient(len(self._outcomes)):
                # Others are about to finish: let a few share the transaction.
                await asyncio.sleep(PATIENCE_S)
            self._ready.clear()
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        """Write every buffered outcome; wait out a database outage (rows stay leased).
        `final`: the last flush, which tries the held outcomes again at once, then every
        HELD_RETRY_S until none is held (its caller bounds it with a deadline)."""
        async with self._lock:
            while True:
                if final:
                    self._take_back_held()
                await self._write_all()
                if not (final and self._held):
                    return
                # The last flush: rows another transaction still holds are tried again
                # until they are free or the caller's shutdown deadline runs out. An
                # answered outcome left behind would be sent again after its lease.
                await asyncio.sleep(HELD_RETRY_S)

    async def _write_all(self) -> None:
        """Write the buffered outcomes, a batch at a time, waiting out an outage."""
        delays = retry.reconnect_delays()
        while self._outcomes:
            batch = self._outcomes[: self._settings.batch_size]
            try:
                recorded = await self._record(batch)
            except DatabaseError as error:
                await self._trouble("record", error, next(delays))
                continue
            self._recovered()
            del self._outcomes[: len(batch)]
            self._hold([o for o in batch if o.delivery_id in recorded.deferred])
            self._recorded()
            for endpoint in recorded.disabled:
                self._metrics.endpoint_disables.inc()
                log.warning(
                    "endpoint %d disabled: %s", endpoint.endpoint_id, endpoint.disabled_reason
                )

    def _hold(self, outcomes: list[Outcome]) -> None:
        """Keep `outcomes` aside and try them again after HELD_RETRY_S."""
        if not outcomes:
            return
        if not self._held:
            asyncio.get_running_loop().call_later(HELD_RETRY_S, self._retry_held)
        self._held.extend(outcomes)

    def _retry_held(self) -> None:
        self._take_back_held()
        self._ready.set()

    def _take_back_held(self) -> None:
        """The outcomes set aside go back to be written with the others."""
        self._outcomes.extend(self._held)
        self._held.clear()

    async def _record(self, batch: Sequence[Outcome]) -> Recorded:
        """Record `batch`; an outcome the database refuses is isolated by halving the batch
        until it stands alone, then recorded as a failed attempt naming why."""
        retried = self._unconfirmed
        self._unconfirmed = True
        try:
            recorded = await self._store.record_outcomes(
                self._settings.worker_id, batch, self._settings.disable_after, retried=retried
            )
        except DatabaseError as error:
            if not refused_values(error):
                raise
            # Rolled back whole: nothing of this call is recorded.
            self._unconfirmed = retried
            if error.sqlstate == CHECK_VIOLATION and await self._made_partitions():
                # A row had no day partition to go to (sql/functions/partitions.sql):
                # made now, the same batch goes in whole.
                return await self._record(batch)
            if len(batch) == 1:
                await self._record_refused(batch[0], error)
                return Recorded([], set())
            middle = len(batch) // 2
            first, second = await self._record(batch[:middle]), await self._record(batch[middle:])
            return Recorded(first.disabled + second.disabled, first.deferred | second.deferred)
        self._unconfirmed = False
        return recorded

    async def _made_partitions(self) -> bool:
        """Whether day partitions of the history were missing, and are made now. A row
        that finds none fails as a CHECK would (23514); without this, it would be isolated
        and recorded as refused, and even that record would find no partition."""
        made = await self._store.create_partitions(PARTITIONS_AHEAD)
        if made:
            log.warning("made %d missing day partitions of the history; recording again", made)
        return made > 0

    async def _record_refused(self, outcome: Outcome, error: DatabaseError) -> None:
        reason = refused_outcome_error(error)
        log.warning(
            "delivery %d: the database refused attempt %d's outcome; recorded as a failed "
            "attempt instead: %s",
            outcome.delivery_id,
            outcome.attempt,
            reason,
        )
        reporting.report_refused_outcome(error.sqlstate or "", reason)
        retried = self._unconfirmed
        self._unconfirmed = True
        try:
            await self._store.record_rejected_outcome(self._settings.worker_id, outcome, reason)
        except DatabaseError as second:
            if not refused_values(second):
                raise
            # Even the bare attempt row is refused (a trigger of the operator's, say):
            # drop the outcome rather than hold up every other one. Its lease expires
            # and it is sent again, the one case of a repeat this leaves.
            self._unconfirmed = retried
            self._dropped.add(outcome.delivery_id)
            log.error(
                "delivery %d: even the bare attempt row was refused (%s); the outcome is "
                "dropped and the delivery will be sent again when its lease expires",
                outcome.delivery_id,
                refused_outcome_error(second),
            )
            return
        self._unconfirmed = False
