"""The claim loop's pacing rules, on a clock the test moves: no database, no waiting."""

from __future__ import annotations

import asyncio

import pytest

from notifyhook.pacing import PASSED_BY_RETRY_S, Pacing
from notifyhook.store import Claim


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claim(
    taken: int = 0,
    *,
    wake_in_s: float | None = None,
    more_due: bool = False,
    held_back: bool = False,
    passed_by: bool = False,
) -> Claim:
    # The pacing counts the claimed rows and never reads them.
    return Claim([None] * taken, wake_in_s, more_due, held_back, passed_by)  # type: ignore[list-item]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pacing(clock: Clock) -> Pacing:
    return Pacing(batch_size=100, concurrency=40, clock=clock)


@pytest.mark.parametrize(
    ("batch_size", "concurrency", "refill_at"),
    [(100, 40, 10), (8, 100, 2), (3, 3, 1), (1, 1, 1)],
)
def test_a_refill_waits_for_a_quarter_of_the_smaller_of_batch_and_concurrency(
    batch_size, concurrency, refill_at
):
    assert Pacing(batch_size, concurrency).refill_at == refill_at


def test_a_full_batch_claims_again_at_once(pacing):
    pacing.claimed(claim(10), asked=10, in_flight=10)
    assert pacing.more_due
    assert pacing.wake.is_set()


def test_a_claim_that_took_nothing_waits_to_be_woken(pacing):
    pacing.claimed(claim(0, more_due=True), asked=10, in_flight=40)
    assert pacing.more_due
    assert not pacing.wake.is_set()
    assert pacing.timeout() is None


def test_a_claim_that_filled_every_slot_waits_for_a_slot(pacing):
    pacing.claimed(claim(10, more_due=True), asked=10, in_flight=40)
    assert not pacing.wake.is_set()


def test_a_claim_that_took_fewer_than_it_asked_waits_even_with_rows_due(pacing):
    # It took all its parts, limits and locks allowed: claiming again at once would come
    # back empty. Slots freeing up, a notification or the next turn wake the loop.
    pacing.claimed(claim(4, more_due=True), asked=10, in_flight=4)
    assert pacing.more_due
    assert not pacing.wake.is_set()


def test_a_short_claim_with_nothing_left_leaves_the_loop_to_the_next_turn(pacing, clock):
    pacing.claimed(claim(3, wake_in_s=2.5), asked=10, in_flight=3)
    assert not pacing.more_due
    assert not pacing.wake.is_set()
    assert pacing.timeout() == pytest.approx(2.5)
    clock.now += 2.0
    assert pacing.timeout() == pytest.approx(0.5)
    clock.now += 1.0
    assert pacing.timeout() == 0.0


def test_the_next_turn_is_never_sooner_than_a_millisecond(pacing):
    pacing.claimed(claim(0, wake_in_s=0.0), asked=10, in_flight=0)
    assert pacing.timeout() == pytest.approx(0.001)


def test_passed_by_work_is_looked_at_again_soon_backing_off_to_a_second(pacing):
    timeouts = []
    for _ in range(12):
        pacing.claimed(claim(0, passed_by=True), asked=10, in_flight=0)
        timeouts.append(pacing.timeout())
    assert timeouts[:3] == pytest.approx([PASSED_BY_RETRY_S, 2 * PASSED_BY_RETRY_S, 0.008])
    assert timeouts[-1] == 1.0
    assert timeouts == sorted(timeouts)


def test_passed_by_backoff_starts_over_once_a_claim_gets_through(pacing):
    for _ in range(5):
        pacing.claimed(claim(0, passed_by=True), asked=10, in_flight=0)
    pacing.claimed(claim(1), asked=10, in_flight=1)
    pacing.claimed(claim(0, passed_by=True), asked=10, in_flight=0)
    assert pacing.timeout() == pytest.approx(PASSED_BY_RETRY_S)


def test_passed_by_work_does_not_delay_a_sooner_turn(pacing):
    for _ in range(10):
        pacing.claimed(claim(0, passed_by=True, wake_in_s=0.05), asked=10, in_flight=0)
    assert pacing.timeout() == pytest.approx(0.05)


def test_a_held_back_endpoint_caps_recording_and_claims_again_after_the_record(pacing):
    pacing.claimed(claim(2, held_back=True), asked=10, in_flight=2)
    assert pacing.capped
    assert pacing.more_due
    assert not pacing.patient(buffered=1, in_flight=1)
    pacing.wake.clear()
    pacing.recorded()
    assert pacing.wake.is_set()


def test_a_limited_outcome_is_recorded_at_once_and_claims_again_once_written(pacing):
    pacing.claimed(claim(2), asked=10, in_flight=2)
    assert pacing.patient(buffered=1, in_flight=1)
    pacing.limited()
    assert not pacing.patient(buffered=1, in_flight=1)
    pacing.recorded()
    assert pacing.wake.is_set()
    assert not pacing.claim_after_record
    # The next claim still records without delay: it ran before that record was written.
    pacing.limited()
    pacing.claimed(claim(0), asked=10, in_flight=0)
    assert pacing.capped


def test_outcomes_wait_for_company_only_while_others_are_in_flight(pacing):
    pacing.claimed(claim(12), asked=100, in_flight=12)
    assert pacing.patient(buffered=9, in_flight=3)
    assert not pacing.patient(buffered=10, in_flight=3)
    assert not pacing.patient(buffered=1, in_flight=0)


def test_a_record_with_nothing_due_does_not_wake_the_loop(pacing):
    pacing.claimed(claim(3), asked=10, in_flight=3)
    pacing.recorded()
    assert not pacing.wake.is_set()


def test_a_record_does_not_wake_the_loop_for_rows_that_freed_slots_will_claim(pacing):
    # A claim cut short by the endpoint's part (rows left due, nothing held back): the
    # next claim waits for slots to free up. Woken by every record instead, one busy
    # endpoint's claims came back empty 41-72 times in 1,000 (bench peer scenario).
    pacing.claimed(claim(20, more_due=True), asked=25, in_flight=45)
    pacing.wake.clear()
    pacing.recorded()
    assert not pacing.wake.is_set()


def test_freed_slots_refill_every_few_while_rows_are_due(pacing):
    pacing.claimed(claim(40, more_due=True), asked=40, in_flight=40)
    pacing.wake.clear()
    for in_flight in range(39, 30, -1):
        pacing.freed(in_flight)
        assert not pacing.wake.is_set()
    pacing.freed(30)
    assert pacing.wake.is_set()


def test_the_last_freed_slot_claims_again_even_before_the_refill(pacing):
    pacing.claimed(claim(2, more_due=True), asked=2, in_flight=2)
    pacing.wake.clear()
    pacing.freed(1)
    assert not pacing.wake.is_set()
    pacing.freed(0)
    assert pacing.wake.is_set()


def test_freed_slots_do_not_claim_when_nothing_is_due(pacing):
    pacing.claimed(claim(2), asked=10, in_flight=2)
    pacing.freed(1)
    pacing.freed(0)
    assert not pacing.wake.is_set()


def test_a_retry_sooner_than_the_next_turn_wakes_the_loop_to_wait_less(pacing, clock):
    pacing.claimed(claim(1, wake_in_s=5.0), asked=10, in_flight=1)
    pacing.scheduled_retry(1.0)
    assert pacing.wake.is_set()
    assert pacing.timeout() == pytest.approx(1.0)


def test_a_retry_later_than_the_next_turn_leaves_the_wait_alone(pacing):
    pacing.claimed(claim(1, wake_in_s=0.5), asked=10, in_flight=1)
    pacing.scheduled_retry(1.0)
    assert not pacing.wake.is_set()
    assert pacing.timeout() == pytest.approx(0.5)


def test_only_the_earliest_retry_is_kept_and_a_past_one_is_forgotten(pacing, clock):
    pacing.claimed(claim(2), asked=10, in_flight=2)
    pacing.scheduled_retry(1.0)
    pacing.wake.clear()
    pacing.scheduled_retry(3.0)
    assert not pacing.wake.is_set()
    assert pacing.timeout() == pytest.approx(1.0)
    clock.now += 1.0
    assert pacing.timeout() is None
    assert pacing.retry_deadline is None


def test_wait_returns_on_a_wake_up_and_clears_it(pacing):
    async def scenario() -> None:
        waiting = asyncio.create_task(pacing.wait())
        await asyncio.sleep(0)
        assert not waiting.done()
        pacing.wake.set()
        await waiting
        assert not pacing.wake.is_set()

    asyncio.run(scenario())


def test_wait_returns_at_a_deadline_already_passed(pacing, clock):
    pacing.claimed(claim(0, wake_in_s=1.0), asked=10, in_flight=0)
    clock.now += 2.0
    asyncio.run(pacing.wait())
    assert not pacing.wake.is_set()
