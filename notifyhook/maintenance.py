"""The worker's housekeeping: take back expired leases, sample the queue, make the history's
partitions ahead and drop or prune old rows, tell systemd it lives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from notifyhook.clock import OFF_WARNING_S, DatabaseClock
from notifyhook.metrics import Metrics
from notifyhook.settings import Settings
from notifyhook.store import PARTITIONS_AHEAD, DatabaseError, Store
from notifyhook.systemd import SystemdNotifier

log = logging.getLogger("notifyhook.maintenance")

PRUNE_EVERY_S = 600.0
"""How often a worker offers to run retention (one worker of the fleet does)."""

REPAIR_EVERY_S = 60.0
"""How often a worker offers to wake endpoints whose due rows have no turn (one worker of
the fleet does; nothing of notifyhook's own needs it, a hand-written UPDATE may)."""

PARTITIONS_LOW_S = 2 * 86400.0
"""Fewer seconds than this of day partitions ahead is worth a warning: partitions are made
a week ahead, by every migrate and every retention pass, so something stopped them."""

CLOCK_EVERY_S = 60.0
"""How often a worker reads the database's clock again (notifyhook/clock.py)."""

PRUNE_BATCH = 500
"""Rows deleted per retention statement: each holds its locks only briefly."""


class Maintenance:
    """The jobs a worker runs beside its claim loop, each a loop of its own.

    The claim loop is woken (`wake`) after every reclaim, since rows taken back are due
    at once. Only `heartbeat` runs through a shutdown: a stopping worker takes back
    nobody's leases and prunes nothing.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        wake: Callable[[], None] = lambda: None,
        clock: DatabaseClock | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._wake = wake
        self.clock = clock or DatabaseClock()
        self._repaired_at = self._clock_read_at = time.monotonic()
        self._clock_off = False

    async def reclaim(self) -> None:
        """Every poll interval, take back expired leases and sample the queue's gauges."""
        while True:
            await asyncio.sleep(self._settings.poll_interval)
            try:
                await self.reclaim_once()
            except DatabaseError as error:
                log.debug("reclaim skipped: %s", error)
            self._wake()

    async def reclaim_once(self) -> int:
        """One pass: the deliveries taken back."""
        reclaimed = await self._store.reclaim_expired(self._settings.max_attempts)
        if reclaimed:
            log.warning("took back %d deliveries whose lease expired", reclaimed)
        self._metrics.set_queue(*await self._store.queue_depth())
        if time.monotonic() - self._repaired_at >= REPAIR_EVERY_S:
            self._repaired_at = time.monotonic()
            await self.repair_turns()
        if time.monotonic() - self._clock_read_at >= CLOCK_EVERY_S:
            await self.read_clock()
        return reclaimed

    async def read_clock(self) -> float:
        """Measure this host's clock against the database's (notifyhook/clock.py); warn
        when they disagree by more than OFF_WARNING_S, once until they agree again."""
        self._clock_read_at = time.monotonic()
        offset = await self.clock.measure(self._store.database_time)
        self._metrics.clock_offset.set(offset)
        off = abs(offset) > OFF_WARNING_S
        if off and not self._clock_off:
            log.warning(
                "this host's clock is %.1f s %s the database's: webhook-timestamp is stamped "
                "on the database's clock; fix the host's time synchronisation (NTP)",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )
        elif self._clock_off and not off:
            log.info("this host's clock agrees with the database's again (%.3f s)", offset)
        self._clock_off = off
        return offset

    async def repair_turns(self) -> int:
        """Wake the endpoints whose due rows have no turn (sql/functions/claim.sql)."""
        woken = await self._store.repair_turns()
        if woken:
            log.warning(
                "woke %d endpoints whose due rows had no turn (rows made due by hand?)", woken
            )
        return woken

    async def retention(self) -> None:
        """Every PRUNE_EVERY_S, make the history's partitions ahead, then drop or delete
        what is older than RETENTION. A loop of its own: the first prune of a large history
        takes long, and must not hold up reclaim."""
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            try:
                await self.keep_partitions()
                await self.prune()
            except DatabaseError as error:
                log.debug("retention skipped: %s", error)

    async def keep_partitions(self) -> int:
        """Make the history's day partitions a week ahead (sql/functions/partitions.sql);
        the number made. Run at the worker's start, before its first claim, and by every
        retention pass: an outcome finding no partition waits for one (recorder.py)."""
        ahead = await self._store.partitions_ahead_s()
        made = await self._store.create_partitions(PARTITIONS_AHEAD)
        if ahead is None or ahead < PARTITIONS_LOW_S:
            log.warning(
                "the history had %s of day partitions ahead; made %d (a week ahead now)",
                "none" if ahead is None else f"{ahead / 3600:.0f} h",
                made,
            )
        elif made:
            log.info("made %d day partitions of the history ahead", made)
        return made

    async def prune(self) -> int:
        """Drop the day partitions past RETENTION, then delete older finished rows of the
        legacy partition (and events left without deliveries) in batches; the partitions
        dropped plus the rows deleted (0 when another worker holds the prune lock)."""
        retired = await self._store.retire_partitions(self._settings.retention)
        if retired:
            log.info("retention: dropped partitions %s", ", ".join(retired))
        total = 0
        while deleted := await self._store.prune_once(self._settings.retention, PRUNE_BATCH):
            total += deleted
        if total:
            log.info("retention: deleted %d rows older than %gs", total, self._settings.retention)
        return len(retired or ()) + total

    async def heartbeat(
        self,
        notifier: SystemdNotifier,
        last_cycle: Callable[[], float],
        in_flight: Callable[[], int],
    ) -> None:
        """systemd WATCHDOG and STATUS while the claim loop keeps cycling (`last_cycle`,
        monotonic seconds)."""
        interval = notifier.watchdog_interval_s or 5.0
        stuck_after = stuck_after_s(self._settings)
        while True:
            await asyncio.sleep(min(interval, 5.0))
            if time.monotonic() - last_cycle() < stuck_after:
                notifier.watchdog()
            notifier.status(self._metrics.status_line(in_flight()))


def stuck_after_s(settings: Settings) -> float:
    """How long the claim loop may go without a cycle before the worker counts as stuck."""
    return max(3 * settings.poll_interval, 30.0)
