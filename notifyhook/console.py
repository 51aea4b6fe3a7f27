"""What the commands share: values kept off the command line, printing JSON, running a coroutine."""

from __future__ import annotations

import asyncio
import getpass
import json
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from notifyhook.errors import UsageError

STDIN = "-"
"""As an option's value or file, `-` reads standard input, as for most commands that read files."""


@dataclass(frozen=True, slots=True)
class Given:
    """An option whose value may hold a credential: given on the command line (`value`),
    as `-` (standard input), or in a file (`path`, its `--NAME-file` option)."""

    option: str
    value: str | None
    path: str | None

    @property
    def on_command_line(self) -> bool:
        """Whether the value itself is in argv, where every user of the host can read it
        (ps, /proc/PID/cmdline)."""
        return self.value is not None and self.value != STDIN


def read_given(*given: Given) -> list[str | None]:
    """Each option's value, read from standard input or its file when asked; surrounding
    whitespace (a file's or echo's trailing newline) stripped. Standard input can serve
    one option only."""
    readers = [g.option for g in given if STDIN in (g.value, g.path)]
    if len(readers) > 1:
        files = " or ".join(f"{option}-file" for option in readers)
        raise UsageError(
            f"{' and '.join(readers)} cannot both read standard input; give one with {files}"
        )
    return [_read(g) for g in given]


def _read(given: Given) -> str | None:
    if STDIN in (given.value, given.path):
        source, text = "standard input", _read_stdin(given.option)
    elif given.path is not None:
        source, text = given.path, _read_file(f"{given.option}-file", given.path)
    else:
        return given.value
    text = text.strip()
    if not text:
        named = f"{given.option} -" if given.value == STDIN else f"{given.option}-file"
        raise UsageError(f"{named}: {source} is empty")
    return text


def _read_stdin(option: str) -> str:
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError(f"{option} -: there is no standard input to read")
    if sys.stdin.isatty():
        # At a terminal: asked for, not echoed (nor left in the shell's history).
        return getpass.getpass(f"{option.removeprefix('--')} (not shown): ")
    return sys.stdin.read()


def _read_file(option: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{option}: {path} is not UTF-8 text") from None
    except OSError as error:
        raise UsageError(f"{option}: cannot read {path}: {error.strerror or error}") from None


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
