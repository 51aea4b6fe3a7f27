"""Fuzz of the enqueue surface: random JSON through SQL arrives merged, byte for byte as signed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import standardwebhooks
from conftest import WORKER_DEFAULTS, add_endpoint, wait_until
from hypothesis import event, given, settings
from hypothesis import strategies as st
from psycopg import errors

from notifyhook.tools.receiver import Arrival, Receiver
from notifyhook.tools.workers import WorkerProcess

LIMIT = 262144
PAD_KEY = "~pad"

INSERT = (
    "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
    "VALUES ('fuzz', 'fuzz.event', %s::jsonb) RETURNING id::text"
)
ENQUEUE = "SELECT notifyhook.enqueue('fuzz', 'fuzz.event', %s::jsonb)::text"
SENT = (
    "SELECT (e.extra_fields || ev.payload)::text FROM notifyhook.events AS ev, notifyhook.endpoints AS e "
    "WHERE ev.id = %s AND e.id = %s"
)


# --- JSON text, written by hand so that it can hold what Python's json.dumps never writes:
# duplicate keys, numbers such as 1.0, -0, 1E+2 or 1e-300, escapes such as \/ and \ud83d\ude00.


@dataclass(frozen=True)
class Number:
    text: str


@dataclass(frozen=True)
class Object:
    pairs: tuple[tuple[str, Any], ...]


def dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Object):
        members = (f"{dump(k, ascii_only)}:{dump(v, ascii_only)}" for k, v in value.pairs)
        return "{" + ", ".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(item, ascii_only) for item in value) + "]"
    if isinstance(value, Number):
        return value.text
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only).replace("/", "\\/")
    return json.dumps(value)


def parse(text: str | bytes) -> Any:
    """JSON with exact numbers: 1.0 and 1 compare equal, as they do in jsonb."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
strings = st.text(characters, max_size=12) | st.sampled_from(
    [
        "",
        "😀",
        "𝄞 clef",
        "\u2028\u2029",
        '"quoted"',
        "back\\slash",
        "a/b",
        "\t\n\r\x01\x1f\x7f",
        "é",
    ]
)
numbers = (
    st.integers(min_value=-(10**40), max_value=10**40).map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.sampled_from(
        ["1.0", "-0", "-0.0", "1E+2", "1e-300", "123456789012345678901234567890.5", "0.10"]
    )
).map(Number)
scalars = st.none() | st.booleans() | strings | numbers
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(st.tuples(strings, children), max_size=4).map(lambda p: Object(tuple(p)))
    ),
    max_leaves=25,
)
objects = st.lists(st.tuples(strings, values), max_size=8).map(lambda p: Object(tuple(p)))


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    payload = draw(objects)
    # Extra fields share some of the payload's top-level keys: the payload's must win.
    shared = [key for key, _ in payload.pairs]
    extra_keys = st.sampled_from(shared) | strings if shared else strings
    extra = Object(tuple(draw(st.lists(st.tuples(extra_keys, values), max_size=5))))
    return {
        "payload": payload,
        "extra": extra,
        "ascii_only": draw(st.booleans()),
        "via_enqueue": draw(st.booleans()),
        # Pad the payload to this many bytes of PostgreSQL's own text of it, if it is not
        # already larger: up to the limit, which must pass, and one byte over, which must not.
        "size": draw(
            st.none()
            | st.integers(min_value=0, max_value=64).map(lambda k: k * LIMIT // 64)
            | st.sampled_from([LIMIT, LIMIT + 1])
        ),
    }


# --- one database, receiver and worker for the whole module -------------------------------


@dataclass
class Rig:
    db: psycopg.Connection[Any]
    receiver: Receiver
    endpoints: dict[str, tuple[int, str]]
    """name: (id, secret)"""


@pytest.fixture(scope="module")
def rig(server, tmp_path_factory) -> Iterator[Rig]:
    with server.databases.fresh() as url:
        yield from _rig(url, tmp_path_factory)


def _rig(url: str, tmp_path_factory) -> Iterator[Rig]:
    receiver = Receiver().start_in_thread()
    worker = None
    try:
        with psycopg.connect(url, autocommit=True) as db:
            endpoints = {}
            for endpoint in ("merged", "plain"):
                endpoint_id = add_endpoint(db, "fuzz", endpoint, receiver.url(endpoint))
                secret = db.execute(
                    "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [endpoint_id]
                ).fetchone()[0]
                receiver.trust(endpoint, secret)
                endpoints[endpoint] = (endpoint_id, secret)
            # A process: a worker in this one would use the random module while hypothesis
            # draws examples, which hypothesis refuses.
            worker = WorkerProcess(
                url,
                "fuzz",
                tmp_path_factory.mktemp("fuzz"),
                {**WORKER_DEFAULTS, "log_level": "INFO"},
            )
            wait_until(lambda: "ready" in worker.log(), timeout=30, what="the worker")
            yield Rig(db, receiver, endpoints)
            assert worker.stop(20) == 0, worker.log()
    finally:
        if worker is not None:
            worker.kill()
        receiver.stop_thread()


def padded(rig: Rig, case: dict[str, Any]) -> tuple[str, int | None]:
    """The payload's text, padded to the case's size when asked and possible."""
    payload: Object = case["payload"]
    if case["size"] is None:
        return dump(payload, case["ascii_only"]), None
    with_pad = Object((*payload.pairs, (PAD_KEY, "")))
    text = dump(with_pad, case["ascii_only"])
    base = rig.db.execute("SELECT octet_length(%s::jsonb::text)", [text]).fetchone()[0]
    if base > case["size"]:
        return text, base
    return dump(
        Object((*payload.pairs, (PAD_KEY, "x" * (case["size"] - base)))), case["ascii_only"]
    ), case["size"]


def enqueue(rig: Rig, text: str, via_enqueue: bool) -> str:
    return str(rig.db.execute(ENQUEUE if via_enqueue else INSERT, [text]).fetchone()[0])


@pytest.mark.slow
@settings(database=None, max_examples=50, deadline=None)
@given(case=cases())
def test_what_arrives_is_the_payload_over_the_extra_fields_as_signed(rig, case):
    extra_text = dump(case["extra"], case["ascii_only"])
    merged_id, _ = rig.endpoints["merged"]
    rig.db.execute(
        "UPDATE notifyhook.endpoints SET extra_fields = %s::jsonb WHERE id = %s",
        [extra_text, merged_id],
    )
    text, size = padded(rig, case)
    event(describe(text, size))
    if size is not None and size > LIMIT:
        with pytest.raises(errors.CheckViolation, match=f"more than the limit of {LIMIT}"):
            enqueue(rig, text, case["via_enqueue"])
        return
    event_id = enqueue(rig, text, case["via_enqueue"])
    arrivals = wait_until(
        lambda: arrived(rig.receiver, event_id), timeout=20, what="both deliveries"
    )
    expected = {**parse(extra_text), **parse(text)}
    for name, arrival in arrivals.items():
        endpoint_id, secret = rig.endpoints[name]
        sent = rig.db.execute(SENT, [event_id, endpoint_id]).fetchone()[0]
        # Bytes signed are bytes sent are bytes received: PostgreSQL's text of the merge.
        assert arrival.body == sent.encode()
        assert arrival.verified is True
        assert standardwebhooks.Webhook(secret).verify(arrival.body, arrival.headers) is not None
        assert arrival.headers["Content-Type"] == "application/json"
        assert parse(arrival.body) == (expected if name == "merged" else parse(text))
    if size is not None:
        stored = rig.db.execute(
            "SELECT octet_length(payload::text) FROM notifyhook.events WHERE id = %s", [event_id]
        ).fetchone()[0]
        assert stored == size


def describe(text: str, size: int | None) -> str:
    """For --hypothesis-show-statistics: what kinds of payload the examples covered."""
    if size is None:
        kind = "unpadded"
    else:
        kind = "over the limit" if size > LIMIT else "at the limit" if size == LIMIT else "padded"
    astral = "astral" if any(ord(c) > 0xFFFF for c in text) else "no astral"
    escaped = "escaped astral" if "\\ud8" in text.lower() else "no escaped astral"
    return f"{kind}, {astral}, {escaped}"


def arrived(receiver: Receiver, event_id: str) -> dict[str, Arrival] | None:
    found = {a.path: a for a in receiver.received() if a.webhook_id == event_id}
    return found if len(found) == 2 else None
