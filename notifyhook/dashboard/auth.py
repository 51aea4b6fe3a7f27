"""The dashboard's door: a bearer token, or a login form that sets an HttpOnly cookie.

The cookie holds an HMAC of the token, not the token: a copy of the browser's cookie
store does not hand over what unlocks the command line's `Authorization` too. Every
comparison is in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

COOKIE = "notifyhook_dashboard"
LOGIN = "/login"
STATIC = "/static/"
"""Reachable without the token: the login form and its stylesheet."""


class Door:
    """Checks requests against the token; `None` lets everyone in (bound to loopback)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    @property
    def locked(self) -> bool:
        return self.token is not None

    def session_value(self) -> str:
        assert self.token is not None
        return hmac.new(
            self.token.encode(), b"notifyhook dashboard session", hashlib.sha256
        ).hexdigest()

    def token_matches(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

    def admits(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session_value().encode())


def middleware(door: Door) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
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
        door.session_value(),
        httponly=True,
        samesite="Strict",
        # Behind a TLS proxy the request arrives as plain HTTP; the proxy says so.
        secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        path="/",
    )
