"""What the commands share: printing JSON and running a coroutine on the worker's loop."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Coroutine
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any


def run_async(coroutine: Coroutine[Any, Any, Any], *, sigterm_as_ctrl_c: bool = False) -> Any:
    """Run on uvloop where it is installed: the worker's loop is its hottest code.

    `sigterm_as_ctrl_c`: SIGTERM does what Ctrl-C does (see `_sigterm_as_ctrl_c`), for
    commands that start servers of their own and remove them when they end.
    """
    if sigterm_as_ctrl_c:
        coroutine = _sigterm_as_ctrl_c(coroutine)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _sigterm_as_ctrl_c(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Await `coroutine` with SIGTERM handled as asyncio's runner handles Ctrl-C: the main
    task is cancelled, so that its `finally` blocks stop what it started, then the
    command exits with 130. Python's default for SIGTERM is to die on the spot: a demo
    or bench stopped by `kill`, a CI job's timeout or systemd left its PostgreSQL
    cluster running, with its directory, under the postgres user."""
    # The runner installed its Ctrl-C handler (bound to the main task) before running us.
    previous = signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    try:
        return await coroutine
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_value))


def _json_value(value: Any) -> Any:
    """What json cannot encode by itself: numeric columns stay numbers, times are ISO 8601."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)
