"""`notifyhook demo` as a user runs it: the real command, its own PostgreSQL or a given one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import assert_cluster_gone, interrupted, run_cli, scalar

SMALL = ["--events", "40", "--duration", "2"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
    env.update(extra)
    return env


def run_demo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyhook", "demo", *args],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def figure(output: str, label: str) -> int:
    match = re.search(rf"^  {label}\s+(\d+)", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return int(match.group(1))


def assert_consistent_summary(output: str, events: int) -> None:
    assert figure(output, "events enqueued") == events
    deliveries = figure(output, "deliveries")
    delivered = figure(output, "delivered")
    dead = figure(output, "dead letters")
    assert deliveries > events  # events fan out to several endpoints
    assert delivered + dead == deliveries
    assert dead >= 1  # the broken and the retired endpoints
    verified = re.search(r"signatures verified\s+(\d+) of (\d+) requests", output)
    assert verified, output
    assert int(verified.group(1)) == int(verified.group(2)) >= deliveries
    assert figure(output, "HTTP attempts") == int(verified.group(2))
    assert re.search(r"latency, COMMIT to first request: p50 [\d.]+ ms, p95 [\d.]+ ms", output)
    assert "NOT FINISHED" not in output
    # The retired endpoint's 410 alone alerts twice: a dead letter and a disabled endpoint.
    alerts = re.search(r"alerts \(NOTIFY\)\s+\d+ \((\d+) dead, (\d+) disabled\)", output)
    assert alerts, output
    assert int(alerts.group(1)) >= 1
    assert int(alerts.group(2)) == 1
    assert "select * from notifyhook.queue_stats" in output


def pids(output: str) -> list[int]:
    """The worker's and the receiver's."""
    found = re.findall(r"worker started \(pid (\d+)|receiver on \S+ \(pid (\d+)\)", output)
    numbers = [int(a or b) for a, b in found]
    assert len(numbers) == 2, output
    return numbers


def assert_gone(pid: int) -> None:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return
    assert state == "Z", f"process {pid} still running"


@pytest.mark.slow
def test_demo_starts_its_own_postgresql_and_removes_it():
    result = run_demo(*SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_consistent_summary(result.stdout, 40)
    assert_cluster_gone(result.stdout)
    for pid in pids(result.stdout):
        assert_gone(pid)
    assert "PostgreSQL cluster stopped and its directory removed" in result.stdout
    # Not a terminal: progress comes as plain lines, no control sequences.
    assert "\x1b[" not in result.stdout
    assert re.search(r"^  elapsed [\d.]+s  events \d+", result.stdout, re.MULTILINE)


def demo_databases(admin_url: str) -> list[str]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'notifyhook_demo_%'"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.slow
def test_demo_in_a_given_server_works_in_a_database_of_its_own(server):
    before = demo_databases(server.admin_url)
    result = run_demo(*SMALL, NOTIFYHOOK_DATABASE_URL=server.admin_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_consistent_summary(result.stdout, 40)
    assert "demo database dropped" in result.stdout
    assert demo_databases(server.admin_url) == before
    with psycopg.connect(server.admin_url) as conn:
        # Nothing was made in the database the URL names.
        assert scalar(conn, "SELECT to_regnamespace('notifyhook') IS NULL")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_removes_everything_the_demo_started(signum):
    # SIGTERM is what `kill`, a CI job's timeout and systemd send.
    status, output, errors = interrupted(
        ["notifyhook", "demo", "--events", "200", "--duration", "30"], "Enqueueing", signum
    )
    assert status == 130, output + errors
    assert "Interrupted" in output
    assert_cluster_gone(output)
    for pid in pids(output):
        assert_gone(pid)


def test_bad_arguments_exit_2():
    result = run_cli(None, "demo", "--events", "3")
    assert result.returncode == 2
    assert result.stderr.startswith("notifyhook: --events must be at least 10")
