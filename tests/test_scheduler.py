"""The claim (sql/functions/claim.sql) called as the worker calls it: turns, fair parts,
fleet-wide limits, locks skipped, and a cost that follows the rows it takes."""

from __future__ import annotations

import re
from typing import Any
from uuid import RFC_4122

import psycopg
import pytest
from conftest import add_endpoint, scalar

CLAIM = (
    "SELECT coalesce(array_agg((c).endpoint_id ORDER BY (c).delivery_id) "
    "FILTER (WHERE (c).delivery_id IS NOT NULL), '{}') "
    "FROM notifyhook.claim_due(%(worker)s, %(rows)s, interval '1 minute', %(concurrency)s, "
    "%(held_endpoints)s::bigint[], %(held_counts)s::integer[], %(held_tenants)s::text[]) AS r "
    "LEFT JOIN LATERAL unnest(r.deliveries) AS c ON true"
)


def claim(
    conn: psycopg.Connection[Any],
    rows: int,
    *,
    concurrency: int = 100,
    worker: str = "w",
    held: dict[int, tuple[str, int]] | None = None,
) -> list[int]:
    """The endpoint of each delivery one claim took."""
    held = held or {}
    return list(
        scalar(
            conn,
            CLAIM,
            {
                "worker": worker,
                "rows": rows,
                "concurrency": concurrency,
                "held_endpoints": list(held),
                "held_counts": [n for _, n in held.values()],
                "held_tenants": [t for t, _ in held.values()],
            },
        )
    )


def enqueue(conn: psycopg.Connection[Any], tenant: str, count: int) -> None:
    conn.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT %s, 'x.y', jsonb_build_object('n', n) FROM generate_series(1, %s) AS n",
        [tenant, count],
    )


def test_endpoints_take_turns_across_claims(db):
    ids = [add_endpoint(db, f"t{n}", "e", f"https://example.com/{n}") for n in range(3)]
    for n in range(3):
        enqueue(db, f"t{n}", 10)
    # One row per claim: each endpoint in turn, the one just served to the back of the line.
    served = [claim(db, 1)[0] for _ in range(6)]
    assert served == ids + ids


def test_a_lone_endpoint_takes_all_but_the_reserve_and_another_gets_it(db):
    slow = add_endpoint(db, "a", "slow", "https://example.com/slow")
    fresh = add_endpoint(db, "b", "fresh", "https://example.com/fresh")
    enqueue(db, "a", 100)
    assert claim(db, 20, concurrency=20) == [slow] * 18
    enqueue(db, "b", 5)
    # Two slots left, both the reserve: only an endpoint below its part may use them.
    assert claim(db, 2, concurrency=20, held={slow: ("a", 18)}) == [fresh, fresh]
    assert claim(db, 2, concurrency=20, held={slow: ("a", 18), fresh: ("b", 9)}) == []


def test_a_tenant_shares_between_its_endpoints_due_at_once(db):
    one = add_endpoint(db, "t", "one", "https://example.com/1")
    two = add_endpoint(db, "t", "two", "https://example.com/2", event_types=["other.*"])
    enqueue(db, "t", 50)
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't', 'other.x', '{}' FROM generate_series(1, 50)"
    )
    taken = claim(db, 18, concurrency=20)
    assert sorted(taken) == [one] * 9 + [two] * 9


def test_a_claim_skips_an_endpoint_whose_turn_row_is_locked(db, database_url):
    locked = add_endpoint(db, "a", "locked", "https://example.com/a", max_in_flight=5)
    free = add_endpoint(db, "b", "free", "https://example.com/b", rate_limit=100)
    enqueue(db, "a", 3)
    enqueue(db, "b", 3)
    with psycopg.connect(database_url) as operator:
        for table in ("endpoint_turns", "endpoint_state"):
            operator.execute(
                f"SELECT * FROM notifyhook.{table} WHERE endpoint_id = %s FOR UPDATE", [locked]
            )
        operator.execute("UPDATE notifyhook.endpoints SET name = 'renamed' WHERE id = %s", [locked])
        db.execute("SET lock_timeout = '1s'")
        # No wait and no lock timeout: the other endpoint is served at once.
        assert claim(db, 10) == [free] * 3
        operator.rollback()
    assert claim(db, 10) == [locked] * 3


def test_a_producer_transaction_blocks_no_claim_and_its_rows_are_not_lost(db, database_url):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 2)
    with psycopg.connect(database_url) as producer:
        enqueue(producer, "t", 3)  # not committed yet
        db.execute("SET lock_timeout = '1s'")
        assert claim(db, 10) == [endpoint] * 2
        # The endpoint has nothing left that the claim could see: it lost its turn...
        assert claim(db, 10) == []
        producer.commit()
    # ...and the producer's wake gives it back with the rows it announces.
    assert claim(db, 10) == [endpoint] * 3


def test_max_in_flight_is_held_and_a_recorded_outcome_gives_the_turn_back(db):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e", max_in_flight=2)
    enqueue(db, "t", 5)
    assert claim(db, 10, worker="w1") == [endpoint] * 2
    assert claim(db, 10, worker="w2") == []
    assert scalar(db, "SELECT turn_at FROM notifyhook.endpoint_turns") is None
    delivery, attempt = db.execute(
        "SELECT id, attempts FROM notifyhook.deliveries WHERE status = 'processing' LIMIT 1"
    ).fetchone()
    db.execute(
        "SELECT * FROM notifyhook.record_outcomes('w1', %s::bigint[], %s::bigint[], "
        "%s::integer[], '{delivered}', '{NULL}', "
        "ARRAY[now()], '{1.0}', '{200}', '{NULL}', '{NULL}', '{false}', interval '5 days', false)",
        [[delivery], [endpoint], [attempt]],
    )
    assert claim(db, 10, worker="w2") == [endpoint]


def test_a_record_neither_waits_for_a_claim_nor_loses_health_to_it(db, database_url):
    """Claims lock endpoint_turns, records endpoint_state: a claim still open on one
    endpoint neither delays the record of its outcomes nor costs them their health
    update (when both locked endpoint_state, the record waited for the claim, and past
    half a second left the endpoint's health unwritten)."""
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 4)
    assert claim(db, 2) == [endpoint] * 2
    delivery, attempt = db.execute(
        "SELECT id, attempts FROM notifyhook.deliveries WHERE status = 'processing' LIMIT 1"
    ).fetchone()
    with psycopg.connect(database_url) as other_worker:
        # A claim in progress: it holds the endpoint's turn until it commits.
        assert claim(other_worker, 1, worker="w2") == [endpoint]
        db.execute("SET lock_timeout = '100ms'")
        db.execute(
            "SELECT * FROM notifyhook.record_outcomes('w', %s::bigint[], %s::bigint[], "
            "%s::integer[], '{delivered}', '{NULL}', ARRAY[now()], '{1.0}', '{200}', '{NULL}', "
            "'{NULL}', '{false}', interval '5 days', false)",
            [[delivery], [endpoint], [attempt]],
        )
        recorded = scalar(
            db,
            "SELECT last_success_at IS NOT NULL FROM notifyhook.endpoint_state "
            "WHERE endpoint_id = %s",
            [endpoint],
        )
        other_worker.rollback()
    assert recorded
    assert (
        scalar(db, "SELECT status FROM notifyhook.deliveries WHERE id = %s", [delivery])
        == "delivered"
    )


def test_a_fifo_endpoint_sends_its_head_and_a_retrying_head_holds_the_rest(db):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e", ordered=True)
    enqueue(db, "t", 3)
    first = claim(db, 10)
    assert first == [endpoint]
    head = scalar(db, "SELECT id FROM notifyhook.deliveries WHERE status = 'processing'")
    assert claim(db, 10) == []  # one in flight at a time
    db.execute(
        "SELECT * FROM notifyhook.record_outcomes('w', %s::bigint[], %s::bigint[], '{1}', "
        "'{pending}', '{60}', "
        "ARRAY[now()], '{1.0}', '{500}', '{NULL}', '{NULL}', '{false}', interval '5 days', false)",
        [[head], [endpoint]],
    )
    # The head waits a minute for its retry; the rows behind it wait with it.
    assert claim(db, 10) == []
    db.execute("UPDATE notifyhook.deliveries SET next_attempt_at = now() WHERE id = %s", [head])
    db.execute("INSERT INTO notifyhook.endpoint_wakes VALUES (%s, now())", [endpoint])
    assert claim(db, 10) == [endpoint]
    assert scalar(db, "SELECT id FROM notifyhook.deliveries WHERE status = 'processing'") == head


def test_the_events_of_one_transaction_have_ids_in_the_order_they_were_inserted(db):
    # A FIFO endpoint's order is events.created_at, events.id, and created_at is the
    # transaction's start: the ids order one transaction's events. Also when the clock
    # seems to step back: the session's last microsecond is set in the future here.
    with db.transaction():
        db.execute("SELECT set_config('notifyhook.event_us', %s, false)", [str(2**52)])
        for first in (1, 101, 201):
            db.execute(
                "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
                "SELECT 't', 'x.y', jsonb_build_object('n', n) "
                "FROM generate_series(%s::integer, %s::integer) AS n ORDER BY n",
                [first, first + 99],
            )
        order = scalar(
            db,
            "SELECT array_agg((payload ->> 'n')::integer ORDER BY created_at, id) "
            "FROM notifyhook.events",
        )
    assert order == list(range(1, 301))
    # UUIDv7: version 7, RFC 9562's variant, the time in its first 48 bits.
    uuid = scalar(db, "SELECT id FROM notifyhook.events LIMIT 1")
    assert (uuid.version, uuid.variant) == (7, RFC_4122)


def test_take_over_gives_back_a_dead_predecessors_rows_at_once(db):
    add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 4)
    claim(db, 4, worker="host:1")
    assert scalar(db, "SELECT notifyhook.take_over('host:1', 6)") == 4
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'pending'") == 4
    assert (
        scalar(db, "SELECT count(*) FROM notifyhook.attempts WHERE error LIKE 'lease expired%'")
        == 4
    )


def test_take_over_leaves_the_rows_of_a_live_session_with_the_same_id(db, database_url):
    add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 2)
    with psycopg.connect(database_url, autocommit=True) as live:
        assert scalar(live, "SELECT notifyhook.take_over('host:1', 6)") == 0
        claim(live, 2, worker="host:1")
        assert scalar(db, "SELECT notifyhook.take_over('host:1', 6)") is None
    assert scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'processing'") == 2


def _idle_claim_buffers(db) -> int:
    """Shared buffers one claim touches when nothing is due (its root plan node's count,
    which includes every statement it ran), by auto_explain."""
    plans: list[str] = []
    db.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    db.execute("LOAD 'auto_explain'")
    db.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_analyze = on; "
        "SET auto_explain.log_buffers = on; SET auto_explain.log_nested_statements = on; "
        "SET auto_explain.log_level = notice; SET client_min_messages = notice"
    )
    assert claim(db, 100) == []
    db.execute("RESET client_min_messages")
    top = [p for p in plans if "FROM notifyhook.claim_due(" in p]
    assert len(top) == 1, plans
    found = re.search(r"shared hit=(\d+)", top[0])
    assert found, top[0]
    return int(found.group(1))


def _endpoints_with_a_retry_waiting(db, first: int, last: int) -> None:
    db.execute(
        "INSERT INTO notifyhook.endpoints (tenant_id, name, url) "
        "SELECT 't' || n, 'e', 'https://example.com/' || n FROM generate_series(%s::integer, %s::integer) AS n",
        [first, last],
    )
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't' || n, 'x.y', '{}' FROM generate_series(%s::integer, %s::integer) AS n",
        [first, last],
    )
    while claim(db, 10_000, concurrency=100_000):  # a claim folds 1,000 wakes at most
        pass
    # Every attempt failed: each endpoint has a retry waiting an hour, and nothing is due.
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'pending', locked_by = NULL, "
        "locked_until = NULL, next_attempt_at = now() + interval '1 hour' "
        "WHERE status = 'processing'"
    )
    db.execute(
        "UPDATE notifyhook.endpoint_turns SET turn_at = now() + interval '1 hour' "
        "WHERE turn_at IS NULL"
    )
    db.execute("VACUUM ANALYZE notifyhook.endpoint_turns, notifyhook.deliveries")
    db.execute("VACUUM notifyhook.endpoint_wakes")


def test_a_claim_when_nothing_is_due_reads_a_few_pages_whatever_the_endpoints(db):
    _endpoints_with_a_retry_waiting(db, 1, 10)
    few = _idle_claim_buffers(db)
    _endpoints_with_a_retry_waiting(db, 11, 3_000)
    many = _idle_claim_buffers(db)
    # A fold of no wakes, the head of the turn index, the hints: the same handful of pages
    # for 3,000 endpoints as for 10 (version 2 probed every endpoint with a pending row).
    # (A few pages of slack: autovacuum or a page prune by another backend can move the
    # count a little between the two claims.)
    assert many <= few + 12, (few, many)
    assert many <= 80, (few, many)


def test_a_claim_reads_the_endpoints_it_serves_not_all_of_them(db):
    db.execute(
        "INSERT INTO notifyhook.endpoints (tenant_id, name, url) "
        "SELECT 't' || n, 'e', 'https://example.com/' || n FROM generate_series(1, 3000) AS n"
    )
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "SELECT 't' || n, 'x.y', '{}' FROM generate_series(1, 3000) AS n"
    )
    for _ in range(4):  # a claim folds 1,000 wakes at most; taking no rows
        assert claim(db, 0) == []
    db.execute("VACUUM ANALYZE notifyhook.endpoints, notifyhook.endpoint_turns")
    # The transaction's own counts: the session's earlier ones are flushed first (PostgreSQL
    # 15 keeps them pending for up to a second, and pg_stat_xact_* would show them too).
    db.execute("SELECT pg_stat_force_next_flush()")
    with db.transaction():
        taken = claim(db, 10)
        read = db.execute(
            "SELECT seq_tup_read + idx_tup_fetch "
            "FROM pg_stat_xact_user_tables WHERE relid = 'notifyhook.endpoints'::regclass"
        ).fetchone()
    assert len(taken) == 10
    # The fair parts look at the first CONCURRENCY (100) due turns and the rows come from
    # the 10 endpoints served: endpoint rows read by key, a few hundred at most. The
    # generic plan once hashed the due turns and read every endpoint (3,000 here).
    assert read is not None
    assert read[0] < 500, read


@pytest.mark.parametrize("way", ["lone endpoint", "general"])
def test_a_claim_of_a_few_rows_of_a_long_backlog_reads_a_few_rows(db, way):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 20_000)
    db.execute("VACUUM ANALYZE notifyhook.deliveries")
    db.execute("SELECT pg_stat_force_next_flush()")
    with db.transaction():
        db.execute(
            "SELECT set_config('notifyhook.general_claim', %s, true)",
            ["on" if way == "general" else "off"],
        )
        taken = claim(db, 10)
        read = db.execute(
            "SELECT sum(seq_tup_read + idx_tup_fetch) FROM pg_stat_xact_user_tables "
            "WHERE relid = 'notifyhook.deliveries_active'::regclass"
        ).fetchone()
    assert taken == [endpoint] * 10
    # The 10 rows taken and the next one due, not the backlog: a generic plan that cannot
    # know a LIMIT's value once hash-joined the chosen ids with every active row (20,000).
    assert read is not None
    assert read[0] < 100, read


def test_repair_turns_wakes_an_endpoint_whose_rows_a_hand_written_update_made_due(db):
    endpoint = add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 2)
    assert claim(db, 10) == [endpoint] * 2
    # An operator puts the rows back by hand, leaving no wake: no claim would see them.
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'pending', locked_by = NULL, "
        "locked_until = NULL, next_attempt_at = now()"
    )
    assert claim(db, 10) == []
    assert scalar(db, "SELECT notifyhook.repair_turns()") == 1
    assert claim(db, 10) == [endpoint] * 2
    assert scalar(db, "SELECT notifyhook.repair_turns()") == 0


def test_the_reserve_serves_a_sibling_of_the_same_tenant_whose_part_is_taken(db):
    slow = add_endpoint(db, "t", "slow", "https://example.com/slow")
    sibling = add_endpoint(db, "t", "sibling", "https://example.com/sibling", event_types=["b.*"])
    enqueue(db, "t", 100)
    assert claim(db, 20, concurrency=20) == [slow] * 18
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES ('t', 'b.x', '{}')"
    )
    assert claim(db, 2, concurrency=20, held={slow: ("t", 18)}) == [sibling]


def test_an_operator_holding_one_endpoint_delays_no_other_endpoints_deliveries(
    db, database_url, receiver, run_worker
):
    held = add_endpoint(db, "a", "held", receiver.url("held"))
    free = add_endpoint(db, "b", "free", receiver.url("free"))
    enqueue(db, "a", 1)
    enqueue(db, "b", 1)
    worker = run_worker(concurrency="10")
    worker.wait_recorded(lambda: len(receiver.received()) == 2, what="both first deliveries")
    with psycopg.connect(database_url) as operator:
        # An operator's transaction holds one endpoint's row and its state row, open.
        operator.execute("UPDATE notifyhook.endpoints SET timeout_ms = 5000 WHERE id = %s", [held])
        for table in ("endpoint_turns", "endpoint_state"):
            operator.execute(
                f"SELECT * FROM notifyhook.{table} WHERE endpoint_id = %s FOR UPDATE", [held]
            )
        enqueue(db, "a", 3)
        enqueue(db, "b", 20)
        # The other endpoint's events go out and are recorded, batches shared with the
        # held endpoint's outcomes included.
        worker.wait_recorded(
            lambda: (
                scalar(
                    db,
                    "SELECT count(*) FROM notifyhook.deliveries "
                    "WHERE endpoint_id = %s AND status = 'delivered'",
                    [free],
                )
                == 21
            ),
            what="the free endpoint's deliveries recorded while the other is held",
        )
        operator.rollback()
    worker.wait_recorded(
        lambda: (
            scalar(db, "SELECT count(*) FROM notifyhook.deliveries WHERE status = 'delivered'")
            == 25
        ),
        what="everything delivered once the operator lets go",
    )
    assert len(receiver.received("free")) == 21


def test_a_lease_runs_from_the_claim_not_from_the_transactions_start(db):
    add_endpoint(db, "t", "e", "https://example.com/e")
    enqueue(db, "t", 1)
    with db.transaction():
        db.execute("SELECT pg_sleep(1)")  # a claim that waited inside its transaction
        claim(db, 1)
        left = scalar(
            db, "SELECT extract(epoch FROM locked_until - now()) FROM notifyhook.deliveries"
        )
    # The lease is a minute from the claim, a second after the transaction began.
    assert left >= 61


def test_worker_sessions_run_under_statement_and_lock_timeouts(database_url):
    from notifyhook.settings import Settings
    from notifyhook.store import Store
    from notifyhook.worker import session_timeouts

    settings = Settings(database_url=database_url, lease=20)  # type: ignore[arg-type]

    async def read() -> list[Any]:
        async with (
            Store.open(database_url, timeouts=session_timeouts(settings)) as store,
            store._pool.connection() as conn,
        ):
            shown = [
                (await (await conn.execute(f"SHOW {name}")).fetchone())[0]
                for name in ("statement_timeout", "lock_timeout")
            ]
            return [*shown, conn.info.get_parameters().get("tcp_user_timeout")]

    import asyncio

    statement, lock, tcp_user = asyncio.run(read())
    assert (statement, lock) == ("10s", "5s")  # half the lease; at most 5 s for a lock
    assert int(tcp_user or 0) > 0
    # A short lease: a lock wait still ends before the statement's own timeout, so that
    # it is reported as the lock wait it is.
    settings = Settings(database_url=database_url, lease=6, http_timeout=2)  # type: ignore[arg-type]
    statement, lock, _ = asyncio.run(read())
    assert (statement, lock) == ("3s", "1500ms")
