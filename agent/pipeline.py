"""The pipeline: source → prepare → infer → interpret → results, in overlapping threads.

Two threads do the work and, when the pipeline has a way to reload the model, a
third watches:

- the capture thread reads the source (reconnecting with backoff when it is lost),
  paces files to ``fps``, and prepares each frame for the model (resize, normalise,
  quantise: numpy and OpenCV calls that release the GIL);
- the inference thread runs the model and interprets its outputs, so preparing
  frame n+1 overlaps with inferring frame n;
- the watchdog notices an inference that overruns ``invoke_timeout_s`` (a stalled
  USB Coral) and brings the model back on a fresh delegate or the CPU variant.

Between capture and inference is one slot holding the latest frame. A live source
(camera, stream, sensor) overwrites it, so a slow model never builds a queue: the
overwritten frame is counted as dropped. A file played as fast as possible
(``fps: 0``) waits for the slot instead, and no frame is dropped.

With several interpreters (``runtime.interpreters``), the inference thread hands
frames to one worker thread per interpreter and gives out the results in frame order
(agent/workers.py); a swap takes effect at the next frame handed out, while the frames
in flight finish on the old set.

``swap`` puts in a new model that was loaded and warmed up beside the running one;
the inference thread switches between two frames, so no frame is lost and none
sees a half-loaded model. Every result names the model version that produced it.
The loader paces itself with ``between_frames`` (allocating a model's tensors holds
the GIL, a warm-up run takes the cores: each waits for a gap between frames), and
the replaced model is closed by the thread that called ``swap``, not the inference
thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import logs
from agent.backoff import backoff_delay
from agent.contract import EventName
from agent.errors import EdgeAgentError
from agent.frames import END, Item, Observer, Result, Slot, Stage, Stats, rate
from agent.sources.base import EndOfStream, Source, SourceError
from agent.workers import PREPARE_ON_WORKER, Pool

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.adapters import Output
    from agent.runtime.model import LoadedModel, ModelFiles

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.25  # longest a source read blocks, so stop() is prompt
STATS_WINDOW = 2048  # results kept for percentiles and fps
RECONNECT_FIRST_S = 0.5  # first wait before reopening a source or reloading a model
PACE_WAIT_S = 0.25  # longest a loader waits for a gap between frames (none at fps 0)
SLOW_INTERVAL_S = 0.05  # frames further apart than this (under 20 fps): a slow stream

__all__ = ["Observer", "Pipeline", "Reload", "Result", "Stage", "Stats", "rate"]

Reload = Callable[["ModelFiles", str], "LoadedModel"]
"""Load these files on ``edgetpu`` or ``cpu`` (for the watchdog). Raises ModelError."""


class Pipeline:
    """Runs ``model`` on every frame of ``source``; results and events go to callbacks.

    Callbacks run in the pipeline's threads: keep them short (hand off to a queue).
    An exception in one is counted as an error and logged, never fatal. ``stop``
    closes the model being served unless ``close_model`` is False.
    """

    def __init__(
        self,
        source: Source,
        model: LoadedModel,
        on_result: Callable[[Result], None],
        on_event: Callable[[EventName, dict[str, Any]], None] | None = None,
        fps: float = 0.0,
        reconnect_max_s: float = 30.0,
        invoke_timeout_s: float = 2.0,
        reload: Reload | None = None,
        close_model: bool = True,
    ) -> None:
        self.source = source
        self.close_model = close_model
        self._model = model
        self._pending: LoadedModel | None = None
        self._swapped = threading.Condition()
        self._retired: list[LoadedModel] = []  # switched out, closed by swap()'s caller
        # Switched out while frames still run on its interpreters (runtime.interpreters
        # > 1): retired once the last of them is done.
        self._draining: list[LoadedModel] = []
        # Gaps between frames, for loaders (between_frames): the inference thread counts
        # the moments it goes idle, only while a loader waits for one.
        self._idle = threading.Condition()
        self._idle_serial = 0
        self._idle_given = 0
        self._pacing = 0
        self._busy = False  # the inference thread has a frame in hand (or the pool has)
        self._put_at: deque[float] = deque(maxlen=8)  # capture times of the last frames
        self.on_result = on_result
        # After the model, on the inference thread: stages change the result before it is
        # handed on (a cascade), observers see it after (a shadow run). Replaced whole.
        self._stages: tuple[Stage, ...] = ()
        self._observers: tuple[Observer, ...] = ()
        self.on_event = on_event or (lambda name, detail: None)
        self.fps = fps
        self.reconnect_max_s = reconnect_max_s
        self.invoke_timeout_s = invoke_timeout_s
        self.reload = reload
        self._slot = Slot()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        self._abandoned: list[threading.Thread] = []  # stuck in a stalled inference
        # The watchdog and the inference threads agree on what is in flight under _watch:
        # (generation, started) of a watched call; the generation is bumped when the
        # watchdog abandons a stalled call, and a late return of it is then ignored.
        self._watch = threading.Lock()
        self._generation = 0
        self._invoke: tuple[int, float] | None = None
        self._stalls = 0
        self._infer_thread: threading.Thread | None = None
        self._pool: Pool | None = None  # with runtime.interpreters > 1: agent/workers.py
        # A file played as fast as possible queues a next frame at each interpreter; a
        # live source never does (it would serve an older frame, later).
        self._depth = 1 if source.live else 2
        # counters: each is written by one thread at a time (capture, or the serving
        # inference thread; the watchdog counts stalls)
        self._frames = 0
        self._dropped = 0
        self._capture_errors = 0
        self._infer_errors = 0
        self._results = 0
        self._connected = False
        self._last_frame: np.ndarray | None = None  # for a snapshot: a reference, no copy
        self._lock = threading.Lock()
        self._latency: deque[float] = deque(maxlen=STATS_WINDOW)
        self._infer_time: deque[float] = deque(maxlen=STATS_WINDOW)
        self._done_at: deque[float] = deque(maxlen=STATS_WINDOW)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the threads. The source is opened by the capture thread (with retries)."""
        self._spawn(self._capture_loop, "capture")
        self._infer_thread = self._spawn(lambda: self._infer_loop(0, None), "infer")
        if self.reload is not None:  # without a way to reload, no call is watched
            self._spawn(self._watchdog_loop, "watchdog")

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        # daemon: a stalled accelerator call can never be joined, and must not keep
        # the process alive
        thread = threading.Thread(target=target, name=f"pipeline-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads and close the source and models. Bounded by ``timeout``."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread not in self._abandoned:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._swapped:
            pending, self._pending = self._pending, None
            self._swapped.notify_all()
        if pending is not None:
            pending.close()
        self._close_retired()
        idle = not any(t.is_alive() and t not in self._abandoned for t in self._threads)
        if idle and self.close_model:
            self._model.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a finite source has been fully processed; True when it has."""
        return self._finished.wait(timeout)

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def model(self) -> LoadedModel:
        return self._model

    def swap(self, model: LoadedModel, timeout: float = 10.0) -> bool:
        """Switch to ``model`` (loaded and warmed up) between two frames.

        Returns True once the inference thread serves it, False when it did not take
        it within ``timeout`` (it still will, at the next frame). The replaced model is
        closed by the pipeline: here, in the caller's thread (freeing an interpreter
        holds the GIL for a few ms, which the inference thread must not pay).
        """
        with self._swapped:
            if self._pending is not None:
                self._pending.close()
                self._pending = None
            if self._stop.is_set():
                model.close()
                return False
            if not self._threads or self._finished.is_set():  # not running: switch now
                old, self._model = self._model, model
                old.close()
                return True
            self._pending = model
            deadline = time.monotonic() + timeout
            taken = (
                self._swapped.wait_for(
                    lambda: self._pending is not model or self._stop.is_set(), timeout
                )
                and self._model is model
            )
            if taken:  # several interpreters: the frames in flight on the old set end first
                self._swapped.wait_for(
                    lambda: not self._draining or self._stop.is_set(),
                    max(0.0, deadline - time.monotonic()),
                )
        self._close_retired()
        return taken

    def _close_retired(self) -> None:
        with self._swapped:
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()

    def set_stages(self, stages: tuple[Stage, ...]) -> None:
        """Run these after the model on every later frame, in order (any thread)."""
        self._stages = tuple(stages)

    def set_observers(self, observers: tuple[Observer, ...]) -> None:
        """Hand every later result to these after ``on_result`` (any thread)."""
        self._observers = tuple(observers)

    def between_frames(self, timeout: float = PACE_WAIT_S) -> bool:
        """Return at a moment the inference thread has finished a frame and the next is
        not there yet (True; each moment is given to one caller), or after ``timeout``
        (False; also at once when the pipeline is not running).

        A model loaded beside the running one passes this as its loader's pace, so that
        its GIL-holding and CPU-heavy steps fall in the gaps between frames.
        """
        if not self._threads or self._finished.is_set() or self._stop.is_set():
            return False  # no stream to make room for
        if self._slow_stream() and not self._busy and self._slot.empty():
            return True  # frames far apart and none in hand: a step seldom meets one
        with self._idle:
            self._pacing += 1
            try:
                gap = self._idle.wait_for(
                    lambda: self._idle_serial > self._idle_given or self._stop.is_set(),
                    timeout,
                )
                self._idle_given = self._idle_serial
                return gap and not self._stop.is_set()
            finally:
                self._pacing -= 1

    def _slow_stream(self) -> bool:
        """Frames come less often than every ``SLOW_INTERVAL_S``: the model is mostly idle
        (pacing each step to a gap of its own would make a latency budget's 50 invokes
        take 50 frame intervals)."""
        times = list(self._put_at)
        return len(times) >= 3 and (times[-1] - times[0]) / (len(times) - 1) >= SLOW_INTERVAL_S

    def _going_idle(self) -> None:
        """The inference thread is about to wait for a frame: a gap, if none is there."""
        with self._idle:
            if self._slot.empty():
                self._idle_serial += 1
                self._idle.notify_all()

    def withdraw(self, model: LoadedModel) -> bool:
        """Take back ``model`` handed to swap() and not yet serving (then closed).

        Returns False when it is serving already: the swap happened after all.
        """
        with self._swapped:
            withdrawn = self._pending is model
            if withdrawn:
                self._pending = None
            serving = self._model is model
        if withdrawn:  # only what was taken back here: a switched-out model is closed by
            model.close()  # swap()'s caller once no frame runs on it
        self._close_retired()
        return not serving

    def stats(self) -> Stats:
        import numpy as np

        with self._lock:
            latency = np.array(self._latency) if self._latency else np.zeros(1)
            infer = np.array(self._infer_time) if self._infer_time else np.zeros(1)
            done = list(self._done_at)
        now = time.monotonic()
        recent = [t for t in done if now - t <= 5.0]
        fps = rate(recent)
        p50, p95, p99 = np.percentile(latency, [50, 95, 99])
        model = self._model
        return Stats(
            frames=self._frames,
            results=self._results,
            dropped=self._dropped,
            errors=self._capture_errors + self._infer_errors + self._stalls,
            fps=float(fps),
            latency_ms_p50=float(p50),
            latency_ms_p95=float(p95),
            latency_ms_p99=float(p99),
            infer_ms_p50=float(np.percentile(infer, 50)),
            backend=model.backend_name,
            model=model.name,
            version=model.version,
            source_connected=self._connected,
            runtime=model.choice.to_dict(),
        )

    def last_frame(self) -> np.ndarray | None:
        """The frame the source gave last (a copy; None before the first), for a
        snapshot. Sources hand each frame over and never write to it again."""
        frame = self._last_frame
        return None if frame is None else frame.copy()

    # -- capture -----------------------------------------------------------------

    def _capture_loop(self) -> None:
        attempt = 0
        lost_at: float | None = None
        interval = 1.0 / self.fps if self.fps > 0 and not self.source.live else 0.0
        wait = not self.source.live and interval == 0.0  # a file as fast as inference
        next_due = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._connected:
                    try:
                        self._open_source()
                    except SourceError as exc:
                        lost_at, attempt = self._outage(exc, lost_at, attempt)
                        continue
                    self._connected = True
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
                    self._event("source_ended", source=self.source.name, frames=self._frames)
                    self._slot.put(END, True, self._stop)
                    return
                except SourceError as exc:
                    self._connected = False
                    self.source.close()
                    lost_at, attempt = self._outage(exc, lost_at, attempt)
                    continue
                if frame is None:
                    continue
                self._last_frame = frame
                item = self._prepare(frame)
                if item is not None:
                    self._put_at.append(item.mono)
                    if self._slot.put(item, wait, self._stop):
                        self._dropped += 1
        except Exception:  # a bug must not silently stop the stream: count and report it
            log.exception("capture thread failed")
            self._capture_errors += 1
            self._event("pipeline_error", stage="capture")
            self._slot.put(END, False, self._stop)
        finally:
            self.source.close()
            self._connected = False

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
        self._stop.wait(self._retry_delay(attempt))
        return lost_at, attempt

    def _retry_delay(self, attempt: int) -> float:
        return backoff_delay(attempt, RECONNECT_FIRST_S, self.reconnect_max_s, low=0.5)

    def _prepare(self, frame: np.ndarray) -> Item | None:
        index = self._frames
        self._frames += 1
        item = Item(index, time.time(), time.monotonic(), frame, None, None, None)
        model = self._pending or self._model  # frames from now on go to the newest model
        if model.workers > 1:  # the worker running it prepares it: resizing on every core
            item.key = PREPARE_ON_WORKER
            return item
        try:
            item.tensor, item.geometry = model.prepare(frame)
            item.key = model.input_key
        except Exception as exc:  # ValueError, cv2.error: this frame only
            if model is self._pending:
                # Hand it on unprepared all the same: the inference thread switches to the
                # new model at this frame, prepares it again and counts the failure
                # there, so a model that fits no frame is swapped in and seen failing
                # (probation rolls it back) instead of stalling the swap.
                return item
            self._capture_errors += 1
            log.warning("frame %d does not fit the model: %s", index, exc)
            return None
        return item

    # -- inference ---------------------------------------------------------------

    def _infer_loop(self, generation: int, recover_reason: str | None) -> None:
        if recover_reason is not None and not self._recover(recover_reason, generation):
            return
        while not self._stop.is_set() and generation == self._generation:
            if self._pacing:  # a loader waits for a gap between frames
                self._going_idle()
            if (self._pending or self._model).workers > 1:
                if self._pool_loop():
                    return
                continue
            self._busy = False
            item = self._slot.take(0.1)
            self._busy = item is not None and item is not END
            if item is None:  # no frame (a source reconnecting): a swap still happens
                self._switch_if_pending()
                continue
            if item is END:
                self._finished.set()
                return
            self._switch_if_pending()
            model = self._model
            try:
                if item.key != model.input_key:  # prepared before a swap to another input
                    item.tensor, item.geometry = model.prepare(item.frame)
                started = self._begin(generation, model)
                try:
                    outputs = model.infer(item.tensor)
                except BaseException:
                    if not self._end(generation):
                        return  # abandoned by the watchdog: its failure is stale too
                    raise
                if not self._end(generation):
                    return  # the watchdog gave up on this call; its result is stale
                finished = time.monotonic()
                output = model.interpret(outputs, item.geometry)
            except RuntimeError as exc:
                self._infer_errors += 1
                if model.backend_name == "edgetpu" and self.reload is not None:
                    if not self._recover(f"inference failed: {exc}", generation):
                        return
                else:
                    log.warning("inference failed on frame %d: %s", item.index, exc)
                continue
            except Exception as exc:  # a frame that does not fit, an adapter bug: not fatal
                self._infer_errors += 1
                log.warning("frame %d: %s: %s", item.index, type(exc).__name__, exc)
                continue
            self._emit(item, model, output, started, finished)

    def _pool_loop(self) -> bool:
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
                self._retire_drained(pool)
                pending = self._pending
                if pending is not None and pending.workers > 1:
                    self._switch_if_pending(drain=True)
                elif pending is not None or self._model.workers == 1:
                    if not pool.idle:
                        self._slot.until(pool.ready, 0.1)
                        continue
                    self._switch_if_pending()
                    if self._model.workers == 1:
                        return False
                worker = pool.free(self._model.workers, self._depth)
                if worker is None:
                    self._slot.until(pool.ready, 0.1)
                    continue
                self._busy = not pool.idle
                if self._pacing and pool.idle:  # a loader waits for a gap between frames
                    self._going_idle()
                item = self._slot.take(0.1, pool.ready)
                self._busy = not pool.idle or item is not None
                if item is END:
                    while not pool.idle and not self._stop.is_set():
                        self._slot.until(pool.ready, 0.1)
                        self._hand_out(pool)
                        self._retire_drained(pool)
                    self._finished.set()
                    return True
                if item is not None:
                    pool.submit(item, self._model, worker)
            return True
        finally:  # stopping: what still drains is closed by stop(), after the workers
            with self._swapped:
                self._retired += self._draining
                self._draining.clear()
                self._swapped.notify_all()  # a swap() waiting for the drain: it is over

    def _retire_drained(self, pool: Pool) -> None:
        """Hand the switched-out models no frame runs on any more to swap()'s caller."""
        with self._swapped:
            done = [old for old in self._draining if not pool.uses(old)]
            if done:
                self._draining = [old for old in self._draining if pool.uses(old)]
                self._retired += done
                self._swapped.notify_all()

    def _hand_out(self, pool: Pool) -> None:
        for job in pool.take_done():  # in frame order
            if job.output is None:
                self._infer_errors += 1  # a frame that does not fit: counted here, in order
                if job.unfit:
                    log.warning("frame %d does not fit the model: %s", job.item.index, job.error)
                else:
                    log.warning("frame %d: %s", job.item.index, job.error)
            else:
                self._emit(job.item, job.model, job.output, job.started, job.finished)

    def _begin(self, generation: int, model: LoadedModel) -> float:
        started = time.monotonic()
        # Only an accelerator is watched: a slow CPU model is slow, not stalled, and
        # without a way to reload there is nothing better to serve from.
        if model.backend_name == "edgetpu" and self.reload is not None:
            with self._watch:
                self._invoke = (generation, started)
        return started

    def _end(self, generation: int) -> bool:
        """False when the watchdog has abandoned this thread's call."""
        with self._watch:
            if generation != self._generation:
                return False
            self._invoke = None
            return True

    def _switch_if_pending(self, drain: bool = False) -> None:
        """Serve the pending model from now on. The old one is closed by swap()'s caller;
        with ``drain`` (several interpreters: frames in flight still run on it) once the
        pool is done with it."""
        if self._pending is None:
            return
        with self._swapped:
            new, self._pending = self._pending, None
            if new is None:
                return
            old, self._model = self._model, new
            (self._draining if drain else self._retired).append(old)
            self._swapped.notify_all()
        self._event(
            "model_swapped",
            model=new.name,
            version=new.version,
            previous=old.version,
            backend=new.backend_name,
        )

    def _emit(
        self, item: Item, model: LoadedModel, output: Output, started: float, finished: float
    ) -> None:
        now = time.monotonic()
        result = Result(
            frame=item.index,
            ts=item.ts,
            model=model.name,
            version=model.version,
            backend=model.backend_name,
            latency_ms=(now - item.mono) * 1000,
            infer_ms=(finished - started) * 1000,
            output=output,
        )
        for stage in self._stages:
            try:
                result = stage.run(item, result)
            except Exception:
                self._infer_errors += 1
                log.exception("stage %s failed on frame %d", type(stage).__name__, item.index)
        with self._lock:  # after the stages: a cascade's time is part of the latency
            self._latency.append(result.latency_ms)
            self._infer_time.append(result.infer_ms)
            self._done_at.append(now)
        self._results += 1
        try:
            self.on_result(result)
        except Exception:
            self._infer_errors += 1
            log.exception("result callback failed on frame %d", item.index)
        for observer in self._observers:
            try:
                observer.observe(item, result)
            except Exception:
                self._infer_errors += 1
                log.exception("observer %s failed on frame %d", type(observer).__name__, item.index)

    # -- accelerator watchdog --------------------------------------------------------

    def _watchdog_loop(self) -> None:
        period = min(0.1, self.invoke_timeout_s / 4)
        while not self._stop.wait(period):
            with self._watch:
                invoke = self._invoke
                if invoke is None or time.monotonic() - invoke[1] < self.invoke_timeout_s:
                    continue
                # The stalled call cannot be interrupted: abandon its thread (it exits
                # when the call returns, if ever) and serve from a new one.
                self._invoke = None
                self._stalls += 1
                self._generation += 1
                generation = self._generation
                if self._infer_thread is not None:
                    self._abandoned.append(self._infer_thread)
            reason = f"inference stalled for over {self.invoke_timeout_s * 1000:.0f} ms"
            self._infer_thread = self._spawn(
                functools.partial(self._infer_loop, generation, reason), f"infer-{generation}"
            )

    def _recover(self, reason: str, generation: int) -> bool:
        """Bring the model back on a fresh delegate, else on the CPU variant.

        Retries with backoff until it works; False when stopping or superseded.
        """
        old = self._model
        self._event("accelerator_lost", backend=old.backend_name, error=reason)
        old.close()  # let go of the failed delegate before opening the device again
        assert self.reload is not None  # only called with a way to reload
        attempt = 0
        while not self._stop.is_set() and generation == self._generation:
            for accelerator in ("edgetpu", "cpu"):
                try:
                    new = self.reload(old.files, accelerator)
                except EdgeAgentError as exc:
                    log.warning("re-initialising on the %s failed: %s", accelerator, exc)
                    continue
                with self._swapped:
                    if generation != self._generation:  # a newer recovery took over
                        new.close()
                        return False
                    self._model = new
                self._event(
                    "accelerator_recovered"
                    if new.backend_name == "edgetpu"
                    else "accelerator_fallback",
                    backend=new.backend_name,
                    model=new.name,
                    version=new.version,
                )
                return True
            attempt += 1
            self._stop.wait(self._retry_delay(attempt))
        return False

    def _event(self, name: EventName, **detail: Any) -> None:
        logs.event(log, name, detail)
        try:
            self.on_event(name, detail)
        except Exception:
            log.exception("event callback failed for %s", name)
