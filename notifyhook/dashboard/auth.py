"""The dashboard's door: a bearer token, or a login form that sets an HttpOnly cookie.

The cookie holds its expiry, a random session id and an HMAC of both, keyed by the
token and by a key drawn when the process starts; never the token: a copy of the
browser's cookie store does not hand over what unlocks the command line's
`Authorization` too, and what it does hand over ends with the session, or when that
session logs out. Every comparison is in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

COOKIE = "notifyhook_dashboard"
LOGIN = "/login"
STATIC = "/static/"
"""Reachable without the token: the login form and its stylesheet."""
SESSION_LIFETIME_S = 12 * 60 * 60
"""How long a login lasts: a working day, after which the person types the token again.
The token is the long-lived secret; a cookie copied from a browser (a stolen profile, a
shared machine) must stop working on its own rather than until the token changes.
Restarting the dashboard process ends every session sooner: the key the cookies are
signed with is drawn at start and never stored."""

MOST_ENDED_SESSIONS = 10_000
"""Sessions logged out before their end that the process remembers; past that many, it
ends every session at once (draws a new key) rather than forget one."""


SESSION_ID_BYTES = 8
"""Random bytes of a session's id, written in the cookie as lower-case hex."""


def _is_session_id(text: str) -> bool:
    """Whether `text` is an id as session_value draws it. Checked before the MAC, which
    would fail to encode a header's undecodable bytes (a 500, not a 401)."""
    return len(text) == 2 * SESSION_ID_BYTES and all(ch in "0123456789abcdef" for ch in text)


class Door:
    """Checks requests against the token; `None` lets everyone in (bound to loopback).
    `loopback_only`: without a token, on loopback: a request must name loopback in
    its Host too (see middleware)."""

    def __init__(self, token: str | None, *, loopback_only: bool = False) -> None:
        self.token = token
        self.loopback_only = loopback_only and token is None
        # Drawn per process and kept in memory only, so a restart revokes every cookie
        # (what an operator reaches for first), without changing the token.
        self._process_key = secrets.token_bytes(32)
        # Logged-out sessions, until their own end: a copy of a cookie (a shared
        # machine's profile, a proxy's log) must not outlive the logout.
        self._ended: dict[str, int] = {}

    @property
    def locked(self) -> bool:
        return self.token is not None

    def session_value(self, expires: int) -> str:
        """The cookie of a new session that ends at `expires` (Unix seconds):
        "expires.id.MAC", the id random, so that two logins are two sessions."""
        session = f"{expires}.{secrets.token_hex(SESSION_ID_BYTES)}"
        return f"{session}.{self._session_mac(session)}"

    def session_admits(self, value: str) -> bool:
        """Whether a cookie is one of ours, unaltered, not logged out, and its session
        not yet over by this server's clock. Anything malformed is simply not admitted."""
        session, dot, mac = value.rpartition(".")
        expires, _, session_id = session.partition(".")
        if not (dot and expires.isascii() and expires.isdigit() and _is_session_id(session_id)):
            return False
        expected = self._session_mac(session).encode()
        # "replace": a header's undecodable bytes reach us as surrogates, which would
        # raise; they match no MAC either way.
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), expected):
            return False
        # Ours, so digits of a sane length.
        return int(expires) > time.time() and session not in self._ended

    def end_session(self, value: str) -> None:
        """Log a session out: its cookie, wherever copied, is refused from now on."""
        if not self.session_admits(value):
            return
        session = value.rpartition(".")[0]
        now = time.time()
        self._ended = {s: end for s, end in self._ended.items() if end > now}
        if len(self._ended) >= MOST_ENDED_SESSIONS:
            # Remembering more would let logouts fill the memory; forgetting one would
            # let its cookie in again. Every session ends instead (a restart's effect).
            self._process_key = secrets.token_bytes(32)
            self._ended.clear()
            return
        self._ended[session] = int(session.partition(".")[0])

    def _session_mac(self, session: str) -> str:
        assert self.token is not None
        # The process key has a fixed length, so the concatenation is unambiguous.
        key = self._process_key + self.token.encode()
        message = b"notifyhook dashboard session until " + session.encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        assert self.token is not None
        # A header's undecodable bytes arrive as surrogates: "surrogatepass" encodes them
        # into bytes no valid UTF-8 token has, where "replace" would make them a "?",
        # and plain encode() raises (a 500 instead of a 401).
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token.encode())

    def admits(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        return self.session_admits(request.cookies.get(COOKIE, ""))


def loopback_host(host: str | None) -> bool:
    """Whether a request's Host names this machine's loopback (localhost, 127.0.0.1,
    [::1]), with or without a port."""
    if not host:
        return False
    if host.startswith("["):  # [::1]:8790
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # 127.0.0.1:8790, localhost:8790
        name = host.partition(":")[0]
    else:  # no port, or a bare IPv6 address
        name = host
    return is_loopback(name)


def is_loopback(name: str) -> bool:
    """Whether a host name or address is this machine's loopback."""
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def middleware(door: Door) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if door.loopback_only and not loopback_host(request.host):
            # Without a token the dashboard listens on loopback only, but a web page
            # whose name re-resolves to 127.0.0.1 (DNS rebinding) is sent here by the
            # browser as its own origin, and may read the answer: it comes with its own
            # Host, which names no loopback.
            raise web.HTTPMisdirectedRequest(
                text="421: without a token the dashboard answers only to localhost\n"
            )
        if door.admits(request) or request.path == LOGIN or request.path.startswith(STATIC):
            return await handler(request)
        # A person in a browser goes to the form; a program is told what it lacks.
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
        raise web.HTTPUnauthorized(
            text="401: a dashboard token is required (Authorization: Bearer TOKEN)\n",
            headers={"WWW-Authenticate": 'Bearer realm="notifyhook dashboard"'},
        )

    return check


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only, never another host.

    Browsers (WHATWG URL parsing) drop tabs and newlines and read a backslash as a
    slash, so "/\t/evil.example" is "//evil.example", another host: a target with any
    of them, or any control character or space, is refused with the rest."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ch <= " " or ch == "\x7f" for ch in target)
    ):
        return "/"
    return target


def set_session(door: Door, request: web.Request, response: web.StreamResponse) -> None:
    response.set_cookie(
        COOKIE,
        door.session_value(int(time.time()) + SESSION_LIFETIME_S),
        # The browser keeps it through a restart and drops it once we would refuse it.
        max_age=SESSION_LIFETIME_S,
        httponly=True,
        samesite="Strict",
        # Behind a TLS proxy the request arrives as plain HTTP; the proxy says so.
        secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        path="/",
    )
