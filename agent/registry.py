"""Fetching from a model registry: plain files over http(s):// or file://.

The download discipline (after python-tuf's fetcher): every fetch has a hard
maximum length and an overall deadline, not only a per-read timeout; a body longer
than promised is refused as soon as it is seen; a transfer that breaks off is
resumed with an HTTP Range request, keeping the bytes already on disk; transport
failures are retried with capped, jittered backoff, everything else is not.
Redirects are followed only within the registry's own origin.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import urllib3
from urllib3.connectionpool import port_by_scheme
from urllib3.util import parse_url

from agent import __version__
from agent.atomic import open_private
from agent.backoff import backoff_delay
from agent.config import RegistryConfig
from agent.errors import RegistryError, StoreError, TransportError, VerificationError
from agent.faults import crash_point
from agent.hashing import BackgroundSha256

CHUNK = 1 << 20
MAX_REDIRECTS = 5
# Written bytes are handed to the disk every this many (writeback started, not waited
# for): the fsync before a blob is installed then has little left to wait for, and a
# broken-off download keeps more of its bytes through a power cut.
WRITEBACK_BYTES = 16 << 20
CLOSED_EARLY = "connection closed early"  # how _reason names a cut; _read calls it truncation
Progress = Callable[[int, int], None]
T = TypeVar("T")


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


class _RangeRefused(TransportError):
    """HTTP 416: the partial file on disk does not fit the file on the server."""


class _Body(Protocol):
    def read1(self, amt: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class _Response:
    body: _Body
    start: int  # offset of the body's first byte in the file
    length: int | None  # bytes the body declares, when it does
    etag: str | None = None  # the validator to send as If-None-Match next time
    not_modified: bool = False  # the file still has the ETag asked about; no body


@dataclass(frozen=True)
class Fetched:
    """A conditional fetch: ``data`` None means unchanged since ``etag``."""

    data: bytes | None
    etag: str | None


class _Transport(Protocol):
    def open(
        self, relpath: str, offset: int, deadline: float, etag: str | None = None
    ) -> _Response: ...

    def close(self) -> None: ...


class _FileTransport:
    """A registry folder on this machine (file:///srv/registry)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(
        self, relpath: str, offset: int, deadline: float, etag: str | None = None
    ) -> _Response:
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
            return _Response(io.BytesIO(), 0, 0, tag, not_modified=True)
        start = min(offset, stat.st_size)
        f.seek(start)
        return _Response(f, start, stat.st_size - start, tag)

    def close(self) -> None:
        pass


class _Watchdog:
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

    def __enter__(self) -> _Watchdog:
        _Watchdog._current.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _Watchdog._current.watchdog = None

    @classmethod
    def watch(cls, sock: socket.socket | None) -> None:
        """Put ``sock`` under this thread's watchdog (called as each request goes out)."""
        watchdog: _Watchdog | None = getattr(cls._current, "watchdog", None)
        if watchdog is not None and sock is not None:
            with watchdog._lock:
                watchdog._sock = sock
                if watchdog.fired:
                    _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


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
        _Watchdog.watch(self.sock)
        _quick_ack(self.sock)


class _WatchedTLSConnection(urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        _Watchdog.watch(self.sock)
        _quick_ack(self.sock)


class _WatchedPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedTLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedTLSConnection


class _HttpTransport:
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

    def open(
        self, relpath: str, offset: int, deadline: float, etag: str | None = None
    ) -> _Response:
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
                raise TransportError(f"{url}: {_reason(exc)}") from exc
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
            return _reason(exc)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return (
                f"cannot connect: no answer within {self.connect_timeout_s:g} s "
                "(registry.connect_timeout_s)"
            )
        return _reason(exc)

    @staticmethod
    def _accept(url: str, resp: urllib3.BaseHTTPResponse, offset: int) -> _Response:
        status = resp.status
        etag = resp.headers.get("ETag")
        if status == 304:
            resp.close()
            return _Response(io.BytesIO(), 0, 0, etag, not_modified=True)
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
            return _Response(resp, start, length, etag)
        resp.close()  # unread body: never hand the connection back
        if status in (404, 410):
            raise NotFoundError(f"{url}: not found (HTTP {status})")
        if status == 416 and offset:
            raise _RangeRefused(f"{url}: HTTP 416 for a resume at byte {offset}")
        if status >= 500 or status in (408, 429):
            raise TransportError(f"{url}: HTTP {status}")
        raise RegistryError(f"{url}: HTTP {status}")

    def close(self) -> None:
        self.pool.clear()


def _start_writeback(f: BinaryIO, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of ``f`` from ``offset`` to disk, without waiting.

    On Linux POSIX_FADV_DONTNEED starts the writeback of the range's dirty pages
    (WB_SYNC_NONE) and drops only pages already clean; elsewhere this does nothing.
    A hint: the fsync at install time is what makes the bytes durable.
    """
    f.flush()
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_DONTNEED)


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


def _reason(exc: BaseException) -> str:
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


class Registry:
    """A client of one registry. Thread-compatible: use one per thread."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30,
        connect_timeout_s: float = 5,
        deadline_s: float = 1800,
        retries: int = 5,
        ca: Path | None = None,
        backoff_s: float = 0.5,
        backoff_cap_s: float = 60,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.received_bytes = 0  # file body bytes download() took off the network
        self.transport: _Transport
        if url.startswith("file://"):
            self.transport = _FileTransport(
                Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            )
        else:
            self.transport = _HttpTransport(url, ca, timeout_s, connect_timeout_s)

    @classmethod
    def from_config(cls, config: RegistryConfig) -> Registry:
        if config.url is None:
            raise RegistryError("registry.url is not set: no registry to fetch from")
        return cls(
            config.url,
            timeout_s=config.timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            deadline_s=config.deadline_s,
            retries=config.retries,
            ca=config.ca,
            backoff_s=config.retry_backoff_s,
        )

    def close(self) -> None:
        self.transport.close()

    def _retrying(self, what: str, deadline: float, attempt_once: Callable[[], T]) -> T:
        attempt = 0
        with _Watchdog(deadline - time.monotonic()) as watchdog:
            while True:
                try:
                    return attempt_once()
                except DeadlineError:
                    raise
                except TransportError as exc:
                    if attempt == 0 and isinstance(exc, UnreachableError):
                        raise  # down from the start: said at once, not after the retries
                    attempt += 1
                    remaining = deadline - time.monotonic()
                    if watchdog.fired or remaining <= 0:
                        raise DeadlineError(
                            f"{what}: overall deadline of {self.deadline_s:g} s exceeded "
                            f"(registry.deadline_s) after {_attempts(attempt)}; last: {exc}"
                        ) from exc
                    if attempt > self.retries:
                        raise TransportError(
                            f"{exc} (gave up on {what} after {_attempts(attempt)})"
                        ) from exc
                    delay = backoff_delay(
                        attempt, self.backoff_s, self.backoff_cap_s
                    )  # full jitter
                    time.sleep(min(delay, remaining))

    def fetch_document(
        self, relpath: str, max_bytes: int, *, optional: bool = False
    ) -> bytes | None:
        """Fetch a small document (index, manifest, signature) whole.

        Returns None when ``optional`` and the registry has no such file. Raises
        VerificationError when it is longer than ``max_bytes``, TransportError when
        retries are spent, RegistryError for other refusals.
        """
        try:
            return self.fetch_if_changed(relpath, max_bytes, None).data
        except NotFoundError:
            if optional:
                return None
            raise

    def fetch_if_changed(self, relpath: str, max_bytes: int, etag: str | None) -> Fetched:
        """Fetch a small document unless it still has ``etag`` (HTTP If-None-Match).

        Polling a registry every few minutes from many devices then costs a 304 and no
        body while nothing changed. Raises as fetch_document (NotFoundError included).
        """
        deadline = time.monotonic() + self.deadline_s

        def once() -> Fetched:
            resp = self.transport.open(relpath, 0, deadline, etag)
            try:
                if resp.not_modified:
                    return Fetched(None, resp.etag or etag)
                if resp.length is not None and resp.length > max_bytes:
                    raise VerificationError(
                        f"{relpath}: {resp.length} bytes, over the limit of {max_bytes}"
                    )
                data = bytearray()
                while chunk := self._read(resp.body, relpath, deadline):
                    data += chunk
                    if len(data) > max_bytes:
                        raise VerificationError(
                            f"{relpath}: longer than the limit of {max_bytes} bytes"
                        )
                if resp.length is not None and len(data) < resp.length:
                    raise TransportError(
                        f"{relpath}: truncated at {len(data)} of {resp.length} bytes"
                    )
                return Fetched(bytes(data), resp.etag)
            finally:
                resp.body.close()

        return self._retrying(relpath, deadline, once)

    def download(
        self, relpath: str, part: Path, size: int, progress: Progress | None = None
    ) -> str:
        """Fetch ``relpath`` into ``part`` until it holds exactly ``size`` bytes.

        Bytes already in ``part`` (an earlier, broken-off attempt) are kept and only the
        rest is requested; only when ``part`` is a regular file of ours, though: a link
        there is never followed, and a planted file is replaced (``atomic.open_private``).
        ``progress(done, size)`` is called as each transfer begins (``done``: the bytes
        kept) and after each chunk written. Returns the hex SHA-256
        of the whole file; the caller compares it with the manifest. On TransportError
        the partial file is kept for the next attempt (and on KeyboardInterrupt); on
        VerificationError and StoreError it is deleted.
        """
        deadline = time.monotonic() + self.deadline_s
        try:
            return self._retrying(
                relpath,
                deadline,
                lambda: self._download_once(relpath, part, size, deadline, progress),
            )
        except (VerificationError, StoreError, RegistryError):
            with contextlib.suppress(OSError):  # a folder planted there stays, named in exc
                part.unlink(missing_ok=True)
            raise

    def _download_once(
        self, relpath: str, part: Path, size: int, deadline: float, progress: Progress | None
    ) -> str:
        try:  # never through a link, never into a file someone else planted
            f = os.fdopen(open_private(part), "r+b")
        except OSError as exc:
            raise StoreError(f"{part}: cannot write: {exc.strerror or exc}") from exc
        with f:
            return self._continue(relpath, f, part, size, deadline, progress)

    def _continue(
        self,
        relpath: str,
        f: BinaryIO,
        part: Path,
        size: int,
        deadline: float,
        progress: Progress | None,
    ) -> str:
        offset = os.fstat(f.fileno()).st_size
        if offset > size:
            f.truncate(0)
            offset = 0
        digest = BackgroundSha256()
        try:
            if offset:  # the bytes kept from an earlier attempt
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            if offset == size:  # finished earlier (or an empty file): nothing to ask for
                return digest.hexdigest()
            try:
                resp = self.transport.open(relpath, offset, deadline)
            except _RangeRefused:
                f.truncate(0)  # the server's file is not the one we began: start over
                raise
            try:
                if resp.start == 0 and offset:  # the server ignored Range: take it all
                    digest.close()
                    digest, offset = BackgroundSha256(), 0
                elif resp.start != offset:
                    raise TransportError(
                        f"{relpath}: asked for bytes from {offset}, "
                        f"the server sent from {resp.start}"
                    )
                if resp.length is not None and resp.start + resp.length > size:
                    sends = resp.start + resp.length
                    raise VerificationError(
                        f"{relpath}: server sends {sends} bytes, manifest says {size}"
                    )
                return self._receive(
                    relpath, resp, f, part, offset, size, digest, deadline, progress
                )
            finally:
                resp.body.close()
        finally:
            digest.close()

    def _receive(
        self,
        relpath: str,
        resp: _Response,
        f: BinaryIO,
        part: Path,
        offset: int,
        size: int,
        digest: BackgroundSha256,
        deadline: float,
        progress: Progress | None,
    ) -> str:
        """Write the body into ``f`` from ``offset`` and return the whole file's hash.

        Per chunk only what must be per chunk: the length bound, the write and handing
        the chunk to the hashing thread (it hashes while the next one is received);
        the deadline is checked before every read.
        """
        done = offset
        try:
            f.seek(offset)
            f.truncate()
        except OSError as exc:
            raise StoreError(f"{part}: cannot write: {exc.strerror}") from exc
        if progress is not None:  # the baseline: bytes kept from before, if any
            progress(done, size)
        flushed = done
        while chunk := self._read(resp.body, relpath, deadline, done, size):
            if done + len(chunk) > size:
                raise VerificationError(f"{relpath}: body longer than the manifest's {size} bytes")
            first = done == offset
            try:
                f.write(chunk)
                if done + len(chunk) - flushed >= WRITEBACK_BYTES:
                    _start_writeback(f, flushed, done + len(chunk) - flushed)
                    flushed = done + len(chunk)
            except OSError as exc:
                raise StoreError(f"{part}: write failed: {exc.strerror}") from exc
            digest.update(chunk)
            done += len(chunk)
            self.received_bytes += len(chunk)
            if progress is not None:
                progress(done, size)
            if first:  # the first chunk of this transfer is written
                f.flush()
                crash_point("download_partial")
        try:
            f.flush()
        except OSError as exc:
            raise StoreError(f"{part}: write failed: {exc.strerror}") from exc
        if done < size:
            raise TransportError(f"{relpath}: truncated at {done} of {size} bytes ({CLOSED_EARLY})")
        return digest.hexdigest()

    def _read(
        self, body: _Body, relpath: str, deadline: float, done: int = 0, size: int | None = None
    ) -> bytes:
        if time.monotonic() > deadline:
            got = f" ({done} of {size} bytes)" if size is not None else ""
            raise DeadlineError(
                f"{relpath}: overall deadline of {self.deadline_s:g} s exceeded{got}"
            )
        try:
            return body.read1(CHUNK)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = _reason(exc) if isinstance(exc, urllib3.exceptions.HTTPError) else str(exc)
            at = f" at {done} of {size} bytes" if size is not None else ""
            verb = "truncated" if reason == CLOSED_EARLY else "transfer broke off"
            raise TransportError(f"{relpath}: {verb}{at} ({reason})") from exc
