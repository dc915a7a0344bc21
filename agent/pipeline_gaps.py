"""Gaps between frames, given to a model loading beside the running one (``between_frames``).

Allocating a model's tensors holds the GIL and a warm-up run takes the cores: a loader
waits for a moment the inference thread has finished a frame and the next is not there
yet. The inference thread counts those moments, only while a loader waits for one; each
moment is given to one caller.
"""

from __future__ import annotations

import threading
from collections import deque

from agent.frames import Slot

SLOW_INTERVAL_S = 0.05  # frames further apart than this (under 20 fps): a slow stream


class Gaps:
    """The moments the inference thread goes idle, whether it has a frame in hand, and
    the recent frames' capture times."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._serial = 0
        self._given = 0
        self.pacing = 0  # loaders waiting for a gap: read by the inference thread
        self.busy = False  # the inference thread has a frame in hand (or the pool has)
        self._put_at: deque[float] = deque(maxlen=8)  # capture times of the last frames

    def put(self, mono: float) -> None:
        """A frame captured at ``mono`` (the capture thread)."""
        self._put_at.append(mono)

    def slow_stream(self) -> bool:
        """Frames come less often than every ``SLOW_INTERVAL_S``: the model is mostly idle
        (pacing each step to a gap of its own would make a latency budget's 50 invokes
        take 50 frame intervals)."""
        times = list(self._put_at)
        return len(times) >= 3 and (times[-1] - times[0]) / (len(times) - 1) >= SLOW_INTERVAL_S

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """True at the next gap not given to another caller; False after ``timeout`` or
        once ``stop`` is set."""
        with self._idle:
            self.pacing += 1
            try:
                gap = self._idle.wait_for(
                    lambda: self._serial > self._given or stop.is_set(), timeout
                )
                self._given = self._serial
                return gap and not stop.is_set()
            finally:
                self.pacing -= 1

    def going_idle(self, slot: Slot) -> None:
        """The inference thread is about to wait for a frame: a gap, if none is there."""
        with self._idle:
            if slot.empty():
                self._serial += 1
                self._idle.notify_all()
