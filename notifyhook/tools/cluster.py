"""A throwaway PostgreSQL cluster for the demo, the bench and the tests."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from notifyhook.errors import NotifyhookError


class ClusterError(NotifyhookError):
    """PostgreSQL's server binaries are missing, or the cluster would not start."""


INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found on PATH, "
    "via pg_config --bindir, or in /usr/lib/postgresql/*/bin: install them "
    "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) "
    "or set NOTIFYHOOK_DATABASE_URL to an existing server"
)


def find_bindir() -> Path:
    """Where initdb lives: PATH, then pg_config --bindir, then the newest Debian-style install."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "initdb").exists():
            return bindir
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if installed:
        return Path(installed[-1]).parent
    raise ClusterError(INSTALL_HINT)


MEMORY_DIRECTORY_MIN_FREE = 2 << 30
"""The free space a RAM directory needs to hold the test processes' clusters."""


def memory_directory() -> Path | None:
    """A directory in RAM (/dev/shm, a tmpfs) to put throwaway clusters in, when there is one.

    With fsync off, PostgreSQL still writes every page it copies or checkpoints through
    the file system, and a CREATE DATABASE from a migrated template copies a few
    megabytes: in RAM the tests wait far less for their fresh databases (the figures are
    in docs/testing.md). For the tests; a crash of the server loses nothing of tmpfs,
    only a crash of the machine does.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
        return None
    # A container's /dev/shm is often 64 MB, less than one test process's cluster with
    # its databases: a full tmpfs would fail tests at random, so such a one is not used.
    return shm if shutil.disk_usage(shm).free >= MEMORY_DIRECTORY_MIN_FREE else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """initdb into a temporary directory (under `directory`, else the system's), start on
    a free port, remove everything on stop.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres`
    user (or NOTIFYHOOK_CLUSTER_USER) and every server command runs through runuser.
    """

    def __init__(
        self,
        *,
        fsync: bool = True,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        directory: Path | None = None,
    ) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="notifyhook-pg-", dir=directory))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._user = self._server_user()
        self._settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": str(max_connections),
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            **(settings or {}),
        }

    @staticmethod
    def _server_user() -> str | None:
        if os.geteuid() != 0:
            return None
        name = os.environ.get("NOTIFYHOOK_CLUSTER_USER", "postgres")
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ClusterError(
                f"running as root, and initdb refuses root: create a {name!r} user or run as another user"
            ) from None
        return name

    def _run(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root)
        if check and result.returncode != 0:
            raise ClusterError(
                f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def start(self) -> Cluster:
        if self._user is not None:
            shutil.chown(self.root, self._user)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in self._settings.items())
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))
        return self

    def pg_ctl(self, *args: str) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args])

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (`fast` or `immediate`), as an operator or a crash would."""
        self.pg_ctl("restart", "-w", "-t", "60", "-m", mode, "-l", str(self.log))

    def start_standby(self) -> Cluster:
        """A streaming hot standby of this running server, on a port of its own.

        pg_basebackup -R copies the data directory and writes primary_conninfo; the
        copied postgresql.conf is this one, so the standby's own port and socket
        directory are appended after it (the last line wins). initdb's pg_hba.conf
        already trusts replication connections from 127.0.0.1.
        """
        standby = Cluster(directory=self.root.parent)
        try:
            if standby._user is not None:
                shutil.chown(standby.root, standby._user)
            standby._run(
                [
                    str(self.bindir / "pg_basebackup"),
                    *("-D", str(standby.data), "-h", "127.0.0.1", "-p", str(self.port)),
                    *("-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync"),
                ]
            )
            with (standby.data / "postgresql.conf").open("a") as conf:
                conf.writelines(f"{k} = {v}\n" for k, v in standby._settings_of_place().items())
            standby.pg_ctl("start", "-w", "-t", "60", "-l", str(standby.log))
        except BaseException:
            standby.stop()
            raise
        return standby

    def _settings_of_place(self) -> dict[str, str]:
        return {"port": str(self.port), "unix_socket_directories": f"'{self.root}'"}

    def promote(self) -> None:
        """Make this standby a primary, waiting until it accepts writes."""
        self.pg_ctl("promote", "-w", "-t", "60")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        if self.data.exists():
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-w"],
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server:
    """A PostgreSQL server to work in: the one `url` names, or, without a URL, a throwaway
    Cluster of our own (made with `options`). `start` and `stop` start and stop ours and
    leave a given server alone. The tests', the demo's and the bench's servers build on it.
    """

    def __init__(self, url: str | None, **options: Any) -> None:
        self.cluster = Cluster(**options) if url is None else None
        self.admin_url = self.cluster.url() if self.cluster is not None else str(url)

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
