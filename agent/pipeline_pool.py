"""The inference thread's loop for a model of several interpreters (``runtime.interpreters``).

It hands frames to one worker thread per interpreter (agent/workers.py) and gives out
the results in frame order. A swap to another model of several takes effect at the
next frame handed out, while the frames in flight finish on the old set; a swap to a
model of one waits for the frames in flight, then hands the stream back to the loop
of one interpreter (agent/pipeline.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.frames import END, Item, Slot
from agent.workers import Pool

if TYPE_CHECKING:
    from agent.pipeline_figures import Figures
    from agent.pipeline_gaps import Gaps
    from agent.pipeline_swap import Handover
    from agent.runtime.adapters import Output
    from agent.runtime.model import LoadedModel

log = logging.getLogger("agent.pipeline")  # the pipeline's records, as before the split

Emit = Callable[["Item", "LoadedModel", "Output", float, float], None]
"""Hand on one frame's output: (item, model, output, started, finished)."""


class PoolLoop:
    """Serves frames from ``slot`` on a pool of interpreters, made at first use."""

    def __init__(
        self,
        spawn: Callable[[Callable[[], None], str], threading.Thread],
        stop: threading.Event,
        finished: threading.Event,
        slot: Slot,
        models: Handover,
        gaps: Gaps,
        figures: Figures,
        live: bool,
        switch: Callable[..., None],
        emit: Emit,
    ) -> None:
        self._spawn = spawn
        self._stop = stop
        self._finished = finished
        self._slot = slot
        self._models = models
        self._gaps = gaps
        self._figures = figures
        # A file played as fast as possible queues a next frame at each interpreter; a
        # live source never does (it would serve an older frame, later).
        self._depth = 1 if live else 2
        self._switch_if_pending = switch
        self._emit = emit
        self._pool: Pool | None = None

    def run(self) -> bool:
        """Serve a model of several interpreters (CPU only: never watched) until the
        stream ends (True), or a swap brings a model of one (False).

        A swap to another model of several takes effect at the next frame handed out:
        the frames in flight finish on the old one (each job names its model; results
        still come out in frame order, so versions never go back), which is closed once
        its last job is done. A swap to a model of one waits for the frames in flight.
        """
        if self._pool is None:
            self._pool = Pool(self._spawn, self._stop, self._slot.wake)
        pool = self._pool
        try:
            while not self._stop.is_set():
                self._hand_out(pool)
                self._models.retire_drained(pool.uses)
                pending = self._models.pending
                if pending is not None and pending.workers > 1:
                    self._switch_if_pending(drain=True)
                elif pending is not None or self._models.model.workers == 1:
                    if not pool.idle:
                        self._slot.until(pool.ready, 0.1)
                        continue
                    self._switch_if_pending()
                    if self._models.model.workers == 1:
                        return False
                worker = pool.free(self._models.model.workers, self._depth)
                if worker is None:
                    self._slot.until(pool.ready, 0.1)
                    continue
                self._gaps.busy = not pool.idle
                if self._gaps.pacing and pool.idle:  # a loader waits for a gap between frames
                    self._gaps.going_idle(self._slot)
                item = self._slot.take(0.1, pool.ready)
                self._gaps.busy = not pool.idle or item is not None
                if item is END:
                    while not pool.idle and not self._stop.is_set():
                        self._slot.until(pool.ready, 0.1)
                        self._hand_out(pool)
                        self._models.retire_drained(pool.uses)
                    self._finished.set()
                    return True
                if item is not None:
                    pool.submit(item, self._models.model, worker)
            return True
        finally:  # stopping: what still drains is closed by stop(), after the workers
            self._models.retire_all_draining()

    def _hand_out(self, pool: Pool) -> None:
        for job in pool.take_done():  # in frame order
            if job.output is None:
                self._figures.infer_errors += 1  # a frame that does not fit: counted here, in order
                if job.unfit:
                    log.warning("frame %d does not fit the model: %s", job.item.index, job.error)
                else:
                    log.warning("frame %d: %s", job.item.index, job.error)
            else:
                self._emit(job.item, job.model, job.output, job.started, job.finished)
