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
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from agent.atomic import open_private
from agent.backoff import backoff_delay
from agent.config import RegistryConfig
from agent.errors import RegistryError, StoreError, TransportError, VerificationError
from agent.faults import crash_point
from agent.hashing import BackgroundSha256
from agent.transport import (
    CLOSED_EARLY,
    Body,
    DeadlineError,
    Fetched,
    FileTransport,
    NotFoundError,
    RangeRefused,
    Response,
    Transport,
    UnreachableError,
    Watchdog,
)

__all__ = [  # the errors callers catch are defined with the transports
    "DeadlineError",
    "Fetched",
    "NotFoundError",
    "Progress",
    "Registry",
    "UnreachableError",
]

CHUNK = 1 << 20
# Written bytes are handed to the disk every this many (writeback started, not waited
# for): the fsync before a blob is installed then has little left to wait for, and a
# broken-off download keeps more of its bytes through a power cut.
WRITEBACK_BYTES = 16 << 20
Progress = Callable[[int, int], None]
T = TypeVar("T")


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
        self.transport: Transport
        if url.startswith("file://"):
            self.transport = FileTransport(
                Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            )
        else:  # urllib3 is imported only for a registry served over HTTP
            from agent.transport_http import HttpTransport

            self.transport = HttpTransport(url, ca, timeout_s, connect_timeout_s)

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
        with Watchdog(deadline - time.monotonic()) as watchdog:
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
            except RangeRefused:
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
        resp: Response,
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
        self, body: Body, relpath: str, deadline: float, done: int = 0, size: int | None = None
    ) -> bytes:
        if time.monotonic() > deadline:
            got = f" ({done} of {size} bytes)" if size is not None else ""
            raise DeadlineError(
                f"{relpath}: overall deadline of {self.deadline_s:g} s exceeded{got}"
            )
        try:
            return body.read1(CHUNK)
        except OSError as exc:  # BodyBroken names an HTTP failure in a short phrase
            reason = str(exc)
            at = f" at {done} of {size} bytes" if size is not None else ""
            verb = "truncated" if reason == CLOSED_EARLY else "transfer broke off"
            raise TransportError(f"{relpath}: {verb}{at} ({reason})") from exc
