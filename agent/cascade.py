"""A cascade: a second model on crops of the first one's detections (detect → classify).

``Cascade`` is a pipeline ``Stage`` (agent/frames.py): on the inference thread, after
the primary model, it picks the detections to crop (agent/cascade_rules.py), runs its
model on each crop (a view of the frame, no copy) and returns a new result whose
detections carry the crop's output under ``cascade`` (``{"model", "version", "classes"
| "detections" | "values"}``; boxes in the frame's pixels). A result without detections
(or of a classification or raw model) passes through unchanged.

The second model updates on its own: ``swap`` hands a new one in from any thread; the
inference thread takes the model once per frame, so one frame's crops never mix
versions. A crop whose run fails is counted; its detection gets no nested part and the
frame still goes out. ``stats`` gives the figures for telemetry; ``set_outputs`` hands
each frame's crop answers (the ones that ran) to an observer of the second model's
output statistics (agent/shadow/outputs.py), with no extra invoke.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.cascade_rules import CascadeRules, Crop, plan_crops
from agent.runtime.adapters import Nested, Output

if TYPE_CHECKING:
    from agent.contract import CascadeFiguresDoc
    from agent.frames import Item, Result
    from agent.runtime.model import LoadedModel

log = logging.getLogger(__name__)

WINDOW = 2048  # crop times kept for the median
SWAP_WAIT_S = 10.0  # longest swap/close wait for the frame in hand to finish
ERROR_LOG_EVERY_S = 60.0  # a failing crop is logged at most this often

# One frame's crop answers of the second model: (model, version, outputs), on the
# inference thread; what it raises is logged, never loses the frame.
CropOutputs = Callable[[str, int | None, Sequence[Output]], None]


@dataclass(frozen=True)
class CascadeStats:
    """Counters since start; the median over the recent crops."""

    model: str | None  # None until a second model is there
    version: int | None
    frames: int  # frames with at least one crop run
    crops: int  # crops run (failed ones too)
    skipped: int  # eligible crops left out by max_crops
    small: int  # eligible crops under min_size
    errors: int  # crops whose run failed
    infer_ms_p50: float  # one crop: prepare, invoke, interpret

    def to_dict(self, name: str = "") -> CascadeFiguresDoc:
        """Telemetry's ``pipelines.NAME.cascade``; ``name`` (the configured model's)
        while no second model is there yet."""
        return {
            "model": self.model or name,
            "version": self.version,
            "crops": self.crops,
            "infer_ms_p50": round(self.infer_ms_p50, 2),
            "errors": self.errors,
        }


def shifted(output: Output, dx: int, dy: int) -> Output:
    """``output`` of a crop at (dx, dy), its boxes moved into the frame's pixels."""
    if output.task != "detection" or not (dx or dy):
        return output
    moved = [
        dataclasses.replace(d, box=(d.box[0] + dx, d.box[1] + dy, d.box[2] + dx, d.box[3] + dy))
        for d in output.detections
    ]
    return dataclasses.replace(output, detections=moved)


class Cascade:
    """The second model of a pipeline, run on crops of the first one's detections.

    ``model`` may be None (not downloaded yet): results pass through until ``swap``
    brings one. ``rules`` may be replaced whole from any thread (read once per frame).
    """

    def __init__(
        self,
        model: LoadedModel | None,
        rules: CascadeRules,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self._clock = clock
        self._model = model
        self._in_use: LoadedModel | None = None  # the model the frame in hand runs on
        self._retired: list[LoadedModel] = []  # swapped out mid-frame: closed here
        self._cond = threading.Condition()
        # counters: written by the inference thread only
        self._frames = 0
        self._crops = 0
        self._skipped = 0
        self._small = 0
        self._errors = 0
        self._times: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()  # the times, read by stats() in another thread
        self._logged_at = -ERROR_LOG_EVERY_S
        self._outputs: CropOutputs | None = None

    def set_outputs(self, observer: CropOutputs | None) -> None:
        """Hand each frame's crop answers to ``observer`` (from the next frame on)."""
        self._outputs = observer

    # -- the inference thread ------------------------------------------------------

    def run(self, item: Item, result: Result) -> Result:
        """``result`` with the second model's output nested under the detections it
        cropped, as a new result (latency up to now); the same one when nothing ran."""
        detections = result.output.detections
        if result.output.task != "detection" or not detections or item.frame.ndim != 3:
            return result
        height, width = item.frame.shape[:2]
        rules = self.rules
        plan = plan_crops(width, height, detections, rules)
        self._skipped += plan.over_limit
        self._small += plan.too_small
        if not plan.crops:
            return result
        with self._cond:
            model = self._in_use = self._model
        if model is None:
            return result
        try:
            nested = self._run_crops(item, model, plan.crops)
        finally:
            with self._cond:
                self._in_use = None
                retired, self._retired = self._retired, []
                self._cond.notify_all()
            for old in retired:
                old.close()
        self._frames += 1
        observer = self._outputs
        if observer is not None and nested:
            self._observe(observer, model, [part.output for part in nested.values()])
        found = list(detections)
        for index, part in nested.items():
            found[index] = dataclasses.replace(found[index], cascade=part)
        output = dataclasses.replace(result.output, detections=found)
        latency = (self._clock() - item.mono) * 1000
        return dataclasses.replace(result, output=output, latency_ms=latency)

    def _run_crops(
        self, item: Item, model: LoadedModel, crops: tuple[Crop, ...]
    ) -> dict[int, Nested]:
        nested: dict[int, Nested] = {}
        for crop in crops:
            pixels = item.frame[crop.y0 : crop.y1, crop.x0 : crop.x1]  # a view
            started = self._clock()
            self._crops += 1
            try:
                output = model.run(pixels)
            except Exception as exc:  # a failing crop must not lose the frame
                self._errors += 1
                self._log_error(item.index, crop.index, exc)
                continue
            finally:
                spent = (self._clock() - started) * 1000
                with self._lock:
                    self._times.append(spent)
            part = Nested(model.name, model.version, shifted(output, crop.x0, crop.y0))
            nested[crop.index] = part
        return nested

    def _observe(self, observer: CropOutputs, model: LoadedModel, outputs: list[Output]) -> None:
        try:
            observer(model.name, model.version, outputs)
        except Exception as exc:  # statistics must not lose the frame
            now = self._clock()
            if now - self._logged_at >= ERROR_LOG_EVERY_S:
                self._logged_at = now
                log.warning("cascade: output statistics: %s: %s", type(exc).__name__, exc)

    def _log_error(self, frame: int, index: int, exc: Exception) -> None:
        now = self._clock()
        if now - self._logged_at >= ERROR_LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "cascade: frame %d, detection %d: %s: %s (%d crop errors so far)",
                frame,
                index,
                type(exc).__name__,
                exc,
                self._errors,
            )

    # -- any thread ------------------------------------------------------------------

    def model(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel, timeout: float = SWAP_WAIT_S) -> LoadedModel | None:
        """Run ``model`` from the next frame on. Returns the model it replaces once no
        frame runs on it (the caller closes it), or None when there was none, or when a
        frame still ran on it after ``timeout`` (the cascade closes it after that frame).
        """
        with self._cond:
            old, self._model = self._model, model
            if old is None:
                return None
            if not self._cond.wait_for(lambda: self._in_use is not old, timeout):
                self._retired.append(old)
                return None
            return old

    def close(self, timeout: float = SWAP_WAIT_S) -> None:
        """Close the model (after the frame in hand, at most ``timeout``); later frames
        pass through."""
        with self._cond:
            old, self._model = self._model, None
            if old is not None and not self._cond.wait_for(
                lambda: self._in_use is not old, timeout
            ):
                self._retired.append(old)
                return
            retired, self._retired = self._retired, []
        for model in [*retired, *([old] if old is not None else [])]:
            model.close()

    def stats(self) -> CascadeStats:
        model = self._model
        with self._lock:
            times = sorted(self._times)
        return CascadeStats(
            model=None if model is None else model.name,
            version=None if model is None else model.version,
            frames=self._frames,
            crops=self._crops,
            skipped=self._skipped,
            small=self._small,
            errors=self._errors,
            infer_ms_p50=times[len(times) // 2] if times else 0.0,
        )


__all__ = ["Cascade", "CascadeRules", "CascadeStats", "CropOutputs", "shifted"]
