"""A worker's slots and rows in hand (notifyhook/slots.py), on a clock the test moves."""

from __future__ import annotations

import itertools
import uuid

import pytest
from conftest import Clock

from notifyhook.slots import LOOKAHEAD_MOST, Slots, longest_wait_s
from notifyhook.store import ClaimedDelivery, Holding

ids = itertools.count(1)


def rows(endpoint_id: int, count: int, tenant_id: str = "t") -> list[ClaimedDelivery]:
    return [
        ClaimedDelivery(
            next(ids),
            uuid.uuid4(),
            endpoint_id,
            tenant_id,
            1,
            "https://example.com/",
            "s",
            None,
            {},
            None,
            None,
            "{}",
            False,
        )
        for _ in range(count)
    ]


def endpoints(started: list[ClaimedDelivery]) -> list[int]:
    return [row.endpoint_id for row in started]


@pytest.fixture
def slots(clock: Clock) -> Slots:
    return Slots(concurrency=10, longest_wait_s=1.0, clock=clock)


def test_without_lookahead_a_claim_shares_the_free_slots_and_its_rows_start_at_once(slots):
    begin_claim(slots)
    assert (slots.capacity, slots.room) == (10, 10)
    started = slots.take(rows(1, 6) + rows(2, 3))
    assert sorted(endpoints(started)) == [1] * 6 + [2] * 3
    assert (slots.running, slots.waiting, slots.room) == (9, 0, 1)
    assert sorted(slots.holdings(), key=lambda h: h.endpoint_id) == [
        Holding(1, "t", 6),
        Holding(2, "t", 3),
    ]


def test_no_endpoint_runs_more_than_all_but_the_reserve(slots):
    a = rows(1, 10)
    assert len(slots.take(a)) == 9  # a tenth of 10 slots kept for others
    assert slots.waiting == 1
    assert endpoints(slots.take(b := rows(2, 1))) == [2]  # a fresh event finds a slot
    # A is past an even part of the slots now B has rows: its row in hand leaves the
    # reserve alone, and takes a slot when B's request ends.
    assert slots.finished(a[0]) == []
    assert endpoints(slots.finished(b[0])) == [1]


def test_a_freed_slot_goes_to_the_endpoint_with_the_fewest_requests_running(slots):
    a = rows(1, 6)
    slots.take(a + rows(2, 1))
    # A's rows were taken first, but B runs fewer: B's go first. A's wait: two
    # endpoints have rows, and A runs more than its even part of the reserve's edge.
    assert endpoints(slots.take(rows(1, 3) + rows(2, 2))) == [2, 2]
    assert (slots.running, slots.waiting) == (9, 3)
    assert endpoints(slots.finished(a[0])) == [1]


def test_a_stopping_worker_starts_nothing_more_and_gives_back_what_it_holds_in_hand(slots):
    a = rows(1, 12)
    slots.take(a)
    assert slots.finished(a[0], refill=False) == []
    back = slots.give_back_waiting()
    assert sorted(row.delivery_id for row in back) == [row.delivery_id for row in a[9:]]
    assert (slots.running, slots.waiting, slots.in_hand()) == (8, 0, [])


def begin_claim(slots: Slots) -> None:
    slots.look_ahead()
    slots.claim_started()


def run_claim(slots: Slots, clock: Clock, claim_s: float) -> None:
    begin_claim(slots)
    clock.now += claim_s
    slots.claim_answered()


def test_a_claim_looks_ahead_by_what_fast_endpoints_will_free_before_the_next_answer(slots, clock):
    a = rows(1, 9)
    run_claim(slots, clock, 0.004)
    slots.take(a)
    clock.now += 0.004
    for row in a:  # all of the claim's rows end within 4 ms
        slots.finished(row)
    slots.take(b := rows(1, 5))
    begin_claim(slots)
    # 9 freed in the 8 ms since the last claim began; a claim takes 4 ms; over two
    # claims' time it will free 9 more: the claim may take them beyond the slots.
    assert slots.lookahead == 9
    assert (slots.capacity, slots.room) == (19, 14)
    assert len(b) == slots.running


def test_a_claim_does_not_look_ahead_while_a_request_has_outlived_a_whole_claim(slots, clock):
    fast, slow = rows(1, 5), rows(2, 3)
    run_claim(slots, clock, 0.004)
    slots.take(fast + slow)
    clock.now += 0.004
    for row in fast:
        slots.finished(row)
    run_claim(slots, clock, 0.004)
    assert slots.lookahead == 5  # the slow rows started after the last claim began
    for _ in range(2):
        slots.take(more := rows(1, 5))
        clock.now += 0.004
        for row in more:
            slots.finished(row)
        begin_claim(slots)
    # Still running since before the claim before the last began: a slow endpoint,
    # whose part must not grow by a lookahead.
    assert slots.lookahead == 0
    assert slots.room == 7
    for row in slow:
        slots.finished(row)
    clock.now += 0.004
    begin_claim(slots)
    assert slots.lookahead == 6  # fast again: 3 freed in 4 ms; over two claims of 4 ms, 6


def test_the_lookahead_has_a_bound(clock):
    slots = Slots(concurrency=4, longest_wait_s=1.0, clock=clock)
    run_claim(slots, clock, 0.010)
    for _ in range(10):  # the same slots freed over and over within one claim's time
        row = rows(1, 1)
        slots.take(row)
        slots.finished(row[0])
    clock.now += 0.001
    begin_claim(slots)
    assert slots.lookahead == LOOKAHEAD_MOST * 4


def test_the_first_claim_and_an_idle_worker_do_not_look_ahead(slots, clock):
    begin_claim(slots)
    assert slots.lookahead == 0
    clock.now += 5
    begin_claim(slots)
    assert slots.lookahead == 0


def test_a_row_in_hand_that_waited_too_long_is_given_back_not_started(slots, clock):
    a = rows(1, 11)
    slots.take(a)
    assert slots.next_expiry() == clock.now + 1.0
    clock.now += 0.5
    assert slots.expired() == []
    clock.now += 0.5
    assert slots.finished(a[0]) == []  # a slot, but its row waited its second
    assert [row.delivery_id for row in slots.expired()] == [a[9].delivery_id, a[10].delivery_id]
    assert (slots.waiting, slots.next_expiry(), slots.expired()) == (0, None, [])


def test_rows_expired_but_not_yet_given_back_are_still_in_hand(slots, clock):
    a = rows(1, 10)
    slots.take(a)
    clock.now += 1.0
    slots.finished(a[0])
    assert [row.delivery_id for row in slots.in_hand()] == [a[9].delivery_id]
    assert [row.delivery_id for row in slots.give_back_waiting()] == [a[9].delivery_id]


@pytest.mark.parametrize(("lease_s", "wait_s"), [(60.0, 1.0), (10.0, 0.25), (1.0, 0.025)])
def test_a_row_in_hand_waits_at_most_a_fortieth_of_the_lease(lease_s, wait_s):
    assert longest_wait_s(lease_s) == wait_s


def test_rows_taken_ahead_never_keep_a_fresh_event_from_a_free_slot(slots, clock):
    a = rows(1, 9)
    run_claim(slots, clock, 0.004)
    slots.take(a)
    clock.now += 0.004
    for row in a:
        slots.finished(row)
    begin_claim(slots)
    assert slots.lookahead == 9
    slots.take(b := rows(1, 17))  # 9 running (all but the reserve), 8 in hand
    clock.now += 0.5
    begin_claim(slots)  # nothing freed: no lookahead now, and more held than slots
    assert (slots.lookahead, slots.held, slots.capacity) == (0, 17, 10)
    assert slots.room == 1  # the free slot: the claim's reserve gives it to a newcomer
    assert endpoints(slots.take(rows(2, 1))) == [2]
    assert len(b) == 17


def test_rows_taken_ahead_for_two_endpoints_leave_the_reserve_to_a_newcomer(slots, clock):
    # (review) A claim looking ahead gave A and C nine rows each; ten slots.
    a, c = rows(1, 9, "t1"), rows(2, 9, "t2")
    run_claim(slots, clock, 0.004)
    started = slots.take(a + c)
    assert sorted(endpoints(started)) == [1] * 5 + [2] * 4  # the tenth slot: the reserve
    assert (slots.running, slots.waiting) == (9, 9)
    assert endpoints(slots.take(b := rows(3, 1, "t3"))) == [3]  # a fresh event: the reserve
    assert slots.finished(started[0]) == []  # what is free now is the reserve: kept
    assert len(slots.finished(b[0])) == 1  # and when B's request ends, A or C goes on


def test_an_endpoint_not_seen_answering_runs_only_its_part_of_rows_taken_ahead(slots, clock):
    # (review) A and C answer within a claim; S is new. A claim looking ahead by 20
    # shares 30 rows: S's 9 are its part of 30, three of the ten slots.
    a, c = rows(1, 9), rows(2, 9)
    run_claim(slots, clock, 0.004)
    slots.take(a[:4] + c[:4])
    clock.now += 0.004
    for row in a[:4] + c[:4]:
        slots.finished(row)
    begin_claim(slots)
    slots.lookahead = 20  # as look_ahead would say for a fast enough pair
    s = rows(3, 9)
    running = slots.take(a[4:] + c[4:] + s)
    assert endpoints(running).count(3) <= 3
    for _ in range(30):  # A and C answer, S does not: their slots are not S's
        fast = [row for row in running if row.endpoint_id != 3]
        if not fast:
            break
        running.remove(fast[0])
        running += slots.finished(fast[0])
    assert endpoints(running).count(3) == 3
    assert slots.waiting == 6  # S's other rows wait, and go back if S stays slow
