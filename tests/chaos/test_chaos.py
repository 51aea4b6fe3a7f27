"""The CI chaos run: about a minute of kills, restarts, cut connections and bad receivers."""

from __future__ import annotations

import signal
import socket

import pytest
from conftest import SUMMARY, assert_cluster_gone, cluster_place, interrupted

from .checks import judge, report
from .plan import CI
from .run import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_nothing_is_lost_under_faults(tmp_path, record_property):
    timeline: list[str] = []
    verdict = judge(run(CI, tmp_path, say=timeline.append))
    summary = report(verdict)
    # Shown at the end of the run, pass or fail, under xdist too: the numbers are the
    # point of the run (tests/conftest.py's pytest_terminal_summary prints it).
    record_property(SUMMARY, summary)
    assert not verdict.failures, "\n".join([*timeline, summary])


def test_sigterm_stops_the_workers_and_postgresql():
    # SIGTERM is what `kill` and a CI job's timeout send: the run's workers and cluster
    # were left running.
    status, output, errors = interrupted(
        ["tests.chaos"], "chaos[ci]: PostgreSQL at", signal.SIGTERM
    )
    assert status == 130, output + errors
    assert "interrupted: workers and PostgreSQL stopped" in output
    assert_cluster_gone(output)
    _, port = cluster_place(output)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
