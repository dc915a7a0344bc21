"""Small, real ``.tflite`` models built by our own code, without TensorFlow.

The models are written with the TFLite flatbuffer object API that ``ai-edge-litert``
ships (``schema_py_generated``) and run by the real interpreter. Their outputs are a
known function of the input, so tests and the demo can check what comes out:

- ``colour_classifier``: the mean of each RGB channel, i.e. how red, green and blue
  the frame is, as a 3-class classifier (float or uint8-quantised).
- ``colour_detector``: the same means in the post-processed SSD form (boxes,
  classes, scores, count), one fixed box per colour.
- ``window_regressor``: the mean of a sensor window per channel.
- ``edgetpu_stub``: a model whose only operator is ``edgetpu-custom-op``, like
  the output of the Edge TPU compiler, for the paths where no TPU is present.

YOLO heads (Ultralytics' raw output layouts) are made by ``agent.modelgen_yolo``.

``offset`` is added to every output value, so a model's version can be read back
from its results (the hot-swap tests use this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

COLOUR_LABELS = ("red", "green", "blue")
# ymin, xmin, ymax, xmax (normalised) of the one box per colour colour_detector reports
COLOUR_BOXES = ((0.0, 0.0, 0.5, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75))


class _Graph:
    """Collects tensors, buffers and operators of one subgraph, then packs a model."""

    def __init__(self) -> None:
        try:
            from ai_edge_litert import schema_py_generated as schema
        except ImportError:  # tflite-runtime alone ships no schema to build models with
            from agent.errors import ModelError

            raise ModelError(
                "generating models needs the TFLite schema that ai-edge-litert ships: "
                "pip install 'edge-agent[litert]' (tflite-runtime alone can run models, "
                "not make them)"
            ) from None

        self.schema: Any = schema
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.tensors: list[Any] = []
        self.operators: list[Any] = []
        self.opcodes: list[tuple[int, str | None]] = []

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str = "float32",
        data: np.ndarray | None = None,
        quant: tuple[float, int] | None = None,
    ) -> int:
        s = self.schema
        tensor = s.TensorT()
        tensor.name = name
        tensor.shape = list(shape)
        tensor.type = {
            "float32": s.TensorType.FLOAT32,
            "uint8": s.TensorType.UINT8,
            "int8": s.TensorType.INT8,
            "int32": s.TensorType.INT32,
        }[dtype]
        tensor.buffer = 0
        if data is not None:
            buffer = s.BufferT()
            import numpy as np

            # an array is packed in one copy; a list would be packed byte by byte
            buffer.data = np.frombuffer(data.astype(dtype).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = [quant[0]], [quant[1]]
            tensor.quantization = q
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def const(
        self, name: str, value: Sequence[Any] | float | np.ndarray, dtype: str = "float32"
    ) -> int:
        import numpy as np

        array = np.asarray(value, dtype=dtype)
        return self.tensor(name, array.shape, dtype, data=array)

    def op(
        self,
        code: int | str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: tuple[int, Any] | None = None,
    ) -> None:
        """Add an operator; ``code`` is a BuiltinOperator, or a custom op's name."""
        key = (code, None) if isinstance(code, int) else (self.schema.BuiltinOperator.CUSTOM, code)
        if key not in self.opcodes:
            self.opcodes.append(key)
        operator = self.schema.OperatorT()
        operator.opcodeIndex = self.opcodes.index(key)
        operator.inputs, operator.outputs = list(inputs), list(outputs)
        if options is not None:
            operator.builtinOptionsType, operator.builtinOptions = options
        self.operators.append(operator)

    def mean(self, source: int, axes: Sequence[int], shape: Sequence[int], name: str) -> int:
        s = self.schema
        out = self.tensor(name, shape)
        options = s.ReducerOptionsT()
        options.keepDims = False
        axis = self.const(f"{name}/axes", list(axes), "int32")
        self.op(
            s.BuiltinOperator.MEAN,
            [source, axis],
            [out],
            (s.BuiltinOptions.ReducerOptions, options),
        )
        return out

    def binary(self, code: int, a: int, b: int, shape: Sequence[int], name: str) -> int:
        s = self.schema
        out = self.tensor(name, shape)
        kind = {
            s.BuiltinOperator.ADD: (s.BuiltinOptions.AddOptions, s.AddOptionsT()),
            s.BuiltinOperator.MUL: (s.BuiltinOptions.MulOptions, s.MulOptionsT()),
        }[code]
        self.op(code, [a, b], [out], kind)
        return out

    def add(self, a: int, b: int, shape: Sequence[int], name: str) -> int:
        return self.binary(self.schema.BuiltinOperator.ADD, a, b, shape, name)

    def mul(self, a: int, b: int, shape: Sequence[int], name: str) -> int:
        return self.binary(self.schema.BuiltinOperator.MUL, a, b, shape, name)

    def reshape(
        self,
        source: int,
        shape: Sequence[int],
        name: str,
        dtype: str = "float32",
        quant: tuple[float, int] | None = None,
    ) -> int:
        s = self.schema
        out = self.tensor(name, shape, dtype, quant=quant)
        target = self.const(f"{name}/shape", list(shape), "int32")
        options = s.ReshapeOptionsT()
        options.newShape = list(shape)
        self.op(
            s.BuiltinOperator.RESHAPE,
            [source, target],
            [out],
            (s.BuiltinOptions.ReshapeOptions, options),
        )
        return out

    def finish(self, inputs: Sequence[int], outputs: Sequence[int], description: str) -> bytes:
        import flatbuffers

        s = self.schema
        subgraph = s.SubGraphT()
        subgraph.tensors, subgraph.operators = self.tensors, self.operators
        subgraph.inputs, subgraph.outputs = list(inputs), list(outputs)
        subgraph.name = "main"
        model = s.ModelT()
        model.version = 3
        model.description = description
        model.subgraphs, model.buffers = [subgraph], self.buffers
        model.operatorCodes = []
        for builtin, custom in self.opcodes:
            opcode = s.OperatorCodeT()
            opcode.builtinCode = builtin
            opcode.deprecatedBuiltinCode = min(builtin, 127)
            opcode.customCode = custom
            opcode.version = 1
            model.operatorCodes.append(opcode)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def colour_classifier(size: int = 32, offset: float = 0.0, quantised: bool = False) -> bytes:
    """Input ``[1,size,size,3]``; output ``[1,3]``: mean red, green, blue (+ offset).

    Float: the input is expected in [0, 1] and the scores come out in [0, 1].
    Quantised: uint8 input and output with scale 1/255, zero point 0 (``offset``
    must then be 0), so the output is the channel mean in pixel units.
    """
    g = _Graph()
    if quantised:
        if offset:
            raise ValueError("a quantised colour_classifier cannot carry an offset")
        s = g.schema
        quant = (1 / 255, 0)
        image = g.tensor("image", [1, size, size, 3], "uint8", quant=quant)
        pooled = g.tensor("pooled", [1, 1, 1, 3], "uint8", quant=quant)
        options = s.Pool2DOptionsT()
        options.padding = s.Padding.VALID
        options.strideW = options.strideH = 1
        options.filterWidth = options.filterHeight = size
        g.op(
            s.BuiltinOperator.AVERAGE_POOL_2D,
            [image],
            [pooled],
            (s.BuiltinOptions.Pool2DOptions, options),
        )
        scores = g.reshape(pooled, [1, 3], "scores", "uint8", quant)
        return g.finish([image], [scores], "edge-agent colour_classifier (uint8)")
    image = g.tensor("image", [1, size, size, 3])
    means = g.mean(image, [1, 2], [1, 3], "means")
    scores = g.add(means, g.const("offset", [[offset] * 3]), [1, 3], "scores")
    return g.finish([image], [scores], "edge-agent colour_classifier")


def colour_detector(size: int = 32, offset: float = 0.0) -> bytes:
    """Float input ``[1,size,size,3]``; SSD post-processed outputs in TFLite's order.

    ``TFLite_Detection_PostProcess`` boxes ``[1,3,4]`` (COLOUR_BOXES), ``:1``
    classes ``[1,3]`` (0, 1, 2), ``:2`` scores ``[1,3]`` (channel means + offset),
    ``:3`` count ``[1]`` (3).
    """
    g = _Graph()
    image = g.tensor("image", [1, size, size, 3])
    means = g.mean(image, [1, 2], [1, 3], "means")
    zeros = g.mul(means, g.const("zero", 0.0), [1, 3], "zeros")
    name = "TFLite_Detection_PostProcess"
    column = g.reshape(zeros, [1, 3, 1], "zeros/column")
    boxes = g.add(column, g.const("boxes", [COLOUR_BOXES]), [1, 3, 4], name)
    classes = g.add(zeros, g.const("class_ids", [[0.0, 1.0, 2.0]]), [1, 3], f"{name}:1")
    scores = g.add(means, g.const("offset", [[offset] * 3]), [1, 3], f"{name}:2")
    nothing = g.mean(zeros, [1], [1], "nothing")
    count = g.add(nothing, g.const("three", [3.0]), [1], f"{name}:3")
    return g.finish([image], [boxes, classes, scores, count], "edge-agent colour_detector")


def window_regressor(window: int, channels: int = 1, offset: float = 0.0) -> bytes:
    """Input ``[1,window,channels]`` float; output ``[1,channels]``: the means (+ offset)."""
    g = _Graph()
    samples = g.tensor("samples", [1, window, channels])
    means = g.mean(samples, [1], [1, channels], "means")
    values = g.add(means, g.const("offset", [[offset] * channels]), [1, channels], "values")
    return g.finish([samples], [values], "edge-agent window_regressor")


def edgetpu_stub(size: int = 32) -> bytes:
    """A uint8 model whose one operator is ``edgetpu-custom-op``: runs only on a TPU."""
    g = _Graph()
    quant = (1 / 255, 0)
    image = g.tensor("image", [1, size, size, 3], "uint8", quant=quant)
    scores = g.tensor("scores", [1, 3], "uint8", quant=quant)
    g.op("edgetpu-custom-op", [image], [scores])
    return g.finish([image], [scores], "edge-agent edgetpu_stub")
