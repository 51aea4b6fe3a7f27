"""The sd_notify client against real datagram sockets, as systemd would receive them."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator

import pytest

from notifyhook.systemd import SystemdNotifier


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test run itself may live under systemd (a CI runner's unit): start
    # every test from an environment that says nothing about it.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        # Bounded: a missing datagram fails the test in a second, not at the timeout.
        sock.settimeout(1.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def assert_nothing_more(sock: socket.socket) -> None:
    # Datagrams between local sockets are queued synchronously by sendto(),
    # so anything sent is already readable: no waiting needed to prove absence.
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_sends_each_state(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    notifier = SystemdNotifier()
    assert notifier.enabled

    notifier.ready()
    notifier.status("delivering: 3 in flight")
    notifier.watchdog()
    notifier.stopping()

    received = [receiver.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"STATUS=delivering: 3 in flight", b"WATCHDOG=1", b"STOPPING=1"]
    assert_nothing_more(receiver)


def test_status_stays_one_assignment(receiver: socket.socket) -> None:
    SystemdNotifier().status("line one\nREADY=1")
    assert receiver.recv(4096) == b"STATUS=line one READY=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"notifyhook-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(1.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        SystemdNotifier().ready()

        assert sock.recv(4096) == b"READY=1"


def test_watchdog_interval_is_half_the_timeout(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SystemdNotifier().watchdog_interval_s == 5.0


def test_no_watchdog_without_watchdog_usec(receiver: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.watchdog_interval_s is None
    notifier.watchdog()
    notifier.ready()
    assert receiver.recv(4096) == b"READY=1"


def test_watchdog_meant_for_another_process(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    notifier = SystemdNotifier()
    assert notifier.watchdog_interval_s is None

    notifier.watchdog()
    notifier.ready()

    # READY=1 comes first: the watchdog ping was never sent.
    assert receiver.recv(4096) == b"READY=1"
    assert_nothing_more(receiver)


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready()
    notifier.status("idle")
    notifier.watchdog()
    notifier.stopping()


def test_a_vanished_socket_warns_once_and_never_raises(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notifier = SystemdNotifier()
    with caplog.at_level(logging.WARNING, logger="notifyhook.systemd"):
        notifier.ready()
        notifier.status("still going")
        notifier.stopping()
    warnings = [r for r in caplog.records if r.name == "notifyhook.systemd"]
    assert len(warnings) == 1
    assert "gone" in warnings[0].getMessage()
