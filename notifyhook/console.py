"""What the commands share: printing JSON and running a coroutine on the worker's loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where it is installed: the worker's loop is its hottest code."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


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
