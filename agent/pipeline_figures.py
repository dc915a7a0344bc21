"""The pipeline's figures: its counters and its window of recent results, read by ``stats``.

Each counter is written by one thread at a time (the capture thread, the serving
inference thread, or the watchdog counting stalls); the windows of latencies are
shared with the thread that asks for ``stats`` and kept under a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from agent.frames import Stats, rate

if TYPE_CHECKING:
    from agent.runtime.model import LoadedModel

STATS_WINDOW = 2048  # results kept for percentiles and fps


class Figures:
    """Frames read, results given, frames dropped, errors, and recent latencies."""

    def __init__(self) -> None:
        self.frames = 0
        self.dropped = 0
        self.capture_errors = 0
        self.infer_errors = 0
        self.results = 0
        self.stalls = 0
        self._lock = threading.Lock()
        self._latency: deque[float] = deque(maxlen=STATS_WINDOW)
        self._infer_time: deque[float] = deque(maxlen=STATS_WINDOW)
        self._done_at: deque[float] = deque(maxlen=STATS_WINDOW)

    def record(self, latency_ms: float, infer_ms: float, done_at: float) -> None:
        """Keep one result's times (any thread)."""
        with self._lock:
            self._latency.append(latency_ms)
            self._infer_time.append(infer_ms)
            self._done_at.append(done_at)

    def stats(self, model: LoadedModel, connected: bool) -> Stats:
        """The figures now, for ``model`` serving; fps over the last 5 s."""
        import numpy as np

        with self._lock:
            latency = np.array(self._latency) if self._latency else np.zeros(1)
            infer = np.array(self._infer_time) if self._infer_time else np.zeros(1)
            done = list(self._done_at)
        now = time.monotonic()
        recent = [t for t in done if now - t <= 5.0]
        fps = rate(recent)
        p50, p95, p99 = np.percentile(latency, [50, 95, 99])
        return Stats(
            frames=self.frames,
            results=self.results,
            dropped=self.dropped,
            errors=self.capture_errors + self.infer_errors + self.stalls,
            fps=float(fps),
            latency_ms_p50=float(p50),
            latency_ms_p95=float(p95),
            latency_ms_p99=float(p99),
            infer_ms_p50=float(np.percentile(infer, 50)),
            backend=model.backend_name,
            model=model.name,
            version=model.version,
            source_connected=connected,
            runtime=model.choice.to_dict(),
        )
