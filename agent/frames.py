"""What passes between the pipeline's threads, and what comes out of it.

``Item``: a frame read by the capture thread, prepared for the model. ``Slot``: the one
place between capture and inference (latest wins, or wait for room). ``Result``: what
the model made of one frame. ``Stats``: the pipeline's figures over its recent results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from agent.contract import InferenceDoc, RuntimeDoc
    from agent.runtime.adapters import Geometry, Output


@dataclass(frozen=True)
class Result:
    """What the model made of one frame."""

    frame: int  # the pipeline's frame number, from 0
    ts: float  # wall clock time of capture
    model: str
    version: int | None
    backend: str
    latency_ms: float  # capture to result
    infer_ms: float  # the interpreter alone
    output: Output

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "ts": round(self.ts, 3),
            "model": self.model,
            "version": self.version,
            "backend": self.backend,
            "latency_ms": round(self.latency_ms, 2),
            "infer_ms": round(self.infer_ms, 2),
            **self.output.to_dict(),
        }


@dataclass(frozen=True)
class Stats:
    """Counters since start, and rates and percentiles over the recent results."""

    frames: int  # read from the source
    results: int
    dropped: int  # overwritten before inference (live sources only)
    errors: int
    fps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    infer_ms_p50: float
    backend: str
    model: str
    version: int | None
    source_connected: bool
    runtime: RuntimeDoc | None = None  # interpreters and threads: in the state, not here

    def to_dict(self) -> InferenceDoc:
        """Telemetry's ``inference``: the fields in order, floats to 2 decimals."""
        return {
            "frames": self.frames,
            "results": self.results,
            "dropped": self.dropped,
            "errors": self.errors,
            "fps": round(self.fps, 2),
            "latency_ms_p50": round(self.latency_ms_p50, 2),
            "latency_ms_p95": round(self.latency_ms_p95, 2),
            "latency_ms_p99": round(self.latency_ms_p99, 2),
            "infer_ms_p50": round(self.infer_ms_p50, 2),
            "backend": self.backend,
            "model": self.model,
            "version": self.version,
            "source_connected": self.source_connected,
        }


@dataclass
class Item:
    index: int
    ts: float
    mono: float
    frame: np.ndarray
    tensor: np.ndarray | None
    geometry: Geometry | None
    key: object  # the model input key the tensor was prepared for


END = object()  # the stream ended: after the last item


class Stage(Protocol):
    """A step after the pipeline's model, before the result is published (a cascade).

    ``run`` is called on the pipeline's inference thread, one frame at a time in frame
    order, with the frame's item and the primary model's result; it returns the result to
    publish (the same one, or a new one). It must not raise: an exception is counted as an
    inference error and the primary result is published as it was.
    """

    def run(self, item: Item, result: Result) -> Result: ...


class Observer(Protocol):
    """Sees every published result after it was handed on (a shadow run, output
    statistics): on the inference thread, in frame order, after ``on_result``. Its time
    delays the next frame, never this one's result. It must not raise (counted, logged)."""

    def observe(self, item: Item, result: Result) -> None: ...


class Slot:
    """One item between the threads: latest wins (counting drops), or wait for room."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None

    def put(self, item: Any, wait: bool, stop: threading.Event) -> bool:
        """Store ``item``; True when it replaced one that was never taken.

        With ``wait``, a stop ends the wait without storing: the frame already waiting
        is kept (the inference thread may still take it), not replaced by a newer one,
        so a stopped stream ends without a gap (and no drop is counted).
        """
        with self._cond:
            while wait and self._item is not None and not stop.is_set():
                self._cond.wait(0.1)
            if wait and self._item is not None:  # stopping
                return False
            replaced = self._item is not None
            self._item = item
            self._cond.notify_all()
            return replaced

    def empty(self) -> bool:
        return self._item is None

    def take(self, timeout: float, ready: Callable[[], bool] | None = None) -> Any:
        """The item, or None after ``timeout`` or as soon as ``ready()`` holds."""
        with self._cond:
            if self._item is None and not (ready and ready()):
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Wait (without taking) until ``ready()`` holds, at most ``timeout``."""
        with self._cond:
            self._cond.wait_for(ready, timeout)

    def wake(self) -> None:
        """Another thread changed what ``ready`` looks at."""
        with self._cond:
            self._cond.notify_all()


def rate(times: list[float]) -> float:
    """Results per second over ``times`` (monotonic, ascending): 0.0 for fewer than three,
    or when they all fall in one clock tick (no span to divide by)."""
    if len(times) <= 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])
