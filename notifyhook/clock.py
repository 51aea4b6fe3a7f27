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

    @staticmethod
    def host() -> float:
        """Unix seconds on this host's clock, uncorrected: what a measurement compares."""
        return wall()

    def measured(self, before: float, database: float, after: float) -> float:
        """Take the database's reading `database`, made between this host's `before` and
        `after`: the offset is counted from the middle, within half the round trip."""
        self.offset_s = database - (before + after) / 2
        return self.offset_s
