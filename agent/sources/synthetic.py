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
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 64)],
        axis=-1,
    ).astype(np.uint8)
    side = max(min(width, height) // 4, 1)
    frames = []
    for index in range(count):
        frame = base.copy()
        left = (index * (width - side)) // max(count - 1, 1)
        top = (height - side) // 2
        frame[top : top + side, left : left + side] = 255
        frames.append(frame)
    return frames


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


class SyntheticSource(MemorySource):
    """``source.type: synthetic``: the test pattern, ``frames`` long (0: endless)."""

    name = "synthetic"

    def __init__(self, config: SyntheticConfig):
        super().__init__(pattern_frames(config.width, config.height), loop=True)
        self.limit = config.frames
        self._served = 0

    def open(self) -> None:
        super().open()
        self._served = 0

    def read(self, timeout: float) -> np.ndarray:
        if self.limit and self._served >= self.limit:
            raise EndOfStream
        self._served += 1
        return super().read(timeout)
