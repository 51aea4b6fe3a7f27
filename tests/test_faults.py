"""The worker under faults: kills, database restarts, cut connections, misbehaving receivers."""

from __future__ import annotations

import logging
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


def test_sigkill_mid_flight_loses_nothing(db, receiver, start_worker):
    receiver.sequence("slow", Answer(kind="slow", seconds=0.5))
    add_endpoint(db, "t", "slow", receiver.url("slow"))
    doomed = start_worker(lease="3", http_timeout="2")
    insert_events(db, "t", 20)
    wait_until(lambda: receiver.received("slow"), what="requests in flight")
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    start_worker(lease="3", http_timeout="2")
    wait_until(lambda: statuses(db) == {"delivered": 20}, timeout=60, what="everything delivered")
    arrivals = Counter(a.webhook_id for a in receiver.received("slow"))
    assert len(arrivals) == 20
    repeats = sum(n - 1 for n in arrivals.values())
    in_flight_at_kill = scalar(
        db, "SELECT count(*) FROM notifyhook.attempts WHERE error LIKE 'lease expired%%'"
    )
    assert repeats <= in_flight_at_kill, f"{repeats} repeats, {in_flight_at_kill} leases expired"
    print(f"repeats after SIGKILL: {repeats}")


def test_a_worker_restarted_under_the_same_id_takes_its_rows_back_at_once(
    db, receiver, start_worker
):
    # The first answers hang until the kill; a lease of 10 minutes would keep the rows
    # leased for that long, unless the restarted worker takes them back itself.
    receiver.sequence("e", Answer(kind="hang"), Answer(kind="hang"), Answer(status=200))
    add_endpoint(db, "t", "e", receiver.url("e"))
    doomed = start_worker(worker_id="host:1", lease="600", http_timeout="300")
    insert_events(db, "t", 2)
    wait_until(lambda: len(receiver.received("e")) == 2, what="both requests in flight")
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    successor = start_worker(worker_id="host:1", lease="600", http_timeout="300")
    wait_until(lambda: statuses(db) == {"delivered": 2}, what="both delivered by the successor")
    assert "took back 2 deliveries a previous worker host:1 left leased" in successor.log()
    expired = scalar(
        db, "SELECT count(*) FROM notifyhook.attempts WHERE error LIKE 'lease expired%%'"
    )
    assert expired == 2


def test_four_workers_deliver_each_event_exactly_once(db, receiver, start_worker):
    add_endpoint(db, "t", "a", receiver.url("a"))
    add_endpoint(db, "t", "b", receiver.url("b"))
    for _ in range(4):
        start_worker(concurrency="20", batch_size="20")
    insert_events(db, "t", 1000)
    wait_until(lambda: statuses(db) == {"delivered": 2000}, timeout=120, what="2,000 deliveries")
    arrivals = Counter((a.path, a.webhook_id) for a in receiver.received())
    assert len(arrivals) == 2000
    assert set(arrivals.values()) == {1}
    workers = {r[0] for r in db.execute("SELECT DISTINCT worker FROM notifyhook.attempts")}
    assert len(workers) >= 2


def test_listener_killed_by_pg_terminate_backend_reconnects(db, receiver, start_worker):
    add_endpoint(db, "t", "a", receiver.url("a"))
    worker = start_worker(poll_interval="30")
    insert_events(db, "t", 1)
    wait_until(lambda: statuses(db) == {"delivered": 1})
    killed = scalar(
        db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'notifyhook'",
    )
    assert killed >= 1
    wait_until(
        lambda: "listener reconnected" in worker.log(), timeout=30, what="the listener to reconnect"
    )
    insert_events(db, "t", 5)
    # With a 30 s poll interval, a prompt delivery proves the new LISTEN works.
    wait_until(
        lambda: statuses(db) == {"delivered": 6}, timeout=10, what="deliveries after reconnecting"
    )
    assert worker.process.poll() is None


def test_a_claim_whose_answer_was_lost_is_sent_at_once_and_not_charged(db, receiver, run_worker):
    # A claim commits and its answer never reaches the worker (the connection drops in
    # between): its rows are leased to a worker that does not know of them. Left to the
    # lease, they waited it out and were charged an attempt never made; one on its last
    # attempt went dead without a request ever leaving.
    add_endpoint(db, "t", "a", receiver.url("a"))
    worker = run_worker(lease="60")
    insert_events(db, "t", 1)
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 1}, what="a first delivery")
    # A request in flight meanwhile is the worker's own: not given back.
    receiver.sequence("slow", Answer(kind="slow", seconds=1.5))
    add_endpoint(db, "u", "slow", receiver.url("slow"))
    insert_events(db, "u", 1)
    wait_until(lambda: receiver.received("slow"), what="a request in flight")
    # What a committed claim of an event's last attempt leaves (the third, with the
    # tests' two retries)...
    with db.transaction():
        insert_events(db, "t", 1)
        lost = scalar(
            db,
            "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 3, "
            "locked_by = %s, locked_until = now() + interval '60 seconds', updated_at = now() "
            "WHERE status = 'pending' RETURNING id",
            [worker.worker_id],
        )
    # ...and the connection its answer was to come on, gone.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
        "current_database() AND pid <> pg_backend_pid() AND application_name = 'notifyhook'"
    )
    worker.wait_recorded(
        lambda: statuses(db) == {"delivered": 3}, timeout=20, what="the lost claim's row sent"
    )
    attempts = db.execute(
        "SELECT attempt, status_code, error FROM notifyhook.attempts WHERE delivery_id = %s "
        "ORDER BY id",
        [lost],
    ).fetchall()
    assert [(attempt, code) for attempt, code, _ in attempts] == [(3, None), (3, 200)], attempts
    assert attempts[0][2].startswith("claim lost:"), attempts[0][2]
    assert len(receiver.received("a")) == 2
    assert len(receiver.received("slow")) == 1
    assert scalar(
        db,
        "SELECT array_agg(a.status_code) FROM notifyhook.attempts AS a "
        "JOIN notifyhook.endpoints AS e ON e.id = a.endpoint_id WHERE e.name = 'slow'",
    ) == [200]


def test_postgres_restart_mid_stream(own_cluster, receiver, start_worker):
    url = own_cluster.url()
    with psycopg.connect(url, autocommit=True) as conn:
        add_endpoint(conn, "t", "a", receiver.url("a"))
        insert_events(conn, "t", 50)
    worker = start_worker(url, poll_interval="1")
    with psycopg.connect(url, autocommit=True) as conn:
        wait_until(lambda: statuses(conn) == {"delivered": 50})
    own_cluster.restart("fast")
    with psycopg.connect(url, autocommit=True) as conn:
        insert_events(conn, "t", 50)
        wait_until(
            lambda: statuses(conn) == {"delivered": 100},
            timeout=60,
            what="deliveries after a restart",
        )
    own_cluster.restart("immediate")
    with psycopg.connect(url, autocommit=True) as conn:
        insert_events(conn, "t", 50)
        wait_until(
            lambda: statuses(conn) == {"delivered": 150},
            timeout=60,
            what="deliveries after a crash",
        )
    assert worker.process.poll() is None, worker.log()
    assert len({a.webhook_id for a in receiver.received("a")}) == 150


def test_sigterm_while_the_database_is_down_exits_in_time_and_loses_nothing(
    own_cluster, receiver, start_worker
):
    url = own_cluster.url()
    receiver.sequence("slow", Answer(kind="slow", seconds=2))
    with psycopg.connect(url, autocommit=True) as conn:
        add_endpoint(conn, "t", "slow", receiver.url("slow"))
        insert_events(conn, "t", 5)
    first = start_worker(url, shutdown_grace="5", http_timeout="3", lease="5")
    wait_until(lambda: len(receiver.received("slow")) == 5, what="requests in flight")
    own_cluster.pg_ctl("stop", "-m", "fast", "-w")
    first.signal(signal.SIGTERM)
    # The answers come within the grace, but nothing can be recorded: the worker must
    # still exit 0 within the unit's TimeoutStopSec (45 s), saying what it left.
    assert first.wait(timeout=40) == 0, first.log()
    assert "5 outcomes unrecorded" in first.log()
    own_cluster.pg_ctl("start", "-w", "-t", "30", "-l", str(own_cluster.log))
    start_worker(url, poll_interval="1", lease="5", http_timeout="3")
    with psycopg.connect(url, autocommit=True) as conn:
        wait_until(lambda: statuses(conn) == {"delivered": 5}, timeout=40, what="redelivery")
    event_ids = {a.webhook_id for a in receiver.received("slow")}
    assert len(event_ids) == 5


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Answer(kind="hang", seconds=30), ("timeout",)),
        # An abort after the request was read reaches the client as a reset or a close.
        (Answer(kind="reset"), ("reset", "closed")),
        (Answer(kind="slow", seconds=3), ("timeout",)),
        (Answer(kind="big", status=200, size=10 * 1024 * 1024), None),
    ],
    ids=["hang", "reset", "slow", "10MB"],
)
def test_a_misbehaving_receiver_costs_nothing_but_its_attempt(
    db, receiver, start_worker, answer, error
):
    receiver.sequence("bad", answer)
    add_endpoint(db, "t", "bad", receiver.url("bad"))
    add_endpoint(db, "t", "good", receiver.url("good"))
    start_worker(http_timeout="1", retry_schedule="60")
    insert_events(db, "t", 3)
    wait_until(lambda: len(receiver.received("good")) == 3, what="the good endpoint's deliveries")
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 6, what="six attempts"
    )
    bad = db.execute(
        "SELECT a.error, a.response_excerpt FROM notifyhook.attempts AS a "
        "JOIN notifyhook.endpoints AS e ON e.id = a.endpoint_id WHERE e.name = 'bad'"
    ).fetchall()
    for recorded_error, excerpt in bad:
        if error is None:
            assert recorded_error is None
            assert len(excerpt) <= 1024
        else:
            assert any(word in recorded_error.lower() for word in error), recorded_error


def delivery_state(db, delivery: int) -> tuple[str, int]:
    row = db.execute(
        "SELECT status, attempts FROM notifyhook.deliveries WHERE id = %s", [delivery]
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def settled_by_another_worker(db, run_worker, delivery: int, lease: str) -> None:
    """Another worker of the fleet, later: wait until it has settled `delivery`."""
    run_worker(lease=lease, http_timeout="2")
    wait_until(
        lambda: delivery_state(db, delivery)[0] in ("delivered", "dead"),
        timeout=20,
        what="the delivery settled",
    )


def test_an_answer_set_aside_at_shutdown_is_recorded_not_dropped(
    db, database_url, receiver, run_worker
):
    # What the user sees: an operator's DELETE of an endpoint is held open for a moment
    # (1-2 s, far inside the lease) and rolled back, while a worker is stopped
    # (SIGTERM, a deploy). The receiver answered 200 during the grace; the worker exits
    # 0 without a word, the row stays leased, and after the lease another worker sends
    # the answered webhook again.
    # Breaks DESIGN §8 "Recording never resends" ("The recorder runs through the whole
    # shutdown grace: what answers during the grace is recorded as answered"; "a
    # recorded 200 is never followed by another request") and docs/operations.md ("set
    # aside and tried again every half second ... If the transaction outlasts the
    # delivery's lease, that delivery is taken back and sent again": this one did not).
    # Cause: Recorder.flush(final=True) records the held outcomes once; those deferred
    # again go back to _held, whose retry (call_later) never runs: the worker exits.
    receiver.sequence("a", Answer(kind="slow", seconds=1.0))
    endpoint = add_endpoint(db, "t", "a", receiver.url("a"))
    worker = run_worker(lease="4", http_timeout="2", shutdown_grace="5")
    insert_events(db, "t", 1)
    wait_until(lambda: receiver.received("a"), what="the request in flight")
    delivery = scalar(db, "SELECT id FROM notifyhook.deliveries")
    with psycopg.connect(database_url) as operator:
        operator.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [endpoint])
        # Rolled back 2 s from now, well within the 4 s lease, while the worker stops.
        rollback = threading.Timer(2.0, operator.rollback)
        rollback.start()
        worker.stop()  # SIGTERM's soft stop: the 200 comes during the grace
        rollback.join()
    state_after_stop = delivery_state(db, delivery)
    settled_by_another_worker(db, run_worker, delivery, lease="4")
    assert len(receiver.received("a")) == 1, (
        f"the 200 answered during the shutdown grace was not recorded (state after the "
        f"stop: {state_after_stop}); the webhook was sent "
        f"{len(receiver.received('a'))} times"
    )


def test_a_claim_lost_as_the_worker_stops_is_given_back_not_dead_lettered(
    db, database_url, receiver, run_worker
):
    # What the user sees: the database connection drops under a claim just as the
    # worker is stopped (a failover and a restart of the workers, or SIGTERM during the
    # outage). The claim had committed: its row, on its last attempt, is leased to the
    # stopping worker, which never sent it. The worker exits 0 without giving it back;
    # when the lease runs out the row is charged an attempt never made and goes dead
    # ("lease expired"), a dead letter and an alert for a webhook no receiver ever saw.
    # Breaks DESIGN §3 (on SIGTERM "returns what it could not finish to pending without
    # charging an attempt"); the running worker gives the same rows back uncharged
    # (release_lost_claims, test_faults.test_a_claim_whose_answer_was_lost_...).
    # Cause: worker.py _claim_loop sets _claim_unanswered and only the next claim cycle
    # acts on it; once _stop is set the loop ends and _finish_in_flight never calls
    # _release_lost_claims.
    add_endpoint(db, "t", "a", receiver.url("a"))
    worker = run_worker(lease="10", http_timeout="2")
    insert_events(db, "t", 1)
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 1}, what="a first delivery")
    with psycopg.connect(database_url) as operator:
        # Holds the worker's next claim (lock_timeout 2.5 s) so that the test decides when
        # it fails; it fails by its connection being cut, as a lost answer does.
        operator.execute("LOCK TABLE notifyhook.endpoint_turns IN ACCESS EXCLUSIVE MODE")
        claim_waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'notifyhook' AND wait_event_type = 'Lock'"
        )
        wait_until(lambda: scalar(db, claim_waiting), what="the worker's claim to wait")
        # What the claim committed before its answer was lost: the last attempt (the
        # third, with the tests' two retries) of an event, leased to this worker.
        with db.transaction():
            insert_events(db, "t", 1)
            lost = scalar(
                db,
                "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 3, "
                "locked_by = %s, locked_until = now() + interval '3 seconds', "
                "updated_at = now() WHERE status = 'pending' RETURNING id",
                [worker.worker_id],
            )
        assert worker.worker is not None
        worker.call(worker.worker.request_stop)  # SIGTERM
        db.execute(f"SELECT pg_terminate_backend(pid) FROM ({claim_waiting}) AS c")
        wait_until(lambda: not worker._thread.is_alive(), what="the worker to exit")
        operator.rollback()
    assert worker.error is None
    state_after_stop = delivery_state(db, lost)
    settled_by_another_worker(db, run_worker, lost, lease="10")
    errors = [
        e
        for (e,) in db.execute(
            "SELECT error FROM notifyhook.attempts WHERE delivery_id = %s ORDER BY id", [lost]
        )
    ]
    assert delivery_state(db, lost)[0] == "delivered", (
        f"a row of a lost claim, never sent, left leased by the stopping worker (state "
        f"after the stop: {state_after_stop}) went dead with {len(receiver.received('a')) - 1} "
        f"requests sent; its attempts: {errors}"
    )


def test_a_worker_whose_id_another_live_session_holds_claims_nothing_until_it_ends(
    db, database_url, receiver, run_worker, caplog
):
    # Two live workers under one NOTIFYHOOK_WORKER_ID (a cloned host, an env file shared
    # by mistake) each took the other's rows for their own: the one whose claim failed
    # gave back, as a lost claim, the row its twin was still sending, and it went twice
    # (review, session 9). The id's advisory lock, held here as a live twin's claim
    # connection holds it, now decides who claims.
    caplog.set_level(logging.WARNING, logger="notifyhook")
    add_endpoint(db, "t", "a", receiver.url("a"))
    with psycopg.connect(database_url, autocommit=True) as twin:
        twin.execute("SELECT pg_advisory_lock(hashtextextended('notifyhook worker twin', 0))")
        worker = run_worker(worker_id="twin")
        insert_events(db, "t", 1)
        wait_until(
            lambda: "another live session claims as worker twin" in caplog.text, what="the warning"
        )
        time.sleep(1.5)  # several claim cycles
        assert receiver.received("a") == []
        assert statuses(db) == {"pending": 1}
    # The twin's session ends: the worker takes the id and delivers.
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 1}, what="the delivery")
    assert len(receiver.received("a")) == 1


def test_a_failed_claims_log_line_quotes_no_row_the_server_detailed(
    db, receiver, run_worker, caplog
):
    # A statement the server fails (here an operator's trigger on the queue) is logged
    # with its reason. Its DETAIL is left out: for a constraint it quotes the failing
    # row, and a row can hold an endpoint's URL with its token.
    caplog.set_level(logging.WARNING, logger="notifyhook")
    url = receiver.url("a") + "?token=s3cr3t-in-the-url"
    add_endpoint(db, "t", "a", url)
    db.execute(
        """
        CREATE FUNCTION public.no_claims() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'claims are paused' USING ERRCODE = '55006', DETAIL =
                'row (' || (SELECT url FROM notifyhook.endpoints WHERE id = NEW.endpoint_id) || ')';
        END $$;
        CREATE TRIGGER no_claims BEFORE UPDATE ON notifyhook.deliveries_active
            FOR EACH ROW WHEN (NEW.status = 'processing') EXECUTE FUNCTION public.no_claims();
        """
    )
    run_worker()
    insert_events(db, "t", 1)
    wait_until(lambda: "claim failed" in caplog.text, what="the claim's failure logged")
    assert "claims are paused" in caplog.text
    assert "s3cr3t" not in caplog.text
