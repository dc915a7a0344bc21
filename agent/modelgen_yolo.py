"""Small, real ``.tflite`` models with the raw output of Ultralytics YOLO exports.

``yolo_detector`` builds a model whose one output has exactly an export's layout —
``[1, 4+nc, A]`` for v8/v11 (or transposed), ``[1, A, 5+nc]`` for v5, ``A`` anchors
for the input's size (2100 / 6300 at 320×320) — with known boxes whose scores are a
function of the input: each of ``YOLO_OBJECTS`` scores the mean of one colour
channel of the input (in 0..1), so a test knows which boxes must come out of a red
or a blue frame. Every other anchor is background: seeded boxes all over the input
and class scores below ``BACKGROUND_SCORE``.

The int8 variant has what a full-integer export shows its user: int8 input (scale
1/255, zero point -128) and int8 output (scale 1/255, zero point -128, the 0..1 of
normalised boxes and probabilities); inside, it dequantises, computes in float and
quantises again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from agent.modelgen import _Graph

if TYPE_CHECKING:
    import numpy as np

BACKGROUND_SCORE = 0.1  # background anchors score below this
INT8_QUANT = (1 / 255, -128)


class YoloObject:
    """One known box: ``cx, cy, w, h`` normalised to the input, its class, and the
    input channel (0 red, 1 green, 2 blue) whose mean × ``gain`` is its score."""

    def __init__(
        self, box: tuple[float, float, float, float], class_id: int, channel: int, gain: float
    ) -> None:
        self.box, self.class_id, self.channel, self.gain = box, class_id, channel, gain


# two boxes of class 0 overlapping (the weaker is suppressed), the same box as class 2
# (kept: NMS is per class), and one box each for green and blue
YOLO_OBJECTS = (
    YoloObject((0.25, 0.25, 0.3, 0.3), 0, channel=0, gain=1.0),
    YoloObject((0.26, 0.26, 0.3, 0.3), 0, channel=0, gain=0.9),
    YoloObject((0.25, 0.25, 0.3, 0.3), 2, channel=0, gain=0.8),
    YoloObject((0.7, 0.6, 0.2, 0.4), 1, channel=1, gain=1.0),
    YoloObject((0.5, 0.85, 0.5, 0.2), 79, channel=2, gain=1.0),
)


def yolo_anchors(version: str, height: int, width: int) -> int:
    cells = sum((height // s) * (width // s) for s in (8, 16, 32))
    return 3 * cells if version == "yolov5" else cells


def _rows(
    version: str, classes: int, anchors: int, objects: tuple[YoloObject, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor, channels first: the constant part [C, A] and the weights [C*K, 3] of
    the channel means for the K object anchors (the first K)."""
    import numpy as np

    first = 5 if version == "yolov5" else 4
    channels = first + classes
    rng = np.random.default_rng(seed)
    base = np.zeros((channels, anchors), np.float32)
    centre = rng.uniform(0.0, 1.0, (2, anchors))
    size = rng.uniform(0.02, 0.3, (2, anchors))
    base[0:2], base[2:4] = centre, size
    if version == "yolov5":  # low objectness, any class probabilities
        base[4] = rng.uniform(0.0, BACKGROUND_SCORE, anchors)
        base[first:] = rng.uniform(0.0, 1.0, (classes, anchors))
    else:
        base[first:] = rng.uniform(0.0, BACKGROUND_SCORE, (classes, anchors))
    weights = np.zeros((channels, len(objects), 3), np.float32)
    for k, obj in enumerate(objects):
        base[:, k] = 0.0
        base[0:4, k] = obj.box
        if version == "yolov5":  # objectness from the input, the class sure
            weights[4, k, obj.channel] = obj.gain
            base[first + obj.class_id, k] = 1.0
        else:
            weights[first + obj.class_id, k, obj.channel] = obj.gain
    return base, weights


def yolo_detector(
    version: Literal["yolov5", "yolov8"] = "yolov8",
    size: int = 320,
    classes: int = 80,
    *,
    int8: bool = False,
    transposed: bool = False,
    pixels: bool = False,
    objects: tuple[YoloObject, ...] = YOLO_OBJECTS,
    seed: int = 0,
) -> bytes:
    """Input ``[1,size,size,3]`` (float32, or int8 with ``int8``); one output with a
    YOLO export's layout: v8 ``[1, 4+classes, A]`` (``[1, A, 4+classes]`` when
    ``transposed``), v5 ``[1, A, 5+classes]``. Boxes normalised to the input, or in
    input pixels with ``pixels`` (float only)."""
    import numpy as np

    if int8 and pixels:
        raise ValueError("int8 outputs hold 0..1: pixel boxes need a float model")
    anchors = yolo_anchors(version, size, size)
    first = 5 if version == "yolov5" else 4
    channels, count = first + classes, len(objects)
    base, weights = _rows(version, classes, anchors, objects, seed)
    if pixels:
        base[0:4] *= size
        weights[0:4] *= size
    anchors_first = version == "yolov5" or transposed
    g = _Graph()
    s = g.schema
    if int8:
        quantised = g.tensor("images", [1, size, size, 3], "int8", quant=INT8_QUANT)
        image = g.tensor("images/float", [1, size, size, 3])
        g.op(s.BuiltinOperator.DEQUANTIZE, [quantised], [image])
    else:
        image = quantised = g.tensor("images", [1, size, size, 3])
    means = g.mean(image, [1, 2], [1, 3], "means")
    # object rows = means @ weights: FULLY_CONNECTED takes weights [out, in]
    if anchors_first:
        matrix, block_shape, axis = weights.transpose(1, 0, 2), [1, count, channels], 1
        const_block, background = base[:, :count].T, base[:, count:].T
    else:
        matrix, block_shape, axis = weights, [1, channels, count], 2
        const_block, background = base[:, :count], base[:, count:]
    flat = g.tensor("objects/flat", [1, channels * count])
    fc = s.FullyConnectedOptionsT()
    g.op(
        s.BuiltinOperator.FULLY_CONNECTED,
        [means, g.const("objects/weights", np.ascontiguousarray(matrix).reshape(-1, 3)), -1],
        [flat],
        (s.BuiltinOptions.FullyConnectedOptions, fc),
    )
    shaped = g.reshape(flat, block_shape, "objects/shaped")
    block = g.add(shaped, g.const("objects/base", const_block[np.newaxis]), block_shape, "objects")
    out_shape = [1, anchors, channels] if anchors_first else [1, channels, anchors]
    rest = g.const("background", np.ascontiguousarray(background)[np.newaxis])
    joined = g.tensor("output0" if not int8 else "output0/float", out_shape)
    concat = s.ConcatenationOptionsT()
    concat.axis = axis
    g.op(
        s.BuiltinOperator.CONCATENATION,
        [block, rest],
        [joined],
        (s.BuiltinOptions.ConcatenationOptions, concat),
    )
    output = joined
    if int8:
        output = g.tensor("output0", out_shape, "int8", quant=INT8_QUANT)
        g.op(s.BuiltinOperator.QUANTIZE, [joined], [output])
    kind = f"{version}{' int8' if int8 else ''}{' transposed' if transposed else ''}"
    return g.finish([quantised], [output], f"edge-agent yolo_detector ({kind})")
