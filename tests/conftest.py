"""The test harness: a throwaway PostgreSQL, a fresh database per test, real workers and receivers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import psycopg
import pytest
from databases import Databases, migrate_database

from notifyhook import cli
from notifyhook.tools import cluster
from notifyhook.tools.cluster import Cluster, find_bindir, memory_directory
from notifyhook.tools.receiver import Receiver
from notifyhook.tools.workers import WorkerProcess, WorkerThread, notifyhook_environment


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what} (last value: {value!r})"
            )
        time.sleep(0.02)


class Server(cluster.Server):
    """The PostgreSQL the suite runs against: our own cluster (in RAM where there is
    /dev/shm), or NOTIFYHOOK_TEST_DATABASE_URL; and the fresh databases made in it."""

    def __init__(self) -> None:
        given = os.environ.get("NOTIFYHOOK_TEST_DATABASE_URL") or None
        super().__init__(given, fsync=False, max_connections=300, directory=memory_directory())
        self.start()
        self.databases = Databases(self.admin_url)

    def stop(self) -> None:
        try:
            self.databases.stop()
        finally:
            super().stop()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    running = Server()
    try:
        running.databases.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A migrated PostgreSQL of the test's own, which it may stop, restart or crash."""
    with Cluster(fsync=False, directory=memory_directory()) as cluster:
        migrate_database(cluster.url())
        yield cluster


@pytest.fixture
def database_url(server: Server) -> Iterator[str]:
    """A fresh, migrated database of its own for each test."""
    with server.databases.fresh() as url:
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database, for arranging and checking."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def environment(database_url: str | None, /, **settings: str) -> dict[str, str]:
    """A `notifyhook` command's environment: no NOTIFYHOOK_* variable of ours, these
    settings, and buffered output, as in a terminal pipeline or a systemd unit."""
    env = notifyhook_environment(database_url, settings)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run_cli(
    database_url: str | None,
    /,
    *args: str,
    check: bool = False,
    process: bool = False,
    stdin: str = "",
    **settings: str,
) -> subprocess.CompletedProcess[str]:
    """`notifyhook ARGS…` with these settings: its exit code, stdout and stderr.

    In this process by default: `notifyhook.cli.main`, the function the console script
    calls, with the same environment a process would have (`environment`), its output
    captured and what it sets up undone: a process would spend most of its time
    importing notifyhook (docs/testing.md). `process=True` runs one, for what only a
    process shows (the exit status the interpreter passes on, buffering, signals). `check`: fail unless it exits 0.
    `stdin`: what the command reads on its standard input (nothing by default)."""
    if process:
        result = subprocess.run(
            [sys.executable, "-m", "notifyhook", *args],
            env=environment(database_url, **settings),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    else:
        result = _run_in_process(environment(database_url, **settings), list(args), stdin)
    if check:
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def _run_in_process(
    env: dict[str, str], args: list[str], stdin: str
) -> subprocess.CompletedProcess[str]:
    # A worker would run until stopped, taking over this process's signals.
    assert args[:1] != ["worker"] or "--help" in args, "a worker: start_worker or run_worker"
    stdout, stderr = _ThisThreadOnly(sys.stdout), _ThisThreadOnly(sys.stderr)
    with (
        _notifyhook_variables(env),
        _logging_restored(),
        _stdin(stdin),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code = cli.main(args)
        except SystemExit as exit:  # argparse's --help and usage errors
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(
        ["notifyhook", *args], code, stdout.getvalue(), stderr.getvalue()
    )


class _ThisThreadOnly(io.StringIO):
    """Captures what the calling thread writes. What other threads write meanwhile goes
    where it went before: an in-process worker's log lines reach the handlers the command
    sets up while it runs, and are not the command's output."""

    def __init__(self, elsewhere: TextIO) -> None:
        super().__init__()
        self._owner = threading.get_ident()
        self._elsewhere = elsewhere

    def write(self, text: str) -> int:
        if threading.get_ident() == self._owner:
            return super().write(text)
        return self._elsewhere.write(text)


@contextlib.contextmanager
def _stdin(text: str) -> Iterator[None]:
    """sys.stdin reads `text` for the block, as a pipe would (never a terminal)."""
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def _notifyhook_variables(env: dict[str, str]) -> Iterator[None]:
    """os.environ's NOTIFYHOOK_* variables as in `env` for the block. Only those change:
    other threads (workers, libpq) may read the environment meanwhile."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("NOTIFYHOOK_")}
    wanted = {k: v for k, v in env.items() if k.startswith("NOTIFYHOOK_")}
    try:
        for key in saved.keys() - wanted.keys():
            del os.environ[key]
        os.environ.update(wanted)
        yield
    finally:
        for key in wanted.keys() - saved.keys():
            os.environ.pop(key, None)
        os.environ.update(saved)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Undo what `logs.configure` does to the root logger and the libraries' loggers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)


def psql_binary() -> str:
    return str(find_bindir() / "psql")


def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL through the real psql command line, as a program in any language would."""
    return subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start_in_thread()
    yield running
    running.stop_thread()


def interrupted(
    args: list[str], until: str, signum: int, *, watch: str = "stdout"
) -> tuple[int, str, str]:
    """Run `python -m *args` (no NOTIFYHOOK_ variables), send `signum` once a line of its
    `watch` stream starts with `until`: (exit status, that stream's whole text, the
    other stream's)."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        watched = process.stdout if watch == "stdout" else process.stderr
        assert watched is not None
        for line in watched:
            seen.append(line)
            if line.startswith(until):
                break
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if watch == "stdout":
        return process.returncode, "".join(seen) + out, err
    return process.returncode, "".join(seen) + err, out


def cluster_place(output: str) -> tuple[Path, int]:
    """The throwaway cluster's directory and port, from the progress lines of a demo, a
    bench or a chaos run ("cluster in DIRECTORY on port PORT")."""
    match = re.search(r"cluster in (\S+) on port (\d+)", output)
    assert match, output
    return Path(match.group(1)), int(match.group(2))


def assert_cluster_gone(output: str) -> None:
    """The cluster named in `output` is stopped and its directory removed."""
    directory, _ = cluster_place(output)
    assert not directory.exists()
    assert processes_mentioning(str(directory)) == []


def processes_mentioning(text: str) -> list[int]:
    """The processes whose command line holds `text` (a cluster's directory: its server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def add_endpoint(
    conn: psycopg.Connection[Any], tenant: str, name: str, url: str, **columns: Any
) -> int:
    """Insert an endpoint with plain SQL; returns its id."""
    names = ["tenant_id", "name", "url", *columns]
    values = [tenant, name, url, *columns.values()]
    placeholders = ", ".join(["%s"] * len(values))
    return int(
        scalar(
            conn,
            f"INSERT INTO notifyhook.endpoints ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
            values,
        )
    )


WORKER_DEFAULTS = {
    "allow_private_networks": "true",
    "poll_interval": "0.5",
    "retry_schedule": "0.2,0.4",
    "jitter": "0",
    "lease": "10",
    "http_timeout": "2",
    "shutdown_grace": "5",
    "log_level": "DEBUG",
}
"""Settings of the tests' workers, in process or not: short retries, a short poll."""


@pytest.fixture
def start_worker(database_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `notifyhook worker` processes on the test's database; all are killed at the end.

    For what only a process shows: signals, exit codes, its log, its command line. The
    worker's behaviour is tested in process (`run_worker`)."""
    started: list[WorkerProcess] = []

    def start(url: str | None = None, **settings: str) -> WorkerProcess:
        worker_id = settings.pop("worker_id", f"test-worker-{len(started) + 1}")
        worker = WorkerProcess(
            url or database_url, worker_id, tmp_path, {**WORKER_DEFAULTS, **settings}
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def run_worker(database_url: str) -> Iterator[Callable[..., WorkerThread]]:
    """Start Workers in this process on the test's database; all are killed at the end
    (and a worker that failed fails the test)."""
    started: list[WorkerThread] = []

    def start(url: str | None = None, **settings: str) -> WorkerThread:
        worker_id = settings.pop("worker_id", f"test-worker-{len(started) + 1}")
        worker = WorkerThread(url or database_url, worker_id, {**WORKER_DEFAULTS, **settings})
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill()


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI job's timeout, `timeout`, kill) ends the run as Ctrl-C does, so that
    # the session's fixtures stop the PostgreSQL servers they started; by default it
    # ended the process at once and left them running (six found after one session).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


SUMMARY = "summary"
"""A test's `record_property(SUMMARY, text)`: printed at the end of the run. The
property travels with the test's report, so an xdist process's summary reaches the
terminal, where a print of the process's own is dropped."""


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for outcome in ("passed", "failed"):
        for report in terminalreporter.getreports(outcome):
            for name, text in report.user_properties:
                if name == SUMMARY:
                    terminalreporter.write_sep("-", f"{report.nodeid} ({outcome})")
                    terminalreporter.write_line(text)
