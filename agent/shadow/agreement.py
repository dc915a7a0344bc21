"""Pure rules of a shadow run: how far a candidate agrees with the active model, which
frames it sees, when its CPU share is spent, and when it is promoted.

No I/O, no clock of their own: :class:`agent.shadow.run.ShadowRun` feeds them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.contract import AgreementDoc, AgreementMetric
    from agent.runtime.adapters import Detection, Output

IOU_MATCH = 0.5  # a candidate box matches an active one of the same label at this IoU
MAX_ERROR_SHARE = 0.05  # a candidate failing on more than this share is never promoted
CPU_WINDOW_S = 10.0  # the CPU bound looks at this much recent wall time
CPU_MIN_SPAN_S = 1.0  # ... and at least this much (so the first invoke is never refused)


def metric_of(task: str) -> AgreementMetric:
    """``top1`` for classification, ``f1`` for detection, ``mean_error`` otherwise."""
    if task == "classification":
        return "top1"
    if task == "detection":
        return "f1"
    return "mean_error"


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``xmin, ymin, xmax, ymax`` boxes (0 when empty)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    active: list[Detection], candidate: list[Detection], threshold: float = IOU_MATCH
) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of ``candidate`` against ``active``: greedy, best candidate
    score first, each active box matched once, same label and IoU >= ``threshold``."""
    free = list(active)
    tp = 0
    for det in sorted(candidate, key=lambda d: -d.score):
        best, best_iou = None, threshold
        for other in free:
            if other.label == det.label:
                overlap = iou(det.box, other.box)
                if overlap >= best_iou:
                    best, best_iou = other, overlap
        if best is not None:
            free.remove(best)
            tp += 1
    return tp, len(candidate) - tp, len(free)


def numbers(values: Iterable[Any]) -> list[float]:
    """The numbers of a regression/raw output's ``values`` (raw entries: their
    ``values`` list, else min/max/mean), flattened in order."""
    out: list[float] = []
    for value in values:
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out.append(float(value))
        elif isinstance(value, dict):
            inner = value.get("values")
            if isinstance(inner, list):
                out.extend(numbers(inner))
            else:
                out.extend(numbers(value.get(k) for k in ("min", "max", "mean")))
        elif isinstance(value, list):
            out.extend(numbers(value))
    return out


def top_label(output: Output) -> str | None:
    return output.classes[0][1] if output.classes else None


@dataclass
class Agreement:
    """Agreement of a candidate with the active model, accumulated over frames."""

    metric: AgreementMetric
    frames: int = 0
    matches: int = 0  # top1: frames whose top labels are equal
    tp: int = 0  # f1: summed over frames (micro F1)
    fp: int = 0
    fn: int = 0
    error_sum: float = 0.0  # mean_error: summed |active - candidate|
    error_count: int = 0

    def add(self, active: Output, candidate: Output) -> None:
        self.frames += 1
        if self.metric == "top1":
            self.matches += top_label(active) == top_label(candidate)
        elif self.metric == "f1":
            tp, fp, fn = match_boxes(active.detections, candidate.detections)
            self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        else:
            a, c = numbers(active.values), numbers(candidate.values)
            for x, y in zip(a, c, strict=False):
                if math.isfinite(x) and math.isfinite(y):
                    self.error_sum += abs(x - y)
                    self.error_count += 1

    @property
    def value(self) -> float | None:
        """top1: share of equal top labels; f1: 2tp/(2tp+fp+fn) (1.0 when neither found
        a box); mean_error: mean absolute difference. None before any frame."""
        if self.frames == 0:
            return None
        if self.metric == "top1":
            return self.matches / self.frames
        if self.metric == "f1":
            total = 2 * self.tp + self.fp + self.fn
            return 1.0 if total == 0 else 2 * self.tp / total
        return self.error_sum / self.error_count if self.error_count else None

    def doc(self) -> AgreementDoc:
        value = self.value
        return {
            "metric": self.metric,
            "value": None if value is None else round(value, 4),
            "frames": self.frames,
        }


def sampled(index: int, pct: int) -> bool:
    """Whether the ``index``-th frame (from 0) is in a ``pct`` % sample: evenly spread
    and deterministic (10 % takes frames 9, 19, 29, …; 100 % every one)."""
    return (index + 1) * pct // 100 > index * pct // 100


class CpuBudget:
    """The share of wall time spent on shadow invokes, over the last ``window_s``."""

    def __init__(self, max_pct: int, window_s: float = CPU_WINDOW_S) -> None:
        self.max_share = max_pct / 100.0
        self.window_s = window_s
        self._spans: deque[tuple[float, float]] = deque()  # (ended at, seconds spent)
        self._started: float | None = None

    def allows(self, now: float) -> bool:
        """True when another invoke may run: spent / span <= the bound, the span being
        the window (or the time since the first look, at least CPU_MIN_SPAN_S)."""
        if self._started is None:
            self._started = now
        while self._spans and self._spans[0][0] < now - self.window_s:
            self._spans.popleft()
        span = max(min(self.window_s, now - self._started), CPU_MIN_SPAN_S)
        spent = sum(s for _, s in self._spans)
        return spent / span < self.max_share

    def spent(self, ended_at: float, seconds: float) -> None:
        self._spans.append((ended_at, max(seconds, 0.0)))


def should_promote(
    *,
    frames: int,
    errors: int,
    agreement: float | None,
    metric: AgreementMetric,
    min_frames: int,
    min_agreement: float,
    max_error_share: float = MAX_ERROR_SHARE,
) -> bool:
    """Promote once ``frames >= min_frames`` and the agreement reaches ``min_agreement``
    (for ``mean_error``, lower is better: the error must be at most ``min_agreement``'s
    complement, ``1 - min_agreement``); never while errors exceed ``max_error_share`` of
    the attempts."""
    if agreement is None or frames < max(min_frames, 1):
        return False
    if errors > max_error_share * (frames + errors):
        return False
    if metric == "mean_error":
        return agreement <= 1.0 - min_agreement
    return agreement >= min_agreement
