"""Serve the dashboard until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from notifyhook.dashboard.app import build_app
from notifyhook.dashboard.auth import is_loopback
from notifyhook.dashboard.data import SESSION_SETTINGS
from notifyhook.errors import ConfigurationError, SchemaVersionError
from notifyhook.store import connect, read_only, read_schema_version

log = logging.getLogger("notifyhook.dashboard")

TOKEN_VARIABLE = "NOTIFYHOOK_DASHBOARD_TOKEN"
MIN_TOKEN_LENGTH = 16


def token_from_environment() -> str | None:
    """NOTIFYHOOK_DASHBOARD_TOKEN, or None when unset or empty (as for every setting)."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"{TOKEN_VARIABLE} must be at least {MIN_TOKEN_LENGTH} characters long "
            "(e.g. the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


async def serve(database_url: str, host: str, port: int, token: str | None) -> None:
    """Check the database once, then answer until a signal; prints the address it serves."""
    await _check_schema(database_url)
    if token is None and not is_loopback(host):
        log.warning(
            "dashboard: listening on %s without %s: anyone who reaches it can read it",
            host,
            TOKEN_VARIABLE,
        )
    app = build_app(database_url, token, loopback_only=is_loopback(host))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        print(f"notifyhook dashboard on http://{shown}:{bound_port}/", flush=True)
        await _until_signal()
    finally:
        await runner.cleanup()


async def _check_schema(database_url: str) -> None:
    async with connect(read_only(database_url, **SESSION_SETTINGS)) as conn:
        version = await read_schema_version(conn)
    if version is None:
        raise SchemaVersionError(
            "the database has no notifyhook schema: run `notifyhook migrate` first"
        )


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
