"""sd_notify without a library: one datagram to $NOTIFY_SOCKET, a path or an abstract name."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.notify import Notifier, notify_address


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("relative/sock", None),  # sd_notify(3) takes absolute paths and @names only
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract/name", b"\0abstract/name"),
    ],
)
def test_notify_socket_names_a_path_or_an_abstract_name(
    value: str | None, address: str | bytes | None
) -> None:
    assert notify_address(value) == address


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_lines_arrive_as_one_datagram_on_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _receiver(str(path)) as sock:
        Notifier({"NOTIFY_SOCKET": str(path)}).send("READY=1", "STATUS=serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_an_abstract_socket_is_reached_too() -> None:
    name = f"@edge-agent-test-{os.getpid()}"
    with _receiver(b"\0" + name[1:].encode()) as sock:
        Notifier({"NOTIFY_SOCKET": name}).send("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_status_is_sent_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _receiver(str(path)) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        for line in ("a", "a", "b"):
            notifier.status(line)
        sock.settimeout(0.2)
        got = []
        with pytest.raises(TimeoutError):
            while True:
                got.append(sock.recv(4096))
    assert got == [b"STATUS=a", b"STATUS=b"]


def test_without_systemd_or_with_its_socket_gone_nothing_fails(tmp_path: Path) -> None:
    Notifier({}).send("READY=1")  # not run by systemd: silent
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("READY=1")  # no listener
