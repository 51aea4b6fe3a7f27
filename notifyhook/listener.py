"""The dedicated autocommit LISTEN connection: a notification only sets the wake-up event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from notifyhook import retry
from notifyhook.store import connect, queries, redact_conninfo, server_words

log = logging.getLogger("notifyhook.listener")


class Listener:
    """LISTENs on channel `notifyhook`; reconnects with backoff, forever, when the connection drops.

    The notification is only a hint (its payload is ignored): the table is the
    truth, and whatever was sent while this connection was down is lost, so
    every (re)connection wakes the claim loop to catch up at once.
    """

    def __init__(
        self, url: str, wake: Callable[[], None], on_reconnect: Callable[[], None]
    ) -> None:
        self._url = url
        self._wake = wake
        self._on_reconnect = on_reconnect
        self.connected = False

    async def run(self) -> None:
        delays = retry.reconnect_delays()
        first = True
        while True:
            try:
                async with connect(self._url) as conn:
                    await conn.execute(queries()["listen"])
                    self.connected = True
                    if not first:
                        log.info("listener reconnected to %s", redact_conninfo(self._url))
                        self._on_reconnect()
                    first = False
                    delays = retry.reconnect_delays()
                    self._wake()
                    async for _ in conn.notifies():
                        self._wake()
            except psycopg.OperationalError as error:
                self.connected = False
                first = False
                wait = next(delays)
                log.warning(
                    "listener lost the database (%s); reconnecting in %.1fs",
                    server_words(error),
                    wait,
                )
                await asyncio.sleep(wait)
