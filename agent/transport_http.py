"""The http(s):// transport of a registry: urllib3, redirects within the registry's
origin only, the overall deadline enforced on the socket (``Watchdog``)."""

from __future__ import annotations

import contextlib
import io
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import urllib3
from urllib3.connectionpool import port_by_scheme
from urllib3.util import parse_url

from agent import __version__
from agent.errors import RegistryError, TransportError
from agent.transport import (
    CLOSED_EARLY,
    BodyBroken,
    DeadlineError,
    NotFoundError,
    RangeRefused,
    Response,
    UnreachableError,
    Watchdog,
)

MAX_REDIRECTS = 5


def _quick_ack(sock: socket.socket | None) -> None:
    """Acknowledge the answer's first segments at once (Linux ``TCP_QUICKACK``).

    A server that writes its headers and its body in two sends without TCP_NODELAY
    (Python's http.server, some proxies) holds a small body back until the headers are
    acknowledged; with a delayed ACK that costs 40 ms a request. A hint: ignored where
    the option does not exist or is refused.
    """
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class _WatchedConnection(urllib3.connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        Watchdog.watch(self.sock)
        _quick_ack(self.sock)


class _WatchedTLSConnection(urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        Watchdog.watch(self.sock)
        _quick_ack(self.sock)


class _WatchedPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedTLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedTLSConnection


class HttpTransport:
    """A registry behind any web server, object store or CDN."""

    def __init__(
        self, base: str, ca: Path | None, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.base = base if base.endswith("/") else base + "/"
        self.origin = self._origin(self.base)
        self.pool = urllib3.PoolManager(
            num_pools=2,
            ca_certs=str(ca) if ca is not None else None,
            retries=False,  # retries are ours: they resume, and they respect the deadline
        )
        self.pool.pool_classes_by_scheme = {"http": _WatchedPool, "https": _WatchedTLSPool}

    @staticmethod
    def _origin(url: str) -> tuple[str, str, int | None]:
        """(scheme, host, port) as urllib3 reads ``url``: the parser that connects.

        Raises urllib3's LocationParseError (a ValueError) when it cannot be parsed.
        """
        parts = parse_url(url)
        scheme = (parts.scheme or "http").lower()
        return scheme, (parts.host or "").lower(), parts.port or port_by_scheme.get(scheme)

    def open(self, relpath: str, offset: int, deadline: float, etag: str | None = None) -> Response:
        url = self.base + urllib.parse.quote(relpath)
        headers = {"User-Agent": f"edge-agent/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        elif etag is not None:
            headers["If-None-Match"] = etag
        for _ in range(MAX_REDIRECTS + 1):
            timeout = min(self.timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineError(f"{url}: overall deadline exceeded (registry.deadline_s)")
            try:
                resp = self.pool.request(
                    "GET",
                    url,
                    headers=headers,
                    redirect=False,
                    preload_content=False,
                    decode_content=False,
                    timeout=urllib3.Timeout(
                        connect=min(self.connect_timeout_s, timeout), read=timeout
                    ),
                )
            except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.SSLError) as exc:
                # NewConnectionError (refused, DNS) is a ConnectTimeoutError in urllib3 2
                raise UnreachableError(f"{url}: {self._unreachable(url, exc)}") from exc
            except urllib3.exceptions.HTTPError as exc:
                raise TransportError(f"{url}: {reason(exc)}") from exc
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.headers.get("Location", "")
                resp.close()  # unread body: never hand the connection back
                url = self._redirect(url, location)
                continue
            return self._accept(url, resp, offset)
        raise RegistryError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _redirect(self, url: str, location: str) -> str:
        """The URL to follow for ``Location: location``, judged as urllib3 will connect.

        The origin is judged by urllib3's own ``parse_url``, and the URL it returns is
        exactly the one judged, so no second parser can read another host out of it.
        Raises RegistryError for a Location off the registry's origin, one with
        user-info, a backslash, whitespace or control characters, or one that does not
        parse.
        """
        if "\\" in location or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in location):
            raise RegistryError(
                f"{url}: redirect to {location!r} refused: a Location with a backslash, "
                "whitespace or control characters is read differently by different "
                "parsers; fix the server's redirect"
            )
        try:
            target = parse_url(urllib.parse.urljoin(url, location))
            origin = self._origin(target.url)
        except ValueError:
            raise RegistryError(f"{url}: unusable redirect to {location!r}") from None
        if target.auth is not None:
            raise RegistryError(
                f"{url}: redirect to {location!r} refused: it carries user-info (name@host); "
                "fix the server's redirect"
            )
        if origin != self.origin:
            raise RegistryError(
                f"{url}: redirected to another host ({target.url}); refused, "
                "only redirects within the registry's origin are followed"
            )
        return target.url

    def _unreachable(self, url: str, exc: urllib3.exceptions.HTTPError) -> str:
        """Why no connection was made, for an operator: refused, DNS, timeout or TLS."""
        host = urllib.parse.urlsplit(url).hostname
        if isinstance(exc, urllib3.exceptions.NameResolutionError):
            return f"cannot connect: host {host} not found (DNS)"
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            if isinstance(exc.__cause__, ConnectionRefusedError):
                return "cannot connect: connection refused (is the registry running?)"
            return reason(exc)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return (
                f"cannot connect: no answer within {self.connect_timeout_s:g} s "
                "(registry.connect_timeout_s)"
            )
        return reason(exc)

    @staticmethod
    def _accept(url: str, resp: urllib3.BaseHTTPResponse, offset: int) -> Response:
        status = resp.status
        etag = resp.headers.get("ETag")
        if status == 304:
            resp.close()
            return Response(io.BytesIO(), 0, 0, etag, not_modified=True)
        if status in (200, 206):
            declared = resp.headers.get("Content-Length")
            length = (
                int(declared) if declared and declared.isascii() and declared.isdigit() else None
            )
            start = 0
            if status == 206:
                content_range = resp.headers.get("Content-Range", "")
                try:
                    start = int(content_range.split()[1].split("-")[0])
                except (IndexError, ValueError):
                    resp.close()  # unread body: never hand the connection back
                    raise TransportError(f"{url}: bad Content-Range {content_range!r}") from None
            return Response(_HttpBody(resp), start, length, etag)
        resp.close()  # unread body: never hand the connection back
        if status in (404, 410):
            raise NotFoundError(f"{url}: not found (HTTP {status})")
        if status == 416 and offset:
            raise RangeRefused(f"{url}: HTTP 416 for a resume at byte {offset}")
        if status >= 500 or status in (408, 429):
            raise TransportError(f"{url}: HTTP {status}")
        raise RegistryError(f"{url}: HTTP {status}")

    def close(self) -> None:
        self.pool.clear()


class _HttpBody:
    """A response body whose read errors are ``BodyBroken`` naming the reason."""

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp

    def read1(self, amt: int = -1, /) -> bytes:
        try:
            return self._resp.read1(amt)
        except urllib3.exceptions.HTTPError as exc:
            raise BodyBroken(reason(exc)) from exc

    def close(self) -> None:
        self._resp.close()


def reason(exc: BaseException) -> str:
    """What a urllib3 error means, in one short phrase for an operator."""
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "no data within the read timeout (registry.timeout_s)"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return f"TLS failed: {exc.args[0] if exc.args else exc} (is registry.ca right?)"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before its base class
        return f"cannot connect: {str(exc).rsplit(': ', 1)[-1]}"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connect timed out (registry.connect_timeout_s)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        if "IncompleteRead" in str(exc) or "InvalidChunkLength" in str(exc):
            return CLOSED_EARLY
        return f"connection broken: {exc.args[0] if exc.args else exc}"
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
