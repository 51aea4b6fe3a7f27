"""`notifyhook bench`: throughput, latency, idle cost, a noisy neighbour and history, measured."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from notifyhook.errors import UsageError

if TYPE_CHECKING:
    from notifyhook.tools.bench_context import Result, Size
    from notifyhook.tools.scenario import Server

SCENARIO_NAMES = (
    "backlog", "latency", "idle", "noisy", "ratelimit", "history", "endpoints", "peer"
)  # fmt: skip
"""The scenarios, in the order they run: written out here because every `notifyhook` command,
a worker's start included, builds the parser from this module, and should not import the
scenarios (and aiohttp) to do so. A test holds them equal to bench_scenarios.SCENARIOS."""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput, latency, idle cost, a noisy neighbour, history",
        description="Start a throwaway PostgreSQL (or, with NOTIFYHOOK_DATABASE_URL, databases of "
        "its own there), a receiver on 127.0.0.1 and real worker processes, and measure: a backlog "
        "drained by one and by N workers; COMMIT-to-request latency at 50/s and 500/s; the "
        "statements an idle worker runs; a fast endpoint's latency beside a slow one's backlog; "
        "the backlog again over a million rows of history. Every figure comes with the CPU "
        "used by the workers, PostgreSQL and the receiver, and the workers' peak memory.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_NAMES),
        help=f"comma-separated, from {', '.join(SCENARIO_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes for the second backlog run (2)"
    )
    parser.add_argument(
        "--size", type=float, default=1.0, help="scale every count and duration by this (1.0)"
    )
    parser.add_argument(
        "--small", action="store_true", help="a quick smoke run (backlog 500, history 10,000…)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=bench_command, standalone=True)


def bench_command(args: argparse.Namespace) -> int:
    # Imported here, not at the top, for the reason SCENARIO_NAMES is a literal.
    from notifyhook.console import run_async
    from notifyhook.settings import optional_database_url
    from notifyhook.tools.bench_context import SMALL, Size
    from notifyhook.tools.cluster import find_bindir

    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIO_NAMES))
    if unknown or not chosen:
        raise UsageError(
            f"unknown scenario {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(SCENARIO_NAMES)}"
        )
    if args.workers < 1 or args.size <= 0:
        raise UsageError("--workers must be at least 1 and --size positive")
    size = SMALL if args.small else Size().scaled(args.size)
    url = optional_database_url()
    if url is None:
        find_bindir()  # fail at once, naming what to install
    directory = Path(tempfile.mkdtemp(prefix="notifyhook-bench-"))
    try:
        report = run_async(
            _bench(url, chosen, size, args.workers, directory), sigterm_as_ctrl_c=True
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


async def _bench(
    url: str | None, chosen: Sequence[str], size: Size, workers: int, directory: Path
) -> dict[str, Any]:
    # Imported here for the reason bench_command gives.
    from notifyhook.tools.bench_context import Bench, receiver_paths
    from notifyhook.tools.bench_scenarios import SCENARIOS, ceiling
    from notifyhook.tools.receiver_process import ReceiverProcess
    from notifyhook.tools.scenario import Server

    _progress("starting PostgreSQL…" if url is None else "using NOTIFYHOOK_DATABASE_URL…")
    async with Server.open(url, "notifyhook_bench") as server:
        _progress(server.describe())
        receiver = ReceiverProcess(receiver_paths()).start()
        try:
            bench = Bench(server, receiver, directory, size, workers, _progress)
            results: list[Result] = [await ceiling(bench)]
            for name in SCENARIO_NAMES:
                if name in chosen:
                    _progress(f"{name}…")
                    results += await SCENARIOS[name](bench)
        finally:
            receiver.stop()
        return {
            "environment": _environment(server, size),
            "results": [_result_json(r) for r in results],
        }


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _environment(server: Server, size: Size) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": server.version,
        "server": "throwaway cluster (fsync on)" if server.cluster else "NOTIFYHOOK_DATABASE_URL",
        "sizes": asdict(size),
        "worker_settings": "defaults (CONCURRENCY 100, BATCH_SIZE 100, POLL_INTERVAL 5)",
    }


def _result_json(result: Result) -> dict[str, Any]:
    entry = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "usage"}
    entry["usage"] = asdict(result.usage) if result.usage is not None else None
    return entry


# -- the table -------------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "case",
    "result",
    "target",
    "worker CPU",
    "PostgreSQL CPU",
    "receiver CPU",
    "worker RSS",
)


def format_report(report: dict[str, Any]) -> str:
    env = report["environment"]
    rows = [_row(entry) for entry in report["results"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = [
        f"notifyhook bench: {env['cpus']} CPUs, PostgreSQL {env['postgresql']}, "
        f"{env['server']}, Python {env['python']}, workers with {env['worker_settings']}",
        "",
        " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines += [
        "",
        "CPU: seconds used during the measured stretch (and % of one core over it); PostgreSQL is "
        "every server process, exited ones included. RSS: the workers' peak resident memory.",
    ]
    notes = [f"  {e['scenario']} {e['case']}: {e['note']}" for e in report["results"] if e["note"]]
    return "\n".join(lines + (["", "Notes:", *notes] if notes else []))


def _row(entry: dict[str, Any]) -> list[str]:
    used = entry["usage"]

    def cpu(key: str) -> str:
        if used is None or used[key] is None:
            return "n/a"
        share = used[key] / used["wall_s"] * 100 if used["wall_s"] else 0.0
        return f"{used[key]:.2f}s ({share:.0f}%)"

    rss = entry["peak_rss_bytes"]
    return [
        entry["scenario"],
        entry["case"],
        entry["summary"],
        entry["target"],
        cpu("worker_cpu_s"),
        cpu("postgres_cpu_s"),
        cpu("receiver_cpu_s"),
        f"{rss / 2**20:.0f} MB" if rss else "",
    ]
