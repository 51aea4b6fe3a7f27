"""The values that flow through one delivery: what was claimed, what the attempt returned."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed `notifyhook.deliveries` row with everything needed to send one attempt."""

    id: int
    event_id: str
    endpoint_id: int
    attempt: int
    """1-based number of the attempt about to be made (already counted at claim time)."""
    url: str
    secrets: tuple[str, ...]
    """Plain `whsec_…` or `whsk_…` secrets to sign with: the current one first, then the
    previous while valid."""
    headers: dict[str, str]
    timeout_s: float
    body: bytes
    """Exactly the bytes to sign and send (payload merged with the endpoint's extra_fields)."""
    retry_schedule: tuple[float, ...] | None = None
    """The endpoint's own retry delays in seconds (endpoints.retry_schedule); None: the global."""


class Verdict(enum.Enum):
    """How an attempt ended, as far as the HTTP exchange can tell."""

    DELIVERED = "delivered"
    """A 2xx answer."""
    RETRY = "retry"
    """A network error, timeout, 408, 425, 429 or 5xx: worth trying again later."""
    PERMANENT = "permanent"
    """Any other answer (3xx, most 4xx), or a refused destination: give up now."""
    GONE = "gone"
    """410 Gone: give up and disable the endpoint."""


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one HTTP attempt did; becomes one `notifyhook.attempts` row."""

    verdict: Verdict
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None
    """At most the first 1 KiB of the response body, decoded leniently."""
    retry_after_s: float | None = None
    """The receiver's Retry-After (429/503 only), in seconds from now, uncapped."""
    sent: bool = True
    """False when the attempt ended on our side before a request left (a secret this
    worker cannot decrypt, a bug): it says nothing of the receiver, whose health
    (circuit, failing clock, disable_after) does not count it."""
    attempt_key: uuid.UUID = field(default_factory=uuid.uuid4)
    """Drawn for each attempt: the database knows a record sent twice by it (attempts.attempt_key)."""
    started_monotonic: float = field(default_factory=time.monotonic)
    """time.monotonic() when the attempt began (by default when this value is made, right
    for an attempt that took no time). The record says how long ago that was, and the
    database writes attempts.started_at on its own clock: a worker's wall clock may be
    off by seconds or hours, and the history's times must agree with the health's. So
    no wall-clock time of the worker's is kept here at all."""


DeliveryStatus = Literal["delivered", "pending", "dead"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The worker's decision after one attempt: the delivery's next state, and the attempt row."""

    delivery_id: int
    endpoint_id: int
    attempt: int
    status: DeliveryStatus
    retry_in_s: float | None
    """pending: seconds until the retry is due, counted from when the outcome is recorded,
    on the database's clock (a worker's may differ); None otherwise."""
    result: AttemptResult
