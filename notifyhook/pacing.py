"""When the claim loop claims again and when outcomes are recorded: the worker's pacing rules."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notifyhook.store import Claim

PASSED_BY_RETRY_S = 0.002
"""How soon to claim again when a claim passed work by for a lock held a moment (doubling
while it stays held, up to a second)."""

PASSED_BY_LONGEST_S = 1.0


class Pacing:
    """The claim loop's clock and wake-up event, and the rules that move them.

    The worker tells it what happened (a claim, a scheduled retry, a finished delivery,
    a recorded batch); it sets the wake-up event when the loop should claim again and
    keeps the deadline for when the loop should look unwoken. No I/O, and the clock is a
    parameter, so the rules are tested without a database or a wait.
    """

    def __init__(
        self, batch_size: int, concurrency: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.concurrency = concurrency
        # Finishing deliveries trigger a new claim only every few slots, and outcomes
        # are recorded a batch at a time: a claim or a record costs the database
        # about a millisecond however few rows it carries, so one per delivery
        # would cost more than the deliveries themselves.
        self.refill_at = max(1, min(batch_size, concurrency) // 4)
        self.wake = asyncio.Event()
        self._clock = clock
        self.more_due = False
        """Rows were left due by the last claim: finishing deliveries trigger the next."""
        self.capped = False
        """Due rows wait for a cap (max_in_flight, a circuit probe, the endpoint's or
        tenant's share) that only a recorded outcome lifts: record without delay."""
        self.claim_after_record = False
        self.freed_since_claim = 0
        self.passed_by_streak = 0
        # When to look again without being woken (monotonic seconds): what the last
        # claim said, and the earliest retry this worker scheduled itself; the latter
        # is kept apart because a claim may run before that retry is recorded.
        self.claim_deadline: float | None = None
        self.retry_deadline: float | None = None

    # -- the claim loop's side ---------------------------------------------------------

    def timeout(self) -> float | None:
        """How long the loop may wait unwoken: until the nearer deadline, or for ever."""
        now = self._clock()
        if self.retry_deadline is not None and self.retry_deadline <= now:
            self.retry_deadline = None
        deadlines = [d for d in (self.claim_deadline, self.retry_deadline) if d is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    async def wait(self) -> None:
        """Wait for a wake-up or the next deadline, whichever comes first."""
        # Not asyncio.wait_for: it runs the wait in a Task of its own, three turns of the
        # loop (behind every ready delivery callback) even when the loop is already woken.
        if not self.wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout()):
                    await self.wake.wait()
        self.wake.clear()

    def claimed(self, claim: Claim, asked: int, in_flight: int) -> None:
        """A claim asked for `asked` rows and its deliveries are started (`in_flight` now)."""
        taken = len(claim.deliveries)
        self.freed_since_claim = 0
        self.capped = claim.held_back or self.claim_after_record
        # An endpoint held back until its in-flight row is recorded (FIFO, its
        # max_in_flight, its circuit) gets its turn back from that record: claim
        # again once it is written.
        self.more_due = claim.more_due or taken == asked or claim.held_back
        self.claim_deadline = self._next_look(claim.wake_in_s, passed_by=claim.passed_by)
        # Claim again at once only when this claim was cut short by the rows asked
        # for and rows are left. One that took fewer took all it could (the rest
        # wait for parts, limits or locks): the next claim waits for slots to free
        # up, a notification or the next turn. (Claiming again at once after a lone
        # endpoint took its part came back empty every time: half of all claims.)
        if taken == asked and self.more_due and in_flight < self.concurrency:
            self.wake.set()

    def _next_look(self, wake_in_s: float | None, *, passed_by: bool) -> float | None:
        """When to claim again unwoken: at the next turn, or shortly when work was passed
        by for a lock, backing off while the lock stays held (an operator's open
        transaction must not make the worker spin)."""
        if passed_by:
            self.passed_by_streak += 1
            retry_s = min(PASSED_BY_RETRY_S * 2 ** (self.passed_by_streak - 1), PASSED_BY_LONGEST_S)
            wake_in_s = retry_s if wake_in_s is None else min(wake_in_s, retry_s)
        else:
            self.passed_by_streak = 0
        if wake_in_s is None:
            return None
        return self._clock() + max(0.001, wake_in_s)

    # -- the deliveries' side ------------------------------------------------------------

    def scheduled_retry(self, retry_in_s: float) -> None:
        """This worker scheduled a retry: look again when it falls due."""
        deadline = self._clock() + retry_in_s
        if self.retry_deadline is None or deadline < self.retry_deadline:
            earliest = min(d for d in (deadline, self.claim_deadline) if d is not None)
            self.retry_deadline = deadline
            if earliest == deadline:
                # The claim loop waits with a timeout computed before this retry
                # existed: wake it to look again (rare: later retries of the same
                # run fall due later).
                self.wake.set()

    def limited(self) -> None:
        """An outcome its endpoint's next row waits for (FIFO, max_in_flight, a circuit):
        record it without waiting for company, and claim again once it is written."""
        self.capped = self.claim_after_record = True

    def freed(self, in_flight: int) -> None:
        """A delivery left its slot (`in_flight` still running): refill every few slots."""
        self.freed_since_claim += 1
        if self.more_due and (self.freed_since_claim >= self.refill_at or not in_flight):
            self.wake.set()

    # -- the recorder's side ---------------------------------------------------------------

    def patient(self, buffered: int, in_flight: int) -> bool:
        """Whether finished outcomes may wait a moment for others to share their batch."""
        return bool(in_flight) and not self.capped and buffered < self.refill_at

    def recorded(self) -> None:
        """A batch of outcomes is written."""
        if self.capped or self.claim_after_record:
            # A limited endpoint's slot is free only once its outcome is recorded: a
            # claim that ran before this flush saw it still held. Rows due for any
            # other reason are claimed as slots free up (`freed`), not at each record:
            # a record frees no slot, and a claim it woke while the lone busy endpoint
            # held its part came back empty (6% of one endpoint's claims at c50).
            self.claim_after_record = False
            self.wake.set()
