"""The dashboard's web application: read-only pages of the queue, endpoints and deliveries."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from notifyhook import __version__
from notifyhook.dashboard import auth, charts
from notifyhook.dashboard.data import Reader, open_reader
from notifyhook.store import DatabaseError

log = logging.getLogger("notifyhook.dashboard")

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    # Nothing but our own stylesheet and inline SVG markup: no script runs at all, so a
    # receiver's answer that slipped past escaping could still do nothing.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

DATABASE_URL = web.AppKey("database_url", str)
DOOR = web.AppKey("door", auth.Door)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


def build_app(
    database_url: str, token: str | None, *, loopback_only: bool = False
) -> web.Application:
    """`loopback_only`: listening on loopback without a token, so a request naming
    another host in its Host header is a DNS-rebinding page's (auth.middleware)."""
    door = auth.Door(token, loopback_only=loopback_only)
    app = web.Application(middlewares=[auth.middleware(door)])
    app[DATABASE_URL] = database_url
    app[DOOR] = door
    app[TEMPLATES] = templates()
    app.on_response_prepare.append(_add_security_headers)
    app.add_routes(
        [
            web.get("/", overview),
            web.get(r"/endpoints/{endpoint_id:\d+}", endpoint_page),
            web.get(r"/deliveries/{delivery_id:\d+}", delivery_page),
            web.get("/dead-letters", dead_letters_page),
            web.get("/login", login_form),
            web.post("/login", login),
            web.post("/logout", logout),
            web.static("/static", HERE / "static"),
        ]
    )
    return app


def templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        # Every value is escaped: names, errors and excerpts come from tenants and receivers.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(when=_when, ms=_ms, percent=_percent, age=_age, seconds=_seconds)
    environment.globals.update(version=__version__)
    return environment


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def render(request: web.Request, name: str, status: int = 200, **values: Any) -> web.Response:
    page = request.app[TEMPLATES].get_template(name)
    values.setdefault("locked", request.app[DOOR].locked)
    return web.Response(text=page.render(**values), status=status, content_type="text/html")


def _tenant(request: web.Request) -> str | None:
    return request.query.get("tenant") or None


async def overview(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    async with _reader(request) as reader:
        queue = await reader.queue()
        tenants = await reader.tenants()
        endpoints = await reader.endpoints(tenant_id=tenant)
        chart = charts.per_minute(await reader.minute_counts())
    return render(
        request,
        "overview.html",
        queue=queue,
        tenants=tenants,
        tenant=tenant,
        endpoints=endpoints,
        chart=chart,
    )


async def endpoint_page(request: web.Request) -> web.Response:
    endpoint_id = _row_id(request, "endpoint_id")
    async with _reader(request) as reader:
        found = await reader.endpoints(endpoint_id=endpoint_id)
        if not found:
            raise _not_found(request, f"no endpoint {endpoint_id}")
        attempts = await reader.endpoint_attempts(endpoint_id)
        chart = charts.per_minute(await reader.minute_counts(endpoint_id))
        dead = await reader.dead_letters(endpoint_id=endpoint_id, limit=20)
    return render(
        request, "endpoint.html", endpoint=found[0], attempts=attempts, chart=chart, dead=dead
    )


async def delivery_page(request: web.Request) -> web.Response:
    delivery_id = _row_id(request, "delivery_id")
    async with _reader(request) as reader:
        delivery = await reader.delivery(delivery_id)
        if delivery is None:
            raise _not_found(request, f"no delivery {delivery_id}")
        # A claim under way counts an attempt its row does not have yet.
        counted = delivery.attempts - (delivery.status == "processing")
        attempts = await reader.delivery_attempts(delivery_id, counted)
    return render(request, "delivery.html", delivery=delivery, attempts=attempts)


async def dead_letters_page(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    async with _reader(request) as reader:
        tenants = await reader.tenants()
        dead = await reader.dead_letters(tenant_id=tenant, limit=100)
    return render(request, "dead_letters.html", tenants=tenants, tenant=tenant, dead=dead)


async def login_form(request: web.Request) -> web.Response:
    target = auth.safe_next(request.query.get("next"))
    return render(request, "login.html", target=target, wrong=False, locked=False)


async def login(request: web.Request) -> web.Response:
    door = request.app[DOOR]
    try:
        form = await request.post()
    except UnicodeDecodeError:
        # A browser sends the form as UTF-8; anything else is a wrong request, not a bug.
        raise web.HTTPBadRequest(text="the login form is not UTF-8") from None
    target = auth.safe_next(str(form.get("next", "/")))
    if not door.locked:
        raise web.HTTPSeeOther(target)
    if not door.token_matches(str(form.get("token", ""))):
        return render(request, "login.html", status=401, target=target, wrong=True, locked=False)
    response = web.HTTPSeeOther(target)
    auth.set_session(door, request, response)
    raise response


async def logout(request: web.Request) -> web.Response:
    request.app[DOOR].end_session(request.cookies.get(auth.COOKIE, ""))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(auth.COOKIE, path="/")
    raise response


@asynccontextmanager
async def _reader(request: web.Request) -> AsyncIterator[Reader]:
    """One read-only connection per page; a database that cannot be read is a 503 page."""
    try:
        async with open_reader(request.app[DATABASE_URL]) as reader:
            yield reader
    except DatabaseError as error:
        # The page says no more than that: libpq's text names hosts and ports.
        log.error("dashboard: the database could not be read: %s", error)
        page = render(request, "error.html", status=503, message="The database could not be read.")
        raise web.HTTPServiceUnavailable(text=page.text, content_type="text/html") from None


def _row_id(request: web.Request, name: str) -> int:
    """A bigint id from the path; one too large for bigint is simply not there."""
    value = int(request.match_info[name])
    if value > 2**63 - 1:
        raise _not_found(request, f"no {name.removesuffix('_id')} {value}")
    return value


def _not_found(request: web.Request, message: str) -> web.HTTPException:
    page = render(request, "error.html", status=404, message=message)
    return web.HTTPNotFound(text=page.text, content_type="text/html")


# -- filters -----------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float | None) -> str:
    """An age the database counted (now() - t): this host's clock may be off."""
    if seconds is None:
        return "never"
    return f"{_seconds(max(seconds, 0))} ago"


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.0f} h"
    return f"{value / 86400:.0f} d"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f}%"
