"""CPU time and peak memory of processes, read from /proc (Linux; psutil is not a dependency)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU of a process; with its reaped children's too. 0 once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS_PER_S


def children(parent: int) -> list[int]:
    """The live direct children of a process."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def postmaster_of(backend: int) -> int | None:
    """The postmaster of a backend process, if the server runs on this host (else None:
    a remote server's backend pid may be some unrelated local process)."""
    fields = _stat_fields(backend)
    if fields is None or _name(backend) != "postgres":
        return None
    parent = int(fields[1])
    return parent if _name(parent) == "postgres" else None


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU of a whole PostgreSQL server: the postmaster, every live backend and helper, and
    every process that has exited (the postmaster reaps them all, so their CPU is in its
    cutime and cstime)."""
    total = cpu_seconds(postmaster, reaped_children=True)
    return total + sum(cpu_seconds(pid, reaped_children=True) for pid in children(postmaster))


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the most resident memory the process has had, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a stretch of a scenario cost: wall time and CPU seconds of each party."""

    wall_s: float
    worker_cpu_s: float
    postgres_cpu_s: float | None
    """None when the server is not on this host (its processes are not in /proc)."""
    receiver_cpu_s: float


class Meter:
    """Reads the CPU of the workers, PostgreSQL and the receiver when started and when read."""

    def __init__(self, workers: Iterable[int], postmaster: int | None, receiver: int) -> None:
        self._workers = list(workers)
        self._postmaster = postmaster
        self._receiver = receiver
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float | None, float]:
        postgres = None if self._postmaster is None else postgres_cpu_seconds(self._postmaster)
        return (
            time.monotonic(),
            sum(cpu_seconds(pid) for pid in self._workers),
            postgres,
            cpu_seconds(self._receiver),
        )

    def read(self) -> Usage:
        now = self._sample()
        start = self._start
        postgres = None
        if now[2] is not None and start[2] is not None:
            postgres = now[2] - start[2]
        return Usage(now[0] - start[0], now[1] - start[1], postgres, now[3] - start[3])
