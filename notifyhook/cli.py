"""The command line: thin wrappers over the store, the worker, the demo and the bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from notifyhook import __version__, logs
from notifyhook.errors import ConfigurationError, NotifyhookError, SchemaVersionError
from notifyhook.settings import Settings, load_settings, warn_unknown_variables
from notifyhook.store import DatabaseError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace, Settings], Any]


class UsageError(NotifyhookError):
    """The command line asks for something that cannot be done as asked (exit 2)."""


class CommandError(NotifyhookError):
    """The command was well formed but could not do its work: no such row, a lock held (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "standalone", False):
            # demo and bench may start their own PostgreSQL, so they read the
            # settings themselves once they know the database.
            result = args.handler(args)
        else:
            # A command's --database-url (stats on a replica) stands above the environment.
            given_url = getattr(args, "database_url", None)
            settings = load_settings(**({"database_url": given_url} if given_url else {}))
            logs.configure(settings.log_format, settings.log_level)
            warn_unknown_variables()  # once logs go where the operator looks
            result = args.handler(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or EXIT_OK)
    except (ConfigurationError, SchemaVersionError, UsageError) as error:
        return _fail(error, EXIT_USAGE)
    except DatabaseError as error:
        return _fail(error, EXIT_FAILURE, _database_message(error))
    except (NotifyhookError, OSError) as error:
        return _fail(error, EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130


def _fail(error: BaseException, code: int, text: str | None = None) -> int:
    message = " ".join((text or str(error)).split()) or type(error).__name__
    print(f"notifyhook: {message}", file=sys.stderr)
    return code


def _database_message(error: DatabaseError) -> str:
    """The server's message and detail, without the CONTEXT of PL/pgSQL internals."""
    primary = error.diag.message_primary
    if not primary:
        return str(error)  # a connection error: libpq's own text
    detail = error.diag.message_detail
    return f"{primary} ({detail})" if detail else primary


def build_parser() -> argparse.ArgumentParser:
    from notifyhook.commands import register_all

    parser = argparse.ArgumentParser(
        prog="notifyhook",
        description="Webhook delivery straight out of PostgreSQL. "
        "Settings come from NOTIFYHOOK_* environment variables (see systemd/notifyhook.env.example).",
    )
    parser.add_argument("--version", action="version", version=f"notifyhook {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    register_all(commands)
    return parser


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
