"""The producer: enqueues events through SQL at a steady rate, riding out database restarts."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors

from .plan import EVENT_TYPES

TENANTS = ("acme", "beta", "gamma")

INSERT = (
    "INSERT INTO notifyhook.events (tenant_id, event_type, payload, idempotency_key) "
    "VALUES (%s, %s, %s::jsonb, %s) RETURNING id::text"
)
FIND = "SELECT id::text FROM notifyhook.events WHERE tenant_id = %s AND idempotency_key = %s"
ENQUEUE = "SELECT notifyhook.enqueue(%s, %s, %s::jsonb, %s)::text"


@dataclass(frozen=True)
class Event:
    seq: int
    event_id: str
    tenant: str
    event_type: str


class Producer(threading.Thread):
    """Enqueues `rate` events a second for `seconds`, half by INSERT and half by enqueue().

    Every event carries an idempotency key, so an enqueue whose commit went unconfirmed
    (the server restarted under it) is retried without a double: enqueue() returns the
    existing id, a plain INSERT raises a unique violation and the id is looked up.
    """

    def __init__(self, url: str, rate: float, seconds: float, seed: int, origin: float) -> None:
        super().__init__(name="producer", daemon=True)
        self._url = url
        self._rate = rate
        self._seconds = seconds
        self._origin = origin  # time.monotonic() at which event 0 is due
        self._rng = random.Random(seed)
        self._halt = threading.Event()
        self.events: list[Event] = []
        self.errors = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as failure:
            self.failure = failure

    def stop(self) -> None:
        self._halt.set()

    def _produce(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        start = self._origin
        total = int(self._rate * self._seconds)
        for seq in range(total):
            due = start + seq / self._rate
            if self._halt.wait(max(0.0, due - time.monotonic())):
                break
            tenant = TENANTS[seq % len(TENANTS)]
            event_type = self._rng.choice(EVENT_TYPES)
            payload = json.dumps({"seq": seq, "tenant": tenant, "note": "chaos ✓"})
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(
                            self._url, autocommit=True, application_name="chaos-producer"
                        )
                    event_id = self._enqueue(conn, seq, tenant, event_type, payload)
                    break
                except psycopg.OperationalError:
                    # The server is restarting: try again, with the same idempotency key.
                    self.errors += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    if self._halt.wait(0.1):
                        return
            self.events.append(Event(seq, event_id, tenant, event_type))
        if conn is not None:
            conn.close()

    @staticmethod
    def _enqueue(
        conn: psycopg.Connection[Any], seq: int, tenant: str, event_type: str, payload: str
    ) -> str:
        key = f"chaos-{seq}"
        if seq % 2:
            row = conn.execute(ENQUEUE, [tenant, event_type, payload, key]).fetchone()
        else:
            try:
                row = conn.execute(INSERT, [tenant, event_type, payload, key]).fetchone()
            except errors.UniqueViolation:
                row = conn.execute(FIND, [tenant, key]).fetchone()
        assert row is not None
        return str(row[0])
