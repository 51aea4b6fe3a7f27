"""Recording never resends (DESIGN §8): a real worker, a real PostgreSQL, a real receiver.

A recorded 200 is never followed by another request for the same delivery, except after
a worker crash: not when the database refuses one outcome of a batch, not when the
worker stops gracefully, not when an endpoint is deleted while its answers come in.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import psycopg
import pytest
from conftest import add_endpoint, scalar, wait_until
from test_worker import insert_events, statuses

from notifyhook.tools.receiver import Answer

pytestmark = pytest.mark.slow


def own_endpoints(db, receiver, *names: str) -> list[int]:
    """Endpoints of tenant t, each at the receiver's path of its name and subscribed to
    events of that type only; their ids."""
    return [add_endpoint(db, "t", n, receiver.url(n), event_types=[n]) for n in names]


def insert_typed(db, *event_types: str) -> None:
    """One event of tenant t for each type given, in one INSERT."""
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't', kind, '{}' FROM unnest(%s::text[]) AS kind",
        [list(event_types)],
    )


def attempts_per_delivery(db) -> Counter[int]:
    return Counter(
        row[0] for row in db.execute("SELECT delivery_id FROM notifyhook.attempts").fetchall()
    )


def test_an_outcome_the_database_refuses_blocks_nothing_and_nothing_is_resent(
    db, receiver, start_worker
):
    # One endpoint's answer carries a value the database refuses (here a constraint of
    # the operator's; in the issue, a DISABLE_AFTER that overflowed a timestamp): the
    # batches it shares with healthy deliveries must still be recorded, once.
    db.execute(
        "ALTER TABLE notifyhook.attempts ADD CONSTRAINT no_poison "
        "CHECK (response_excerpt IS DISTINCT FROM 'poison')"
    )
    receiver.sequence("poison", Answer(kind="slow", seconds=0.3, body=b"poison"))
    receiver.sequence("a", Answer(kind="slow", seconds=0.3))
    receiver.sequence("b", Answer(kind="slow", seconds=0.3))
    for name in ("poison", "a", "b"):
        add_endpoint(db, "t", name, receiver.url(name))
    worker = start_worker(lease="3", http_timeout="2")
    insert_events(db, "t", 10)
    wait_until(
        lambda: statuses(db) == {"delivered": 30}, timeout=30, what="every delivery recorded"
    )
    arrivals = Counter((a.path, a.webhook_id) for a in receiver.received())
    assert len(arrivals) == 30
    assert set(arrivals.values()) == {1}, "a delivery was sent twice"
    assert set(attempts_per_delivery(db).values()) == {1}
    refused = db.execute(
        "SELECT a.error FROM notifyhook.attempts AS a "
        "JOIN notifyhook.endpoints AS e ON e.id = a.endpoint_id WHERE e.name = 'poison'"
    ).fetchall()
    assert len(refused) == 10
    assert all("no_poison" in error for (error,) in refused)
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts WHERE error IS NULL") == 20
    log = worker.log()
    assert "refused" in log
    assert "took back" not in log


def test_what_answers_during_the_shutdown_grace_is_recorded_as_answered(db, receiver, start_worker):
    # The timing: A answers 200 after 4.5 s; B, claimed later, hangs until its
    # 5.4 s timeout; SIGTERM just after B is claimed. A's lease (6 s) ends before B's
    # timeout: its outcome must be recorded while the worker waits for B, not after.
    receiver.sequence("a", Answer(kind="slow", seconds=4.5))
    receiver.sequence("b", Answer(kind="hang", seconds=30))
    a = add_endpoint(db, "t", "a", receiver.url("a"))
    b = add_endpoint(db, "t", "b", receiver.url("b"), timeout_ms=5400)
    worker = start_worker(lease="6", http_timeout="5", shutdown_grace="10")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "VALUES ('t', 'x', '{}', %s)",
        [a],
    )
    wait_until(lambda: receiver.received("a"), what="A's request")
    # B is claimed well after A, so that A's lease ends before B's timeout does.
    time.sleep(1.5)
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "VALUES ('t', 'x', '{}', %s)",
        [b],
    )
    wait_until(lambda: receiver.received("b"), what="B's request")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    state = dict(
        db.execute(
            "SELECT endpoint_id, status FROM notifyhook.deliveries WHERE endpoint_id IN (%s, %s)",
            [a, b],
        ).fetchall()
    )
    assert state[a] == "delivered", worker.log()
    assert state[b] == "pending"  # timed out: a retry, on the schedule
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts WHERE endpoint_id = %s", [a]) == 1
    start_worker(lease="6", http_timeout="5")
    # The next worker sends B again, and never A.
    wait_until(lambda: len(receiver.received("b")) == 2, timeout=30, what="B's retry")
    assert len(receiver.received("a")) == 1


def test_deleting_an_endpoint_while_its_answers_are_recorded(
    db, database_url, receiver, start_worker
):
    # The endpoint is deleted by a transaction that commits while the worker's record
    # waits for the rows it updates: the record must skip the vanished deliveries (no
    # foreign key or partition error) and record the rest of its batch.
    receiver.sequence("doomed", Answer(kind="slow", seconds=1.0))
    receiver.sequence("kept", Answer(kind="slow", seconds=1.0))
    doomed = add_endpoint(db, "t", "doomed", receiver.url("doomed"))
    add_endpoint(db, "t", "kept", receiver.url("kept"))
    worker = start_worker()
    insert_events(db, "t", 3)
    wait_until(lambda: len(receiver.received()) == 6, what="six requests in flight")
    with psycopg.connect(database_url) as deleting:
        deleting.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [doomed])
        wait_until(
            lambda: scalar(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'notifyhook' AND wait_event_type = 'Lock'",
            ),
            what="the record to wait for the deleted rows",
        )
        deleting.commit()
    wait_until(lambda: statuses(db) == {"delivered": 3}, what="the kept endpoint's deliveries")
    assert len(receiver.received("kept")) == 3
    assert set(attempts_per_delivery(db).values()) == {1}
    log = worker.log()
    assert "refused" not in log
    assert "foreign key" not in log


def test_an_operators_lock_on_an_endpoint_row_holds_up_no_outcome(
    db, database_url, receiver, run_worker
):
    # An admin tool locks an endpoint row before an edit (SELECT ... FOR UPDATE) for longer
    # than a lease, while requests to it and to another endpoint are answered 200. Before
    # 0008 each outcome moved its row into the history, whose foreign key check waits for
    # that lock: the whole batch waited, the leases ran out, and both 200s went again.
    receiver.sequence("edited", Answer(kind="slow", seconds=1.0))
    receiver.sequence("other", Answer(kind="slow", seconds=1.5))
    edited, _ = own_endpoints(db, receiver, "edited", "other")
    worker = run_worker(lease="3", http_timeout="2")
    insert_typed(db, "edited", "other")
    wait_until(lambda: len(receiver.received()) == 2, what="both requests in flight")
    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT * FROM notifyhook.endpoints WHERE id = %s FOR UPDATE", [edited])
        # Recorded while the lock is held, well within the lease.
        worker.wait_recorded(lambda: statuses(db) == {"delivered": 2}, what="both delivered")
        time.sleep(4)  # past the lease: nothing may be taken back and sent again
        operator.rollback()
    assert Counter(hit.path for hit in receiver.received()) == {"edited": 1, "other": 1}
    assert set(attempts_per_delivery(db).values()) == {1}


def test_an_operators_lock_on_an_endpoint_row_holds_up_no_claim(
    db, database_url, receiver, run_worker
):
    # The same lock, with rows of that endpoint and of another due when the worker
    # starts: a claim gives each picked turn row its wake and then its next turn, and the
    # second update of a row its own transaction wrote checked the turn's foreign key
    # against the locked endpoint row. Every claim waited, the other endpoint's included.
    edited, _ = own_endpoints(db, receiver, "edited", "other")
    insert_typed(db, "edited", "other", "other")
    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT * FROM notifyhook.endpoints WHERE id = %s FOR UPDATE", [edited])
        worker = run_worker()
        worker.wait_recorded(lambda: statuses(db) == {"delivered": 3}, what="all three delivered")
        operator.rollback()
    assert Counter(hit.path for hit in receiver.received()) == {"edited": 1, "other": 2}


def test_an_operators_open_delete_of_one_endpoint_holds_up_no_other_outcome(
    db, database_url, receiver, run_worker
):
    # An operator deletes an endpoint in a transaction held open past the lease while a
    # request to it is in flight; another endpoint's request is answered 200 meanwhile.
    # The record waited on the row the DELETE's cascade held, with its whole batch, and
    # the other endpoint's answered webhook went again after the lease (review, session
    # 8). Now the held row's outcome waits alone, and is recorded once the DELETE ends.
    receiver.sequence("doomed", Answer(kind="slow", seconds=0.5))
    receiver.sequence("kept", Answer(kind="slow", seconds=1.0))
    doomed, _ = own_endpoints(db, receiver, "doomed", "kept")
    worker = run_worker(lease="3", http_timeout="2")
    insert_typed(db, "doomed")
    wait_until(lambda: receiver.received("doomed"), what="the doomed endpoint's request")
    with psycopg.connect(database_url) as operator:
        operator.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [doomed])
        insert_typed(db, "kept")
        worker.wait_recorded(
            lambda: statuses(db).get("delivered") == 1, what="kept's 200 recorded meanwhile"
        )
        time.sleep(4)  # past the lease
        operator.rollback()
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 2}, what="both recorded")
    assert len(receiver.received("kept")) == 1
    kept_attempts = scalar(
        db, "SELECT count(*) FROM notifyhook.attempts WHERE endpoint_id <> %s", [doomed]
    )
    assert kept_attempts == 1
    # The held row itself may go again: its outcome could not be written before its lease
    # ran out (docs/operations.md).


def expired_rows_of(db, *workers: str) -> None:
    """One processing row per worker, leased for 10 s until 2 s ago (within the lease
    more that a live worker keeps)."""
    add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    insert_events(db, "t", len(workers))
    ids = [row[0] for row in db.execute("SELECT id FROM notifyhook.deliveries ORDER BY id")]
    for delivery, worker in zip(ids, workers, strict=True):
        db.execute(
            "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 1, "
            "locked_by = %s, updated_at = now() - interval '12 seconds', "
            "locked_until = now() - interval '2 seconds' WHERE id = %s",
            [worker, delivery],
        )


def test_an_answered_outcome_held_past_the_lease_by_an_operator_is_not_reclaimed(
    db, database_url, receiver, run_worker
):
    # An operator's transaction locks a delivery row while its request is answered 200
    # and holds it past the lease: the outcome is set aside, tried again every half
    # second. When the lock ends, a reclaim could take the row first (a worker's timer)
    # and the answered webhook went again (review, session 9: "reclaim vs deferred
    # outcome"). Here the reclaim waits for the row and runs in the instant the lock
    # ends, before the recorder's next try: a live worker's row is not taken within a
    # lease more.
    receiver.sequence("a", Answer(kind="slow", seconds=1.0))
    add_endpoint(db, "t", "a", receiver.url("a"))
    worker = run_worker(lease="2", http_timeout="1.5")
    insert_events(db, "t", 1)
    wait_until(lambda: receiver.received("a"), what="the request")
    reclaimed: list[int] = []

    def reclaim_as_the_lock_ends() -> None:
        with psycopg.connect(database_url) as reclaimer:
            reclaimer.execute("SELECT FROM notifyhook.deliveries FOR UPDATE")
            reclaimed.append(scalar(reclaimer, "SELECT notifyhook.reclaim_expired(5)"))

    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT FROM notifyhook.deliveries FOR UPDATE")
        wait_until(
            lambda: scalar(db, "SELECT locked_until < now() FROM notifyhook.deliveries"),
            what="the lease to run out",
        )
        reclaimer = threading.Thread(target=reclaim_as_the_lock_ends)
        reclaimer.start()
        wait_until(
            lambda: scalar(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%FOR UPDATE%%'",
            ),
            what="the reclaim waiting for the row",
        )
        operator.rollback()
    reclaimer.join(10)
    assert reclaimed == [0]
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 1}, what="the 200 recorded")
    assert [hit.answered for hit in receiver.received("a")] == [200]
    assert list(attempts_per_delivery(db).values()) == [1]


def test_a_live_workers_row_comes_back_after_twice_its_lease_and_a_dead_ones_at_once(
    db, database_url
):
    # The other side of the rule above: a worker alive but stuck still gives its rows up,
    # one lease later; a dead one's (no session holds its id) come back as soon as their
    # lease ends.
    expired_rows_of(db, "live-recent", "dead", "live-stuck")
    db.execute(  # leased for 10 s, until 30 s ago: past a lease more
        "UPDATE notifyhook.deliveries SET updated_at = now() - interval '40 seconds', "
        "locked_until = now() - interval '30 seconds' WHERE locked_by = 'live-stuck'"
    )
    with psycopg.connect(database_url, autocommit=True) as alive:
        for worker in ("live-stuck", "live-recent"):
            alive.execute("SELECT pg_advisory_lock(notifyhook.worker_lock_key(%s))", [worker])
        assert scalar(db, "SELECT notifyhook.reclaim_expired(5)") == 2
    back = dict(db.execute("SELECT locked_by, status FROM notifyhook.deliveries").fetchall())
    assert back == {None: "pending", "live-recent": "processing"}, back


def test_a_record_past_its_lock_timeout_is_logged_as_such_and_recorded_once_later(
    db, database_url, receiver, start_worker
):
    # An operator's transaction holds the history (a LOCK TABLE or an ALTER TABLE left
    # open in psql) while an answer comes in: the record waits until its lock_timeout
    # (3 s under a lease of 12 s) cancels it. That is no outage, and "database
    # unavailable" sent the operator looking for one. The record is tried again and, the
    # lock gone, the answer recorded once, never sent again.
    receiver.sequence("a", Answer(kind="slow", seconds=1.0))
    add_endpoint(db, "t", "a", receiver.url("a"))
    worker = start_worker(lease="12", http_timeout="5")
    with psycopg.connect(database_url) as operator:
        insert_events(db, "t", 1)
        wait_until(lambda: receiver.received("a"), what="the request")
        operator.execute("LOCK TABLE notifyhook.attempts IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: "record failed" in worker.log(), timeout=30, what="the record to fail")
    wait_until(lambda: statuses(db) == {"delivered": 1}, what="the outcome recorded")
    assert len(receiver.received("a")) == 1
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 1
    log = worker.log()
    assert (
        "record failed, the statement waited past its lock_timeout of 3s for a lock another "
        "transaction holds (" in log
    ), log
    assert "database unavailable" not in log


def test_reclaim_knows_a_live_worker_whatever_its_ids_lock_key(db, database_url):
    # reclaim_expired rebuilds each held bigint key from pg_locks' two 32-bit halves; the
    # keys of worker ids are hashes: negative half the time, either half >= 2^31.
    workers = [f"worker-{n}" for n in range(16)]
    keys = [scalar(db, "SELECT notifyhook.worker_lock_key(%s)", [w]) for w in workers]
    assert any(k < 0 for k in keys)
    assert any(k >= 0 and k & 0x80000000 for k in keys)  # a low half >= 2^31
    expired_rows_of(db, *workers)
    with psycopg.connect(database_url, autocommit=True) as alive:
        for worker in workers:
            alive.execute("SELECT pg_advisory_lock(notifyhook.worker_lock_key(%s))", [worker])
        assert scalar(db, "SELECT notifyhook.reclaim_expired(5)") == 0
        # Released here, not by closing: a closed connection's backend lets its locks go
        # a moment after the client has returned (CI once saw all 16 still held).
        alive.execute("SELECT pg_advisory_unlock_all()")
    assert scalar(db, "SELECT notifyhook.reclaim_expired(5)") == len(workers)


def test_a_dead_workers_rows_come_back_although_its_id_is_locked_in_another_database(db, server):
    # Two notifyhook installations in one cluster (staging and production), workers on
    # one host: the unit sets WORKER_ID=%H:%i, so both have a "host:1". Advisory locks
    # are per database, but pg_locks lists every database's: the other installation's
    # live "host:1" made this one's dead "host:1" look alive (review s12-rev3).
    expired_rows_of(db, "host:1")
    with (
        server.databases.fresh() as other_url,
        psycopg.connect(other_url, autocommit=True) as other,
    ):
        other.execute("SELECT pg_advisory_lock(notifyhook.worker_lock_key('host:1'))")
        assert scalar(db, "SELECT notifyhook.reclaim_expired(5)") == 1
