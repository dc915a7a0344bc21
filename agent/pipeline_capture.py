"""The pipeline's capture thread: source → paced, prepared frames in the slot.

It reads the source (reopening it with backoff when it is lost: one ``source_lost``
event per outage, ``source_recovered`` when it is back), paces a file to ``fps``, and
hands each frame to ``prepare`` (resize, normalise, quantise for the model: numpy and
OpenCV calls that release the GIL) before putting it in the slot. A live source
overwrites a frame not yet taken (counted as dropped); a file played as fast as
possible (``fps: 0``) waits for the slot instead. The end of a finite source is put in
the slot as ``END``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.backoff import backoff_delay
from agent.frames import END, Item, Slot
from agent.sources.base import EndOfStream, Source, SourceError

if TYPE_CHECKING:
    import numpy as np

    from agent.contract import EventName
    from agent.pipeline_figures import Figures
    from agent.pipeline_gaps import Gaps

log = logging.getLogger("agent.pipeline")  # the pipeline's records, as before the split

READ_TIMEOUT_S = 0.25  # longest a source read blocks, so stop() is prompt
RECONNECT_FIRST_S = 0.5  # first wait before reopening a source or reloading a model


class EventSink(Protocol):
    """Where the pipeline's events go (``Pipeline._event``)."""

    def __call__(self, name: EventName, **detail: Any) -> None: ...


def retry_delay(attempt: int, max_s: float) -> float:
    """The wait before reopening a source or reloading a model, the ``attempt``-th time."""
    return backoff_delay(attempt, RECONNECT_FIRST_S, max_s, low=0.5)


class Capture:
    """The capture loop of one pipeline; ``connected`` and ``last_frame`` are read by it."""

    def __init__(
        self,
        source: Source,
        fps: float,
        reconnect_max_s: float,
        slot: Slot,
        stop: threading.Event,
        figures: Figures,
        gaps: Gaps,
        prepare: Callable[[np.ndarray], Item | None],
        event: EventSink,
    ) -> None:
        self.source = source
        self.fps = fps
        self.reconnect_max_s = reconnect_max_s
        self._slot = slot
        self._stop = stop
        self.figures = figures
        self._gaps = gaps
        self._prepare_frame = prepare
        self._event = event
        self.connected = False
        self.last_frame: np.ndarray | None = None  # for a snapshot: a reference, no copy

    def run(self) -> None:
        """Read, pace and prepare frames into the slot until stopped or the stream ends."""
        attempt = 0
        lost_at: float | None = None
        interval = 1.0 / self.fps if self.fps > 0 and not self.source.live else 0.0
        wait = not self.source.live and interval == 0.0  # a file as fast as inference
        next_due = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self.connected:
                    try:
                        self._open_source()
                    except SourceError as exc:
                        lost_at, attempt = self._outage(exc, lost_at, attempt)
                        continue
                    self.connected = True
                    if lost_at is not None:
                        self._event(
                            "source_recovered",
                            source=self.source.name,
                            down_s=round(time.monotonic() - lost_at, 2),
                        )
                    attempt, lost_at = 0, None
                if interval:
                    now = time.monotonic()
                    if next_due > now:
                        self._stop.wait(next_due - now)
                    next_due = max(next_due + interval, time.monotonic() - interval)
                try:
                    frame = self.source.read(READ_TIMEOUT_S)
                except EndOfStream:
                    # a finite source (a file, a folder without loop) is done: said once
                    self._event("source_ended", source=self.source.name, frames=self.figures.frames)
                    self._slot.put(END, True, self._stop)
                    return
                except SourceError as exc:
                    self.connected = False
                    self.source.close()
                    lost_at, attempt = self._outage(exc, lost_at, attempt)
                    continue
                if frame is None:
                    continue
                self.last_frame = frame
                item = self._prepare_frame(frame)
                if item is not None:
                    self._gaps.put(item.mono)
                    if self._slot.put(item, wait, self._stop):
                        self.figures.dropped += 1
        except Exception:  # a bug must not silently stop the stream: count and report it
            log.exception("capture thread failed")
            self.figures.capture_errors += 1
            self._event("pipeline_error", stage="capture")
            self._slot.put(END, False, self._stop)
        finally:
            self.source.close()
            self.connected = False

    def _open_source(self) -> None:
        try:
            self.source.open()
        except ImportError as exc:  # a device library is missing: say which
            raise SourceError(f"{self.source.name}: cannot import {exc.name}: {exc}") from exc

    def _outage(self, exc: SourceError, lost_at: float | None, attempt: int) -> tuple[float, int]:
        """Report the start of an outage once, then wait before the next attempt."""
        if lost_at is None:  # one event per outage, not one per attempt
            self._event("source_lost", source=self.source.name, error=str(exc))
            lost_at = time.monotonic()
        else:
            log.debug("source still lost (attempt %d): %s", attempt, exc)
        attempt += 1
        self._stop.wait(retry_delay(attempt, self.reconnect_max_s))
        return lost_at, attempt
