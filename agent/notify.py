"""sd_notify: tell systemd READY=1, WATCHDOG=1, STATUS=…, RELOADING=1, STOPPING=1.

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), as sd_notify(3)
documents. A dozen lines here rather than a dependency: ``sdnotify`` ships only as a
source distribution, which a binary-only device install (``--only-binary=:all:``)
cannot take. Without ``$NOTIFY_SOCKET`` (not run by systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or an abstract name (``@``)."""
    if not value or value[0] not in "/@":
        return None
    return b"\0" + value[1:].encode() if value[0] == "@" else value


class Notifier:
    """Sends notify datagrams; silent when not run by systemd, never raises."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = notify_address(env.get("NOTIFY_SOCKET"))
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone (shutdown): the agent carries on
            log.debug("sd_notify %s: %s", self._address, exc)

    def status(self, line: str) -> None:
        """STATUS=``line``, only when it changed."""
        if line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")
