"""Task adapters: frames into input tensors, output tensors into results.

What pycoral's adapters give, without pycoral: the input size, resizing (stretched,
or aspect kept with padding for detection, with the scale to map boxes back),
quantised inputs and outputs (scale, zero point), classification top-k with labels,
detection with boxes in frame pixels, either SSD in its post-processed 4-output form
(boxes, classes, scores, count) or a YOLO head decoded here (agent/runtime/yolo.py),
and regression/raw outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ModelError
from agent.runtime.yolo import DEFAULT_IOU, DETECTION_FORMATS, YoloLayout, yolo_layout

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.backends import TensorSpec

TASKS = ("classification", "detection", "regression", "raw")
RAW_VALUES_MAX = 64  # raw outputs larger than this are summarised, not listed


@dataclass(frozen=True)
class InputNorm:
    """``(pixel - mean) / std`` gives the real input value a model expects.

    Float models get it applied. Quantised models get raw pixels unless a norm is
    given explicitly (what Coral's models and pycoral expect); with one, the real
    value is quantised with the input's scale and zero point.
    """

    mean: float = 0.0
    std: float = 255.0
    explicit: bool = False


@dataclass(frozen=True)
class Geometry:
    """How a frame was fitted into the input: to map boxes back to frame pixels."""

    frame_height: int
    frame_width: int
    scale_y: float  # input pixels per frame pixel
    scale_x: float
    input_height: int = 0
    input_width: int = 0


@dataclass(frozen=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in frame pixels
    cascade: Nested | None = None  # a second model's output on this box's crop


@dataclass(frozen=True)
class Nested:
    """What a cascade's second model made of one detection's crop (agent/cascade.py):
    its output's boxes, if it detects, are in the frame's pixels."""

    model: str
    version: int | None
    output: Output

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, **self.output.to_dict()}


@dataclass(frozen=True)
class Output:
    """What one inference found: ``classes`` or ``detections`` or ``values``."""

    task: str
    classes: list[tuple[int, str, float]] = field(default_factory=list)  # id, label, score
    detections: list[Detection] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)  # regression floats; raw per-output dicts

    def to_dict(self) -> dict[str, Any]:
        if self.task == "classification":
            return {
                "classes": [
                    {"id": i, "label": lab, "score": round(s, 4)} for i, lab, s in self.classes
                ]
            }
        if self.task == "detection":
            return {"detections": [_detection(d) for d in self.detections]}
        return {"values": self.values}

    def summary(self) -> str:
        """One short line for a terminal."""
        if self.task == "classification":
            return ", ".join(f"{lab} {s:.2f}" for _, lab, s in self.classes) or "nothing"
        if self.task == "detection":
            return (
                ", ".join(
                    f"{d.label} {d.score:.2f} at {[round(v) for v in d.box]}"
                    + (f" ({d.cascade.output.summary()})" if d.cascade is not None else "")
                    for d in self.detections
                )
                or "nothing"
            )
        if self.task == "regression":
            return " ".join(f"{v:g}" for v in self.values) or "nothing"
        return "; ".join(_raw_summary(entry) for entry in self.values) or "nothing"


def _detection(d: Detection) -> dict[str, Any]:
    entry = {
        "id": d.class_id,
        "label": d.label,
        "score": round(d.score, 4),
        "box": [round(v, 1) for v in d.box],
    }
    if d.cascade is not None:
        entry["cascade"] = d.cascade.to_dict()
    return entry


def _raw_summary(entry: dict[str, Any]) -> str:
    """``scores [1, 3]: 1 0 0`` or ``boxes [1, 896, 16]: min -3 max 7.5 mean 0.12``."""
    shape = "x".join(str(n) for n in entry.get("shape", []))
    head = f"{entry.get('name') or 'output'} [{shape}]"
    if "values" in entry:
        return f"{head}: " + " ".join(f"{v:g}" for v in entry["values"])
    return f"{head}: min {entry['min']:g} max {entry['max']:g} mean {entry['mean']:g}"


def read_labels(path: Path) -> dict[int, str]:
    """Labels from ``path``: ``N label`` lines (Coral's format) or one label per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read labels: {exc}") from exc
    numbered = re.compile(r"^\s*(\d+)[\s:]+(.*\S)\s*$")
    if lines and all(numbered.match(line) for line in lines if line.strip()):
        return {int(m[1]): m[2] for m in map(numbered.match, lines) if m}
    return {index: line.strip() for index, line in enumerate(lines)}


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    from agent.runtime.resize import resizer

    return resizer()(frame, width, height)


def prepare(
    frame: np.ndarray, spec: TensorSpec, norm: InputNorm, keep_aspect: bool
) -> tuple[np.ndarray, Geometry]:
    """The input tensor for ``frame``, and how the frame was fitted into it.

    Image inputs are ``[1, H, W, C]``: the frame is resized (stretched, or with its
    aspect kept and padded at the right and bottom when ``keep_aspect``). Other inputs
    take the frame as is, with a batch axis added. Raises ValueError when the frame
    cannot fit the input.
    """
    import numpy as np

    shape = spec.shape
    if len(shape) == 4 and frame.ndim == 3:
        height, width, channels = shape[1], shape[2], shape[3]
        fh, fw = frame.shape[:2]
        if frame.shape[2] != channels:
            if channels == 1:
                frame = frame.mean(axis=2, keepdims=True).astype(frame.dtype)
            else:
                raise ValueError(f"frame has {frame.shape[2]} channels, the model wants {channels}")
        if keep_aspect:
            scale = min(width / fw, height / fh)
            sw, sh = max(1, round(fw * scale)), max(1, round(fh * scale))
            resized = frame if (sw, sh) == (fw, fh) else _resize(frame, sw, sh)
            pixels = np.zeros((height, width, channels), dtype=frame.dtype)
            pixels[:sh, :sw] = resized.reshape(sh, sw, channels)
            geometry = Geometry(fh, fw, scale, scale, height, width)
        else:
            pixels = frame if (fw, fh) == (width, height) else _resize(frame, width, height)
            pixels = pixels.reshape(height, width, channels)
            geometry = Geometry(fh, fw, height / fh, width / fw, height, width)
        tensor = _to_input(pixels, spec, norm)[np.newaxis]
        return tensor, geometry
    if frame.size != int(np.prod(shape)):
        raise ValueError(f"frame of shape {list(frame.shape)} does not fit input {list(shape)}")
    tensor = _to_input(frame.reshape(shape), spec, norm)
    return tensor, Geometry(0, 0, 1.0, 1.0)


def _to_input(values: np.ndarray, spec: TensorSpec, norm: InputNorm) -> np.ndarray:
    import numpy as np

    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        if values.dtype.kind == "f" and not norm.explicit:
            return values.astype(dtype, copy=False)  # sensor values are already real numbers
        return _normalised(values, norm).astype(dtype, copy=False)
    if spec.quantised and norm.explicit:
        real = _normalised(values, norm)
        quantised = np.round(real / spec.scale + spec.zero_point)
        info = np.iinfo(dtype)
        return np.clip(quantised, info.min, info.max).astype(dtype)
    if dtype == np.uint8 and values.dtype == np.uint8:
        return values
    if dtype == np.int8 and values.dtype == np.uint8:
        return (values.astype(np.int16) - 128).astype(np.int8)  # pycoral's convention
    return values.astype(dtype)


def _normalised(values: np.ndarray, norm: InputNorm) -> np.ndarray:
    """``(values - mean) / std`` in float32, computed in the one array made (the same
    values as the expression, which makes three: a 640x480 frame's worth of fresh pages
    each, ~0.6 ms of a 256x256 input against ~0.04 ms)."""
    import numpy as np

    real = values.astype(np.float32)
    real -= norm.mean
    real /= norm.std
    return real


def dequantise(tensor: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values of an output tensor (float32)."""
    import numpy as np

    if spec.quantised:
        return (tensor.astype(np.float32) - spec.zero_point) * spec.scale
    return tensor.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Adapter:
    """Turns the outputs of one model into an ``Output`` for its task."""

    task: str
    outputs: list[TensorSpec]
    labels: dict[int, str]
    top_k: int = 5
    min_score: float = 0.0
    detection_order: tuple[int, int, int, int] = (0, 1, 2, 3)  # boxes, classes, scores, count
    yolo: YoloLayout | None = None  # a YOLO head, decoded here, instead of SSD's outputs
    iou_threshold: float = DEFAULT_IOU  # YOLO's NMS

    @classmethod
    def build(
        cls,
        task: str,
        outputs: list[TensorSpec],
        labels: dict[int, str],
        top_k: int = 5,
        min_score: float = 0.0,
        *,
        input_shape: tuple[int, ...] = (),
        detection_format: str | None = None,
        iou_threshold: float = DEFAULT_IOU,
    ) -> Adapter:
        """Check that ``outputs`` fit ``task``. Raises ModelError naming the mismatch.

        A detection model is SSD (4 post-processed outputs) or YOLO (one raw output),
        by ``detection_format`` (the manifest's) or else by the outputs' shapes;
        ``input_shape`` (the model's image input) tells YOLO's layouts apart.
        """
        if task not in TASKS:
            raise ModelError(f"task {task!r} is not one of {', '.join(TASKS)}")
        order = (0, 1, 2, 3)
        yolo = None
        if task == "detection":
            order, yolo = detection_head(outputs, input_shape, detection_format)
        elif task == "classification" and not outputs:
            raise ModelError("a classification model needs an output")
        return cls(task, outputs, labels, top_k, min_score, order, yolo, iou_threshold)

    def label(self, class_id: int) -> str:
        return self.labels.get(class_id, str(class_id))

    def interpret(self, tensors: list[np.ndarray], geometry: Geometry) -> Output:
        import numpy as np

        if self.task == "classification":
            scores = dequantise(tensors[0], self.outputs[0]).reshape(-1)
            best = np.argsort(-scores, kind="stable")[: self.top_k]
            classes = [
                (int(i), self.label(int(i)), float(scores[i]))
                for i in best
                if scores[i] >= self.min_score
            ]
            return Output(self.task, classes=classes)
        if self.task == "detection":
            return Output(self.task, detections=self._detections(tensors, geometry))
        if self.task == "regression":
            values = dequantise(tensors[0], self.outputs[0]).reshape(-1)
            return Output(self.task, values=[round(float(v), 6) for v in values])
        pairs = zip(tensors, self.outputs, strict=True)
        return Output(self.task, values=[_raw(tensor, spec) for tensor, spec in pairs])

    def _detections(self, tensors: list[np.ndarray], geometry: Geometry) -> list[Detection]:
        if self.yolo is not None:
            return self._yolo_detections(tensors[0], self.yolo, geometry)
        b, c, s, n = (dequantise(tensors[i], self.outputs[i]) for i in self.detection_order)
        boxes, classes, scores = b.reshape(-1, 4), c.reshape(-1), s.reshape(-1)
        count = min(int(n.reshape(-1)[0]), len(scores))
        height, width = geometry.input_height, geometry.input_width
        found = []
        for i in range(count):
            if not scores[i] >= self.min_score:  # NaN too
                continue
            ymin, xmin, ymax, xmax = (float(v) for v in boxes[i])
            if not all(math.isfinite(v) for v in (ymin, xmin, ymax, xmax, classes[i])):
                continue  # a broken model's inf or NaN: no box to report
            # normalised to the input; the frame filled input pixels [0, frame * scale)
            box = (
                _clip(xmin * width / geometry.scale_x, geometry.frame_width),
                _clip(ymin * height / geometry.scale_y, geometry.frame_height),
                _clip(xmax * width / geometry.scale_x, geometry.frame_width),
                _clip(ymax * height / geometry.scale_y, geometry.frame_height),
            )
            cid = int(classes[i])
            found.append(Detection(cid, self.label(cid), float(scores[i]), box))
        found.sort(key=lambda d: -d.score)
        return found[: self.top_k]

    def _yolo_detections(
        self, tensor: np.ndarray, layout: YoloLayout, geometry: Geometry
    ) -> list[Detection]:
        import numpy as np

        from agent.runtime.yolo import detect

        spec = self.outputs[0]
        quant = (spec.scale, spec.zero_point) if spec.quantised else None
        size = (geometry.input_width, geometry.input_height)
        found = detect(tensor, layout, size, self.min_score, self.iou_threshold, self.top_k, quant)
        # the frame filled input pixels [0, frame * scale): no offset to take away
        scale = np.array([geometry.scale_x, geometry.scale_y] * 2, dtype=np.float64)
        limit = np.array([geometry.frame_width, geometry.frame_height] * 2, dtype=np.float64)
        boxes = np.clip(found.xyxy / scale, 0.0, limit)
        return [
            Detection(int(cid), self.label(int(cid)), float(score), tuple(box.tolist()))
            for box, score, cid in zip(boxes, found.scores, found.classes, strict=True)
        ]


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))


def _raw(tensor: np.ndarray, spec: TensorSpec) -> dict[str, Any]:
    values = dequantise(tensor, spec)
    entry: dict[str, Any] = {"name": spec.name, "shape": list(values.shape)}
    if values.size <= RAW_VALUES_MAX:
        entry["values"] = [round(float(v), 6) for v in values.reshape(-1)]
    else:
        entry.update(
            min=round(float(values.min()), 6),
            max=round(float(values.max()), 6),
            mean=round(float(values.mean()), 6),
        )
    return entry


def detection_head(
    outputs: list[TensorSpec], input_shape: tuple[int, ...], declared: str | None = None
) -> tuple[tuple[int, int, int, int], YoloLayout | None]:
    """SSD's output order, or a YOLO head's layout, of a detection model.

    ``declared`` (the manifest's ``detection_format``) decides when given; else one
    output is a YOLO head and four are SSD's. Raises ModelError naming the shapes.
    """
    if declared is not None and declared not in DETECTION_FORMATS:
        raise ModelError(
            f"detection_format {declared!r} is not one of {', '.join(DETECTION_FORMATS)}"
        )
    if declared == "ssd" or (declared is None and len(outputs) != 1):
        if declared is None and len(outputs) != 4:
            shapes = [list(o.shape) for o in outputs]
            raise ModelError(
                f"a detection model has the 4 post-processed SSD outputs (boxes, classes, "
                f"scores, count) or one YOLO output ([1, 4+classes, anchors] or [1, anchors, "
                f"5+classes]); this one has {len(outputs)}: {shapes}"
            )
        return detection_outputs(outputs), None
    if len(input_shape) != 4:
        raise ModelError(
            f"a YOLO detection model takes an image [1, H, W, C]; this input is {list(input_shape)}"
        )
    return (0, 1, 2, 3), yolo_layout(outputs, input_shape, declared)


def detection_outputs(outputs: list[TensorSpec]) -> tuple[int, int, int, int]:
    """Positions of boxes, classes, scores and count among an SSD model's outputs.

    Boxes are ``[1, N, 4]`` and count ``[1]``. Classes and scores are both ``[1, N]``:
    TFLite's post-processing op names them ``…:1`` and ``…:2``; other exports carry
    "class" and "score" in their names; failing both, classes come first (TF1 order).
    Raises ModelError when the outputs are not this form.
    """
    shapes = [tuple(o.shape) for o in outputs]
    if len(outputs) != 4:
        raise ModelError(
            f"a detection model needs the 4 post-processed SSD outputs (boxes, classes, scores, "
            f"count); this one has {len(outputs)}: {shapes}"
        )
    boxes = [i for i, o in enumerate(outputs) if len(o.shape) == 3 and o.shape[-1] == 4]
    count = [i for i, o in enumerate(outputs) if len(o.shape) == 1]  # [1]; [1,1] may be N=1
    pair = [i for i in range(4) if i not in boxes + count]
    if len(boxes) != 1 or len(count) != 1 or len(pair) != 2:
        raise ModelError(f"detection outputs are not boxes [1,N,4], [1,N], [1,N], [1]: {shapes}")
    first, second = (outputs[i].name.lower() for i in pair)
    if (first.endswith(":2") and second.endswith(":1")) or ("score" in first and "class" in second):
        pair.reverse()
    return boxes[0], pair[0], pair[1], count[0]
