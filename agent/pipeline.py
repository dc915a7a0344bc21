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

This module runs the threads, the inference loop of one interpreter and the way of a
result out; the parts each have a module: the capture loop (agent/pipeline_capture.py),
the loop of several interpreters (agent/pipeline_pool.py), the hand-over of models
between frames (agent/pipeline_swap.py), the gaps given to loaders
(agent/pipeline_gaps.py), the watch over a stalled accelerator call
(agent/pipeline_watchdog.py), and the counters behind ``stats``
(agent/pipeline_figures.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import logs
from agent.contract import EventName
from agent.errors import EdgeAgentError
from agent.frames import END, Item, Observer, Result, Slot, Stage, Stats, rate
from agent.pipeline_capture import Capture, retry_delay
from agent.pipeline_figures import Figures
from agent.pipeline_gaps import Gaps
from agent.pipeline_pool import PoolLoop
from agent.pipeline_swap import Handover
from agent.pipeline_watchdog import Watchdog
from agent.sources.base import Source
from agent.workers import PREPARE_ON_WORKER

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.adapters import Output
    from agent.runtime.model import LoadedModel, ModelFiles

log = logging.getLogger(__name__)

PACE_WAIT_S = 0.25  # longest a loader waits for a gap between frames (none at fps 0)

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
        self._models = Handover(model)
        # Gaps between frames, for loaders (between_frames): the inference thread counts
        # the moments it goes idle, only while a loader waits for one.
        self._gaps = Gaps()
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
        self._watchdog = Watchdog(invoke_timeout_s)
        self._infer_thread: threading.Thread | None = None
        self._figures = Figures()
        self._capture = Capture(
            source,
            fps,
            reconnect_max_s,
            self._slot,
            self._stop,
            self._figures,
            self._gaps,
            self._prepare,
            self._event,
        )
        self._pool = PoolLoop(
            self._spawn,
            self._stop,
            self._finished,
            self._slot,
            self._models,
            self._gaps,
            self._figures,
            source.live,
            self._switch_if_pending,
            self._emit,
        )

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the threads. The source is opened by the capture thread (with retries)."""
        self._spawn(self._capture.run, "capture")
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
        self._models.close_pending()
        self._models.close_retired()
        idle = not any(t.is_alive() and t not in self._abandoned for t in self._threads)
        if idle and self.close_model:
            self._models.model.close()

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
        return self._models.model

    def swap(self, model: LoadedModel, timeout: float = 10.0) -> bool:
        """Switch to ``model`` (loaded and warmed up) between two frames.

        Returns True once the inference thread serves it, False when it did not take
        it within ``timeout`` (it still will, at the next frame). The replaced model is
        closed by the pipeline: here, in the caller's thread (freeing an interpreter
        holds the GIL for a few ms, which the inference thread must not pay).
        """
        return self._models.offer(model, timeout, self._running, self._stop)

    def _running(self) -> bool:
        return bool(self._threads) and not self._finished.is_set()

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
        if self._gaps.slow_stream() and not self._gaps.busy and self._slot.empty():
            return True  # frames far apart and none in hand: a step seldom meets one
        return self._gaps.wait(timeout, self._stop)

    def withdraw(self, model: LoadedModel) -> bool:
        """Take back ``model`` handed to swap() and not yet serving (then closed).

        Returns False when it is serving already: the swap happened after all.
        """
        return self._models.withdraw(model)

    def stats(self) -> Stats:
        """The figures now: counters, latency percentiles, fps over the last 5 s."""
        return self._figures.stats(self._models.model, self._capture.connected)

    def last_frame(self) -> np.ndarray | None:
        """The frame the source gave last (a copy; None before the first), for a
        snapshot. Sources hand each frame over and never write to it again."""
        frame = self._capture.last_frame
        return None if frame is None else frame.copy()

    # -- capture (the loop itself: agent/pipeline_capture.py) ---------------------

    def _prepare(self, frame: np.ndarray) -> Item | None:
        index = self._figures.frames
        self._figures.frames += 1
        item = Item(index, time.time(), time.monotonic(), frame, None, None, None)
        model = self._models.newest()  # frames from now on go to the newest model
        if model.workers > 1:  # the worker running it prepares it: resizing on every core
            item.key = PREPARE_ON_WORKER
            return item
        try:
            item.tensor, item.geometry = model.prepare(frame)
            item.key = model.input_key
        except Exception as exc:  # ValueError, cv2.error: this frame only
            if model is self._models.pending:
                # Hand it on unprepared all the same: the inference thread switches to the
                # new model at this frame, prepares it again and counts the failure
                # there, so a model that fits no frame is swapped in and seen failing
                # (probation rolls it back) instead of stalling the swap.
                return item
            self._figures.capture_errors += 1
            log.warning("frame %d does not fit the model: %s", index, exc)
            return None
        return item

    # -- inference ---------------------------------------------------------------

    def _infer_loop(self, generation: int, recover_reason: str | None) -> None:
        if recover_reason is not None and not self._recover(recover_reason, generation):
            return
        while not self._stop.is_set() and generation == self._watchdog.generation:
            if self._gaps.pacing:  # a loader waits for a gap between frames
                self._gaps.going_idle(self._slot)
            if self._models.newest().workers > 1:
                if self._pool.run():
                    return
                continue
            self._gaps.busy = False
            item = self._slot.take(0.1)
            self._gaps.busy = item is not None and item is not END
            if item is None:  # no frame (a source reconnecting): a swap still happens
                self._switch_if_pending()
                continue
            if item is END:
                self._finished.set()
                return
            self._switch_if_pending()
            model = self._models.model
            try:
                if item.key != model.input_key:  # prepared before a swap to another input
                    item.tensor, item.geometry = model.prepare(item.frame)
                started = self._begin(generation, model)
                try:
                    outputs = model.infer(item.tensor)
                except BaseException:
                    if not self._watchdog.end(generation):
                        return  # abandoned by the watchdog: its failure is stale too
                    raise
                if not self._watchdog.end(generation):
                    return  # the watchdog gave up on this call; its result is stale
                finished = time.monotonic()
                output = model.interpret(outputs, item.geometry)
            except RuntimeError as exc:
                self._figures.infer_errors += 1
                if model.backend_name == "edgetpu" and self.reload is not None:
                    if not self._recover(f"inference failed: {exc}", generation):
                        return
                else:
                    log.warning("inference failed on frame %d: %s", item.index, exc)
                continue
            except Exception as exc:  # a frame that does not fit, an adapter bug: not fatal
                self._figures.infer_errors += 1
                log.warning("frame %d: %s: %s", item.index, type(exc).__name__, exc)
                continue
            self._emit(item, model, output, started, finished)

    def _begin(self, generation: int, model: LoadedModel) -> float:
        started = time.monotonic()
        # Only an accelerator is watched: a slow CPU model is slow, not stalled, and
        # without a way to reload there is nothing better to serve from.
        if model.backend_name == "edgetpu" and self.reload is not None:
            self._watchdog.begin(generation, started)
        return started

    def _switch_if_pending(self, drain: bool = False) -> None:
        """Serve the pending model from now on. The old one is closed by swap()'s caller;
        with ``drain`` (several interpreters: frames in flight still run on it) once the
        pool is done with it."""
        switched = self._models.switch_if_pending(drain)
        if switched is None:
            return
        new, old = switched
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
                self._figures.infer_errors += 1
                log.exception("stage %s failed on frame %d", type(stage).__name__, item.index)
        # after the stages: a cascade's time is part of the latency
        self._figures.record(result.latency_ms, result.infer_ms, now)
        self._figures.results += 1
        try:
            self.on_result(result)
        except Exception:
            self._figures.infer_errors += 1
            log.exception("result callback failed on frame %d", item.index)
        for observer in self._observers:
            try:
                observer.observe(item, result)
            except Exception:
                self._figures.infer_errors += 1
                log.exception("observer %s failed on frame %d", type(observer).__name__, item.index)

    # -- accelerator watchdog --------------------------------------------------------

    def _watchdog_loop(self) -> None:
        self._watchdog.run(self._stop, self._stalled)

    def _stalled(self, generation: int) -> None:
        """The watchdog abandoned a stalled call (it cannot be interrupted): its thread
        exits when the call returns, if ever; serve from a new one."""
        self._figures.stalls += 1
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
        old = self._models.model
        self._event("accelerator_lost", backend=old.backend_name, error=reason)
        old.close()  # let go of the failed delegate before opening the device again
        assert self.reload is not None  # only called with a way to reload
        attempt = 0
        while not self._stop.is_set() and generation == self._watchdog.generation:
            for accelerator in ("edgetpu", "cpu"):
                try:
                    new = self.reload(old.files, accelerator)
                except EdgeAgentError as exc:
                    log.warning("re-initialising on the %s failed: %s", accelerator, exc)
                    continue
                if not self._models.replace(new, lambda: generation == self._watchdog.generation):
                    return False  # a newer recovery took over
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
            self._stop.wait(retry_delay(attempt, self.reconnect_max_s))
        return False

    def _event(self, name: EventName, **detail: Any) -> None:
        logs.event(log, name, detail)
        try:
            self.on_event(name, detail)
        except Exception:
            log.exception("event callback failed for %s", name)
