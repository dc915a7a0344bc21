"""Frames made in memory: a test pattern (``source.type: synthetic``) or given arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.sources.base import EndOfStream

if TYPE_CHECKING:
    import numpy as np

    from agent.config import SyntheticSource as SyntheticConfig

PATTERN_FRAMES = 30  # one second of pattern at 30 fps, then it repeats


def pattern_frames(width: int, height: int, count: int = PATTERN_FRAMES) -> list[np.ndarray]:
    """``count`` RGB frames: a gradient with a bright square that moves across it."""
    base = _gradient(width, height)
    return [_with_square(base, index, count) for index in range(count)]


def _gradient(width: int, height: int) -> np.ndarray:
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width]
    base: np.ndarray = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 64)],
        axis=-1,
    ).astype(np.uint8)
    return base


def _with_square(base: np.ndarray, index: int, count: int) -> np.ndarray:
    """Frame ``index`` of ``count``: ``base`` with the square at its place (a new array)."""
    height, width = base.shape[:2]
    side = max(min(width, height) // 4, 1)
    frame: np.ndarray = base.copy()
    left = (index * (width - side)) // max(count - 1, 1)
    top = (height - side) // 2
    frame[top : top + side, left : left + side] = 255
    return frame


class MemorySource:
    """Yields the given arrays in order (``loop``: forever); for tests and benchmarks."""

    name = "memory"

    def __init__(self, frames: Sequence[np.ndarray], loop: bool = False, live: bool = False):
        if not frames:
            raise ValueError("MemorySource needs at least one frame")
        self.frames = frames
        self.loop = loop
        self.live = live
        self._next = 0

    def open(self) -> None:
        self._next = 0

    def read(self, timeout: float) -> np.ndarray:
        if self._next >= len(self.frames):
            if not self.loop:
                raise EndOfStream
            self._next = 0
        frame = self.frames[self._next]
        self._next += 1
        return frame

    def close(self) -> None:
        pass


class SyntheticSource:
    """``source.type: synthetic``: the test pattern, ``frames`` long (0: endless).

    Each frame is made when read (a copy of the gradient and the square drawn): holding
    the pattern's 30 frames would take 28 MB at 640x480 (bench/daemon.py, issue 19)."""

    name = "synthetic"
    live = False

    def __init__(self, config: SyntheticConfig):
        self._base = _gradient(config.width, config.height)
        self.limit = config.frames
        self._served = 0

    def open(self) -> None:
        self._served = 0

    def read(self, timeout: float) -> np.ndarray:
        if self.limit and self._served >= self.limit:
            raise EndOfStream
        frame = _with_square(self._base, self._served % PATTERN_FRAMES, PATTERN_FRAMES)
        self._served += 1
        return frame

    def close(self) -> None:
        pass
