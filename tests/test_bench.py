"""`notifyhook bench --small` as a user runs it: every scenario runs, the figures hang together,
nothing is left behind. Figures are reported, never asserted against a time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import psycopg
import pytest
from conftest import assert_cluster_gone, interrupted, run_cli

from notifyhook.tools.bench import SCENARIO_NAMES, format_report
from notifyhook.tools.bench_scenarios import SCENARIOS


def run_bench(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "notifyhook", "bench", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


def bench_databases(admin_url: str) -> list[str]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'notifyhook_bench_%'"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.slow
def test_small_bench_reports_every_scenario_and_leaves_nothing(server):
    before = bench_databases(server.admin_url)
    result = run_bench("--small", "--json", NOTIFYHOOK_DATABASE_URL=server.admin_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert bench_databases(server.admin_url) == before

    results = {(r["scenario"], r["case"]): r for r in report["results"]}
    scenarios = [r["scenario"] for r in report["results"]]
    assert scenarios == ["receiver", "backlog", "backlog", "latency", "latency", "idle", "noisy",
                         "ratelimit", "history", "endpoints", "endpoints", "endpoints",
                         "endpoints", "peer"]  # fmt: skip

    ceiling = results["receiver", "ceiling"]
    assert ceiling["figures"]["verified"] == report["environment"]["sizes"]["ceiling"]

    for case in ("1 worker", "2 workers"):
        backlog = results["backlog", case]
        assert backlog["figures"]["deliveries"] == 500
        assert backlog["figures"]["deliveries_per_s"] > 0
        assert backlog["usage"]["worker_cpu_s"] > 0
        assert backlog["usage"]["postgres_cpu_s"] > 0
        assert backlog["peak_rss_bytes"] > 0
        assert "failed verification" not in backlog["note"]

    for case in ("50/s", "500/s"):
        latency = results["latency", case]["figures"]
        # Ordered and measured; not "p50 > 0": the producer reads its clock when its
        # event loop resumes after the COMMIT, and with the suite's other processes on
        # the same two cores that came later than the request's arrival for most of the
        # smoke run's few events (p50 -4.2 ms, twice in a full run, never alone).
        assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert latency["max_ms"] > 0

    idle = next(r for r in report["results"] if r["scenario"] == "idle")
    assert idle["figures"]["statements_per_min"] >= 0
    assert idle["note"]  # says what was counted

    noisy = next(r for r in report["results"] if r["scenario"] == "noisy")
    assert noisy["figures"]["p99_ms"] > 0
    assert noisy["figures"]["slow_served_per_s"] > 0

    limited = next(r for r in report["results"] if r["scenario"] == "ratelimit")["figures"]
    # A count, not a time: the bucket lets 20 through at once, then 20 a second.
    # The bucket admits at most 40 claims in any second (20 of burst, 20 a second); the
    # receiver's clock sees the requests a few ms after their claims, unevenly on a
    # loaded machine, which can bring one more into a window it measures.
    assert 0 < limited["busiest_second"] <= 41
    assert limited["span_s"] > 0

    spread = [r for r in report["results"] if r["scenario"] == "endpoints"]
    assert [r["case"] for r in spread] == [
        "10 endpoints",
        "1,000 endpoints",
        "10,000 endpoints",
        "10 endpoints, again",
    ]
    for result in spread:
        assert result["figures"]["deliveries"] == 2_000
        # Every claim the worker made is in its histogram, and took some time.
        assert result["figures"]["claims"] >= 2_000 / 100
        assert 0 < result["figures"]["claim_p50_ms"] <= result["figures"]["claim_p99_ms"]
        assert 1 <= result["figures"]["rows_per_claim"] <= 100
    # The peer's rate is its claims' rows over their time: both reported.
    peer = next(r for r in report["results"] if r["scenario"] == "peer")
    # Rounded: rows_per_claim is a quotient (500 / 19 * 19 is 499.99999999999994).
    rows_claimed = round(peer["figures"]["claims"] * peer["figures"]["rows_per_claim"])
    assert rows_claimed >= peer["figures"]["deliveries"]
    assert 0 < peer["figures"]["claim_p50_ms"] <= peer["figures"]["claim_p99_ms"]
    # Compared with the mean of the 10-endpoint runs before and after them.
    assert spread[1]["figures"]["vs_10_endpoints"] > 0
    assert spread[2]["figures"]["vs_10_endpoints"] > 0
    history = next(r for r in report["results"] if r["scenario"] == "history")
    assert history["figures"]["deliveries"] == 500
    assert history["figures"]["vs_empty"] > 0
    assert history["figures"]["empty_deliveries_per_s"] > 0
    assert "10,000 delivered rows of history" in history["note"]

    table = format_report(report)
    assert re.search(r"^backlog +\| 2 workers", table, re.MULTILINE)
    assert "PostgreSQL CPU" in table


@pytest.mark.slow
def test_sigterm_stops_the_bench_and_removes_its_postgresql():
    # SIGTERM is what `kill`, a CI job's timeout and systemd send; Python's default for it
    # left the throwaway cluster running.
    status, progress, _ = interrupted(
        ["notifyhook", "bench", "--small", "--scenarios", "backlog"],
        "bench: backlog",
        signal.SIGTERM,
        watch="stderr",
    )
    assert status == 130, progress
    assert_cluster_gone(progress)


@pytest.mark.slow
def test_bench_with_its_own_postgresql_cleans_up():
    result = run_bench("--small", "--scenarios", "backlog,idle", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "deliveries/s" in result.stdout
    assert "pg_stat_statements: " in result.stdout  # loaded into the throwaway cluster
    directory = result.stderr.split("cluster in ", 1)[1].split()[0]
    assert not os.path.exists(directory)


def test_unknown_scenario_is_a_usage_error():
    result = run_cli(None, "bench", "--scenarios", "backlog,warp")
    assert result.returncode == 2
    assert "unknown scenario warp" in result.stderr


def test_the_parser_names_every_scenario_in_order():
    assert tuple(SCENARIOS) == SCENARIO_NAMES


def test_building_the_parser_imports_no_scenario():
    # Every command, a worker's start included, builds the whole parser.
    heavy = ("notifyhook.tools.bench_context", "notifyhook.tools.bench_scenarios", "aiohttp")
    code = (
        "import sys\n"
        "from notifyhook.cli import build_parser\n"
        "build_parser()\n"
        f"print([name for name in {heavy!r} if name in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
