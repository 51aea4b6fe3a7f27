"""The only place that talks SQL: claim, record, release, reclaim, stats and the operators' calls."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from importlib import resources
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import class_row, dict_row
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from notifyhook.delivery import Outcome

Row = tuple[Any, ...]

# Keep a dead TCP peer from hanging a query forever: libpq keepalives notice a
# vanished server within ~25 s when the connection is idle, tcp_user_timeout when it
# has data unacknowledged (a blackhole mid-query: without it, ~15 minutes of TCP
# retransmissions), and connecting gives up after 10 s.
_CONNECTION_OPTIONS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "application_name": "notifyhook",
}

DatabaseError = psycopg.Error
"""Any error from the database or the connection to it."""


@cache
def statements(filename: str) -> dict[str, str]:
    """The statements of a .sql file in the package, each under a `-- name:` line."""
    text = resources.files("notifyhook").joinpath(filename).read_text(encoding="utf-8")
    named: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = chunk.partition("\n")
        named[name.strip()] = body.strip()
    return named


def queries() -> dict[str, str]:
    """The named statements of notifyhook/queries.sql."""
    return statements("queries.sql")


# libpq's options with a fixed set of values. libpq checks these only when it connects,
# too late for "a wrong setting stops the process before it does anything".
_CONNINFO_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
    ),
}  # fmt: skip


# libpq's options that take a whole number. It reads them only when it connects, and
# a connection that fails that way looks like an outage: the worker retried for ever.
_CONNINFO_NUMBERS = (
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout",
)  # fmt: skip

_URL_SCHEMES = ("postgresql://", "postgres://")


def _check_url_authority(url: str) -> None:
    """Refuse a URL whose user name or password holds an unencoded / : or @ (a base64
    password holds a / about half the time): libpq splits such a URL elsewhere, makes a
    piece of the password the host, the port or the database name, and every connection
    error quotes it. Said without quoting anything."""
    rest = url.split("://", 1)[1].split("?", 1)[0]
    authority, _, path = rest.partition("/")
    # In the path, an @ followed by a : or a / is a host and port or database name cut
    # off a password ("p@ss/word@host:5432/db"); a database named "a@b" stays allowed.
    if authority.count("@") > 1 or re.search(r"@.*[:/]", path):
        raise ValueError(
            "has an @ after the host or more than one: a / : or @ in the user name or "
            "password is written %2F %3A %40"
        )


def _check_numbers(params: Mapping[str, object]) -> None:
    for name in _CONNINFO_NUMBERS:
        value = params.get(name)
        if value is not None and not re.fullmatch(r"[+-]?\d+", str(value).strip()):
            raise ValueError(f"{name} must be a whole number")
    for port in (p.strip() for p in str(params.get("port") or "").split(",")):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            # Not quoted: a port that is not a number is most often a piece of a password
            # (an unencoded : or / in it), which libpq took for the port.
            raise ValueError(
                "has a port that is not a number from 1 to 65535 (a / : or @ in the user "
                "name or password is written %2F %3A %40)"
            )


def check_conninfo(url: str) -> None:
    """Raise ValueError unless `url` parses as a libpq URL or DSN (never quoting it)."""
    if not url.strip():
        raise ValueError("must not be empty")
    if url.strip().startswith(_URL_SCHEMES):
        _check_url_authority(url.strip())
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        # libpq's message quotes the part it stumbled on, which may be the password
        # (`unexpected spaces found in "pass word"`): say only which kind of mistake.
        reason = _conninfo_mistake(str(error))
        raise ValueError(f"is not a valid libpq URL or key=value DSN ({reason})") from None
    for name, choices in _CONNINFO_CHOICES.items():
        value = params.get(name)
        if value is not None and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    _check_numbers(params)
    if "@" in str(params.get("host") or ""):
        # An @ left unencoded in the password: libpq splits the URL at the first one, and
        # the rest of the password becomes the host, which every connection error quotes.
        raise ValueError(
            "has an @ in its host name: an @ in the user name or password is written %40"
        )


# libpq's parse errors, by the start of their message, and what we say instead. Only
# these fixed texts are printed: each of libpq's quotes part of the string.
_CONNINFO_MISTAKES = (
    ("unexpected spaces found", "a space in it; write spaces as %20"),
    ("end of string reached when looking for matching", "a [ without its ] in the host"),
    ('missing "=" after', "a key without =value in a key=value DSN"),
    ("unterminated quoted string", "a quoted value without its closing quote"),
    ("invalid URI query parameter", "an unknown parameter after ? in the URL"),
    ("invalid connection option", "an unknown connection option"),
    ("invalid percent-encoded token", "a % not followed by two hexadecimal digits"),
    ("forbidden value %00", "an encoded NUL (%00)"),
    ("invalid integer value", "a number option that is not a number"),
)


def _conninfo_mistake(message: str) -> str:
    for start, mistake in _CONNINFO_MISTAKES:
        if message.strip().startswith(start):
            return mistake
    return "libpq could not parse it"


# The DSN keys that hold a credential: the password, and the passphrase of the client
# certificate's key.
_CREDENTIALS = ("password", "sslpassword")


def redact_conninfo(url: str) -> str:
    """The DSN as safe to print: its credentials replaced by ***."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    for key in _CREDENTIALS:
        if key in params:
            params[key] = "***"
    return make_conninfo("", **params)


def conninfo_credentials(url: str) -> list[str]:
    """The credentials in a DSN (password, key passphrase), to keep out of reports."""
    params = conninfo_to_dict(url)
    return [str(params[key]) for key in _CREDENTIALS if params.get(key)]


def with_dbname(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    return make_conninfo(url, dbname=dbname)


def read_only(url: str, **settings: object) -> str:
    """The DSN with every transaction read-only from the first statement (for readers such
    as the dashboard; on a replica too), and these server settings for the session."""
    given = str(conninfo_to_dict(url).get("options") or "")
    mine = {"default_transaction_read_only": "on", **settings}
    options = " ".join([given, *(f"-c {name}={value}" for name, value in mine.items())])
    return make_conninfo(url, options=options.strip())


async def create_database(admin_url: str, name: str) -> None:
    async with connect(admin_url) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


async def drop_database(admin_url: str, name: str) -> None:
    async with connect(admin_url) as conn:
        await conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def with_options(url: str, options: str) -> str:
    """The DSN with `options` (server settings, `-c name=value`) after the user's own."""
    own = conninfo_to_dict(url).get("options")
    return make_conninfo(url, options=f"{own} {options}" if own else options)


def connection_string(url: str) -> str:
    """The DSN with our connection options added, the user's own taking precedence."""
    return make_conninfo(
        url, **{k: v for k, v in _CONNECTION_OPTIONS.items() if k not in conninfo_to_dict(url)}
    )


# What libpq reports when the server turns down our credentials or names. A failed
# connection carries no SQLSTATE (libpq keeps it to itself), so the text is all there
# is; the server's part is in its lc_messages language, English by default.
_REFUSALS = (
    "password authentication failed",
    "no password supplied",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "does not exist",  # database "x" / role "x"
)


def refusal(error: BaseException) -> str | None:
    """libpq's reason when the server refused the connection for its credentials or
    database name: a wrong setting, not an outage. None for anything else."""
    if not isinstance(error, psycopg.OperationalError) or error.sqlstate is not None:
        return None
    text = " ".join(str(error).split())
    if not any(phrase in text for phrase in _REFUSALS):
        return None
    # "connection failed: connection to server at "h", port 5432 failed: FATAL: why"
    return text.rsplit(" failed: ", 1)[-1]


def is_transient(error: BaseException) -> bool:
    """A lost or refused connection, or a server shutting down or starting: worth waiting out.

    Errors with a SQLSTATE outside classes 08 (connection) and 57 (operator
    intervention) are not, nor is a connection refused for a wrong password, user or
    database (`refusal`): those stay wrong.
    """
    if not isinstance(error, psycopg.OperationalError) or refusal(error) is not None:
        return False
    state = error.sqlstate
    return state is None or state.startswith(("08", "57"))


QUERY_CANCELED, LOCK_NOT_AVAILABLE, IDLE_IN_TRANSACTION_TIMEOUT = "57014", "55P03", "25P03"
"""SQLSTATEs of the worker's own session timeouts (`Timeouts`), and of what shares them:
pg_cancel_backend (57014), NOWAIT (55P03)."""


UNAVAILABLE = "database-unavailable"
"""The Trouble kind of an outage (a lost connection, a server starting or stopping)."""


@dataclass(frozen=True, slots=True)
class Trouble:
    """Why a database call failed, in the words the log and the error report use."""

    kind: str
    """A stable name reports are grouped by: database-unavailable, statement-timeout,
    lock-timeout, … ."""
    text: str
    """What the operator reads, e.g. "the statement waited past its lock_timeout of 5s
    for a lock another transaction holds"."""


def diagnose(error: BaseException, timeouts: Timeouts | None = None) -> Trouble:
    """Why a database call failed: a statement cut short by the session's own timeouts
    (`timeouts`, whose values it names) is not an outage, and saying "database
    unavailable" would send an operator to look for one, when a statement was slow or
    waited on a lock (an operator's transaction, a migration).

    57014 and 55P03 also come from pg_cancel_backend and NOWAIT: the server's message
    (English by default, lc_messages) tells them apart; in another language the words
    stay true but vaguer.
    """
    state = getattr(error, "sqlstate", None)
    primary = getattr(getattr(error, "diag", None), "message_primary", None) or ""
    if state == QUERY_CANCELED:
        if "statement timeout" in primary:
            of = _of(timeouts.statement_s if timeouts else None)
            return Trouble("statement-timeout", f"the statement ran past its statement_timeout{of}")
        return Trouble("query-canceled", "the statement was cancelled (pg_cancel_backend?)")
    if state == LOCK_NOT_AVAILABLE:
        if "lock timeout" in primary:
            of = _of(timeouts.lock_s if timeouts else None)
            return Trouble(
                "lock-timeout",
                f"the statement waited past its lock_timeout{of} for a lock another "
                "transaction holds",
            )
        return Trouble("lock-not-available", "a lock another transaction holds was not available")
    if state == IDLE_IN_TRANSACTION_TIMEOUT:
        of = _of(timeouts.idle_in_transaction_s if timeouts else None)
        return Trouble(
            "idle-in-transaction-timeout",
            f"the server ended the session, idle in a transaction past its "
            f"idle_in_transaction_session_timeout{of}",
        )
    if is_transient(error):
        return Trouble(UNAVAILABLE, "database unavailable")
    return Trouble(
        f"refused-{state or 'unknown'}",
        f"the database refused the statement with SQLSTATE {state or 'unknown'}",
    )


def server_words(error: BaseException) -> str:
    """What a log line quotes of a failed call: the server's primary message on one line,
    at most 300 characters, never its DETAIL, which for a constraint quotes the failing
    row (an endpoint's URL with its token, a receiver's answer). An error of the client
    (a lost connection) has no server message: the first line of libpq's text, its reason."""
    primary = getattr(getattr(error, "diag", None), "message_primary", None)
    text = primary or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return " ".join(text.split())[:300]


def _of(seconds: float | None) -> str:
    """ " of 5s", naming a timeout's value when the caller knows it."""
    return f" of {seconds:g}s" if seconds else ""


PARTITIONS_AHEAD = timedelta(days=7)
"""How far ahead `migrate` and the workers make the history's day partitions."""


@asynccontextmanager
async def connect(
    url: str, *, autocommit: bool = True
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One connection, for commands and the listener (the worker's queries use a pool)."""
    conn = await psycopg.AsyncConnection.connect(connection_string(url), autocommit=autocommit)
    async with conn:
        yield conn


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """One row a claim took (the composite type notifyhook.claimed_delivery)."""

    delivery_id: int
    event_id: UUID
    endpoint_id: int
    tenant_id: str
    attempt: int
    """1-based number of the attempt about to be made (counted at claim time)."""
    url: str
    secret: str
    previous_secret: str | None
    """The secret before the last rotation, while it is still signed with."""
    headers: dict[str, str]
    timeout_ms: int | None
    retry_schedule: list[int] | None
    """The endpoint's own retry delays in seconds; None: the global schedule."""
    body: str
    """The exact JSON body to send (payload merged over the endpoint's extra_fields)."""
    limited: bool
    """The endpoint is limited fleet-wide (max_in_flight, FIFO, an open circuit): its next
    row may wait until this one's outcome is recorded."""


def _claimed_delivery(*values: Any) -> ClaimedDelivery:
    return ClaimedDelivery(*values)


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim returned: the rows to send now, and when to look again."""

    deliveries: list[ClaimedDelivery]
    wake_in_s: float | None
    """Seconds until the next endpoint's turn comes (a retry, a rate token), if any."""
    more_due: bool
    """Rows are due that this claim did not take: claim again when slots free up."""
    held_back: bool
    """An endpoint waits for an outcome of its in-flight rows (max_in_flight, its circuit,
    FIFO order): record outcomes without delay."""
    passed_by: bool
    """Work was passed by because its lock was held for a moment: claim again shortly."""


@dataclass(frozen=True, slots=True)
class Holding:
    """What a worker holds of one endpoint: the claim shares its slots by it."""

    endpoint_id: int
    tenant_id: str
    rows: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Bounds on every statement of a worker's session (DESIGN §8: a claim never waits)."""

    statement_s: float
    lock_s: float

    @property
    def idle_in_transaction_s(self) -> float:
        """A transaction left open (a stalled loop) ends as a statement would."""
        return self.statement_s

    def options(self) -> str:
        """libpq `options`: the session settings, in milliseconds."""
        # Whole milliseconds, at least 1: PostgreSQL reads 0 as no timeout at all.
        statement_ms = max(1, math.ceil(self.statement_s * 1000))
        lock_ms = max(1, math.ceil(self.lock_s * 1000))
        idle_ms = max(1, math.ceil(self.idle_in_transaction_s * 1000))
        return (
            f"-c statement_timeout={statement_ms}"
            f" -c lock_timeout={lock_ms}"
            f" -c idle_in_transaction_session_timeout={idle_ms}"
        )


@dataclass(frozen=True, slots=True)
class DisabledEndpoint:
    """An endpoint that record_outcomes disabled (a 410, or failing for too long)."""

    endpoint_id: int
    disabled_reason: str


@dataclass(frozen=True, slots=True)
class _RecordRow:
    """A row of record_outcomes' answer: a disabled endpoint, or a deferred delivery."""

    endpoint_id: int | None
    disabled_reason: str | None
    deferred_delivery_id: int | None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one record_outcomes call did beyond recording: the endpoints it disabled, and
    the deliveries whose rows another transaction held, whose outcomes it left."""

    disabled: list[DisabledEndpoint]
    deferred: set[int]


Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def _storable(text: str | None) -> str | None:
    """`text` as a PostgreSQL text value can hold it: without NUL characters.

    A receiver's answer is anything it likes (a gzip body, binary junk), and one NUL
    in an excerpt would fail the whole batch's INSERT, again at every retry.
    """
    if text is None or "\x00" not in text:
        return text
    return text.replace("\x00", "\ufffd")


@dataclass(slots=True)
class _WorkerIdLock:
    """Whether the claim connection's session holds the worker id's advisory lock."""

    held: bool = False


def _claim_connection(
    worker: str | None, id_lock: _WorkerIdLock
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    """Prepare each claim connection: load notifyhook.claimed_delivery values as
    ClaimedDelivery, and hold the worker id's advisory lock (see take_over) again after a
    reconnection, so that a process started later under the same id sees it in use.
    Whether it got the lock is kept in `id_lock`: a worker claims only while it holds it."""

    async def prepare(conn: psycopg.AsyncConnection[Any]) -> None:
        info = await CompositeInfo.fetch(conn, "notifyhook.claimed_delivery")
        if info is None:
            raise psycopg.ProgrammingError("type notifyhook.claimed_delivery does not exist")
        register_composite(info, conn, _claimed_delivery)
        if worker is not None:
            cursor = await conn.execute(queries()["hold_worker_id"], {"worker": worker})
            row = await cursor.fetchone()
            id_lock.held = bool(row and row[0])

    return prepare


@asynccontextmanager
async def _open_pool(
    url: str,
    name: str,
    size: int,
    configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
) -> AsyncIterator[Pool]:
    pool: Pool = AsyncConnectionPool(
        connection_string(url),
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True},
        configure=configure,
        open=False,
        # Fail a checkout after 10 s rather than 30: the loop backs off and retries.
        timeout=10.0,
        name=name,
    )
    # Not waiting: a database that is down is the claim loop's to report and retry.
    await pool.open(wait=False)
    try:
        yield pool
    finally:
        await pool.close()


class Store:
    """The worker's queries: claims on a connection of their own, the rest over a small pool.

    Claims have their own connection because psycopg_pool hands connections out first
    in, first out: sharing the pool, successive claims land on backends that have sat
    idle the longest, and a claim is on the path from an event's COMMIT to its request.
    On one connection the claim's backend ran every claim before it; at 50 events/s
    that took ~0.2 ms off the median COMMIT-to-request time (docs/performance.md).
    """

    def __init__(self, pool: Pool, claims: Pool, id_lock: _WorkerIdLock | None = None) -> None:
        self._pool = pool
        self._claims = claims
        self._id_lock = id_lock or _WorkerIdLock()
        self._sql = queries()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        size: int = 3,
        timeouts: Timeouts | None = None,
        worker: str | None = None,
    ) -> AsyncIterator[Store]:
        """`size` connections at most for recording and the rest, plus one for claims
        (holding the advisory lock on `worker`, the WORKER_ID, when given)."""
        if timeouts is not None:
            url = with_options(url, timeouts.options())
        id_lock = _WorkerIdLock()
        prepare = _claim_connection(worker, id_lock)
        async with (
            _open_pool(url, "notifyhook", size) as pool,
            _open_pool(url, "notifyhook-claims", 1, configure=prepare) as claims,
        ):
            yield cls(pool, claims, id_lock)

    async def _fetch(
        self, name: str, params: Mapping[str, Any] | None = None, *, pool: Pool | None = None
    ) -> list[Row]:
        async with (pool or self._pool).connection() as conn:
            cursor = await conn.execute(self._sql[name], params)
            return await cursor.fetchall()

    async def claim_due(
        self,
        worker: str,
        max_rows: int,
        lease_s: float,
        concurrency: int,
        holdings: Sequence[Holding] = (),
    ) -> Claim:
        """Claim up to `max_rows` due deliveries (sql/functions/claim.sql)."""
        async with self._claims.connection() as conn:
            # Binary: psycopg parses a composite array in binary format at about two
            # thirds of the CPU the text format costs.
            cursor = conn.cursor(row_factory=class_row(Claim), binary=True)
            await cursor.execute(
                self._sql["claim_due"],
                {
                    "worker": worker,
                    "max_rows": max_rows,
                    "lease": timedelta(seconds=lease_s),
                    "concurrency": concurrency,
                    "held_endpoints": [h.endpoint_id for h in holdings],
                    "held_counts": [h.rows for h in holdings],
                    "held_tenants": [h.tenant_id for h in holdings],
                },
            )
            claim = await cursor.fetchone()
        assert claim is not None, "claim_due returns one row"
        return claim

    async def take_over(self, worker: str, max_attempts: int) -> int | None:
        """Take back what a dead predecessor with this WORKER_ID still holds.

        The claim connection holds an advisory lock on the worker id for its life, so a
        worker whose lock was free knows no live process claims under its id: the rows
        leased to that id are a dead predecessor's, given back now rather than when
        their leases run out. None when another live session holds the id.
        """
        rows = await self._fetch(
            "take_over", {"worker": worker, "max_attempts": max_attempts}, pool=self._claims
        )
        self._id_lock.held = rows[0][0] is not None
        return None if rows[0][0] is None else int(rows[0][0])

    @property
    def holds_worker_id(self) -> bool:
        """Whether the claim connection holds the worker id's advisory lock: only then
        may this process claim, and call its unknown rows its own (release_lost_claims)."""
        return self._id_lock.held

    async def hold_worker_id(self, worker: str) -> bool:
        """Try to take the worker id's advisory lock on the claim connection (another
        live session may hold it); whether it is held now. Call only while not held:
        the lock counts each taking."""
        rows = await self._fetch("hold_worker_id", {"worker": worker}, pool=self._claims)
        self._id_lock.held = bool(rows[0][0])
        return self._id_lock.held

    async def release_lost_claims(self, worker: str, known: Iterable[int]) -> int | None:
        """Give back, uncharged, the rows leased to `worker` that it does not know of: a
        claim whose answer was lost. `known`: what it is sending or has still to record.
        None when another live session claims under this id (see take_over)."""
        rows = await self._fetch(
            "release_lost_claims", {"worker": worker, "known": list(known)}, pool=self._claims
        )
        return None if rows[0][0] is None else int(rows[0][0])

    async def record_outcomes(
        self,
        worker: str,
        outcomes: Sequence[Outcome],
        disable_after_s: float,
        *,
        retried: bool = False,
    ) -> Recorded:
        """Write a batch of outcomes; returns the endpoints it disabled, with why, and the
        deliveries whose outcomes it left because another transaction held their rows.

        `retried`: an earlier call with some of these outcomes ended without an answer
        (an error, a cancellation), so they may be recorded already; the function then
        skips those. False on the normal path, which then searches nothing.

        Each attempt's started_at is written on the database's clock: the call says how
        long ago, by this process's monotonic clock, each attempt began, measured as late
        as it can be, once a connection is at hand.
        """
        results = [o.result for o in outcomes]
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=class_row(_RecordRow)) as cursor,
        ):
            sending = time.monotonic()
            await cursor.execute(
                self._sql["record_outcomes"],
                {
                    "worker": worker,
                    "delivery_ids": [o.delivery_id for o in outcomes],
                    "endpoint_ids": [o.endpoint_id for o in outcomes],
                    "attempt_numbers": [o.attempt for o in outcomes],
                    "statuses": [o.status for o in outcomes],
                    "retry_in_s": [o.retry_in_s for o in outcomes],
                    "durations_ms": [r.duration_ms for r in results],
                    "status_codes": [r.status_code for r in results],
                    "errors": [_storable(r.error) for r in results],
                    "excerpts": [_storable(r.response_excerpt) for r in results],
                    "gone": [r.verdict.value == "gone" for r in results],
                    "attempt_keys": [r.attempt_key for r in results],
                    "sent": [r.sent for r in results],
                    "disable_after": timedelta(seconds=disable_after_s),
                    "retried": retried,
                    "started_ago_s": [sending - r.started_monotonic for r in results],
                },
            )
            rows = await cursor.fetchall()
        return Recorded(
            disabled=[
                DisabledEndpoint(row.endpoint_id, row.disabled_reason or "")
                for row in rows
                if row.endpoint_id is not None
            ],
            deferred={row.deferred_delivery_id for row in rows if row.deferred_delivery_id},
        )

    async def record_rejected_outcome(self, worker: str, outcome: Outcome, reason: str) -> bool:
        """Record an outcome the database refused in full: an attempt naming `reason` and
        the delivery's next state, nothing else. False when the delivery is gone."""
        rows = await self._fetch(
            "record_rejected_outcome",
            {
                "worker": worker,
                "delivery_id": outcome.delivery_id,
                "attempt": outcome.attempt,
                "status": outcome.status,
                "retry_in_s": outcome.retry_in_s,
                "reason": reason,
                "attempt_key": outcome.result.attempt_key,
                "endpoint_id": outcome.endpoint_id,
                "started_ago_s": time.monotonic() - outcome.result.started_monotonic,
            },
        )
        return bool(rows[0][0])

    async def release_claims(self, worker: str, held: Sequence[tuple[int, int]]) -> int:
        """Give back (delivery_id, attempt) claims not finished, uncharged."""
        rows = await self._fetch(
            "release_claims",
            {
                "worker": worker,
                "delivery_ids": [delivery_id for delivery_id, _ in held],
                "attempt_numbers": [attempt for _, attempt in held],
            },
        )
        return int(rows[0][0])

    async def repair_turns(self) -> int:
        """Wake endpoints whose due rows have no turn; the number woken."""
        rows = await self._fetch("repair_turns")
        return int(rows[0][0])

    async def reclaim_expired(self, max_attempts: int) -> int:
        rows = await self._fetch("reclaim_expired", {"max_attempts": max_attempts})
        return int(rows[0][0])

    async def prune_once(self, retention_s: float, batch_size: int) -> int | None:
        """One batch of retention, or None when another worker holds the prune lock."""
        async with self._pool.connection() as conn, conn.transaction():
            locked = await (await conn.execute(self._sql["try_lock_prune"])).fetchone()
            if not locked or not locked[0]:
                return None
            cursor = await conn.execute(
                self._sql["prune"],
                {"older_than": timedelta(seconds=retention_s), "batch_size": batch_size},
            )
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

    async def create_partitions(self, ahead: timedelta) -> int:
        """Make the history's day partitions up to `ahead` from now; the number made."""
        rows = await self._fetch("create_partitions", {"ahead": ahead})
        return int(rows[0][0])

    async def partitions_ahead_s(self) -> float | None:
        """Seconds from now to the end of the last day partition (None: none exist)."""
        rows = await self._fetch("partitions_ahead_s")
        return None if rows[0][0] is None else float(rows[0][0])

    async def retire_partitions(self, retention_s: float) -> list[str] | None:
        """Drop the day partitions past `retention_s`; their names, or None when another
        worker (or `notifyhook prune`) holds the prune lock."""
        async with self._pool.connection() as conn:
            return await retire_partitions(conn, retention_s)

    async def database_time(self) -> float:
        """The database's clock, in unix seconds."""
        rows = await self._fetch("database_time")
        return float(rows[0][0])

    async def queue_depth(self) -> tuple[int, int, float, int]:
        """(pending due, processing, oldest due age in seconds, pending of disabled endpoints)."""
        rows = await self._fetch("queue_depth")
        return int(rows[0][0]), int(rows[0][1]), float(rows[0][2]), int(rows[0][3])


async def retire_partitions(
    conn: psycopg.AsyncConnection[Any], retention_s: float
) -> list[str] | None:
    """Detach and drop every day partition of the history whose range ended more than
    `retention_s` ago (sql/functions/partitions.sql), on an autocommit connection: DETACH
    … CONCURRENTLY runs outside a transaction block and waits for no claim or recording.
    A detach cut short (a timeout, a lost connection) is finished by the next call.
    Returns the tables dropped, or None when another session holds the prune lock."""
    named = queries()
    locked = await (await conn.execute(named["try_lock_prune_session"])).fetchone()
    if not locked or not locked[0]:
        return None
    dropped = []
    try:
        cursor = await conn.execute(
            named["retired_partitions"], {"older_than": timedelta(seconds=retention_s)}
        )
        for parent, partition, detach_pending in await cursor.fetchall():
            if parent is not None:  # else detached already, its DROP cut short
                how = sql.SQL("FINALIZE" if detach_pending else "CONCURRENTLY")
                await conn.execute(
                    sql.SQL("ALTER TABLE notifyhook.{} DETACH PARTITION notifyhook.{} {}").format(
                        sql.Identifier(parent), sql.Identifier(partition), how
                    )
                )
            await conn.execute(
                sql.SQL("DROP TABLE notifyhook.{}").format(sql.Identifier(partition))
            )
            dropped.append(partition)
    finally:
        await conn.execute(named["unlock_prune_session"])
    return dropped


async def blocking_backends(url: str, conn: psycopg.AsyncConnection[Any]) -> list[int] | None:
    """The backends whose locks `conn`'s statement waits for, asked over a connection of
    its own (`conn` is busy waiting); None when it waits for no lock held by another
    backend (a slow server, or a lock released as we asked)."""
    async with connect(url) as other:
        cursor = await other.execute(queries()["backend_wait"], {"pid": conn.info.backend_pid})
        row = await cursor.fetchone()
    if row is None or row[0] != "Lock" or not row[1]:
        return None
    return list(row[1])


async def read_schema_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The schema version recorded in the database; None before the first migrate."""
    sql = queries()
    exists = await (await conn.execute(sql["schema_exists"])).fetchone()
    if not exists or not exists[0]:
        return None
    row = await (await conn.execute(sql["schema_version"])).fetchone()
    return int(row[0]) if row and row[0] is not None else None


async def fetch_dicts(
    conn: psycopg.AsyncConnection[Any], name: str, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run a named statement of queries.sql and return its rows as dicts (for commands and stats)."""
    return await run_dicts(conn, queries()[name], params)


async def run_dicts(
    conn: psycopg.AsyncConnection[Any], statement: str, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run one statement and return its rows as dicts (none for a statement without)."""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(statement, params)
        return await cursor.fetchall() if cursor.description else []


def json_param(value: Any) -> Jsonb:
    """A Python value to send as jsonb."""
    return Jsonb(value)
