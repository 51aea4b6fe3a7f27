"""The retry schedule: backoff with jitter, Retry-After, the decision after an attempt, and parsing durations and schedules."""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from notifyhook.delivery import AttemptResult, Delivery, Outcome, Verdict

if TYPE_CHECKING:
    from notifyhook.settings import Settings

DEFAULT_SCHEDULE: tuple[float, ...] = (30.0, 60.0, 120.0, 240.0, 480.0)
DEFAULT_JITTER = 0.1

_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*")
_DURATION_HELP = (
    "a duration is seconds (30, 1.5) or a number with a unit s, m, h or d (90s, 5m, 24h)"
)
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def max_attempts(schedule: Sequence[float]) -> int:
    """How many attempts a delivery gets: the first one plus one per scheduled delay."""
    return len(schedule) + 1


def next_delay(
    attempt: int,
    schedule: Sequence[float],
    jitter: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (1-based); None when exhausted.

    The delay is the schedule's slot for that attempt, ±`jitter` as a fraction. A receiver's
    Retry-After can lengthen it, up to the longest scheduled delay, never shorten it.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter is a fraction between 0 and 1, got {jitter}")
    if attempt > len(schedule):
        return None
    # The module-level functions share a generator that Python reseeds after fork, so forked
    # workers do not retry in lockstep.
    uniform = rng.uniform if rng is not None else random.uniform
    delay = schedule[attempt - 1] * (1 + uniform(-jitter, jitter))
    if retry_after_s is not None:
        # Cap what the receiver asks for, not our own jitter: a hostile Retry-After must not
        # park a delivery for a day, and a small one must not pull every retry to one instant.
        delay = max(delay, min(retry_after_s, max(schedule)))
    return max(delay, 0.0)


def parse_retry_after(
    value: str | None, now: datetime | None = None, *, date: str | None = None
) -> float | None:
    """Seconds from `now` that a Retry-After header asks for; None when absent or unreadable.

    Accepts delta-seconds or an HTTP-date; a date in the past gives 0. An HTTP-date is
    read against the answer's own `Date` header when it has a readable one (RFC 9110
    §10.2.3): the receiver meant "so long after I answered", and a worker whose clock is
    an hour slow would otherwise read a date two seconds ahead as an hour ahead.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    now = _http_date(date) or now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def _http_date(value: str | None) -> datetime | None:
    """An HTTP-date as an aware datetime, or None when absent or unreadable."""
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # A naive datetime (a "-0000" zone) is taken as UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_duration(value: str | float | int) -> float:
    """Seconds from `30`, `"1.5"`, or a number with a unit: `"90s"`, `"5m"`, `"24h"`, `"5d"`."""
    # bool is an int; True seconds is certainly a mistake.
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
        return float(value)
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    number, unit = match.groups()
    seconds = float(number) * _UNIT_SECONDS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is too large for a duration")
    return seconds


def parse_schedule(value: str | Sequence[float]) -> tuple[float, ...]:
    """Retry delays in seconds from `"30,60,120,240,480"` (each a duration) or a sequence."""
    items: Sequence[str | float] = value.split(",") if isinstance(value, str) else value
    if not items or (isinstance(value, str) and not value.strip()):
        raise ValueError("a retry schedule needs at least one delay, e.g. '30,60,120,240,480'")
    delays: list[float] = []
    for position, item in enumerate(items, start=1):
        try:
            delay = parse_duration(item)
        except ValueError as error:
            raise ValueError(f"retry schedule delay {position}: {error}") from None
        if delay <= 0:
            raise ValueError(f"retry schedule delay {position} must be more than 0, got {item!r}")
        delays.append(delay)
    return tuple(delays)


def reconnect_delays(first: float = 0.1, longest: float = 10.0) -> Iterator[float]:
    """Waits between reconnection tries: doubling from `first` to `longest`, ±25% jitter.

    The jitter keeps a fleet of workers that lost the same server from all
    knocking at the same instant when it comes back.
    """
    delay = first
    while True:
        yield delay * random.uniform(0.75, 1.25)
        delay = min(delay * 2, longest)


def decide(delivery: Delivery, result: AttemptResult, settings: Settings) -> Outcome:
    """Map an attempt's result to the delivery's next state (retry schedule, jitter, Retry-After).

    The endpoint's own schedule, when it has one, replaces the global one whole: its
    delays, its attempt budget and the cap on Retry-After (its longest delay).
    """
    status: Any = "dead"
    retry_in_s = None
    if result.verdict is Verdict.DELIVERED:
        status = "delivered"
    elif result.verdict is Verdict.RETRY:
        schedule = delivery.retry_schedule or settings.retry_schedule
        delay = next_delay(delivery.attempt, schedule, settings.jitter, result.retry_after_s)
        if delay is not None:
            status, retry_in_s = "pending", delay
    return Outcome(delivery.id, delivery.endpoint_id, delivery.attempt, status, retry_in_s, result)
