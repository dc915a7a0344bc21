"""Interpreters: the CPU backend and the Edge TPU backend, behind one small Protocol.

The TFLite runtime is ``ai-edge-litert`` when installed, else ``tflite-runtime``
(32-bit ARM, numpy<2). Both are imported on first use, so the package imports on a
machine with neither. The Edge TPU is reached only through ``load_delegate`` with
``libedgetpu.so.1``; pycoral is never needed.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import AcceleratorError, ModelError
from agent.runtime.native_stderr import captured

if TYPE_CHECKING:
    import numpy as np

EDGETPU_OP = b"edgetpu-custom-op"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a loaded model."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: Any  # a numpy scalar type: np.float32, np.uint8, ...
    scale: float  # 0.0 when not quantised
    zero_point: int

    @property
    def quantised(self) -> bool:
        return self.scale != 0.0


class Backend(Protocol):
    """A model loaded on one kind of hardware. ``name`` is ``cpu`` or ``edgetpu``."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def load(self, model: Path) -> None:
        """Load and allocate ``model``. Raises ModelError (AcceleratorError for the TPU)."""

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        """Run once; returns copies of the outputs. Raises RuntimeError on failure."""

    def close(self) -> None:
        """Free the interpreter (and delegate). Safe to call twice."""


@functools.cache
def runtime_api() -> tuple[str, Any, Any]:
    """``(name, Interpreter, load_delegate)`` of the installed TFLite runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return "ai-edge-litert", Interpreter, load_delegate
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import (
            Interpreter,
            load_delegate,
        )

        return "tflite-runtime", Interpreter, load_delegate
    except ImportError:
        from agent.preflight import RUNTIME_INSTALL

        raise ModelError(RUNTIME_INSTALL) from None


def is_edgetpu_model(path: Path) -> bool:
    """Whether ``path`` was compiled for the Edge TPU (it holds ``edgetpu-custom-op``)."""
    with open(path, "rb") as f:
        # the op's name is stored once as a flatbuffer string; models are a few MB
        return EDGETPU_OP in f.read()


def _specs(details: list[dict[str, Any]]) -> list[TensorSpec]:
    specs = []
    for d in details:
        scale, zero_point = d.get("quantization", (0.0, 0))
        specs.append(
            TensorSpec(
                index=int(d["index"]),
                name=str(d["name"]),
                shape=tuple(int(n) for n in d["shape"]),
                dtype=d["dtype"],
                scale=float(scale),
                zero_point=int(zero_point),
            )
        )
    return specs


class CpuBackend:
    """The TFLite interpreter on the CPU (with the runtime's XNNPACK kernels)."""

    name = "cpu"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._interpreter: Any = None

    def _delegates(self) -> list[Any]:
        return []

    def _load_failed(self, model: Path, exc: Exception) -> ModelError:
        # A compiled model fails at allocation here ("unresolved custom op"): say why.
        if EDGETPU_OP.decode() in str(exc):
            return ModelError(
                f"{model}: compiled for the Edge TPU (edgetpu-custom-op); it cannot run on "
                "the CPU: use the release's cpu variant or a device with an Edge TPU"
            )
        reason = str(exc).strip().splitlines()[0]
        return ModelError(f"{model}: cannot load the model on the {self.name}: {reason}")

    def load(self, model: Path) -> None:
        _, interpreter_class, _ = runtime_api()
        # The runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate" and the like
        # to fd 2 here: logged at DEBUG instead (errors at WARNING).
        with captured():
            delegates = self._delegates()
            try:
                interpreter = interpreter_class(
                    model_path=str(model),
                    num_threads=self.threads,
                    experimental_delegates=delegates,
                )
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise self._load_failed(model, exc) from exc
        self._interpreter = interpreter
        self.inputs = _specs(interpreter.get_input_details())
        self.outputs = _specs(interpreter.get_output_details())

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = self._interpreter
        if interpreter is None:
            raise RuntimeError("the model is closed")
        for spec, tensor in zip(self.inputs, tensors, strict=True):
            interpreter.set_tensor(spec.index, tensor)
        interpreter.invoke()  # releases the GIL while the kernels run
        return [interpreter.get_tensor(spec.index) for spec in self.outputs]  # copies

    def close(self) -> None:
        self._interpreter = None  # the interpreter (and delegate) go with the last reference


class EdgeTpuBackend(CpuBackend):
    """The interpreter with the Edge TPU delegate from ``libedgetpu``."""

    name = "edgetpu"

    def __init__(self, threads: int = 1, library: str = "libedgetpu.so.1", device: str = ""):
        super().__init__(threads)
        self.library = library
        self.device = device

    def _delegates(self) -> list[Any]:
        return [open_edgetpu(self.library, self.device)]

    def _load_failed(self, model: Path, exc: Exception) -> ModelError:
        # The accelerator's failure (e.g. a model compiled for another Edge TPU runtime
        # version), so that auto falls back to the cpu variant.
        reason = str(exc).strip().splitlines()[0]
        return AcceleratorError(f"{model}: cannot load the model on the {self.name}: {reason}")


def open_edgetpu(library: str = "libedgetpu.so.1", device: str = "") -> Any:
    """Load the Edge TPU delegate. Raises AcceleratorError saying what to fix."""
    _, _, load_delegate = runtime_api()
    options = {"device": device} if device else {}
    which = f"Edge TPU {device!r}" if device else "an Edge TPU"
    try:
        # Opened here first: the runtime's Delegate prints a stray traceback from its
        # __del__ when the library is missing.
        ctypes.CDLL(library)
        return load_delegate(library, options)
    except OSError as exc:  # the library itself is missing or broken
        raise AcceleratorError(
            f"cannot load {library}: {exc}. Install the Edge TPU runtime "
            "(libedgetpu1-std from Coral's apt repository)"
        ) from exc
    except ValueError as exc:  # the library loaded but no TPU answered
        raise AcceleratorError(
            f"no answer from {which} ({library} loaded): check the device is plugged in "
            "(lsusb shows 1a6e:089a or 18d1:9302; /dev/apex_0 for PCIe), the udev rules and "
            "that no other process holds it"
        ) from exc
