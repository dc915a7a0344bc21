"""YOLO detection heads: Ultralytics YOLOv5 / v8 / v11 TFLite exports, decoded on the device.

What an export gives is one raw tensor, not boxes:

- ``yolov8`` (v8 and v11): ``[1, 4+nc, A]`` (or transposed ``[1, A, 4+nc]``), rows
  ``cx, cy, w, h`` then one probability per class, no objectness;
- ``yolov5``: ``[1, A, 5+nc]``, ``cx, cy, w, h, objectness`` then the class
  probabilities; a class's score is objectness × its probability.

Ultralytics' TFLite (and Edge TPU) exports give the boxes normalised to the input's
size, to spare int8 models the quantisation error; other exports give input pixels.
Which one is read from the values: normalised boxes stay within about 0..1.

``A`` is ``(H/8·W/8 + H/16·W/16 + H/32·W/32)`` anchors for v8 (2100 at 320×320, 8400
at 640×640; P6 heads add stride 64) and three times that for v5, so the input's size
tells the format and the orientation apart. An output whose axes match no such count
is read as YOLO only when the release declares its format (then the longer axis is
the anchors').

Everything here is pure numpy over arrays (the outputs as they come, quantised or not).
Work per frame is bounded: anchors under ``min_score`` are dropped with one
comparison, at most ``MAX_CANDIDATES`` best ones go into the class-aware NMS, and the
NMS stops after ``limit`` picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import ModelError

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.backends import TensorSpec

YoloFormat = Literal["yolov5", "yolov8"]
DETECTION_FORMATS = ("ssd", "yolov5", "yolov8")
MAX_CANDIDATES = 300  # the best anchors kept for NMS (Ultralytics' max_det)
DEFAULT_IOU = 0.45  # Ultralytics' default iou for NMS
PIXEL_BOXES_ABOVE = 2.0  # box values above this are input pixels, not 0..1 of the input


@dataclass(frozen=True)
class YoloLayout:
    """How one YOLO output tensor is laid out."""

    format: YoloFormat
    classes: int
    channels_first: bool  # [1, C, A] (Ultralytics v8) rather than [1, A, C]

    @property
    def first_class(self) -> int:
        return 5 if self.format == "yolov5" else 4


STRIDES = ((8, 16, 32), (8, 16, 32, 64))  # P5 heads (v5s, v8n, …) and P6 heads (v5s6, …)


def anchor_counts(input_shape: tuple[int, ...]) -> dict[YoloFormat, tuple[int, ...]]:
    """Anchors a YOLO head (P5, then P6) has for an image input ``[1, H, W, C]``: one
    per grid cell and stride for v8, three for v5. Empty when the input is no image."""
    if len(input_shape) != 4 or input_shape[1] <= 0 or input_shape[2] <= 0:
        return {}
    height, width = input_shape[1], input_shape[2]
    cells = tuple(
        sum((height // s) * (width // s) for s in strides)
        for strides in STRIDES
        if height % strides[-1] == 0 and width % strides[-1] == 0
    )
    return {"yolov8": cells, "yolov5": tuple(3 * n for n in cells)}


def _first(fmt: YoloFormat) -> int:
    return 5 if fmt == "yolov5" else 4


def _matching(
    shape: tuple[int, ...], input_shape: tuple[int, ...], formats: tuple[YoloFormat, ...]
) -> YoloLayout | None:
    """The layout whose anchor count for this input is one of the output's axes."""
    _, a, b = shape
    counts = anchor_counts(input_shape)
    for fmt in formats:
        first = _first(fmt)
        for anchors in counts.get(fmt, ()):
            if b == anchors and a > first:
                return YoloLayout(fmt, a - first, channels_first=True)
            if a == anchors and b > first:
                return YoloLayout(fmt, b - first, channels_first=False)
    return None


def _one_head(outputs: list[TensorSpec]) -> bool:
    return len(outputs) == 1 and len(outputs[0].shape) == 3 and outputs[0].shape[0] == 1


def yolo_layout(
    outputs: list[TensorSpec], input_shape: tuple[int, ...], declared: str | None = None
) -> YoloLayout:
    """The layout of a YOLO model's one output: by its anchors, which the input's size
    implies, or, when they are not, by ``declared`` (the manifest's
    ``detection_format``) with the longer axis the anchors'. Raises ModelError naming
    the shapes and the fix."""
    shapes = [list(o.shape) for o in outputs]
    if not _one_head(outputs):
        raise ModelError(
            f"a YOLO detection model has one output [1, 4+classes, anchors] (v8/v11) or "
            f"[1, anchors, 5+classes] (v5); this one has {shapes}"
        )
    shape = outputs[0].shape
    all_formats: tuple[YoloFormat, ...] = ("yolov8", "yolov5")
    formats = tuple(f for f in all_formats if f == declared) or all_formats
    found = _matching(shape, input_shape, formats)
    if found is not None:
        return found
    if declared not in all_formats:
        counts = anchor_counts(input_shape)
        expected = ", ".join(f"{fmt} {'/'.join(map(str, n))}" for fmt, n in counts.items() if n)
        raise ModelError(
            f"output {list(shape)} has no axis of the anchors a YOLO head has for the input "
            f"{list(input_shape)} ({expected or 'its sides are not multiples of 32'}); if it "
            f"is one, publish it with --detection-format yolov5 or yolov8"
        )
    fmt: YoloFormat = formats[0]
    _, a, b = shape
    channels, first = min(a, b), _first(fmt)
    if channels <= first:
        raise ModelError(
            f"output {list(shape)} is too narrow for a {fmt} head: it needs {first} box "
            f"values and at least one class per anchor"
        )
    return YoloLayout(fmt, channels - first, channels_first=a < b)


def is_yolo_head(outputs: list[TensorSpec], input_shape: tuple[int, ...]) -> bool:
    """Whether ``outputs`` are one YOLO head with the anchors of the input's size."""
    if not _one_head(outputs):
        return False
    return _matching(outputs[0].shape, input_shape, ("yolov8", "yolov5")) is not None


@dataclass(frozen=True)
class Boxes:
    """Detections in input pixels: ``xyxy`` [n, 4], ``scores`` [n], ``classes`` [n]."""

    xyxy: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def candidates(
    raw: np.ndarray,
    layout: YoloLayout,
    input_size: tuple[int, int],
    min_score: float,
    max_candidates: int = MAX_CANDIDATES,
    quant: tuple[float, int] | None = None,
) -> Boxes:
    """The anchors of ``raw`` (the output, batch 1) scoring at least ``min_score`` in
    their best class, the best ``max_candidates`` of them, as xyxy boxes in input pixels
    (``input_size`` is width, height). ``quant`` (scale, zero point) says ``raw`` holds
    quantised values: the search runs on them (dequantising keeps the order) and only
    the candidates are dequantised. Raises ValueError when ``raw`` does not have the
    layout's size."""
    import numpy as np

    width, height = input_size
    first = layout.first_class
    channels = first + layout.classes
    table = raw.reshape(channels, -1) if layout.channels_first else raw.reshape(-1, channels).T
    # table: [channels, anchors], a view of the output whichever its orientation
    anchors = table.shape[1]
    real = _real(quant)
    at_least = _threshold(min_score, quant, table.dtype)
    probs = table[first:]
    # scores first (a max reduces along either axis without copying), the class of the
    # at most max_candidates kept after (argmax along a strided axis would copy it all)
    if layout.format == "yolov5":
        objectness = table[4]
        kept = np.flatnonzero(objectness >= at_least)  # obj × p ≥ min_score needs obj ≥ it
        # one pass over the whole block beats a copy of most of it
        whole = kept.size > anchors // 4
        best_p = probs.max(axis=0)[kept] if whole else probs[:, kept].max(axis=0)
        scores = real(objectness[kept]) * real(best_p)
        kept, scores = kept[scores >= min_score], scores[scores >= min_score]
    else:
        top = probs.max(axis=0)
        kept = np.flatnonzero(top >= at_least)
        scores = real(top[kept])
    if kept.size > max_candidates:
        top_k = np.argpartition(-scores, max_candidates - 1)[:max_candidates]
        kept, scores = kept[top_k], scores[top_k]
    best = probs[:, kept].argmax(axis=0)
    box_rows = table[:4]
    cx, cy, w, h = (real(box_rows[i, kept]) for i in range(4))
    if kept.size and float(real(np.abs(box_rows).max())) <= PIXEL_BOXES_ABOVE:
        cx, w = cx * width, w * width  # normalised to the input (TFLite exports)
        cy, h = cy * height, h * height
    with np.errstate(invalid="ignore", over="ignore"):  # a broken model's inf and NaN
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    finite = np.isfinite(xyxy).all(axis=1) & np.isfinite(scores)  # no box NMS cannot judge
    return Boxes(xyxy[finite], scores[finite].astype(np.float32), best[finite].astype(np.int64))


def _real(quant: tuple[float, int] | None) -> Callable[[Any], np.ndarray]:
    """Real values (float32) of output values, quantised with ``quant`` or not."""
    import numpy as np

    if quant is None:
        return lambda values: np.asarray(values, dtype=np.float32)
    scale, zero_point = quant
    return lambda values: (np.asarray(values, dtype=np.float32) - zero_point) * np.float32(scale)


def _threshold(min_score: float, quant: tuple[float, int] | None, dtype: Any) -> Any:
    """The value an output must reach to score ``min_score``: the quantised one when
    ``quant`` is given (clipped to the type's range, plus one above it: nothing passes)."""
    import numpy as np

    if quant is None:
        return min_score
    scale, zero_point = quant
    info = np.iinfo(dtype)
    needed = math.ceil(round(min_score / scale + zero_point, 6))
    return min(max(needed, int(info.min)), int(info.max) + 1)


def nms(boxes: Boxes, iou_threshold: float, limit: int) -> np.ndarray:
    """Indices of the boxes kept by greedy class-aware non-maximum suppression, best
    score first, at most ``limit``: a box is dropped when it overlaps a better box of
    the same class by more than ``iou_threshold`` (intersection over union)."""
    import numpy as np

    xyxy = boxes.xyxy.astype(np.float64)
    if xyxy.shape[0] == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    # shifting each class to its own region keeps boxes of different classes apart
    span = float(np.abs(xyxy).max()) * 2 + 1
    shifted = xyxy + (boxes.classes.astype(np.float64) * span)[:, None]
    x0, y0, x1, y1 = shifted.T
    areas = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    order = np.argsort(-boxes.scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:  # one pass per kept box, at most limit
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        width = np.clip(np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]), 0, None)
        height = np.clip(np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]), 0, None)
        inter = width * height
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detect(
    raw: np.ndarray,
    layout: YoloLayout,
    input_size: tuple[int, int],
    min_score: float,
    iou_threshold: float,
    limit: int,
    quant: tuple[float, int] | None = None,
) -> Boxes:
    """Candidates of ``raw`` through NMS: at most ``limit`` boxes in input pixels, best first."""
    found = candidates(raw, layout, input_size, min_score, quant=quant)
    keep = nms(found, iou_threshold, limit)
    return Boxes(found.xyxy[keep], found.scores[keep], found.classes[keep])
