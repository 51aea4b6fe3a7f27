"""Fresh copies of the migrated template, made ahead of the tests and dropped behind them."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from notifyhook.migrate import migrate


def with_dbname(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


class Databases:
    """A template database migrated once, and a thread that keeps `ahead` copies of it
    ready and drops the ones the tests are done with.

    A copy costs PostgreSQL time to make and to drop (docs/testing.md): made while the
    previous test runs, and dropped while the next one does, a test waits for neither. Each test still gets a database of
    its own, as fresh as one made for it.
    """

    def __init__(self, admin_url: str, ahead: int = 2) -> None:
        self.admin_url = admin_url
        self.template = f"notifyhook_template_{os.getpid()}"
        self._numbers = itertools.count()
        self._ahead = ahead
        self._ready: deque[str] = deque()
        self._done: deque[str] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._keep, name="databases", daemon=True)

    def start(self) -> Databases:
        with self._admin() as conn:
            self._drop(conn, self.template)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate_database(with_dbname(self.admin_url, self.template))
        self._thread.start()
        return self

    def take(self) -> str:
        """A fresh migrated database's name; it is the caller's until `give_back`."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._error is not None, 120)
            if self._error is not None:
                raise RuntimeError("could not make a test database") from self._error
            if not self._ready:
                raise TimeoutError("no test database made within 120 s")
            name = self._ready.popleft()
            self._changed.notify_all()
            return name

    def give_back(self, name: str) -> None:
        """Drop it (in the background): its connections are closed by force."""
        with self._changed:
            self._done.append(name)
            self._changed.notify_all()

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """The URL of a fresh migrated database for the block (`take`, then `give_back`)."""
        name = self.take()
        try:
            yield with_dbname(self.admin_url, name)
        finally:
            self.give_back(name)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(60)
        with self._admin() as conn:
            for name in [*self._ready, *self._done, self.template]:
                self._drop(conn, name)

    def _keep(self) -> None:
        try:
            with self._admin() as conn:
                while True:
                    with self._changed:
                        self._changed.wait_for(
                            lambda: self._stopping or self._done or len(self._ready) < self._ahead
                        )
                        if self._stopping:
                            return
                        drop = self._done.popleft() if self._done else None
                    if drop is not None:
                        self._drop(conn, drop)
                        continue
                    name = f"notifyhook_test_{os.getpid()}_{next(self._numbers)}"
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                            sql.Identifier(name), sql.Identifier(self.template)
                        )
                    )
                    with self._changed:
                        self._ready.append(name)
                        self._changed.notify_all()
        except BaseException as error:
            with self._changed:
                self._error = error
                self._changed.notify_all()
            raise

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True)

    @staticmethod
    def _drop(conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def migrate_database(url: str) -> None:
    """`notifyhook migrate`, from synchronous code."""

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrate(conn, max_payload_bytes=262144)

    asyncio.run(apply())
