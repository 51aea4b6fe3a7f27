"""A worker's slots: which claimed deliveries are sent now, and which wait a moment for one.

A claim takes a few milliseconds, and while it runs, requests to fast endpoints end and
leave their slots empty until its answer comes: at CONCURRENCY 50 against one fast
endpoint, every request of a claim had ended before the next claim's rows came. So
while every request running has started since the previous claim began (no endpoint
the worker holds is slower than a claim), a claim looks ahead: it may take, beyond the
slots, as many rows as will be freed before the claim after it answers (at the rate
slots freed since the previous claim began, over two claims' time; at most
LOOKAHEAD_MOST times CONCURRENCY). Those rows wait here, in hand, and a slot that frees
is refilled from them at once. While a request has outlived a claim, a claim does not
look ahead at all: a slow endpoint's part of the slots never grows by it, and it
cannot fill the slots of a fast one with rows taken ahead.

The claim shares out the slots plus the lookahead (`capacity`) by its usual rules
(sql/functions/claim.sql) and counts the rows in hand as held; the fleet-wide limits
count rows in the database, where a row in hand is `processing`. Here, the claim's
rules are kept for the slots themselves:
  * a freed slot goes to the row in hand whose endpoint has the fewest requests
    running, then to the row taken first: a fresh event never queues behind another
    endpoint's rows in hand;
  * no endpoint runs more than all but the reserve (a tenth of the slots), and the
    reserve goes only to an endpoint below an even part of the slots: rows taken
    ahead for busy endpoints never take it from a newcomer;
  * an endpoint not yet seen answering within a claim runs no more than its part of
    the slots as the claim that gave it rows ahead shared them: a slow newcomer does
    not take the slots its fast neighbours free.
A row that waited `longest_wait_s` since its claim for a slot (its endpoint slowed
down) is given back unsent, not held from other workers, and never sent so late that
its lease could run out first; a stopping worker gives back its rows in hand at once.
A worker killed outright leaves them leased, like its requests in flight, and when
the leases expire they are charged an attempt as those are.

No I/O, and the clock is a parameter: the rules are tested without a database or a wait.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from notifyhook.store import ClaimedDelivery, Holding

LOOKAHEAD_CLAIMS = 2.0
"""The claims' time a lookahead covers: the rows of this claim must last through its own
answer and the next claim's."""

LOOKAHEAD_MOST = 2
"""At most this many times CONCURRENCY rows in hand: a claim has a size it pays for."""

LONGEST_WAIT_S = 1.0
"""How long a row in hand may wait for a slot (and at most a fortieth of the lease)."""


def longest_wait_s(lease_s: float) -> float:
    """A row in hand that waited this long since its claim began goes back: its request,
    up to 0.9 of the lease (Settings.endpoint_timeout_cap_s), must still end well within
    the lease."""
    return min(LONGEST_WAIT_S, lease_s / 40)


@dataclass(slots=True, eq=False)
class _Endpoint:
    tenant_id: str
    running: int = 0
    waiting: deque[tuple[float, int, ClaimedDelivery]] = field(default_factory=deque)
    """(when it was taken, in what order, the row), oldest first."""
    freed: int = 0
    """Slots it freed since the last claim began."""
    fast: bool = False
    """It freed a slot between the last two claims: seen answering faster than claims."""
    share: int | None = None
    """While it has rows in hand and is not known fast: the most it may run, its part of
    the slots as the claim that gave it rows ahead shared them."""

    @property
    def held(self) -> int:
        return self.running + len(self.waiting)


class Slots:
    """The rows a worker holds, per endpoint: running (a request in flight) or in hand."""

    def __init__(
        self,
        concurrency: int,
        longest_wait_s: float = LONGEST_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.longest_wait_s = longest_wait_s
        # The claim's reserve (sql/functions/claim.sql): slots one endpoint may not fill.
        self.per_endpoint = max(1, concurrency - concurrency // 10)
        self.lookahead = 0
        self.running = 0
        self.waiting = 0
        self._endpoints: dict[int, _Endpoint] = {}
        # Those with rows in hand, and a heap of (running, its head's order, id) to
        # choose among them: an entry no longer matching its endpoint is stale, skipped.
        self._in_hand: dict[int, _Endpoint] = {}
        self._turns: list[tuple[int, int, int]] = []
        self._expired: list[ClaimedDelivery] = []
        self._clock = clock
        self._taken = 0
        self._claim_began: float | None = None
        self._claim_before: float | None = None
        self._claim_s = 0.0
        self._freed = 0
        """Slots freed since the last claim began."""
        self._started: dict[int, float] = {}
        """When each running row started (monotonic), oldest first."""

    @property
    def held(self) -> int:
        return self.running + self.waiting

    # -- the claim's side ----------------------------------------------------------------

    def look_ahead(self) -> None:
        """Before a claim: how far it may look ahead (see the module's doc)."""
        now = self._clock()
        previous, before = self._claim_began, self._claim_before
        # A request running since before the claim before the last began has outlived a
        # whole claim: its endpoint is slower than claims, and must not gain slots by a
        # lookahead. (Not the last claim: on a busy worker a fast request's answer may
        # wait a claim's time for the event loop.)
        oldest = next(iter(self._started.values()), None)
        if previous is None or (oldest is not None and oldest < (before or previous)):
            self.lookahead = 0
            return
        since = max(now - previous, 1e-6)
        expected = int(self._freed * LOOKAHEAD_CLAIMS * self._claim_s / since)
        self.lookahead = min(LOOKAHEAD_MOST * self.concurrency, expected)

    def claim_started(self) -> None:
        """A claim begins (after `look_ahead`): what was freed is counted from here."""
        self._claim_before, self._claim_began = self._claim_began, self._clock()
        self._freed = 0
        for endpoint_id, endpoint in list(self._endpoints.items()):
            endpoint.fast, endpoint.freed = endpoint.freed > 0, 0
            if endpoint.fast:
                # Kept even when it holds nothing: its next rows, taken ahead, run
                # without a share.
                endpoint.share = None
            elif not endpoint.held:
                del self._endpoints[endpoint_id]

    def claim_answered(self) -> None:
        """The claim's answer came: how long a claim takes, for the next one's lookahead."""
        if self._claim_began is not None:
            self._claim_s = self._clock() - self._claim_began

    @property
    def capacity(self) -> int:
        """What the claim shares out: the slots, and the rows it may take ahead."""
        return self.concurrency + self.lookahead

    @property
    def room(self) -> int:
        """How many rows the claim may take: up to its capacity, and never fewer than the
        free slots. Rows taken ahead may outnumber the capacity of a claim that no longer
        looks ahead (its endpoint slowed down); a fresh event of another endpoint still
        takes a free slot then, by the claim's reserve."""
        return max(self.capacity - self.held, self.concurrency - self.running)

    def holdings(self) -> list[Holding]:
        """What the worker holds per endpoint, running or in hand: the claim's shares."""
        return [
            Holding(endpoint_id, endpoint.tenant_id, endpoint.held)
            for endpoint_id, endpoint in self._endpoints.items()
            if endpoint.held
        ]

    def take(self, claimed: Sequence[ClaimedDelivery]) -> list[ClaimedDelivery]:
        """A claim's rows are held; the ones to start now (the rest wait for a slot). A
        row's wait counts from the claim's start."""
        taken_at = self._claim_began if self._claim_began is not None else self._clock()
        given: dict[int, int] = {}
        for row in claimed:
            endpoint = self._endpoints.get(row.endpoint_id)
            if endpoint is None:
                endpoint = self._endpoints[row.endpoint_id] = _Endpoint(row.tenant_id)
            self._taken += 1
            endpoint.waiting.append((taken_at, self._taken, row))
            given[row.endpoint_id] = given.get(row.endpoint_id, 0) + 1
            if len(endpoint.waiting) == 1:
                self._in_hand[row.endpoint_id] = endpoint
                self._queue(row.endpoint_id, endpoint)
        self.waiting += len(claimed)
        for endpoint_id, rows in given.items():
            endpoint = self._endpoints[endpoint_id]
            if endpoint.fast:
                continue
            if self.lookahead:
                # Its part of the slots, as this claim shared its capacity: rows taken
                # ahead do not make an endpoint not seen answering fast run more.
                endpoint.share = max(1, endpoint.held * self.concurrency // self.capacity)
            elif endpoint.share is not None:
                endpoint.share += rows  # given within the slots
        return self._fill()

    # -- the deliveries' side ------------------------------------------------------------

    def finished(self, row: ClaimedDelivery, *, refill: bool = True) -> list[ClaimedDelivery]:
        """A running row's delivery ended: its slot is free; the rows to start in it (none
        when not `refill`: the worker is stopping)."""
        endpoint = self._endpoints[row.endpoint_id]
        endpoint.running -= 1
        self.running -= 1
        self._freed += 1
        endpoint.freed += 1
        del self._started[row.delivery_id]
        if endpoint.waiting:
            self._queue(row.endpoint_id, endpoint)
        # Kept while it holds nothing: what it freed counts for the next lookahead.
        return self._fill() if refill else []

    def expired(self) -> list[ClaimedDelivery]:
        """Rows in hand that waited too long for a slot, held no more: to give back."""
        self._expire()
        gone, self._expired = self._expired, []
        return gone

    def next_expiry(self) -> float | None:
        """When the oldest row in hand will have waited too long, if one waits."""
        heads = [e.waiting[0][0] for e in self._in_hand.values()]
        return min(heads) + self.longest_wait_s if heads else None

    def give_back_waiting(self) -> list[ClaimedDelivery]:
        """Every row in hand, held no more: the worker stops; they go back unsent."""
        gone = self.in_hand()
        self._expired = []
        for endpoint in self._in_hand.values():
            endpoint.waiting.clear()
            endpoint.share = None
        self._in_hand.clear()
        self._turns.clear()
        self.waiting = 0
        return gone

    def in_hand(self) -> list[ClaimedDelivery]:
        """The rows held and not running: waiting, or expired and not yet given back."""
        return [*self._expired, *(row for e in self._in_hand.values() for _, _, row in e.waiting)]

    # -- choosing ------------------------------------------------------------------------

    def _expire(self) -> None:
        oldest = self._clock() - self.longest_wait_s
        for endpoint_id, endpoint in list(self._in_hand.items()):
            if endpoint.waiting and endpoint.waiting[0][0] <= oldest:
                while endpoint.waiting and endpoint.waiting[0][0] <= oldest:
                    self._expired.append(endpoint.waiting.popleft()[2])
                    self.waiting -= 1
                if endpoint.waiting:
                    self._queue(endpoint_id, endpoint)
                else:
                    self._out_of_hand(endpoint_id, endpoint)

    def _out_of_hand(self, endpoint_id: int, endpoint: _Endpoint) -> None:
        del self._in_hand[endpoint_id]
        endpoint.share = None

    def _queue(self, endpoint_id: int, endpoint: _Endpoint) -> None:
        heapq.heappush(self._turns, (endpoint.running, endpoint.waiting[0][1], endpoint_id))

    def _fill(self) -> list[ClaimedDelivery]:
        """Start rows in hand while slots are free: the endpoint with the fewest running
        first (then the row taken first), none beyond all but the reserve nor its share,
        and the reserve only for an endpoint below an even part; a row that waited too
        long is set aside instead, to be given back."""
        started: list[ClaimedDelivery] = []
        now = self._clock()
        oldest = now - self.longest_wait_s
        while self.running < self.concurrency and self._turns:
            running, order, endpoint_id = self._turns[0]
            endpoint = self._in_hand.get(endpoint_id)
            if endpoint is None or (endpoint.running, endpoint.waiting[0][1]) != (running, order):
                heapq.heappop(self._turns)  # stale: a newer entry, or nothing in hand
                continue
            if self.running >= self.per_endpoint and running >= max(
                1, self.per_endpoint // len(self._endpoints)
            ):
                # The reserve is for endpoints below an even part of the slots (a
                # newcomer), as in the claim; the heap's head runs the fewest, so no
                # other may take it either. Kept for the next slot that frees.
                break
            heapq.heappop(self._turns)
            if running >= self.per_endpoint or (
                endpoint.share is not None and running >= endpoint.share
            ):
                continue  # queued again when one of its requests ends
            taken_at, _, row = endpoint.waiting.popleft()
            self.waiting -= 1
            if taken_at <= oldest:
                self._expired.append(row)
            else:
                started.append(row)
                self._started[row.delivery_id] = now
                endpoint.running += 1
                self.running += 1
            if endpoint.waiting:
                self._queue(endpoint_id, endpoint)
            else:
                self._out_of_hand(endpoint_id, endpoint)
        return started
