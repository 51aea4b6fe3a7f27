"""Workers for the tests, the demo, the bench and the chaos run: real processes, or one in-process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from notifyhook.errors import NotifyhookError
from notifyhook.metrics import Metrics
from notifyhook.settings import Settings
from notifyhook.tools import usage
from notifyhook.worker import Worker, open_worker

log = logging.getLogger("notifyhook.tools.workers")


class WorkerError(NotifyhookError):
    """A worker of the harness died or was not ready in time."""


def notifyhook_environment(url: str | None, settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its NOTIFYHOOK_* variables, then the database
    when given, then `settings` (names with or without the prefix, any case)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
    if url is not None:
        env["NOTIFYHOOK_DATABASE_URL"] = url
    for key, value in settings.items():
        env[f"NOTIFYHOOK_{key.upper().removeprefix('NOTIFYHOOK_')}"] = str(value)
    return env


def worker_environment(url: str, worker_id: str, settings: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: `notifyhook_environment` and its worker id."""
    return {**notifyhook_environment(url, settings), "NOTIFYHOOK_WORKER_ID": worker_id}


class WorkerProcess:
    """A real `notifyhook worker` process; its log goes to a file.

    With `ready_socket`, it reports READY over a notify socket of ours exactly as it
    would to systemd, and `wait_ready` waits for that datagram.
    """

    def __init__(
        self,
        url: str,
        worker_id: str,
        directory: Path,
        settings: Mapping[str, str],
        *,
        ready_socket: bool = False,
        own_session: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.log_path = directory / f"{worker_id}.log"
        self.exit_code: int | None = None
        self._asked_to_stop = False
        env = worker_environment(url, worker_id, settings)
        self._socket: socket.socket | None = None
        self._socket_path = directory / f"{worker_id}.sock"
        if ready_socket:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.bind(str(self._socket_path))
            self._socket.setblocking(False)
            env["NOTIFY_SOCKET"] = str(self._socket_path)
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifyhook", "worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for the demo is the demo's to handle.
            start_new_session=own_session,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log()
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def peak_rss_bytes(self) -> int | None:
        return usage.peak_rss_bytes(self.pid)

    async def wait_ready(self, within_s: float = 30.0) -> None:
        """Wait for READY=1 on the notify socket (`ready_socket=True`)."""
        assert self._socket is not None, "started without a ready socket"
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in self._socket.recv(4096):
                    return
                continue
            except BlockingIOError:
                pass
            if self.process.poll() is not None:
                raise WorkerError(
                    f"worker {self.worker_id} exited with {self.process.returncode}: {self.log_tail()}"
                )
            await asyncio.sleep(0.02)
        raise WorkerError(
            f"worker {self.worker_id} not ready after {within_s:g}s: {self.log_tail()}"
        )

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)
        # A second SIGTERM is the worker's "exit now": `stop` must not send it.
        self._asked_to_stop |= signum in (signal.SIGTERM, signal.SIGINT)

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit code, once it has exited (TimeoutExpired after `timeout`)."""
        try:
            self.exit_code = self.process.wait(timeout)
            return self.exit_code
        finally:
            self._close()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (unless sent already) and wait: the worker gives back what it holds.
        Its exit code; None when it lingered and was killed."""
        if self.process.poll() is None and not self._asked_to_stop:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process.poll() is None:
            self.process.kill()
        self.exit_code = self.process.wait(10)
        self._close()

    def _close(self) -> None:
        self._log.close()
        if self._socket is not None:
            self._socket.close()
            self._socket_path.unlink(missing_ok=True)
            self._socket = None


class WorkerThread:
    """A Worker running in this process, on an event loop in a thread of its own.

    The same Worker as `notifyhook worker` runs, against a real database and real HTTP,
    started in milliseconds rather than a process's import time; a test reads its
    metrics and waits on its recorded batches (`wait_recorded`) rather than on its log.
    """

    def __init__(self, url: str, worker_id: str, settings: Mapping[str, str]) -> None:
        env = worker_environment(url, worker_id, settings)
        # The same variables a process would read, validated the same way; this
        # process's own environment is not read (model_validate skips it).
        self.settings = Settings.model_validate(
            {
                key.removeprefix("NOTIFYHOOK_").lower(): value
                for key, value in env.items()
                if key.startswith("NOTIFYHOOK_")
            }
        )
        self.worker_id = worker_id
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._killed = False
        self._started = threading.Event()
        self._recorded = threading.Condition()
        self.batches_recorded = 0
        self._thread = threading.Thread(target=self._main, name=f"worker-{worker_id}", daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        self._started.wait(30)
        if self.error is not None:
            raise WorkerError(f"worker {self.worker_id} did not start: {self.error!r}")
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:
            if not self._killed:
                raise
        except BaseException as error:  # a test reads it; a thread's exception goes nowhere
            self.error = error
            log.exception("worker %s failed", self.worker_id)
        finally:
            self._started.set()
            with self._recorded:
                self._recorded.notify_all()

    async def _run(self) -> None:
        async with open_worker(self.settings, self.metrics, recorded=self._on_recorded) as worker:
            self.worker = worker
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            self._started.set()
            await worker.run()

    def _on_recorded(self) -> None:
        with self._recorded:
            self.batches_recorded += 1
            self._recorded.notify_all()

    def wait_recorded(
        self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition"
    ) -> Any:
        """Check `predicate` after each batch of outcomes the worker writes (and now and
        then, for a change made elsewhere) until it holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._recorded:
                seen = self.batches_recorded
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0 or self.error is not None or not self._thread.is_alive():
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} (last value: {value!r}; "
                    f"worker error: {self.error!r})"
                )
            with self._recorded:
                self._recorded.wait_for(functools.partial(self._moved, seen), min(left, 0.25))

    def _where(self) -> str:
        """The worker thread's stack and its loop's tasks: why it did not stop."""
        frame = sys._current_frames().get(self._thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)) if frame else "(gone)\n"
        tasks = ""
        if self._loop is not None:
            # Read from another thread: a diagnosis, not state to act on.
            with contextlib.suppress(RuntimeError):
                tasks = "\n".join(repr(task) for task in asyncio.all_tasks(self._loop))
        return stack + tasks

    def _moved(self, seen: int) -> bool:
        return self.batches_recorded != seen or not self._thread.is_alive()

    def call(self, action: Callable[[], object]) -> None:
        """Run `action` on the worker's loop (its state belongs to that thread)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(action)

    def on_loop(self, action: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run `action` on the worker's loop and return what it returned (its state
        belongs to that thread: read it there)."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(action())
            finally:
                done.set()

        self.call(run)
        if not done.wait(timeout) or not box:
            raise WorkerError(f"worker {self.worker_id}'s loop did not run the action")
        return box[0]

    def join(self, timeout: float = 30.0) -> None:
        """Wait for a worker asked to stop some other way; fails the caller if it failed."""
        self._join(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """The soft then hard stop of a SIGTERM; fails the caller if the worker failed."""
        if self._loop is not None and self._thread.is_alive() and self.worker is not None:
            self.call(self.worker.request_stop)
        self._join(timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """Stop at once, as SIGKILL would: what it holds stays leased (a test's teardown);
        fails the caller if the worker had failed before."""
        self._killed = True
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout / 3)
            if self._thread.is_alive():
                # Once seen under load (a full run, not since): a cancellation absorbed
                # on the way out. Cancel everything left on the loop once more; what
                # still hangs then is reported with the thread's stack.
                log.warning("worker %s still stopping:\n%s", self.worker_id, self._where())
                self._loop.call_soon_threadsafe(self._cancel_all)
        self._join(timeout)

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks():
            task.cancel()

    def _join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise WorkerError(
                f"worker {self.worker_id} did not stop within {timeout:g}s; its thread is at:\n"
                + self._where()
            )
        if self.error is not None:
            raise WorkerError(f"worker {self.worker_id} failed: {self.error!r}") from self.error
