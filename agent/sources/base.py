"""What every source is: a small Protocol, the frame it yields and its two errors.

A source only knows how to get the next array from its device, file or socket. Pacing,
frame numbering, timestamps, reconnection with backoff and the ``source_lost`` /
``source_recovered`` events are the pipeline's (``agent.pipeline``), so each source
stays a few dozen lines.

Arrays are ``uint8`` RGB ``[height, width, 3]`` for image sources and ``float32``
``[window, channels]`` for sensor sources.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Protocol

from agent.errors import EdgeAgentError

if TYPE_CHECKING:
    import numpy as np


class SourceError(EdgeAgentError):
    """The source is lost (device gone, stream cut, file unreadable); reopening may help."""


class EndOfStream(Exception):  # a signal, like StopIteration, not a failure
    """A finite source (a file, a folder, ``synthetic.frames``) has no more frames."""


class Source(Protocol):
    """A stream of frames or sensor windows.

    ``live`` sources produce at their own pace (a camera, a network stream, a sensor):
    when inference is slower, the pipeline drops their older frames. Other sources
    (files, synthetic) produce on demand and the pipeline paces them to ``fps``.
    """

    name: str
    live: bool

    def open(self) -> None:
        """Connect or open. Raises SourceError with a message naming what failed."""

    def read(self, timeout: float) -> np.ndarray | None:
        """The next frame, or None when nothing arrived within ``timeout`` seconds.

        Raises EndOfStream when a finite source is done and SourceError when lost.
        Should not block much longer than ``timeout``, so the pipeline can stop; where a
        library cannot be bounded so (a stalled V4L2 camera: ~2 s; RTSP: the source's
        ``timeout_s``) the source says so, and the pipeline abandons the read at stop.
        """

    def close(self) -> None:
        """Release the device or connection. Safe to call twice, or after a failed open."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: errors reach logs and MQTT events."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}").geturl()
