"""How a registry's files are reached: the transports under ``agent.registry``.

A transport opens one file of the registry at an offset and hands back its body, the
offset it starts at, its declared length and its ETag; everything above (lengths,
hashes, retries, resuming, the overall deadline) is ``Registry``'s. This module holds
what every transport shares and the file:// one; the http(s):// one is in
``agent.transport_http`` (urllib3, imported only for a registry served over HTTP).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import RegistryError, TransportError

CLOSED_EARLY = "connection closed early"  # a cut, as BodyBroken names it; Registry says truncated


class NotFoundError(RegistryError):
    """The registry has no such file (HTTP 404/410, or no file under file://)."""


class DeadlineError(TransportError):
    """The overall deadline (registry.deadline_s) passed; not retried."""


class UnreachableError(TransportError):
    """No connection to the registry: refused, unknown host, no answer, TLS refused.

    Raised at once when a fetch's first request meets it (a registry that is down is
    said so in seconds, and the caller's own schedule retries); retried like any
    transport error once the fetch has begun (a server restarting mid-download).
    """


class RangeRefused(TransportError):
    """HTTP 416: the partial file on disk does not fit the file on the server."""


class BodyBroken(OSError):
    """A body broke off while being read; its text says why in a short phrase
    (``CLOSED_EARLY`` for a cut)."""


class Body(Protocol):
    def read1(self, amt: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class Response:
    body: Body
    start: int  # offset of the body's first byte in the file
    length: int | None  # bytes the body declares, when it does
    etag: str | None = None  # the validator to send as If-None-Match next time
    not_modified: bool = False  # the file still has the ETag asked about; no body


@dataclass(frozen=True)
class Fetched:
    """A conditional fetch: ``data`` None means unchanged since ``etag``."""

    data: bytes | None
    etag: str | None


class Transport(Protocol):
    def open(
        self, relpath: str, offset: int, deadline: float, etag: str | None = None
    ) -> Response: ...

    def close(self) -> None: ...


class FileTransport:
    """A registry folder on this machine (file:///srv/registry)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, relpath: str, offset: int, deadline: float, etag: str | None = None) -> Response:
        path = self.root / relpath
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes the response body
        except FileNotFoundError as exc:
            raise NotFoundError(f"{path}: not found in the registry") from exc
        except OSError as exc:
            raise TransportError(f"{path}: cannot read: {exc.strerror}") from exc
        stat = os.fstat(f.fileno())
        tag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'  # as a web server makes one
        if etag is not None and etag == tag and not offset:
            f.close()
            return Response(io.BytesIO(), 0, 0, tag, not_modified=True)
        start = min(offset, stat.st_size)
        f.seek(start)
        return Response(f, start, stat.st_size - start, tag)

    def close(self) -> None:
        pass


class Watchdog:
    """Shuts the current request's socket down when the overall deadline passes.

    Per-read timeouts cannot bound a server that sends a header or body byte now and
    then; this does, wherever the read is blocked (status line, headers, body).
    """

    _current = threading.local()  # the watchdog of this thread's transfer, if any

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        Watchdog._current.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        Watchdog._current.watchdog = None

    @classmethod
    def watch(cls, sock: socket.socket | None) -> None:
        """Put ``sock`` under this thread's watchdog (called as each request goes out)."""
        watchdog: Watchdog | None = getattr(cls._current, "watchdog", None)
        if watchdog is not None and sock is not None:
            with watchdog._lock:
                watchdog._sock = sock
                if watchdog.fired:
                    shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                shut(self._sock)


def shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
