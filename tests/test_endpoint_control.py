"""Per-endpoint control end to end: fair shares, max_in_flight, rate_limit, the circuit,
automatic disabling, secret rotation and secrets at rest, with real workers and receivers."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import psycopg
import pytest
import standardwebhooks
from conftest import add_endpoint, run_cli, scalar, wait_until
from cryptography.fernet import Fernet
from test_worker import insert_events, statuses

from notifyhook.tools.receiver import Answer, Arrival


def printed_secret(output: str) -> str:
    found = re.search(r"^secret: (whsec_\S+)$", output, re.MULTILINE)
    assert found, output
    return found.group(1)


def most_within(times: Sequence[float], window_s: float) -> int:
    """The most of `times` (sorted) within any `window_s` seconds."""
    most, first = 0, 0
    for last, moment in enumerate(times):
        while moment - times[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_at_once(arrivals: Sequence[Arrival], window_s: float) -> int:
    """The most arrivals within any `window_s` seconds.

    When every request is held at least `window_s` by the receiver, this is exactly the
    most requests in flight at one instant: those that arrived within `window_s` before
    an instant are all still open at it.
    """
    return most_within(sorted(a.received_at for a in arrivals), window_s)


def utc_text(moment: datetime) -> str:
    """A time as record_outcomes writes it in disabled_reason."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pending(db, endpoint: int) -> int:
    return int(
        scalar(
            db,
            "SELECT count(*) FROM notifyhook.deliveries WHERE endpoint_id = %s AND status = 'pending'",
            [endpoint],
        )
    )


def insert_for(db, tenant: str, endpoint: int, count: int) -> None:
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "SELECT %s, 'call.completed', jsonb_build_object('n', n), %s FROM generate_series(1, %s) AS n",
        [tenant, endpoint, count],
    )


# -- fairness ------------------------------------------------------------------------
# Worker processes: what these count is requests at once in a window of time, which a
# worker sharing the test's process (and its GIL) with the receiver would blur.


def slow_backlog_passed_by(db, receiver, start_worker, slow_tenants, fast_tenant):
    """Slow endpoints (1.5 s answers) of `slow_tenants` with a backlog, then 30 events for
    a fast endpoint of `fast_tenant`; returns the slow arrivals."""
    slow = []
    for n, tenant in enumerate(slow_tenants):
        receiver.sequence(f"slow{n}", Answer(kind="slow", seconds=1.5))
        slow.append(add_endpoint(db, tenant, f"slow{n}", receiver.url(f"slow{n}")))
    fast = add_endpoint(db, fast_tenant, "fast", receiver.url("fast"))
    start_worker(concurrency="20")
    for tenant, endpoint in zip(slow_tenants, slow, strict=True):
        insert_for(db, tenant, endpoint, 200 // len(slow))
    wait_until(lambda: len(receiver.received()) >= 18, what="the slow backlog under way")
    insert_for(db, fast_tenant, fast, 30)
    wait_until(lambda: len(receiver.received("fast")) == 30, what="the fast endpoint's events")
    # Passed the backlog rather than waited for it: most of it is still queued.
    assert sum(pending(db, endpoint) for endpoint in slow) > 100
    return [a for a in receiver.received() if a.path.startswith("slow")]


def test_a_lone_slow_endpoint_uses_all_but_the_reserve_and_others_pass_it(
    db, receiver, start_worker
):
    slow = slow_backlog_passed_by(db, receiver, start_worker, ["t"], "t2")
    # Alone, it may use every slot but the reserve (a tenth, kept for fresh endpoints):
    # 18 of 20 at once, not the half of earlier releases.
    assert most_at_once(slow, 1.45) == 18


def test_a_lone_tenant_uses_all_but_the_reserve_across_its_endpoints(db, receiver, start_worker):
    slow = slow_backlog_passed_by(db, receiver, start_worker, ["big"] * 4, "small")
    assert most_at_once(slow, 1.45) == 18


def test_a_slow_endpoint_does_not_hold_up_its_sibling_of_the_same_tenant(
    db, receiver, start_worker
):
    slow = slow_backlog_passed_by(db, receiver, start_worker, ["t"], "t")
    assert most_at_once(slow, 1.45) == 18


# -- max_in_flight and rate_limit ------------------------------------------------------


@pytest.mark.slow
def test_max_in_flight_holds_across_two_workers(db, receiver, run_worker):
    receiver.sequence("narrow", Answer(kind="slow", seconds=0.3))
    endpoint = add_endpoint(db, "t", "narrow", receiver.url("narrow"), max_in_flight=3)
    run_worker(concurrency="20")
    run_worker(concurrency="20")
    # Rounds of twice the limit, each insert waking both workers at the same instant
    # with nothing in flight: the moment when two claims race for the same room.
    for round_ in range(1, 6):
        insert_for(db, "t", endpoint, 6)
        done = {"delivered": 6 * round_}
        wait_until(lambda done=done: statuses(db) == done, what="the round")
    arrivals = receiver.received("narrow")
    assert len({a.webhook_id for a in arrivals}) == 30
    assert most_at_once(arrivals, 0.28) <= 3
    # Which worker wins each race is up to the lock: one may take every round,
    # which is as correct as sharing them, so the split is not asserted.


@pytest.mark.slow
def test_rate_limit_holds_across_two_workers(db, receiver, run_worker):
    endpoint = add_endpoint(db, "t", "metered", receiver.url("metered"), rate_limit=20)
    run_worker(concurrency="20")
    run_worker(concurrency="20")
    insert_for(db, "t", endpoint, 100)
    wait_until(lambda: statuses(db) == {"delivered": 100}, what="every delivery")
    assert len(receiver.received("metered")) == 100
    # When each request set out (the attempts' started_at), not when the receiver read
    # it: arrivals also carry the receiver's and the network's delays, which on a loaded
    # machine once bunched the burst with the next second's requests.
    started = [
        row[0]
        for row in db.execute(
            "SELECT extract(epoch FROM started_at)::float8 FROM notifyhook.attempts "
            "WHERE endpoint_id = %s ORDER BY started_at",
            [endpoint],
        )
    ]
    assert len(started) == 100
    # 20 at once (the burst), then 80 at 20 per second: the last is claimed at least 4 s
    # after the first, however many workers. A request sets out a little after its claim
    # (a worker's first opens the connection): hence a little slack, and a window a little
    # under a second, for which the bucket allows 20 + 18 = 38 claims (2 to spare).
    assert started[-1] - started[0] >= 3.8
    assert most_within(started, 0.9) <= 40


# -- automatic disabling ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["sql", "cli"])
def test_an_endpoint_failing_too_long_is_disabled_then_resumed(
    db, database_url, receiver, run_worker, how
):
    health = {"answer": Answer(status=503)}
    receiver.script("down", lambda n: health["answer"])
    down = add_endpoint(db, "t", "down", receiver.url("down"))
    add_endpoint(db, "t", "up", receiver.url("up"))
    worker = run_worker(disable_after="2", retry_schedule=",".join(["0.2"] * 40))
    insert_for(db, "t", down, 5)
    reason = worker.wait_recorded(
        lambda: scalar(
            db,
            "SELECT disabled_reason FROM notifyhook.endpoints WHERE id = %s AND NOT enabled",
            [down],
        ),
        what="automatic disabling",
    )
    assert reason.startswith("every attempt failed since ")
    failing_for = scalar(
        db,
        "SELECT e.updated_at - s.failing_since FROM notifyhook.endpoints AS e "
        "JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id WHERE e.id = %s",
        [down],
    )
    assert failing_for.total_seconds() >= 2
    # Its deliveries wait, untouched: once the request in flight when it was disabled is
    # recorded, the worker serves new events of another endpoint, and not its.
    worker.wait_recorded(
        lambda: (
            not scalar(
                db,
                "SELECT count(*) FROM notifyhook.deliveries WHERE endpoint_id = %s AND status = 'processing'",
                [down],
            )
        ),
        what="the last request in flight to finish",
    )
    sent = len(receiver.received("down"))
    insert_events(db, "t", 3)  # to both endpoints
    worker.wait_recorded(
        lambda: len(receiver.received("up")) == 3, what="the healthy endpoint served"
    )
    assert len(receiver.received("down")) == sent
    assert pending(db, down) == 8
    assert (
        scalar(
            db,
            "SELECT consecutive_failures FROM notifyhook.endpoint_state WHERE endpoint_id = %s",
            [down],
        )
        >= 5
    )
    # Enabling wakes every worker (NOTIFY), resets the failing clock and the circuit.
    health["answer"] = Answer(status=200)
    with psycopg.connect(database_url, autocommit=True) as listening:
        listening.execute("LISTEN notifyhook")
        if how == "sql":
            db.execute("UPDATE notifyhook.endpoints SET enabled = true WHERE id = %s", [down])
        else:
            run_cli(database_url, "endpoint", "enable", str(down), check=True)
        assert next(listening.notifies(timeout=10, stop_after=1)).channel == "notifyhook"
    worker.wait_recorded(
        lambda: statuses(db) == {"delivered": 11}, what="the waiting deliveries sent"
    )
    state = db.execute(
        "SELECT e.enabled, e.disabled_reason, s.consecutive_failures, s.failing_since "
        "FROM notifyhook.endpoints AS e JOIN notifyhook.endpoint_state AS s ON s.endpoint_id = e.id "
        "WHERE e.id = %s",
        [down],
    ).fetchone()
    assert state == (True, None, 0, None)
    assert {a.webhook_id for a in receiver.received("down")} == {
        str(r[0]) for r in db.execute("SELECT id FROM notifyhook.events")
    }


@pytest.mark.slow
def test_a_success_resets_the_failing_clock(db, receiver, run_worker):
    # 503 until the test lets exactly one request through, then 503 again.
    let_through = {"one": False}

    def answer(_: int) -> Answer:
        if let_through["one"]:
            let_through["one"] = False
            return Answer(status=200)
        return Answer(status=503)

    receiver.script("flaky", answer)
    endpoint = add_endpoint(db, "t", "flaky", receiver.url("flaky"))
    worker = run_worker(disable_after="3", retry_schedule=",".join(["0.2"] * 80))
    insert_for(db, "t", endpoint, 20)
    state = "SELECT {} FROM notifyhook.endpoint_state WHERE endpoint_id = %s"
    first_since = worker.wait_recorded(
        lambda: scalar(db, state.format("failing_since"), [endpoint]), what="failures"
    )
    worker.wait_recorded(
        lambda: scalar(
            db, state.format("last_failure_at > failing_since + interval '1 s'"), [endpoint]
        ),
        what="a second of failures",
    )
    let_through["one"] = True
    second_since = worker.wait_recorded(
        lambda: scalar(
            db,
            state.format("CASE WHEN failing_since > last_success_at THEN failing_since END"),
            [endpoint],
        ),
        what="a success, then failures again",
    )
    reason = worker.wait_recorded(
        lambda: scalar(
            db,
            "SELECT disabled_reason FROM notifyhook.endpoints WHERE id = %s AND NOT enabled",
            [endpoint],
        ),
        what="disabling after the second run of failures",
    )
    # Disabled for failing since the second run began, not the first: a clock that the
    # success did not reset would have disabled it during the second run, citing the first.
    assert f"since {utc_text(second_since)}" in reason
    assert utc_text(first_since) not in reason
    assert not statuses(db).get("dead")


def test_a_failure_that_began_before_a_recorded_success_does_not_count(db, receiver, run_worker):
    receiver.sequence("mixed", Answer(kind="slow", status=503, seconds=1.0), Answer(status=200))
    endpoint = add_endpoint(db, "t", "mixed", receiver.url("mixed"))
    worker = run_worker(retry_schedule="60")
    insert_for(db, "t", endpoint, 1)
    worker.wait_recorded(lambda: receiver.received("mixed"), what="the slow failing request")
    # Sent after the slow one began, answered at once: its success is recorded first.
    insert_for(db, "t", endpoint, 1)
    worker.wait_recorded(
        lambda: scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 2, what="both attempts"
    )
    failed_first, succeeded_last = db.execute(
        "SELECT status_code FROM notifyhook.attempts ORDER BY started_at"
    ).fetchall()
    assert (failed_first, succeeded_last) == ((503,), (200,))
    state = db.execute(
        "SELECT consecutive_failures, failing_since, last_failure_at IS NOT NULL "
        "FROM notifyhook.endpoint_state WHERE endpoint_id = %s",
        [endpoint],
    ).fetchone()
    assert state == (0, None, True)


# -- the circuit -----------------------------------------------------------------------


@pytest.mark.slow
def test_an_open_circuit_sends_one_request_at_a_time_then_closes(db, receiver, run_worker):
    health = {"answer": Answer(kind="slow", status=503, seconds=0.5)}
    receiver.script("shaky", lambda n: health["answer"])
    endpoint = add_endpoint(db, "t", "shaky", receiver.url("shaky"))
    # Two workers: one probe at a time for the fleet, not per worker.
    for _ in range(2):
        worker = run_worker(concurrency="20", retry_schedule=",".join(["0.5"] * 30))
    insert_for(db, "t", endpoint, 5)
    # Open: five failures recorded, and nothing claimed before they were.
    worker.wait_recorded(
        lambda: scalar(
            db,
            "SELECT s.consecutive_failures >= 5 AND NOT EXISTS ("
            "    SELECT FROM notifyhook.deliveries AS d"
            "    WHERE d.endpoint_id = s.endpoint_id AND d.status = 'processing')"
            " FROM notifyhook.endpoint_state AS s WHERE s.endpoint_id = %s",
            [endpoint],
        ),
        what="the circuit to open",
    )
    opened_at = len(receiver.received("shaky"))
    insert_for(db, "t", endpoint, 40)
    worker.wait_recorded(lambda: len(receiver.received("shaky")) >= opened_at + 6, what="probes")
    health["answer"] = Answer(kind="slow", seconds=0.5)
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 45}, what="every delivery")
    arrivals = receiver.received("shaky")
    probes = [a for a in arrivals[opened_at:] if a.answered == 503]
    recovered = [a for a in arrivals if a.answered == 200]
    assert len(probes) >= 6
    assert most_at_once(probes, 0.45) == 1
    # Closed again: the backlog went out many at a time.
    assert most_at_once(recovered, 0.45) > 1


# -- secrets -------------------------------------------------------------------------


def test_rotate_secret_signs_with_both_during_the_grace_then_the_new_one(
    db, database_url, receiver, run_worker
):
    endpoint = add_endpoint(db, "t", "rotating", receiver.url("rotating"))
    old = scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [endpoint])
    worker = run_worker()
    rotated = run_cli(
        database_url, "endpoint", "rotate-secret", str(endpoint), "--grace", "3s", check=True
    )
    new = printed_secret(rotated.stdout)
    assert new != old
    insert_events(db, "t", 1)
    during = worker.wait_recorded(lambda: receiver.received("rotating"), what="a webhook")[0]
    in_grace = worker.wait_recorded(
        lambda: db.execute(
            "SELECT a.started_at < e.previous_secret_expires_at FROM notifyhook.attempts AS a "
            "JOIN notifyhook.endpoints AS e ON e.id = a.endpoint_id WHERE e.id = %s",
            [endpoint],
        ).fetchone(),
        what="the attempt recorded",
    )
    assert in_grace == (True,), "sent after the grace: the machine is too slow for this test"
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(during.body, during.headers)
    worker.wait_recorded(
        lambda: scalar(
            db,
            "SELECT previous_secret_expires_at < now() FROM notifyhook.endpoints WHERE id = %s",
            [endpoint],
        ),
        what="the grace to end",
    )
    insert_events(db, "t", 1)
    after = worker.wait_recorded(
        lambda: receiver.received("rotating")[1:], what="a second webhook"
    )[0]
    standardwebhooks.Webhook(new).verify(after.body, after.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old).verify(after.body, after.headers)


def add_sealed_endpoint(database_url, receiver, key: str):
    """`endpoint add` through the console script with NOTIFYHOOK_SECRET_KEY set."""
    return run_cli(
        database_url,
        "endpoint",
        "add",
        "--tenant",
        "t",
        "--name",
        "sealed",
        "--url",
        receiver.url("sealed"),
        check=True,
        secret_key=key,
    )


def test_secrets_at_rest_are_encrypted_and_signed_with_in_clear(
    db, database_url, receiver, run_worker
):
    key = Fernet.generate_key().decode()
    added = add_sealed_endpoint(database_url, receiver, key)
    secret = printed_secret(added.stdout)
    stored = scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE name = 'sealed'")
    assert stored.startswith("enc:")
    assert secret not in stored
    assert secret.removeprefix("whsec_") not in stored
    plain = add_endpoint(db, "t", "plain", receiver.url("plain"))
    plain_secret = scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [plain])
    receiver.trust("sealed", secret)
    receiver.trust("plain", plain_secret)
    worker = run_worker(secret_key=key)
    insert_events(db, "t", 2)
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 4}, what="both endpoints served")
    arrivals = receiver.received()
    assert [a.verified for a in arrivals] == [True] * 4
    for arrival in receiver.received("sealed"):
        standardwebhooks.Webhook(secret).verify(arrival.body, arrival.headers)


def test_a_worker_without_the_key_records_why_and_retries(db, database_url, receiver, run_worker):
    key = Fernet.generate_key().decode()
    added = add_sealed_endpoint(database_url, receiver, key)
    receiver.trust("sealed", printed_secret(added.stdout))
    schedule = ",".join(["0.3"] * 30)
    keyless = run_worker(retry_schedule=schedule)
    insert_events(db, "t", 1)
    keyless.wait_recorded(
        lambda: scalar(db, "SELECT count(*) FROM notifyhook.attempts") >= 2,
        what="failed attempts, retried",
    )
    keyless.stop()
    errors = {r[0] for r in db.execute("SELECT error FROM notifyhook.attempts")}
    assert errors == {"an endpoint secret is encrypted (enc:) but NOTIFYHOOK_SECRET_KEY is not set"}
    assert statuses(db) == {"pending": 1}
    assert receiver.received() == []
    keyed = run_worker(retry_schedule=schedule, secret_key=key)
    keyed.wait_recorded(
        lambda: statuses(db) == {"delivered": 1}, what="delivery by a worker with the key"
    )
    assert [a.verified for a in receiver.received()] == [True]


# -- FIFO endpoints ----------------------------------------------------------------------


@pytest.mark.slow
def test_an_ordered_endpoint_gets_its_events_in_order_one_at_a_time(db, receiver, run_worker):
    # The 8th request fails once; every answer takes 50 ms, so overlapping requests would
    # show as arrivals closer together than that.
    receiver.script(
        "fifo", lambda n: Answer(kind="slow", seconds=0.05, status=500 if n == 7 else 200)
    )
    add_endpoint(db, "t", "fifo", receiver.url("fifo"), ordered=True)
    for _ in range(3):
        worker = run_worker(concurrency="10")
    # One transaction, one INSERT of many rows and then one more: every event has the
    # same created_at, and the ids give the order (schema version 9; before it they
    # were random, and so was the order of one transaction's events).
    with db.transaction():
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "SELECT 't', 'call.completed', jsonb_build_object('n', n) "
            "FROM generate_series(0, 28) AS n ORDER BY n"
        )
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "VALUES ('t', 'call.completed', '{\"n\": 29}')"
        )
    worker.wait_recorded(
        lambda: statuses(db) == {"delivered": 30}, timeout=60, what="all 30 delivered"
    )
    arrivals = receiver.received("fifo")
    assert [json.loads(a.body)["n"] for a in arrivals] == [*range(8), 7, *range(8, 30)]
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.05


def test_an_ordered_endpoint_keeps_created_at_order_with_a_producer_dated_ahead(
    db, receiver, run_worker
):
    # Deliveries are due by the database's clock since 2026-12-04 (a producer an hour
    # fast no longer holds its webhook back an hour); FIFO order still follows
    # events.created_at, the producer's (DESIGN §8). Review s12-rev3.
    add_endpoint(db, "t", "fifo", receiver.url("fifo"), ordered=True)
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, created_at) "
        "VALUES ('t', 'x', '{\"n\": \"ahead\"}', now() + interval '1 hour')"
    )
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "VALUES ('t', 'x', '{\"n\": \"on time\"}')"
    )
    run_worker()
    wait_until(lambda: statuses(db) == {"delivered": 2}, what="both delivered", timeout=15)
    assert [json.loads(hit.body)["n"] for hit in receiver.received("fifo")] == ["on time", "ahead"]
