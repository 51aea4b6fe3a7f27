"""The tools' command-line entry points, light enough for every `notifyhook` start.

The parser is built on each command, a worker's start included: it registers the demo here
without importing the demo itself (PostgreSQL cluster, receiver, rich), which loads when
the command runs. The bench's register() is in notifyhook/tools/bench.py, light already.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="see notifyhook work: a throwaway PostgreSQL, a receiver, a worker, live",
        description="Start a throwaway PostgreSQL (or, with NOTIFYHOOK_DATABASE_URL, a database of "
        "its own there), a receiver that verifies every signature and fails some requests on "
        "purpose, and a worker; enqueue events with plain SQL INSERTs; show the deliveries live; "
        "print a summary; remove everything.",
    )
    parser.add_argument(
        "--events", type=int, default=300, help="events to enqueue (default 300, at least 10)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds over which to trickle them in (default 10)",
    )
    parser.set_defaults(handler=demo_command, standalone=True)


def demo_command(args: argparse.Namespace) -> int:
    from notifyhook.tools import demo

    return demo.demo_command(args)
