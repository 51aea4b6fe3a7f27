"""The worker fleet: real `notifyhook worker` processes, killed and replaced as systemd would."""

from __future__ import annotations

from pathlib import Path

from notifyhook.tools.workers import WorkerProcess

from .plan import WORKER_SETTINGS


class Fleet:
    """Keeps `size` workers running; every kill is followed by a replacement."""

    def __init__(self, database_url: str, log_dir: Path, size: int) -> None:
        self._database_url = database_url
        self._log_dir = log_dir
        self._size = size
        self._started = 0
        self.live: list[WorkerProcess] = []
        self.gone: list[WorkerProcess] = []

    def start(self) -> None:
        while len(self.live) < self._size:
            self.live.append(self._spawn())

    def _spawn(self) -> WorkerProcess:
        self._started += 1
        return WorkerProcess(
            self._database_url, f"chaos-{self._started}", self._log_dir, WORKER_SETTINGS
        )

    def kill(self, victim: WorkerProcess) -> None:
        """SIGKILL one worker and start its replacement at once (Restart=on-failure)."""
        victim.kill()
        self.live.remove(victim)
        self.gone.append(victim)
        self.live.append(self._spawn())

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every live worker; their exit codes (None: did not exit in time, killed)."""
        for worker in self.live:
            worker.signal()
        codes: dict[str, int | None] = {}
        for worker in self.live:
            codes[worker.worker_id] = worker.stop(timeout)
        self.gone.extend(self.live)
        self.live = []
        return codes

    def kill_all(self) -> None:
        """Cleanup after a failure: nothing may outlive the run."""
        for worker in self.live:
            worker.kill()
        self.gone.extend(self.live)
        self.live = []

    @property
    def started(self) -> int:
        return self._started
