"""The layering the import-linter contracts state, seen from a running interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# httpx imports its own command-line tool (httpx._main: rich, pygments, click) whenever all
# three are installed, as they are here with the dev tools; not notifyhook's doing, so the
# check runs as if httpx's CLI were absent (an import of httpx._main then fails, as httpx expects).
LOADED = (
    "import json, sys; sys.modules['httpx._main'] = None; import {module}; "
    "print(json.dumps(sorted(n for n in sys.modules if n.startswith(('notifyhook', 'rich')))))"
)


def loaded_after_importing(module: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    names: list[str] = json.loads(done.stdout)
    return names


@pytest.mark.parametrize("module", ["notifyhook.worker", "notifyhook.cli", "notifyhook.commands"])
def test_the_core_loads_no_tools_and_no_rich(module):
    names = loaded_after_importing(module)
    assert module in names
    assert [n for n in names if n.startswith(("notifyhook.tools", "rich"))] == []


HEAVY = ("psycopg", "psycopg_pool", "pydantic", "aiohttp", "httpx", "sentry_sdk", "rich", "jinja2")

PARSER = (
    "import json, sys; from notifyhook.cli import build_parser; build_parser(); "
    "print(json.dumps(sorted(sys.modules)))"
)


def test_building_the_command_line_parser_loads_no_heavy_library():
    """`notifyhook --help` builds the parser only: it must not pay for what the commands
    import when they run (the database driver, settings, HTTP)."""
    done = subprocess.run(
        [sys.executable, "-c", PARSER], capture_output=True, text=True, check=True, timeout=60
    )
    names = json.loads(done.stdout)
    assert sorted({n.split(".")[0] for n in names} & set(HEAVY)) == []
    # Of the tools, only the entry points that declare the demo's and bench's arguments.
    assert [n for n in names if n.startswith("notifyhook.tools.")] == [
        "notifyhook.tools.bench",
        "notifyhook.tools.entry",
    ]
