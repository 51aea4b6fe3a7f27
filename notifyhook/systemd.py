"""A minimal sd_notify client: READY, STATUS, WATCHDOG and STOPPING to systemd."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state changes to the service manager named by `$NOTIFY_SOCKET`.

    Built from the environment (`os.environ` unless another mapping is given).
    Without `NOTIFY_SOCKET` every method does nothing, so the worker calls them
    unconditionally whether it runs under systemd, in a terminal or in a test.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_name = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(self._socket_name)
        self._watchdog_usec = _watchdog_usec(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to send to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()`: half of `WatchdogSec`, or None if not watched."""
        if self._address is None or self._watchdog_usec is None:
            return None
        # Half the timeout is what sd_watchdog_enabled(3) recommends: one late
        # ping must not be enough to get the service killed.
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> None:
        """Tell systemd start-up is complete (`Type=notify` units wait for this)."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by `systemctl status`."""
        # The datagram is newline-separated assignments: a newline in the text
        # would end STATUS early and could smuggle in another assignment.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Ping the watchdog; a no-op when this process is not the one watched."""
        if self.watchdog_interval_s is not None:
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """Tell systemd a clean shutdown has begun."""
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the event loop on a full receive queue: a lost
                # notification is better than a stalled worker.
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # The socket can vanish (systemd re-executed, unit file changed);
            # delivery must go on, and the log must not fill with the same line.
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot notify systemd at %r (%s); further failures will not be logged",
                    self._socket_name,
                    exc,
                )


def _socket_address(value: str) -> str | bytes | None:
    """The address to send to, from NOTIFY_SOCKET, or None if there is none we can use."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: systemd writes a leading '@' for the NUL byte.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # Newer systemd also offers vsock: addresses (for VMs); we do not run there.
    logger.warning(
        "ignoring NOTIFY_SOCKET=%r: only paths and @abstract sockets are supported", value
    )
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if the watchdog applies to this very process, else None."""
    try:
        # systemd sets WATCHDOG_PID so that a child inheriting the environment
        # does not believe it is the one being watched.
        pid = env.get("WATCHDOG_PID")
        if pid and int(pid) != os.getpid():
            return None
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
