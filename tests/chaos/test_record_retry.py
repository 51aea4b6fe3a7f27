"""A retried record changes nothing: the answer to the first try may have been lost in a crash.

When the server dies between committing record_outcomes and acknowledging it (an immediate
shutdown, a connection cut at that moment), the worker sees an error and records the same
batch again. The chaos runs hit this now and then; here it is made to happen every time.
"""

from __future__ import annotations

import asyncio

from conftest import add_endpoint, scalar

from notifyhook.delivery import AttemptResult, Outcome, Verdict
from notifyhook.store import Store


def test_recording_the_same_outcomes_twice_writes_them_once(db, database_url):
    endpoint = add_endpoint(db, "t", "flaky", "http://127.0.0.1:9/flaky")
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')"
    )
    delivery = scalar(db, "SELECT id FROM notifyhook.deliveries")
    # As a claim leaves it: processing, attempt 1 charged, leased to the worker.
    db.execute(
        "UPDATE notifyhook.deliveries SET status = 'processing', attempts = 1, locked_by = 'w', "
        "locked_until = now() + interval '1 minute'"
    )
    failed = AttemptResult(Verdict.RETRY, 12.5, status_code=503, error="HTTP 503")
    outcome = Outcome(delivery, endpoint, 1, "pending", 30.0, failed)

    async def record_twice() -> None:
        async with Store.open(database_url) as store:
            await store.record_outcomes("w", [outcome], 86400)
            # As the worker sends it again when the first call's answer is lost.
            await store.record_outcomes("w", [outcome], 86400, retried=True)

    asyncio.run(record_twice())
    rows = db.execute(
        "SELECT attempt, status_code, worker FROM notifyhook.attempts WHERE delivery_id = %s",
        [delivery],
    ).fetchall()
    assert rows == [(1, 503, "w")]
    assert (
        scalar(
            db,
            "SELECT consecutive_failures FROM notifyhook.endpoint_state WHERE endpoint_id = %s",
            [endpoint],
        )
        == 1
    )
    assert db.execute(
        "SELECT status, attempts, locked_by FROM notifyhook.deliveries"
    ).fetchone() == ("pending", 1, None)
    # The retry is due 30 s after the record, on the database's clock.
    due_in = scalar(
        db, "SELECT extract(epoch FROM next_attempt_at - now()) FROM notifyhook.deliveries"
    )
    assert 25 < due_in <= 30
