"""The recorder in-process, against the test's real database: batches, refused outcomes, clocks.

Deliveries are arranged as a claim leaves them (processing, attempt charged, leased to
the worker), then outcomes are handed to a Recorder built on a real Store.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
from conftest import add_endpoint, run_cli, scalar, wait_until

from notifyhook.dashboard import charts
from notifyhook.dashboard.charts import Chart
from notifyhook.dashboard.data import EndpointHealth, open_reader
from notifyhook.delivery import AttemptResult, Outcome, Verdict
from notifyhook.metrics import Metrics
from notifyhook.recorder import Recorder
from notifyhook.settings import Settings
from notifyhook.store import Store

WORKER = "w"


def leased(db, endpoint: int, count: int) -> list[int]:
    """`count` deliveries to `endpoint`, as a claim by WORKER leaves them."""
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "SELECT 't', 'x', jsonb_build_object('n', n), %s FROM generate_series(1, %s) AS n",
        [endpoint, count],
    )
    return [
        row[0]
        for row in db.execute(
            "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 1, "
            "locked_by = %s, locked_until = now() + interval '1 minute' "
            "WHERE endpoint_id = %s AND status = 'pending' RETURNING id",
            [WORKER, endpoint],
        ).fetchall()
    ]


def outcome(
    delivery: int,
    endpoint: int,
    status: str = "delivered",
    *,
    code: int | None = 200,
    excerpt: str = "ok",
    retry_in_s: float | None = None,
    duration_ms: float = 12.0,
    began_s_ago: float | None = None,
) -> Outcome:
    """`began_s_ago`: when the attempt began by the worker's monotonic clock, in seconds
    before now (by default now). A worker's wall clock is not part of an outcome at all:
    whatever it reads, the history and the health are on the database's clock."""
    verdict = Verdict.DELIVERED if status == "delivered" else Verdict.RETRY
    began = {} if began_s_ago is None else {"started_monotonic": time.monotonic() - began_s_ago}
    result = AttemptResult(
        verdict,
        duration_ms,
        status_code=code,
        error=None if verdict is Verdict.DELIVERED else f"HTTP {code}",
        response_excerpt=excerpt,
        **began,
    )
    return Outcome(delivery, endpoint, 1, status, retry_in_s, result)  # type: ignore[arg-type]


def record(database_url: str, outcomes: list[Outcome], **settings: str) -> list[str]:
    """Record `outcomes` through a Recorder; returns the database troubles it met."""
    troubles: list[str] = []

    async def trouble(what: str, error: BaseException, wait: float) -> None:
        troubles.append(f"{what}: {str(error).splitlines()[0]}")
        if len(troubles) > 3:
            raise AssertionError(f"the recorder keeps retrying: {troubles}")
        await asyncio.sleep(wait)

    async def run() -> None:
        config = Settings(database_url=database_url, worker_id=WORKER, **settings)  # type: ignore[arg-type]
        async with Store.open(database_url) as store:
            recorder = Recorder(config, store, Metrics(), trouble=trouble, recovered=lambda: None)
            for item in outcomes:
                recorder.add(item)
            async with asyncio.timeout(30):
                await recorder.flush()
            assert len(recorder) == 0

    asyncio.run(run())
    return troubles


def states(db) -> dict[int, tuple[str, str | None]]:
    return {
        row[0]: (row[1], row[2])
        for row in db.execute("SELECT id, status, locked_by FROM notifyhook.deliveries")
    }


def test_a_batch_is_recorded_in_one_go(db, database_url):
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    ids = leased(db, endpoint, 5)
    assert record(database_url, [outcome(d, endpoint) for d in ids]) == []
    assert set(states(db).values()) == {("delivered", None)}
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts WHERE error IS NULL") == 5


def test_an_outcome_the_database_refuses_is_isolated_and_the_rest_recorded(db, database_url):
    # A value the database refuses for one outcome of the batch: a constraint of the
    # operator's, here; a timestamp or interval out of range did the same.
    db.execute(
        "ALTER TABLE notifyhook.attempts ADD CONSTRAINT no_poison "
        "CHECK (response_excerpt IS DISTINCT FROM 'poison')"
    )
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    ids = leased(db, endpoint, 9)
    poisoned, huge_delay = ids[4], ids[7]
    outcomes = [
        # The poisoned attempt began 30 s ago: its row says so, on the database's clock,
        # as every other attempt's does (it said when the refusal was recorded).
        outcome(d, endpoint, excerpt="poison", began_s_ago=30)
        if d == poisoned
        else outcome(d, endpoint, excerpt="ok")
        if d != huge_delay
        # now() + make_interval(secs => 1e300) is out of range.
        else outcome(d, endpoint, "pending", code=503, retry_in_s=1e300)
        for d in ids
    ]
    assert record(database_url, outcomes) == []
    found = states(db)
    assert found[poisoned] == ("delivered", None)  # it was answered: never sent again
    assert found[huge_delay] == ("pending", None)
    assert all(found[d] == ("delivered", None) for d in ids if d not in (poisoned, huge_delay))
    rows = db.execute(
        "SELECT delivery_id, count(*), max(error) FROM notifyhook.attempts GROUP BY delivery_id"
    ).fetchall()
    assert {row[0] for row in rows} == set(ids)
    assert all(count == 1 for _, count, _ in rows)
    errors = {delivery: error for delivery, _, error in rows if error}
    assert set(errors) == {poisoned, huge_delay}
    assert "no_poison" in errors[poisoned]
    assert errors[poisoned].startswith("the database refused to record this attempt's outcome")
    assert "out of range" in errors[huge_delay]
    began_s_ago = scalar(
        db,
        "SELECT extract(epoch FROM now() - started_at) FROM notifyhook.attempts "
        "WHERE delivery_id = %s",
        [poisoned],
    )
    assert 29 < began_s_ago < 45, began_s_ago
    due_in = scalar(
        db,
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM notifyhook.deliveries "
        "WHERE id = %s",
        [huge_delay],
    )
    assert 0 < due_in <= 60
    # ... and the claims are told when (the scheduler's wake).
    assert scalar(
        db,
        "SELECT bool_or(due_at = (SELECT next_attempt_at FROM notifyhook.deliveries WHERE id = %s)) "
        "FROM notifyhook.endpoint_wakes WHERE endpoint_id = %s",
        [huge_delay, endpoint],
    )


def test_an_outcome_refused_even_bare_is_dropped_without_holding_up_the_others(
    db, database_url, caplog
):
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    ids = leased(db, endpoint, 4)
    doomed = ids[1]
    db.execute(
        f"""CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN
            IF NEW.delivery_id = {doomed} THEN RAISE EXCEPTION 'no attempts for this one'; END IF;
            RETURN NEW;
        END $$"""
    )
    db.execute(
        "CREATE TRIGGER refuse_one BEFORE INSERT ON notifyhook.attempts "
        "FOR EACH ROW EXECUTE FUNCTION public.refuse_one()"
    )
    assert record(database_url, [outcome(d, endpoint) for d in ids]) == []
    found = states(db)
    assert found[doomed] == ("processing", WORKER)  # its lease will bring it back
    assert all(found[d] == ("delivered", None) for d in ids if d != doomed)
    assert "dropped" in caplog.text


def test_outcomes_of_a_deleted_endpoint_are_skipped(db, database_url):
    gone = add_endpoint(db, "t", "gone", "http://127.0.0.1:9/gone")
    kept = add_endpoint(db, "t", "kept", "http://127.0.0.1:9/kept")
    gone_ids, kept_ids = leased(db, gone, 2), leased(db, kept, 2)
    db.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [gone])
    outcomes = [outcome(d, gone) for d in gone_ids] + [outcome(d, kept) for d in kept_ids]
    assert record(database_url, outcomes) == []
    assert states(db) == {d: ("delivered", None) for d in kept_ids}
    # The audit log keeps what was sent, as it keeps the deleted endpoint's earlier attempts.
    logged = db.execute("SELECT delivery_id FROM notifyhook.attempts ORDER BY 1").fetchall()
    assert [row[0] for row in logged] == sorted(gone_ids + kept_ids)


def test_a_refused_outcome_of_a_deleted_endpoint_still_has_its_attempt(db, database_url):
    # The same, when the deleted delivery's outcome is also refused for one of its values:
    # the isolated record found no delivery and wrote nothing, so a request that was
    # made had no row in the audit log (review, session 8).
    db.execute(
        "ALTER TABLE notifyhook.attempts ADD CONSTRAINT no_poison "
        "CHECK (response_excerpt IS DISTINCT FROM 'poison')"
    )
    gone = add_endpoint(db, "t", "gone", "http://127.0.0.1:9/gone")
    kept = add_endpoint(db, "t", "kept", "http://127.0.0.1:9/kept")
    (gone_id,) = leased(db, gone, 1)
    (kept_id,) = leased(db, kept, 1)
    db.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [gone])
    outcomes = [outcome(gone_id, gone, excerpt="poison"), outcome(kept_id, kept)]
    assert record(database_url, outcomes) == []
    logged = db.execute(
        "SELECT delivery_id, endpoint_id FROM notifyhook.attempts ORDER BY 1"
    ).fetchall()
    assert logged == sorted([(gone_id, gone), (kept_id, kept)])


def test_endpoint_health_reads_the_database_clock_not_the_workers(db, database_url):
    # A success, then failures: the failures count from the success on the database's
    # clock. (Outcomes carry no wall-clock time of the worker's since 2026-12-04: a
    # worker an hour fast once recorded a success "in the future" that hid them.)
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    ids = leased(db, endpoint, 4)
    record(database_url, [outcome(ids[0], endpoint)])
    for delivery in ids[1:]:
        record(database_url, [outcome(delivery, endpoint, "pending", code=503, retry_in_s=30)])
    failures, failing_since, last_success = db.execute(
        "SELECT consecutive_failures, failing_since, last_success_at "
        "FROM notifyhook.endpoint_state WHERE endpoint_id = %s",
        [endpoint],
    ).fetchone()
    assert failures == 3
    now = scalar(db, "SELECT now()")
    assert abs((failing_since - now).total_seconds()) < 600
    assert abs((last_success - now).total_seconds()) < 600


def _as_the_dashboard_shows(database_url: str, endpoint: int) -> tuple[EndpointHealth, Chart]:
    async def read() -> tuple[EndpointHealth, Chart]:
        async with open_reader(database_url) as reader:
            [health] = await reader.endpoints(endpoint_id=endpoint)
            return health, charts.per_minute(await reader.minute_counts(endpoint))

    return asyncio.run(read())


def test_the_dashboards_last_error_is_the_latest_failure_even_from_a_worker_a_second_fast(
    db, database_url
):
    # Two failures, the second from a worker whose clock runs a second fast (NTP-level
    # drift on a busy host). The last error is the one with started_at <= last_failure_at:
    # with started_at on the worker's clock and health on the database's, the later
    # failure's row began "after" it and the dashboard showed the older error (review
    # h2). Outcomes now carry no wall-clock time of the worker's at all.
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    first, second = leased(db, endpoint, 2)
    record(database_url, [outcome(first, endpoint, "pending", code=503, retry_in_s=30)])
    record(database_url, [outcome(second, endpoint, "pending", code=500, retry_in_s=30)])
    health, _ = _as_the_dashboard_shows(database_url, endpoint)
    assert health.consecutive_failures == 2
    assert health.last_error == "HTTP 500", (health.last_error, health.last_failure_at)
    assert health.last_error_at == health.last_failure_at


def test_the_dashboards_chart_counts_the_attempts_of_a_worker_two_minutes_fast(db, database_url):
    # Attempts per minute over the last hour: an attempt made just now by a worker two
    # minutes fast is an attempt of this minute, not of a minute yet to come (review h2).
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    (delivery,) = leased(db, endpoint, 1)
    record(database_url, [outcome(delivery, endpoint)])
    health, chart = _as_the_dashboard_shows(database_url, endpoint)
    assert health.delivered_1h == 1
    assert chart.total == 1, chart


def test_endpoint_stats_count_the_attempts_of_a_worker_two_hours_slow(db, database_url):
    # A worker two hours behind (a VM resumed from suspend, before NTP steps its clock)
    # delivers just now: `notifyhook stats` (the endpoint_stats view) counts it in the
    # last hour and the last day (review h2).
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    (delivery,) = leased(db, endpoint, 1)
    record(database_url, [outcome(delivery, endpoint)])
    [stats] = json.loads(run_cli(database_url, "stats", "--json", check=True).stdout)["endpoints"]
    assert stats["last_success_at"] is not None
    assert (stats["delivered_1h"], stats["delivered_24h"]) == (1, 1), stats


def test_started_at_is_the_databases_time_the_attempt_began_and_the_healths(db, database_url):
    # A success that began 5 s before the record and a failure that began 2 s before
    # it, by the worker's monotonic clock. Their rows say so on the database's clock,
    # and the endpoint's health holds the very same times.
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    succeeded, failed = leased(db, endpoint, 2)
    before = scalar(db, "SELECT clock_timestamp()")
    outcomes = [
        outcome(succeeded, endpoint, began_s_ago=5),
        outcome(failed, endpoint, "pending", code=503, retry_in_s=30, began_s_ago=2),
    ]
    record(database_url, outcomes)
    after = scalar(db, "SELECT clock_timestamp()")
    started = dict(db.execute("SELECT delivery_id, started_at FROM notifyhook.attempts").fetchall())
    # The record measures the age as it sends, the database reads its clock as the call
    # arrives: between the two, a millisecond at most on one host.
    slack = timedelta(milliseconds=1)
    for delivery, seconds_ago in ((succeeded, 5), (failed, 2)):
        ago = timedelta(seconds=seconds_ago)
        assert before - ago - slack <= started[delivery] <= after - ago + slack
    health = db.execute(
        "SELECT last_success_at, last_failure_at, failing_since, consecutive_failures "
        "FROM notifyhook.endpoint_state WHERE endpoint_id = %s",
        [endpoint],
    ).fetchone()
    assert health == (started[succeeded], started[failed], started[failed], 1)


def test_a_caller_that_does_not_say_how_long_ago_keeps_the_workers_started_at(db):
    # A worker of the version before, still running while `migrate` installs this
    # record_outcomes: its started_at goes in as it sends it, and the health reads the
    # database's clock, now less the duration, as it did.
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    (delivery,) = leased(db, endpoint, 1)
    fast = datetime.now(UTC) + timedelta(hours=1)
    db.execute(
        "SELECT * FROM notifyhook.record_outcomes(%(w)s, ARRAY[%(d)s]::bigint[], "
        "ARRAY[%(e)s]::bigint[], '{1}', '{pending}', '{30}', ARRAY[%(at)s]::timestamptz[], "
        "'{1000}', '{503}', '{HTTP 503}', '{NULL}', '{false}', interval '5 days', false, "
        "ARRAY[gen_random_uuid()], '{true}')",
        {"w": WORKER, "d": delivery, "e": endpoint, "at": fast},
    )
    assert scalar(db, "SELECT started_at FROM notifyhook.attempts") == fast
    failed_at = scalar(
        db,
        "SELECT extract(epoch FROM now() - last_failure_at) FROM notifyhook.endpoint_state "
        "WHERE endpoint_id = %s",
        [endpoint],
    )
    assert 0.9 < failed_at < 60


def test_a_record_sent_again_while_the_first_still_runs_writes_nothing_twice(db, database_url):
    # The first call's answer was lost with its connection, but the call itself still
    # runs on the server (held open here) when the worker sends the batch again. Its
    # delivery is gone (an endpoint deleted meanwhile), so no row lock orders the two
    # calls, and the second computes another started_at, which the unique index on
    # (attempt_key, started_at) does not refuse: the second call must wait for the first
    # and then find its attempt recorded.
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    (delivery,) = leased(db, endpoint, 1)
    db.execute("DELETE FROM notifyhook.endpoints WHERE id = %s", [endpoint])
    sent = outcome(delivery, endpoint, "pending", code=503, retry_in_s=30, began_s_ago=1)
    first = psycopg.connect(database_url)
    first.execute(
        "SELECT * FROM notifyhook.record_outcomes(%(w)s, ARRAY[%(d)s]::bigint[], "
        "ARRAY[%(e)s]::bigint[], '{1}', '{pending}', '{30}', ARRAY[now()], '{12}', '{503}', "
        "'{HTTP 503}', '{NULL}', '{false}', interval '5 days', false, ARRAY[%(k)s]::uuid[], "
        "'{true}', '{1.0}')",
        {"w": WORKER, "d": delivery, "e": endpoint, "k": sent.result.attempt_key},
    )
    failures: list[BaseException] = []

    def record_again() -> None:
        async def run() -> None:
            async with Store.open(database_url) as store:
                await store.record_outcomes(WORKER, [sent], 86400, retried=True)

        try:
            asyncio.run(run())
        except BaseException as error:  # reported by the test's thread
            failures.append(error)

    again = threading.Thread(target=record_again)
    again.start()
    try:
        wait_until(
            lambda: (
                not again.is_alive()
                or scalar(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%%record_outcomes%%'",
                )
            ),
            what="the second call to wait for the first, or to end",
        )
        first.commit()
    finally:
        again.join(timeout=30)
        first.close()
    assert not failures, failures
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 1


def test_a_record_sent_again_knows_each_attempt_by_its_key(db, database_url):
    # Two attempts of one delivery by one worker, with the same attempt number, start and
    # duration (a claim given back uncharged, then taken again): the first record's
    # answer is lost, so both are sent again with retried. Matching by worker, start and
    # duration took the second for the first and dropped it; the attempt key tells them
    # apart, and still skips the one already recorded.
    endpoint = add_endpoint(db, "t", "a", "http://127.0.0.1:9/a")
    (delivery,) = leased(db, endpoint, 1)
    first = outcome(delivery, endpoint, "pending", code=503, retry_in_s=0)
    second = outcome(delivery, endpoint, "delivered")

    async def run() -> None:
        async with Store.open(database_url) as store:
            await store.record_outcomes(WORKER, [first], 86400)
            db.execute(
                "UPDATE notifyhook.deliveries SET status = 'processing', locked_by = %s, "
                "locked_until = now() + interval '1 minute'",
                [WORKER],
            )
            await store.record_outcomes(WORKER, [first, second], 86400, retried=True)

    asyncio.run(run())
    rows = db.execute("SELECT status_code FROM notifyhook.attempts ORDER BY status_code").fetchall()
    assert rows == [(200,), (503,)]
    assert states(db) == {delivery: ("delivered", None)}
