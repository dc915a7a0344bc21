"""What an operator sees while ``edge-agent models pull`` downloads.

A self-overwriting line on a terminal (``model.tflite  12.3 / 40.0 MB  4.1 MB/s  ETA
7 s``), the rate smoothed so that the ETA does not jump with every chunk, and the one
line said when Ctrl-C cuts a download short. The formatting and the rate are pure
functions of plain values; :class:`ProgressLine` only decides when to draw.

A few dozen lines of our own rather than a progress-bar dependency on every device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from agent.manifest import FileEntry
from agent.registry import Progress

SHOWN_FROM_BYTES = 1_000_000  # smaller files are done before a line would help
REDRAW_S = 0.2
RATE_HALF_LIFE_S = 2.0  # the smoothed rate forgets half of its past in this long


def size_text(n: float, unit: float) -> str:
    """``n`` bytes in ``unit`` (1e3, 1e6 or 1e9) with one decimal; whole bytes (unit 1)."""
    return f"{n:.0f}" if unit == 1.0 else f"{n / unit:.1f}"


def _unit(n: float) -> tuple[float, str]:
    for unit, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= unit:
            return unit, name
    return 1.0, "B"


def rate_text(rate: float | None) -> str:
    """Bytes per second as ``4.1 MB/s``; ``-- B/s`` while unknown (nothing measured yet)."""
    if rate is None or rate <= 0:
        return "-- B/s"
    unit, name = _unit(rate)
    return f"{size_text(rate, unit)} {name}/s"


def eta_text(seconds: float | None) -> str:
    """``7 s``, ``3 min 05 s``, ``2 h 10 min``; ``--`` when it cannot be known."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def progress_text(name: str, done: int, total: int | None, rate: float | None) -> str:
    """One progress line: ``model.tflite  12.3 / 40.0 MB  4.1 MB/s  ETA 7 s``.

    ``total`` None or 0 (unknown): the bytes done and the rate, no ETA. A rate of None
    or 0 (stalled, or not measured yet): the ETA is ``--``.
    """
    if not total:
        unit, unit_name = _unit(done)
        return f"{name}  {size_text(done, unit)} {unit_name}  {rate_text(rate)}"
    unit, unit_name = _unit(total)
    left = max(total - done, 0)
    eta = left / rate if rate else None
    if left == 0:
        eta = 0.0
    return (
        f"{name}  {size_text(done, unit)} / {size_text(total, unit)} {unit_name}  "
        f"{rate_text(rate)}  ETA {eta_text(eta)}"
    )


@dataclass
class RateMeter:
    """A transfer rate smoothed exponentially over time (bytes per second).

    Fed (time, bytes done) samples; the first one is the baseline (a resumed download
    starts at the bytes kept, which did not cross the network now).
    """

    half_life_s: float = RATE_HALF_LIFE_S
    rate: float | None = None
    _at: float | None = None
    _done: int = 0

    def add(self, now: float, done: int) -> float | None:
        """Take a sample; returns the smoothed rate (None until two samples apart)."""
        if self._at is None or done < self._done:
            self._at, self._done = now, done
            return self.rate
        elapsed = now - self._at
        if elapsed <= 0:
            return self.rate
        instant = (done - self._done) / elapsed
        if self.rate is None:
            self.rate = instant
        else:
            weight = 1.0 - 0.5 ** (elapsed / self.half_life_s)
            self.rate += weight * (instant - self.rate)
        self._at, self._done = now, done
        return self.rate


class ProgressLine:
    """The progress of each downloaded file on one self-overwriting terminal line.

    Draws only when ``enabled`` (stderr a terminal, not ``--json``) and for files of
    at least SHOWN_FROM_BYTES. Remembers the file being fetched either way, for the
    line said on an interruption.
    """

    def __init__(
        self, stream: TextIO, enabled: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.clock = clock
        self.current: FileEntry | None = None
        self._open = False  # a line is drawn and not yet ended

    def __call__(self, entry: FileEntry) -> Progress | None:
        self.end()
        self.current = entry
        if not self.enabled or entry.size < SHOWN_FROM_BYTES:
            return None
        meter = RateMeter()
        drawn_at = -math.inf

        def show(done: int, total: int) -> None:
            nonlocal drawn_at
            now = self.clock()
            if now - drawn_at < REDRAW_S and done < total:
                return
            drawn_at = now
            rate = meter.add(now, done)
            self._draw(progress_text(entry.name, done, total, rate), done >= total)

        return show

    def _draw(self, text: str, last: bool) -> None:
        # \x1b[K clears what a longer earlier line left on the right
        self.stream.write(f"\r{text}\x1b[K" + ("\n" if last else ""))
        self.stream.flush()
        self._open = not last

    def end(self) -> None:
        """End a line left open (an error or an interruption is said on the next one)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def interrupted_text(entry: FileEntry | None, kept: int) -> str:
    """What Ctrl-C left of the download of ``entry``: ``kept`` bytes for resume, or none."""
    if entry is None:
        return "interrupted before any file was downloaded"
    if kept <= 0:
        return "interrupted: no partial download kept"
    unit, unit_name = _unit(entry.size)
    return (
        f"interrupted: partial download of {entry.name} kept for resume "
        f"({size_text(kept, unit)} of {size_text(entry.size, unit)} {unit_name})"
    )
