"""HTTP multipart MJPEG (``source.type: mjpeg``): IP cameras, ESP32-CAM, mjpg-streamer.

The server answers one GET with a ``multipart/x-mixed-replace`` body that never ends:
a boundary line, part headers, a JPEG, the next boundary line, and so on.

A reader thread receives the body and splits it into parts; ``read()`` takes and
decodes them. Why a thread: urllib3 (http.client below it) ends the connection when a
socket read times out, so ``read(timeout)`` cannot be a socket timeout shorter than
the gap between two frames. The thread's socket waits up to ``timeout_s``; ``read``
waits on the thread for only its ``timeout``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING

from agent import __version__
from agent.sources.base import SourceError, redact_url

if TYPE_CHECKING:
    import numpy as np
    import urllib3

    from agent.config import MjpegSource as MjpegConfig

CHUNK = 64 * 1024
QUEUED_PARTS = 8  # parts kept for a slow reader; older ones are dropped, as a camera would
MAX_PART = 16 * 1024 * 1024  # a camera frame is far smaller; bounds the buffer
HEADERS_END = re.compile(rb"\r?\n\r?\n")
BOUNDARY = re.compile(r';\s*boundary="?([^";]+)"?', re.IGNORECASE)


class _Malformed(Exception):
    """The body is not a multipart stream of reasonable parts."""


class _Parts:
    """Splits a multipart body into part payloads: by each part's Content-Length when
    it has one, else at the next boundary (so such a part is complete only when the
    next one starts)."""

    def __init__(self, boundary: str) -> None:
        # Some cameras declare "boundary=--x" and then write "--x", not "----x".
        self.delimiter = (boundary if boundary.startswith("--") else "--" + boundary).encode()
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads ``data`` completes. Raises _Malformed for a bad or huge part."""
        self.buffer += data
        parts = []
        while (part := self._next()) is not None:
            parts.append(part)
        if len(self.buffer) > MAX_PART:
            raise _Malformed(f"no part ends within {MAX_PART} bytes")
        return parts

    def _next(self) -> bytes | None:
        buffer = self.buffer
        start = buffer.find(self.delimiter)
        headers_end = HEADERS_END.search(buffer, start) if start >= 0 else None
        if headers_end is None:
            return None
        body = headers_end.end()
        length = _content_length(bytes(buffer[start : headers_end.start()]))
        if length is not None:
            end = next_start = body + length
            if len(buffer) < end:
                return None
        else:
            end = next_start = buffer.find(self.delimiter, body)
            if end < 0:
                return None
        part = bytes(buffer[body:end])
        del buffer[:next_start]
        return part if length is not None else part.rstrip(b"\r\n")  # a JPEG ends in FF D9


def _content_length(headers: bytes) -> int | None:
    for line in headers.splitlines()[1:]:  # the first line is the boundary
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            if not value.strip().isdigit() or int(value) > MAX_PART:
                raise _Malformed(f"bad part Content-Length {value.strip()!r}")
            return int(value)
    return None


class _Stream:
    """One connection: its thread queues the parts, then records why it ended."""

    def __init__(
        self, pool: urllib3.PoolManager, response: urllib3.BaseHTTPResponse, boundary: str
    ) -> None:
        self.pool, self.response = pool, response
        self.parts: deque[bytes] = deque(maxlen=QUEUED_PARTS)
        self.ended: str | None = None  # why the stream ended, once it has
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=self._receive, args=(_Parts(boundary),), name="mjpeg", daemon=True
        )
        self.thread.start()

    def _receive(self, parts: _Parts) -> None:
        import urllib3

        reason = "the server closed the connection"
        try:
            while not self.stopping.is_set():
                data = self.response.read1(CHUNK)
                if not data:
                    break
                for part in parts.feed(data):
                    with self.changed:
                        self.parts.append(part)
                        self.changed.notify()
        except urllib3.exceptions.ReadTimeoutError:
            reason = "no data within source.timeout_s"
        except _Malformed as exc:
            reason = f"not an MJPEG stream: {exc}"
        except Exception as exc:  # ProtocolError, OSError, ...: read() must hear of it
            reason = f"connection broken: {exc}"
        with self.changed:
            self.ended = reason
            self.changed.notify()

    def next_part(self, timeout: float) -> bytes | str | None:
        """The oldest part, else why the stream ended, else None after ``timeout``."""
        with self.changed:
            self.changed.wait_for(lambda: self.parts or self.ended, timeout)
            return self.parts.popleft() if self.parts else self.ended

    def stop(self) -> None:
        self.stopping.set()
        # Wake the thread out of its blocking read by shutting the connection down, on a
        # duplicate descriptor: http.client keeps the socket object to itself.
        with (
            # Already closed: at the end of the body http.client drops its file.
            contextlib.suppress(OSError, ValueError, AttributeError),
            socket.socket(fileno=os.dup(self.response.fileno())) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=2)
        self.response.close()
        self.pool.clear()


class MjpegSource:
    """Frames of an HTTP MJPEG stream, RGB ``uint8`` ``[height, width, 3]``.

    ``open()`` connects within ``timeout_s`` and raises SourceError (URL and reason)
    when it cannot, or when the answer is not 200 with a multipart/x-mixed-replace
    body. ``read(timeout)`` returns None when no complete frame arrived within
    ``timeout``; it raises SourceError once the connection is cut (after the frames
    that arrived before), when no data came for ``timeout_s``, or when a part is not
    a JPEG. When frames arrive faster than they are read, the oldest are dropped
    (``QUEUED_PARTS``). Reconnecting is ``close()`` then ``open()``.
    """

    name = "mjpeg"
    live = True

    def __init__(self, config: MjpegConfig) -> None:
        self.url = config.url
        self.target = redact_url(config.url)
        self.timeout_s = config.timeout_s
        self._stream: _Stream | None = None

    def open(self) -> None:
        import urllib3

        self.close()
        pool = urllib3.PoolManager(
            retries=False,  # reconnecting, with backoff, is the pipeline's
            timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
        )
        headers = {"User-Agent": f"edge-agent/{__version__}"}
        parts = urllib.parse.urlsplit(self.url)
        if parts.username is not None:
            # urllib3 ignores a URL's user:password; cameras expect it as Basic auth.
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            headers.update(urllib3.util.make_headers(basic_auth=f"{user}:{password}"))
        try:
            response = pool.request("GET", self.url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            pool.clear()
            if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before its base
                reason = str(exc).rsplit(": ", 1)[-1]  # "[Errno 111] Connection refused"
            elif isinstance(exc, urllib3.exceptions.TimeoutError):
                reason = f"no answer within {self.timeout_s:g} s (timeout_s)"
            else:
                reason = str(exc)
            raise SourceError(f"mjpeg {self.target}: cannot connect: {reason}") from exc
        try:
            boundary = self._boundary(response)
        except SourceError:
            response.close()  # unread body: never hand the connection back
            pool.clear()
            raise
        self._stream = _Stream(pool, response, boundary)

    def _boundary(self, response: urllib3.BaseHTTPResponse) -> str:
        if response.status != 200:
            moved = response.headers.get("Location")
            hint = f" (redirected to {moved}: use that URL)" if moved else ""
            raise SourceError(f"mjpeg {self.target}: HTTP {response.status}{hint}")
        content_type = response.headers.get("Content-Type", "")
        match = BOUNDARY.search(content_type)
        if not content_type.lower().startswith("multipart/x-mixed-replace") or not match:
            raise SourceError(
                f"mjpeg {self.target}: not an MJPEG stream (Content-Type {content_type!r}, "
                "expected multipart/x-mixed-replace with a boundary)"
            )
        return match.group(1).strip()

    def read(self, timeout: float) -> np.ndarray | None:
        import cv2
        import numpy as np

        if self._stream is None:
            raise SourceError(f"mjpeg {self.target}: not open")
        part = self._stream.next_part(timeout)
        if part is None:
            return None
        if isinstance(part, str):
            raise SourceError(f"mjpeg {self.target}: {part}")
        try:
            image = cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:  # an empty part
            image = None
        if image is None:
            raise SourceError(f"mjpeg {self.target}: a part of {len(part)} bytes is not a JPEG")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
