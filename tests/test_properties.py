"""Properties: status classification, decide(), the event-type matcher, signing and Retry-After.

What tests/test_retry.py and tests/test_signing.py already prove is not repeated here.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from notifyhook import __version__
from notifyhook.delivery import AttemptResult, Delivery, Verdict
from notifyhook.errors import VerificationError
from notifyhook.retry import decide, parse_retry_after
from notifyhook.sender import Sender, _status_verdict
from notifyhook.settings import Settings
from notifyhook.signing import decode_secret, generate_secret, verify, webhook_headers
from notifyhook.tools.receiver import Answer

# No example database: tests must not leave files in the tree.
quick = settings(database=None, max_examples=50, deadline=None)
with_db = settings(
    database=None,
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def expected_verdict(status: int) -> Verdict:
    """The contract, written out once more: 2xx delivered, 408/425/429/5xx retry, 410 gone."""
    if status // 100 == 2:
        return Verdict.DELIVERED
    if status in (408, 425, 429) or status // 100 == 5:
        return Verdict.RETRY
    if status == 410:
        return Verdict.GONE
    return Verdict.PERMANENT


def make_settings(schedule: str = "30,60,120,240,480", jitter: float = 0.1) -> Settings:
    return Settings(
        database_url="postgresql://localhost/unused", retry_schedule=schedule, jitter=jitter
    )


def delivery(attempt: int) -> Delivery:
    return Delivery(1, "event", 1, attempt, "http://x", (), {}, 1.0, b"{}")


# --- classification of every status code -----------------------------------------------


def test_every_status_code_from_100_to_599_is_classified_as_the_contract_says():
    wrong = {
        status: _status_verdict(status)
        for status in range(100, 600)
        if _status_verdict(status) is not expected_verdict(status)
    }
    assert wrong == {}


schedules = st.lists(
    st.floats(min_value=0.01, max_value=1e5, allow_nan=False), min_size=1, max_size=8
).map(lambda delays: ",".join(f"{delay:.3f}" for delay in delays))


@quick
@given(
    status=st.integers(min_value=100, max_value=599)
    | st.sampled_from([200, 299, 300, 404, 408, 410, 425, 429, 499, 500, 503, 599]),
    schedule=schedules,
    jitter=st.floats(min_value=0, max_value=1),
    data=st.data(),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_decide_maps_every_status_and_attempt_to_the_next_state(
    status, schedule, jitter, data, retry_after
):
    configured = make_settings(schedule, jitter)
    slots = configured.retry_schedule
    attempt = data.draw(st.integers(min_value=1, max_value=len(slots) + 2), label="attempt")
    result = AttemptResult(_status_verdict(status), 1.0, status, retry_after_s=retry_after)
    outcome = decide(delivery(attempt), result, configured)
    assert (outcome.delivery_id, outcome.attempt, outcome.result) == (1, attempt, result)
    verdict = expected_verdict(status)
    if verdict is Verdict.DELIVERED:
        assert (outcome.status, outcome.retry_in_s) == ("delivered", None)
    elif verdict is Verdict.RETRY and attempt <= len(slots):
        slot = slots[attempt - 1]
        low = slot * (1 - jitter)
        high = max(slot * (1 + jitter), min(retry_after or 0, max(slots)))
        if retry_after is not None:
            low = max(low, min(retry_after, max(slots)))
        assert outcome.status == "pending"
        assert outcome.retry_in_s is not None
        assert low - 1e-9 <= outcome.retry_in_s <= high + 1e-9
    else:
        assert (outcome.status, outcome.retry_in_s) == ("dead", None)


@quick
@given(schedule=schedules, jitter=st.floats(min_value=0, max_value=1))
def test_a_delivery_that_always_fails_dies_after_the_configured_window(schedule, jitter):
    configured = make_settings(schedule, jitter)
    failure = AttemptResult(Verdict.RETRY, 1.0, 503)
    window = 0.0
    attempt = 1
    while True:
        outcome = decide(delivery(attempt), failure, configured)
        if outcome.status == "dead":
            break
        assert outcome.retry_in_s is not None
        window += outcome.retry_in_s
        attempt += 1
    assert attempt == configured.max_attempts == len(configured.retry_schedule) + 1
    total = sum(configured.retry_schedule)
    slack = 1e-3 * attempt + 1e-9 * total
    assert total * (1 - jitter) - slack <= window <= total * (1 + jitter) + slack


def test_every_status_code_over_http_ends_as_decide_says(receiver):
    """200-599 from a real receiver, through the real sender, then decide(), each with a
    Retry-After that only 429 and 503 may honour."""
    statuses = list(range(200, 600))
    receiver.script("code", lambda n: Answer(status=statuses[n], headers={"Retry-After": "7"}))
    configured = make_settings("1,2", jitter=0)

    async def send_all() -> list[AttemptResult]:
        async with Sender(
            allow_private_networks=True, user_agent=f"notifyhook/{__version__}"
        ) as sender:
            secret = generate_secret()
            return [
                await sender.send(
                    Delivery(1, "event", 1, 1, receiver.url("code"), (secret,), {}, 5.0, b"{}")
                )
                for _ in statuses
            ]

    results = asyncio.run(send_all())
    assert [a.answered for a in receiver.received("code")] == statuses
    for status, result in zip(statuses, results, strict=True):
        assert (result.status_code, result.verdict) == (status, expected_verdict(status)), status
        assert result.retry_after_s == (7.0 if status in (429, 503) else None), status
        outcome = decide(delivery(1), result, configured)
        if result.verdict is Verdict.RETRY:
            # Retry-After 7 is capped at the longest scheduled delay, 2 s.
            expected = 2.0 if status in (429, 503) else 1.0
            assert outcome.retry_in_s == expected, status


# --- Retry-After dates -------------------------------------------------------------------


@quick
@given(seconds=st.integers(min_value=-(10**7), max_value=10**8))
def test_an_http_date_retry_after_reads_back_as_the_seconds_until_then(seconds):
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = email.utils.format_datetime(now + timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(header, now=now) == max(seconds, 0)


# --- signing ---------------------------------------------------------------------------

keys = st.binary(min_size=24, max_size=64)
secrets = keys.map(lambda key: "whsec_" + base64.b64encode(key).decode())
bodies = st.binary(max_size=512).map(lambda raw: json.dumps(raw.hex()).encode())


@quick
@given(key=keys)
def test_a_secret_with_or_without_padding_decodes_to_its_key(key):
    encoded = base64.b64encode(key).decode()
    assert decode_secret("whsec_" + encoded) == key
    assert decode_secret("whsec_" + encoded.rstrip("=")) == key


@quick
@given(signers=st.lists(secrets, min_size=1, max_size=4, unique=True), body=bodies, other=secrets)
def test_during_any_rotation_each_secret_verifies_and_no_other(signers, body, other):
    assume(other not in signers)
    headers = webhook_headers(signers, "msg_1", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == len(signers)
    for secret in signers:
        assert verify(secret, headers, body) == json.loads(body)
    with pytest.raises(VerificationError):
        verify(other, headers, body)


@quick
@given(secret=secrets, body=bodies, data=st.data())
def test_changing_any_byte_of_the_body_breaks_the_signature(secret, body, data):
    headers = webhook_headers([secret], "msg_1", int(time.time()), body)
    position = data.draw(st.integers(min_value=0, max_value=len(body) - 1), label="position")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="flip")
    tampered = bytearray(body)
    tampered[position] ^= flip
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, bytes(tampered))


@quick
@given(
    secret=secrets,
    tolerance=st.integers(min_value=10, max_value=10**6),
    skew=st.integers(min_value=-(10**7), max_value=10**7),
)
def test_a_timestamp_is_accepted_exactly_within_the_tolerance(secret, tolerance, skew):
    # Two seconds either side of the edge: the clock may tick between signing and checking.
    assume(abs(abs(skew) - tolerance) > 2)
    headers = webhook_headers([secret], "msg_1", int(time.time()) + skew, b"{}")
    if abs(skew) < tolerance:
        assert verify(secret, headers, b"{}", tolerance=tolerance) == {}
    else:
        with pytest.raises(VerificationError, match="too old" if skew < 0 else "too new"):
            verify(secret, headers, b"{}", tolerance=tolerance)


# --- the event-type matcher ------------------------------------------------------------


def reference_matches(pattern: str, event_type: str) -> bool:
    """The rule: `*` matches all; exact; `p.*` matches `p.x` and `p.x.y`, not `p`."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        prefix = pattern[:-2].split(".")
        return event_type.split(".")[: len(prefix)] == prefix and event_type.count(".") >= len(
            prefix
        )
    return pattern == event_type


EVENT_TYPE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def reference_is_pattern(text: str) -> bool:
    return (
        text == "*"
        or (EVENT_TYPE.fullmatch(text) is not None and len(text) <= 255)
        or (
            text.endswith(".*") and EVENT_TYPE.fullmatch(text[:-2]) is not None and len(text) <= 257
        )
    )


# A small alphabet, so that types share words and prefixes as real ones do.
words = st.text(alphabet="ab_-1", min_size=1, max_size=3) | st.sampled_from(
    ["call", "completed", "billing", "invoice", "x"]
)
event_types = st.lists(words, min_size=1, max_size=4).map(".".join)


@st.composite
def patterns_for(draw: Any, event_type: str) -> str:
    """A pattern likely to be close to `event_type`: a prefix of it, itself, or another type."""
    segments = event_type.split(".")
    kind = draw(st.sampled_from(["star", "exact", "prefix", "other", "other-prefix", "near"]))
    if kind == "star":
        return "*"
    if kind == "exact":
        return event_type
    if kind == "prefix":
        return ".".join(segments[: draw(st.integers(1, len(segments)))]) + ".*"
    if kind == "near":
        # The same text with the dot lost or a character added: must not match as a prefix.
        return event_type.replace(".", "", 1) + draw(st.sampled_from(["", "a"])) + ".*"
    other = draw(event_types)
    return other + ".*" if kind == "other-prefix" else other


@st.composite
def subscriptions(draw: Any) -> tuple[list[str], str]:
    event_type = draw(event_types)
    patterns = draw(st.lists(patterns_for(event_type), min_size=1, max_size=4))
    return patterns, event_type


@pytest.fixture(scope="module")
def module_db(server) -> Any:
    """One migrated database for the module: hypothesis runs many examples per test."""
    with (
        server.databases.fresh() as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        yield conn


MATCH_ALL = """
SELECT notifyhook.event_type_matches(
           ARRAY(SELECT jsonb_array_elements_text(case_->'patterns')), case_->>'type')
FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS cases(case_, position)
ORDER BY position
"""


@with_db
@given(cases=st.lists(subscriptions(), min_size=1, max_size=20))
def test_the_sql_matcher_agrees_with_the_rule(module_db, cases):
    payload = json.dumps([{"patterns": p, "type": t} for p, t in cases])
    got = [row[0] for row in module_db.execute(MATCH_ALL, [payload]).fetchall()]
    assert got == [any(reference_matches(p, t) for p in ps) for ps, t in cases]


def test_the_matcher_on_the_documented_examples(module_db):
    for pattern, event_type, expected in [
        ("*", "call", True),
        ("call.completed", "call.completed", True),
        ("call.completed", "call.completed.v2", False),
        ("call.*", "call.x", True),
        ("call.*", "call.x.y", True),
        ("call.*", "call", False),
        ("call.*", "callx.y", False),
        ("ca_l.*", "call.x", False),  # _ and % are no wildcards here
        ("call.x.*", "call.x", False),
    ]:
        got = module_db.execute(
            "SELECT notifyhook.event_type_matches(%s, %s)", [[pattern], event_type]
        ).fetchone()[0]
        assert got is expected is reference_matches(pattern, event_type), (pattern, event_type)


@with_db
@given(text=st.text(alphabet="ab_-.*% 1é", max_size=8) | subscriptions().map(lambda s: s[0][0]))
def test_endpoints_accept_exactly_the_patterns_of_the_rule(module_db, text):
    got = module_db.execute("SELECT notifyhook.is_event_type_pattern(%s)", [text]).fetchone()[0]
    assert got is reference_is_pattern(text)


@st.composite
def fan_out_cases(draw: Any) -> tuple[list[list[str]], list[str]]:
    """Event types, and endpoints whose patterns are drawn around those types."""
    types = draw(st.lists(event_types, min_size=1, max_size=8))
    near_types = st.sampled_from(types).flatmap(patterns_for)
    endpoints = draw(st.lists(st.lists(near_types, min_size=1, max_size=3), min_size=1, max_size=4))
    return endpoints, types


@settings(
    database=None,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=fan_out_cases())
def test_an_insert_fans_out_to_exactly_the_matching_endpoints(module_db, case):
    endpoints, types = case
    with module_db.transaction(force_rollback=True):
        ids = [
            module_db.execute(
                "INSERT INTO notifyhook.endpoints (tenant_id, name, url, event_types) "
                "VALUES ('fan', %s, 'http://example.com/', %s) RETURNING id",
                [f"e{index}", patterns],
            ).fetchone()[0]
            for index, patterns in enumerate(endpoints)
        ]
        module_db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload, idempotency_key) "
            "SELECT 'fan', t, '{}', n::text FROM unnest(%s::text[]) WITH ORDINALITY AS e(t, n)",
            [types],
        )
        got = sorted(
            module_db.execute(
                "SELECT e.idempotency_key::int, d.endpoint_id FROM notifyhook.deliveries AS d "
                "JOIN notifyhook.events AS e ON e.id = d.event_id"
            ).fetchall()
        )
    expected = sorted(
        (position, endpoint_id)
        for position, event_type in enumerate(types, start=1)
        for endpoint_id, patterns in zip(ids, endpoints, strict=True)
        if any(reference_matches(p, event_type) for p in patterns)
    )
    assert got == expected


@st.composite
def claim_cases(draw: st.DrawFn) -> dict[str, Any]:
    """Endpoints of one or two tenants, each with rows due now and later, some held by the
    worker, plain or with a limit (or disabled), and a claim's size: often one endpoint
    alone, or one left uncapped among capped or limited ones. (Widened by the session-10
    review: rows due later, limited siblings, held entries of no rows, no reserve.)"""
    concurrency = draw(st.sampled_from([1, 2, 3, 9, 10, 11, 20, 50]))
    endpoints = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["t1", "t2"]),  # tenant
                st.integers(0, 30),  # rows due now
                st.integers(0, 3),  # rows due later
                st.integers(0, 25),  # rows this worker holds
                st.sampled_from(["plain", "plain", "plain", "disabled", "rate", "max", "fifo"]),
                st.booleans(),  # in the held arrays even when it holds nothing
            ),
            min_size=1,
            max_size=4,
        )
    )
    return {
        "concurrency": concurrency,
        "rows": draw(st.integers(1, concurrency)),
        "endpoints": endpoints,
    }


ENDPOINT_KINDS = {
    "plain": "",
    "disabled": ", enabled = false",
    "rate": ", rate_limit = 5",
    "max": ", max_in_flight = 3",
    "fifo": ", ordered = true",
}

CLAIM_TAKEN = """
SELECT coalesce(array_agg((c).endpoint_id ORDER BY (c).endpoint_id), '{}'),
       r.more_due, r.held_back, r.passed_by
FROM notifyhook.claim_due('w', %(rows)s, interval '1 minute', %(concurrency)s,
                          %(held_endpoints)s, %(held_counts)s, %(held_tenants)s) AS r
LEFT JOIN LATERAL unnest(r.deliveries) AS c ON true
GROUP BY r.more_due, r.held_back, r.passed_by
"""


@with_db
@given(case=claim_cases())
def test_the_claims_lone_endpoint_way_takes_what_the_general_statement_takes(module_db, case):
    """claim_due serves one picked endpoint without limits by a shorter way than its general
    statement (sql/functions/claim.sql): both take as many rows of each endpoint and give
    the same turns. (Not always the same rows among rows due at the same instant: nothing
    orders those for an endpoint that is not FIFO.)"""
    with module_db.transaction(force_rollback=True):
        held: dict[int, tuple[str, int]] = {}
        for index, (tenant, due, later, holds, kind, listed) in enumerate(case["endpoints"]):
            endpoint = module_db.execute(
                "INSERT INTO notifyhook.endpoints (tenant_id, name, url, event_types) "
                "VALUES (%s, %s, 'http://example.com/', %s) RETURNING id",
                [tenant, f"e{index}", [f"type.{index}"]],
            ).fetchone()[0]
            module_db.execute(
                "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
                "SELECT %s, %s, '{}' FROM generate_series(1, %s)",
                [tenant, f"type.{index}", due + later + holds],
            )
            if later:
                module_db.execute(
                    "UPDATE notifyhook.deliveries SET next_attempt_at = now() + "
                    "make_interval(mins => 1 + (id %% 5)::integer) WHERE id IN (SELECT id FROM "
                    "notifyhook.deliveries WHERE endpoint_id = %s ORDER BY id DESC LIMIT %s)",
                    [endpoint, later],
                )
            if holds:
                module_db.execute(
                    "UPDATE notifyhook.deliveries SET status = 'processing', locked_by = 'w', "
                    "locked_until = now() + interval '1 minute', attempts = 1 "
                    "WHERE id IN (SELECT id FROM notifyhook.deliveries WHERE endpoint_id = %s "
                    "AND status = 'pending' AND next_attempt_at <= now() LIMIT %s)",
                    [endpoint, holds],
                )
            if ENDPOINT_KINDS[kind]:
                # After the rows: a disabled endpoint's fan-out would make none.
                module_db.execute(
                    f"UPDATE notifyhook.endpoints SET name = name{ENDPOINT_KINDS[kind]} "
                    "WHERE id = %s",
                    [endpoint],
                )
            if holds or listed:
                held[endpoint] = (tenant, holds)
        params = {
            "rows": case["rows"],
            "concurrency": case["concurrency"],
            "held_endpoints": list(held),
            "held_counts": [n for _, n in held.values()],
            "held_tenants": [t for t, _ in held.values()],
        }
        outcomes = []
        for general in ("on", "off"):
            with module_db.transaction(force_rollback=True):
                module_db.execute(
                    "SELECT set_config('notifyhook.general_claim', %s, true)", [general]
                )
                taken = module_db.execute(CLAIM_TAKEN, params).fetchone()
                # Who comes next, in order, and whose turn is now or still to come.
                turns = module_db.execute(
                    "SELECT endpoint_id, turn_at IS NULL, turn_at <= clock_timestamp() "
                    "FROM notifyhook.endpoint_turns ORDER BY turn_at, endpoint_id"
                ).fetchall()
                outcomes.append((taken, turns))
    assert outcomes[0] == outcomes[1]
