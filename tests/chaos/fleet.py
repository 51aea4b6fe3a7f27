"""The worker fleet: real `notifyhook worker` processes, killed and replaced as systemd would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .plan import WORKER_SETTINGS


@dataclass
class Worker:
    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    exit_code: int | None = None


class Fleet:
    """Keeps `size` workers running; every kill is followed by a replacement."""

    def __init__(self, database_url: str, log_dir: Path, size: int) -> None:
        self._database_url = database_url
        self._log_dir = log_dir
        self._size = size
        self._started = 0
        self.live: list[Worker] = []
        self.gone: list[Worker] = []

    def start(self) -> None:
        while len(self.live) < self._size:
            self.live.append(self._spawn())

    def _spawn(self) -> Worker:
        self._started += 1
        worker_id = f"chaos-{self._started}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
        env.update({f"NOTIFYHOOK_{k.upper()}": v for k, v in WORKER_SETTINGS.items()})
        env["NOTIFYHOOK_DATABASE_URL"] = self._database_url
        env["NOTIFYHOOK_WORKER_ID"] = worker_id
        log_path = self._log_dir / f"{worker_id}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "notifyhook", "worker"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        return Worker(worker_id, process, log_path, log_file)

    def kill(self, victim: Worker) -> None:
        """SIGKILL one worker and start its replacement at once (Restart=on-failure)."""
        victim.process.send_signal(signal.SIGKILL)
        victim.exit_code = victim.process.wait(10)
        victim.log_file.close()
        self.live.remove(victim)
        self.gone.append(victim)
        self.live.append(self._spawn())

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every live worker; their exit codes (None: did not exit in time, killed)."""
        for worker in self.live:
            worker.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for worker in self.live:
            try:
                worker.exit_code = worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(10)
            worker.log_file.close()
            codes[worker.worker_id] = worker.exit_code
        self.gone.extend(self.live)
        self.live = []
        return codes

    def kill_all(self) -> None:
        """Cleanup after a failure: nothing may outlive the run."""
        for worker in self.live:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
            worker.log_file.close()
        self.gone.extend(self.live)
        self.live = []

    @property
    def started(self) -> int:
        return self._started
