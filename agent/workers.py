"""Several interpreters side by side, results back in frame order (``runtime.interpreters``).

The pipeline's inference thread becomes a dispatcher: it hands each frame to a free
worker thread (worker ``i`` runs the model's interpreter ``i``, so no interpreter is
used by two threads) and emits results from the head of the in-flight queue only, so
the result for frame n always comes before frame n+1's, however the invokes overlap.
``invoke()`` releases the GIL, so N interpreters of one thread each use N cores.

The dispatcher owns ``Pool``'s in-flight queue; the workers only fill in their job and
call ``wake`` (the pipeline's slot condition) so a dispatcher waiting for a frame also
notices a finished job.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.runtime.adapters import Output
    from agent.runtime.model import LoadedModel

# Item.key of a frame the worker running it prepares (resize, normalise): with several
# interpreters the frames are prepared on as many cores, beside the invokes, instead of
# one after the other on the capture thread (cv2 and numpy release the GIL).
PREPARE_ON_WORKER = object()
POLL_S = 0.1  # longest a worker waits for a job before looking at the stop flag
BACKLOG = 2  # finished jobs held behind a slow head, per worker


@dataclass
class Job:
    """One frame on one interpreter; filled in by the worker, read after ``done``."""

    item: Any  # agent.frames.Item: index, frame, tensor, geometry, key
    model: LoadedModel
    worker: int
    started: float = 0.0
    finished: float = 0.0
    output: Output | None = None
    error: Exception | None = None
    unfit: bool = False  # the frame could not be prepared for the model: not its failure
    done: threading.Event = field(default_factory=threading.Event)


class Pool:
    """Worker threads, one per interpreter, and the in-flight jobs in frame order.

    Used by one dispatcher thread (``submit``, ``ready``, ``take_done``); ``spawn``
    starts a thread (the pipeline's, so stop() joins it); workers end when ``stop``
    is set.
    """

    def __init__(
        self,
        spawn: Callable[[Callable[[], None], str], threading.Thread],
        stop: threading.Event,
        wake: Callable[[], None],
    ) -> None:
        self._spawn = spawn
        self._stop = stop
        self._wake = wake
        self._queues: list[queue.Queue[Job]] = []
        self._inflight: deque[Job] = deque()

    def free(self, workers: int, depth: int = 1) -> int | None:
        """The worker below ``workers`` with the fewest unfinished jobs, when that is
        under ``depth``; None otherwise, or when enough finished jobs wait behind a
        slow head. With ``depth`` 2 a next frame waits at each worker, which starts it
        as soon as its invoke ends instead of waiting for the dispatcher."""
        if len(self._inflight) >= (BACKLOG + depth) * workers:
            return None
        load = [0] * workers
        for job in self._inflight:
            if job.worker < workers and not job.done.is_set():
                load[job.worker] += 1
        least = min(range(workers), key=load.__getitem__)
        return least if load[least] < depth else None

    def submit(self, item: Any, model: LoadedModel, worker: int) -> None:
        while len(self._queues) <= worker:  # threads are started on first need
            jobs: queue.Queue[Job] = queue.Queue()
            self._queues.append(jobs)
            index = len(self._queues) - 1
            self._spawn(functools.partial(self._work, jobs), f"infer-w{index}")
        job = Job(item, model, worker)
        self._inflight.append(job)
        self._queues[worker].put(job)

    def uses(self, model: LoadedModel) -> bool:
        """A job of ``model`` is in flight (its interpreters may be running)."""
        return any(job.model is model for job in self._inflight)

    @property
    def idle(self) -> bool:
        """Nothing in flight: every result handed out."""
        return not self._inflight

    def ready(self) -> bool:
        """The oldest job is finished (a result can be handed out in order)."""
        return bool(self._inflight) and self._inflight[0].done.is_set()

    def take_done(self) -> Iterator[Job]:
        """The finished jobs at the head, oldest first; stops at the first unfinished."""
        while self._inflight and self._inflight[0].done.is_set():
            yield self._inflight.popleft()

    def _work(self, jobs: queue.Queue[Job]) -> None:
        while not self._stop.is_set():
            try:
                job = jobs.get(timeout=POLL_S)
            except queue.Empty:
                continue
            run(job)
            self._wake()


def run(job: Job) -> None:
    """Prepare (a frame left to the worker, or prepared for another model), infer,
    interpret."""
    item, model = job.item, job.model
    try:
        if item.key is PREPARE_ON_WORKER:
            try:
                item.tensor, item.geometry = model.prepare(item.frame)
            except Exception:  # ValueError, cv2.error: this frame only
                job.unfit = True
                raise
            item.key = model.input_key
        elif item.key != model.input_key:  # prepared before a swap to another input
            item.tensor, item.geometry = model.prepare(item.frame)
        job.started = time.monotonic()
        outputs = model.infer(item.tensor, job.worker)
        job.finished = time.monotonic()
        job.output = model.interpret(outputs, item.geometry)
    except Exception as exc:  # counted by the dispatcher, in frame order
        job.error = exc
    finally:
        job.done.set()
