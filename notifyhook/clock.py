"""The database's clock as a worker reads it: what `webhook-timestamp` is stamped with.

PostgreSQL is the fleet's one coordinator, and its clock already decides every other
time (leases, retries, health, `started_at`). A worker whose host clock is off by more
than a receiver's tolerance (Standard Webhooks verifiers allow five minutes) would have
every request refused as a replay, and a 4xx is dead at once: so the worker stamps
its requests with its own clock corrected by the offset it last measured against the
database's, and says so in its log when the two disagree by more than OFF_WARNING_S.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

OFF_WARNING_S = 5.0
"""An offset larger than this is worth a warning: NTP keeps hosts within milliseconds."""


def wall() -> float:
    """This host's clock, in unix seconds (a function of its own, so a test can set it off)."""
    return time.time()


class DatabaseClock:
    """This host's clock plus the offset to the database's, as last measured."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        """The database's clock less this host's, in seconds."""

    def now(self) -> float:
        """Unix seconds on the database's clock (this host's until a first measurement)."""
        return wall() + self.offset_s

    async def measure(self, read: Callable[[], Awaitable[float]]) -> float:
        """Read the database's clock with `read` and keep the offset, counted from the
        middle of the round trip (so within half of it); the offset."""
        before = wall()
        database = await read()
        self.offset_s = database - (before + wall()) / 2
        return self.offset_s
