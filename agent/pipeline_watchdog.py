"""The accelerator watchdog: notices an inference that overruns ``invoke_timeout_s``.

The watchdog and the inference threads agree on what is in flight under one lock: the
(generation, started) of a watched call. A stalled call cannot be interrupted: the
watchdog bumps the generation, so that a late return of the abandoned call is ignored,
and the pipeline serves from a new inference thread (``on_stall``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Watchdog:
    """The generation of the serving inference thread and the call it has in flight."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._watch = threading.Lock()
        self.generation = 0  # bumped when a stalled call is abandoned
        self._invoke: tuple[int, float] | None = None

    def begin(self, generation: int, started: float) -> None:
        """A call of the inference thread of ``generation`` started at ``started``."""
        with self._watch:
            self._invoke = (generation, started)

    def end(self, generation: int) -> bool:
        """The call is over; False when the watchdog has abandoned this thread's call."""
        with self._watch:
            if generation != self.generation:
                return False
            self._invoke = None
            return True

    def run(self, stop: threading.Event, on_stall: Callable[[int], None]) -> None:
        """Check the call in flight until ``stop``; at a stall, call ``on_stall`` with
        the new generation."""
        period = min(0.1, self.timeout_s / 4)
        while not stop.wait(period):
            generation = self._stalled()
            if generation is not None:
                on_stall(generation)

    def _stalled(self) -> int | None:
        with self._watch:
            invoke = self._invoke
            if invoke is None or time.monotonic() - invoke[1] < self.timeout_s:
                return None
            self._invoke = None
            self.generation += 1
            return self.generation
