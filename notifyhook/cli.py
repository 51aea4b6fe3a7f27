"""The command line: thin wrappers over the store, the worker, the demo and the bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from notifyhook import __version__
from notifyhook.commands import register_all
from notifyhook.errors import (
    ConfigurationError,
    NotifyhookError,
    SchemaVersionError,
    UsageError,
)

if TYPE_CHECKING:
    from notifyhook.store import DatabaseError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Here, not at the top: `notifyhook --help` and a mistyped argument need neither
    # pydantic nor psycopg, which are most of the command line's start-up time.
    import asyncio

    from notifyhook import logs
    from notifyhook.settings import load_settings, warn_unknown_variables
    from notifyhook.store import DatabaseError

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
    parser = argparse.ArgumentParser(
        prog="notifyhook",
        description="Webhook delivery straight out of PostgreSQL. "
        "Settings come from NOTIFYHOOK_* environment variables (see systemd/notifyhook.env.example).",
    )
    parser.add_argument("--version", action="version", version=f"notifyhook {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    register_all(commands)
    return parser
