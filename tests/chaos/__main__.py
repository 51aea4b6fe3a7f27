"""`python -m tests.chaos [--long | --failover]`: a chaos run outside pytest, printing its summary."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
from pathlib import Path

from .checks import judge, report
from .plan import CI, FAILOVER, LONG
from .run import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--long", action="store_true", help="the long run (default: the CI run)")
    runs.add_argument(
        "--failover", action="store_true", help="the primary crashes, its standby is promoted"
    )
    parser.add_argument("--seconds", type=float, help="how long the producer enqueues")
    parser.add_argument("--rate", type=float, help="events per second")
    parser.add_argument("--workers", type=int, help="worker processes")
    parser.add_argument("--seed", type=int, help="seed of the kills and the event types")
    args = parser.parse_args()
    config = LONG if args.long else FAILOVER if args.failover else CI
    changes = {
        name: value
        for name in ("seconds", "rate", "workers", "seed")
        if (value := getattr(args, name)) is not None
    }
    config = dataclasses.replace(config, **changes)
    workdir = Path(tempfile.mkdtemp(prefix="notifyhook-chaos-"))
    # SIGTERM (`kill`, a CI job's timeout) as Ctrl-C: KeyboardInterrupt, so that run's
    # finally blocks kill the workers and stop the cluster. Python's default for SIGTERM
    # left both running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        observed = run(config, workdir)
    except KeyboardInterrupt:
        print(f"interrupted: workers and PostgreSQL stopped; worker logs: {workdir}")
        return 130
    verdict = judge(observed)
    print(report(verdict))
    print(f"worker logs: {workdir}")
    return 1 if verdict.failures else 0


if __name__ == "__main__":
    sys.exit(main())
