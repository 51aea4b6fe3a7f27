"""Per-endpoint retry schedules (endpoints.retry_schedule): the SQL checks, the worker's
decisions, reclaim_expired's budget, the CLI, and a real worker against a failing receiver."""

from __future__ import annotations

import itertools

import psycopg
import pytest
from conftest import add_endpoint, scalar
from test_cli import ok, one_line_error, run, usage_error
from test_worker import statuses

from notifyhook.delivery import AttemptResult, Delivery, Verdict
from notifyhook.retry import decide
from notifyhook.settings import Settings
from notifyhook.tools.receiver import Answer

# --- the database's checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("{}", "must list at least one delay in seconds, or be null"),
        ("{{1,2},{3,4}}", "must list at least one delay in seconds, or be null"),
        ("{10,0,30}", "delay 2 is 0 s: each delay must be from 1 s to 604800 s (7 days)"),
        ("{-5}", "delay 1 is -5 s"),
        ("{60,604801}", "delay 2 is 604801 s"),
        ("{1,NULL}", "delay 2 is null"),
        ("{" + ",".join(["1"] * 21) + "}", "has 21 delays, more than the 20 allowed"),
    ],
)
def test_a_malformed_retry_schedule_is_refused_naming_the_problem(db, schedule, message):
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        add_endpoint(db, "t", "n", "https://example.com/", retry_schedule=schedule)
    assert message in str(raised.value)
    endpoint = add_endpoint(db, "t", "ok", "https://example.com/", retry_schedule="{1,604800}")
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        db.execute(
            "UPDATE notifyhook.endpoints SET retry_schedule = %s WHERE id = %s",
            [schedule, endpoint],
        )
    assert message in str(raised.value)


def test_a_retry_schedule_of_twenty_delays_or_null_is_accepted(db):
    endpoint = add_endpoint(db, "t", "n", "https://example.com/", retry_schedule="{1,2,3}")
    twenty = list(range(1, 21))
    db.execute(
        "UPDATE notifyhook.endpoints SET retry_schedule = %s WHERE id = %s", [twenty, endpoint]
    )
    db.execute("UPDATE notifyhook.endpoints SET retry_schedule = NULL WHERE id = %s", [endpoint])
    assert scalar(db, "SELECT retry_schedule FROM notifyhook.endpoints") is None


# --- decide ---------------------------------------------------------------------------------


def settings() -> Settings:
    return Settings(
        database_url="postgresql://localhost/unused", retry_schedule="30,60,120,240,480", jitter=0
    )


def failed(retry_after_s: float | None = None) -> AttemptResult:
    return AttemptResult(Verdict.RETRY, 1.0, status_code=503, retry_after_s=retry_after_s)


def delivery(attempt: int, schedule: tuple[float, ...] | None) -> Delivery:
    return Delivery(1, "event", 1, attempt, "http://x", (), {}, 1.0, b"{}", schedule)


def test_decide_uses_the_endpoints_delays_and_budget():
    assert decide(delivery(1, (5, 7)), failed(), settings()).retry_in_s == 5
    assert decide(delivery(2, (5, 7)), failed(), settings()).retry_in_s == 7
    assert decide(delivery(3, (5, 7)), failed(), settings()).status == "dead"
    # Without one, the global schedule: six attempts.
    assert decide(delivery(3, None), failed(), settings()).retry_in_s == 120
    assert decide(delivery(6, None), failed(), settings()).status == "dead"


def test_retry_after_is_capped_at_the_endpoints_longest_delay():
    assert decide(delivery(1, (5, 7)), failed(retry_after_s=3600), settings()).retry_in_s == 7
    assert decide(delivery(1, None), failed(retry_after_s=3600), settings()).retry_in_s == 480


# --- reclaim_expired ------------------------------------------------------------------------


def expire_lease(db, endpoint: int, attempts: int) -> int:
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, endpoint_id) "
        "VALUES ('t', 'call.completed', '{}', %s)",
        [endpoint],
    )
    return int(
        scalar(
            db,
            "UPDATE notifyhook.deliveries SET status = 'processing', attempts = %s, "
            "locked_by = 'gone', locked_until = now() - interval '1 second' "
            "WHERE endpoint_id = %s RETURNING id",
            [attempts, endpoint],
        )
    )


def test_reclaim_expired_counts_the_endpoints_own_budget(db):
    short = add_endpoint(db, "t", "short", "https://example.com/", retry_schedule="{1}")
    long = add_endpoint(db, "t", "long", "https://example.com/", retry_schedule="{1,1,1,1,1,1,1}")
    default = add_endpoint(db, "t", "default", "https://example.com/")
    rows = {name: expire_lease(db, e, 2) for name, e in [("short", short), ("long", long)]}
    rows["default"] = expire_lease(db, default, 6)
    # The global budget passed in is 6: the endpoints' own (2 and 8) win where set.
    assert scalar(db, "SELECT notifyhook.reclaim_expired(6)") == 3
    found = dict(db.execute("SELECT id, status FROM notifyhook.deliveries").fetchall())
    assert {name: found[row] for name, row in rows.items()} == {
        "short": "dead",
        "long": "pending",
        "default": "dead",
    }


# --- a real worker --------------------------------------------------------------------------


def test_an_endpoint_schedule_gives_exactly_its_budget_then_dead(db, receiver, run_worker):
    receiver.sequence("own", Answer(status=500))
    receiver.sequence("global", Answer(status=500))
    own = add_endpoint(db, "t", "own", receiver.url("own"), retry_schedule="{1,1}")
    add_endpoint(db, "t", "global", receiver.url("global"))
    worker = run_worker(retry_schedule="0.2,0.2,0.2,0.2,0.2")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "VALUES ('t', 'call.completed', '{}')"
    )
    worker.wait_recorded(lambda: statuses(db) == {"dead": 2}, what="both deliveries dead")
    assert len(receiver.received("own")) == 3
    assert len(receiver.received("global")) == 6
    attempts = db.execute(
        "SELECT a.attempt, a.started_at FROM notifyhook.attempts AS a "
        "WHERE a.endpoint_id = %s ORDER BY a.attempt",
        [own],
    ).fetchall()
    assert [a for a, _ in attempts] == [1, 2, 3]
    # Whole-second delays, not the global 0.2 s: measured on the database's clock.
    gaps = [(b - a).total_seconds() for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert min(gaps) >= 0.9


# --- the CLI --------------------------------------------------------------------------------


def schedule_of(db, endpoint_id: int) -> list[int] | None:
    return scalar(
        db, "SELECT retry_schedule FROM notifyhook.endpoints WHERE id = %s", [endpoint_id]
    )


def test_the_cli_sets_changes_and_clears_a_retry_schedule(db, database_url):
    stdout = ok(database_url, "endpoint", "add", "--tenant", "t", "--name", "n",
                "--url", "https://example.com/", "--retry-schedule", "10, 1m,2h")  # fmt: skip
    endpoint_id = int(stdout.split()[1])
    assert schedule_of(db, endpoint_id) == [10, 60, 7200]
    shown = ok(database_url, "endpoint", "show", str(endpoint_id)).splitlines()
    assert next(line for line in shown if line.startswith("retry_schedule ")).split(None, 1)[1] == (
        "[10, 60, 7200]"
    )

    stdout = ok(database_url, "endpoint", "set-retry-schedule", str(endpoint_id), "5,5")
    assert (
        stdout.strip() == f"endpoint {endpoint_id}: retries after 5,5 seconds (3 attempts in all)"
    )
    assert schedule_of(db, endpoint_id) == [5, 5]
    stdout = ok(database_url, "endpoint", "set-retry-schedule", str(endpoint_id), "default")
    assert stdout.strip() == f"endpoint {endpoint_id}: retries on the global schedule"
    assert schedule_of(db, endpoint_id) is None


def test_the_cli_refuses_bad_retry_schedules(db, database_url):
    endpoint_id = add_endpoint(db, "t", "n", "https://example.com/", retry_schedule="{7}")
    for schedule, complaint in [
        ("1.5", "delay 1 must be whole seconds, got 1.5"),
        ("10,0", "delay 2 must be more than 0"),
        ("10,,20", "delay 2"),
        ("soon", "delay 1"),
    ]:
        error = usage_error(run(database_url, "endpoint", "set-retry-schedule", "1", schedule))
        assert complaint in error
    # Bounds are the database's: one rule, whoever writes the row.
    too_long = run(database_url, "endpoint", "set-retry-schedule", str(endpoint_id), "8d")
    assert "each delay must be from 1 s to 604800 s (7 days)" in one_line_error(too_long, 1)
    missing = run(database_url, "endpoint", "set-retry-schedule", "999", "10")
    assert "no endpoint 999" in one_line_error(missing, 1)
    assert schedule_of(db, endpoint_id) == [7]
