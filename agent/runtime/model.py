"""Choosing a backend for a release and loading it: the Edge TPU with CPU fallback.

``runtime.accelerator``:

- ``auto``: the ``edgetpu`` variant on the Edge TPU when the release has one and a
  TPU answers; otherwise the ``cpu`` variant. A release with only a compiled model
  and no TPU is refused with a clear error, never a crash.
- ``edgetpu``: the ``edgetpu`` variant on the TPU, or an error saying how to fix it.
- ``cpu``: the ``cpu`` variant on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from agent.errors import AcceleratorError, ModelError
from agent.runtime import calibrate as calibration
from agent.runtime.adapters import Adapter, Geometry, InputNorm, Output, prepare, read_labels
from agent.runtime.backends import Backend, CpuBackend, EdgeTpuBackend, is_edgetpu_model
from agent.runtime.calibrate import Choice
from agent.runtime.yolo import DEFAULT_IOU

if TYPE_CHECKING:
    import numpy as np

    from agent.config import RuntimeConfig
    from agent.store import Release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """Everything needed to load one model: its variants, labels and task."""

    name: str
    version: int | None
    task: str
    cpu: Path | None = None
    edgetpu: Path | None = None
    labels: Path | None = None
    norm: InputNorm = field(default_factory=InputNorm)
    detection_format: str | None = None  # ssd, yolov5, yolov8; None: by the outputs' shapes

    @classmethod
    def from_release(cls, release: Release) -> ModelFiles:
        manifest = release.manifest
        labels = next((f for f in manifest.files if f.role == "labels"), None)
        norm = InputNorm()
        if manifest.input is not None:
            norm = InputNorm(manifest.input.mean, manifest.input.std, explicit=True)
        return cls(
            name=manifest.model,
            version=manifest.version,
            task=manifest.task,
            cpu=release.model_path("cpu"),
            edgetpu=release.model_path("edgetpu"),
            labels=None if labels is None else release.path(labels),
            norm=norm,
            detection_format=manifest.detection_format,
        )

    @classmethod
    def from_file(
        cls,
        path: Path,
        task: str = "raw",
        labels: Path | None = None,
        norm: InputNorm | None = None,
    ) -> ModelFiles:
        """One model file; a compiled one counts as the edgetpu variant, else as cpu."""
        try:
            compiled = is_edgetpu_model(path)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model: {exc.strerror or exc}") from exc
        return cls(
            name=path.stem,
            version=None,
            task=task,
            cpu=None if compiled else path,
            edgetpu=path if compiled else None,
            labels=labels,
            norm=norm or InputNorm(),
        )

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name} v{self.version}"


BackendFactory = Callable[["RuntimeConfig"], Backend]

Pace = Callable[[], object]
"""Called by the loader before each step that competes with a running pipeline
(allocating the tensors holds the GIL; a warm-up run takes the cores): returns at a
moment the pipeline is between frames (``Pipeline.between_frames``), or after a
bounded wait."""


def _now() -> None:
    """The pace of a loader beside no pipeline: go at once."""


def patient(pace: Pace, misses: int = 2) -> Pace:
    """``pace``, until it has found no gap ``misses`` times in a row (a stream without
    gaps between frames, a file played as fast as possible): then go at once, so a long
    run of steps (a latency budget's 50 invokes) does not wait out every timeout."""
    missed = 0

    def paced() -> object:
        nonlocal missed
        if missed >= misses:
            return False
        gap = pace()
        missed = 0 if gap else missed + 1
        return gap

    return paced


BACKENDS: dict[str, BackendFactory] = {
    "cpu": lambda runtime: CpuBackend(_threads(runtime)),
    "edgetpu": lambda runtime: EdgeTpuBackend(
        _threads(runtime), runtime.edgetpu_library, runtime.edgetpu_device
    ),
}


def _threads(runtime: RuntimeConfig) -> int:
    return 1 if runtime.threads == "auto" else runtime.threads


class LoadedModel:
    """A model loaded on one or more interpreters of one backend, with the adapter for
    its task. Each interpreter (``infer(..., worker=i)``) is used by one thread at a time;
    ``interpret`` keeps no state and may run in several."""

    def __init__(
        self,
        files: ModelFiles,
        backend: Backend,
        adapter: Adapter,
        note: str = "",
        more: Sequence[Backend] = (),
        choice: Choice | None = None,
    ):
        self.files = files
        self.backend = backend  # the first interpreter
        self.backends = [backend, *more]  # all of them: the same model, side by side
        self.adapter = adapter
        self.note = note  # why this backend was chosen when it was not the first choice
        threads = getattr(backend, "threads", 1)
        self.choice = choice or Choice(len(self.backends), threads, "config")
        if not backend.inputs:
            raise ModelError(f"{files.label}: the model has no input")
        self.input = backend.inputs[0]
        self._keys()

    def _keys(self) -> None:
        self.keep_aspect = self.files.task == "detection"
        # frames prepared for one model fit another only if this key is the same
        self.input_key = (
            self.input.shape,
            str(self.input.dtype),
            self.input.scale,
            self.input.zero_point,
            self.files.norm,
            self.keep_aspect,
        )

    def retask(self, task: str) -> None:
        """Read the outputs as ``task`` from now on. Raises ModelError when they do not fit."""
        adapter = self.adapter
        self.adapter = Adapter.build(
            task,
            self.backend.outputs,
            adapter.labels,
            adapter.top_k,
            adapter.min_score,
            input_shape=self.input.shape,
            detection_format=self.files.detection_format,
            iou_threshold=adapter.iou_threshold,
        )
        self.files = dataclasses.replace(self.files, task=task)
        self._keys()

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def version(self) -> int | None:
        return self.files.version

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def prepare(self, frame: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """Input tensor for ``frame``. Raises ValueError when the frame cannot fit."""
        return prepare(frame, self.input, self.files.norm, self.keep_aspect)

    @property
    def workers(self) -> int:
        """Interpreters that may run at once (one thread each)."""
        return len(self.backends)

    def infer(self, tensor: np.ndarray, worker: int = 0) -> list[np.ndarray]:
        """Run the model on interpreter ``worker``. Raises RuntimeError (a failing
        delegate, a closed model)."""
        return self.backends[worker].infer([tensor])

    def interpret(self, outputs: list[np.ndarray], geometry: Geometry) -> Output:
        return self.adapter.interpret(outputs, geometry)

    def run(self, frame: np.ndarray) -> Output:
        """prepare, infer and interpret one frame, in this thread."""
        tensor, geometry = self.prepare(frame)
        return self.interpret(self.infer(tensor), geometry)

    def warmup(self, runs: int, pace: Pace = _now) -> None:
        """Run on a blank input ``runs`` times, so a broken delegate shows before serving;
        each run after ``pace`` returns."""
        import numpy as np

        blank = np.zeros(self.input.shape, dtype=self.input.dtype)
        for _ in range(runs):
            for backend in self.backends:
                pace()
                backend.infer([blank])

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def load_model(
    files: ModelFiles,
    runtime: RuntimeConfig,
    top_k: int = 5,
    min_score: float = 0.0,
    accelerator: str | None = None,
    backends: Mapping[str, BackendFactory] = BACKENDS,
    pace: Pace | None = None,
    iou_threshold: float = DEFAULT_IOU,
) -> LoadedModel:
    """Load ``files`` on the backend ``accelerator`` (default: ``runtime.accelerator``).

    ``top_k``, ``min_score`` and (for a YOLO head's NMS) ``iou_threshold`` shape the
    results.

    Warms the model up with ``runtime.warmup_runs`` inferences. Beside a running
    pipeline, pass its ``between_frames`` as ``pace``: the loading and each warm-up run
    then wait for a gap between frames instead of starving the stream. Raises
    AcceleratorError when the Edge TPU is required and absent, ModelError for every
    other refusal.
    """
    wanted = accelerator or runtime.accelerator
    pace = patient(pace) if pace is not None else _now
    labels = read_labels(files.labels) if files.labels is not None else {}
    note = ""
    if wanted == "cpu" and files.cpu is None:
        raise ModelError(
            f"{files.label} has only an Edge-TPU-compiled model and runtime.accelerator is cpu: "
            "publish a cpu variant, or run it on a device with an Edge TPU"
        )
    if wanted == "edgetpu" and files.edgetpu is None:
        raise ModelError(
            f"{files.label} has no edgetpu variant and runtime.accelerator is edgetpu: publish "
            "one (compiled with edgetpu_compiler), or set runtime.accelerator: auto"
        )
    if wanted in ("auto", "edgetpu") and files.edgetpu is not None:
        try:
            return _load(
                files,
                files.edgetpu,
                "edgetpu",
                backends,
                runtime,
                labels,
                top_k,
                min_score,
                pace=pace,
                iou_threshold=iou_threshold,
            )
        except AcceleratorError as exc:
            if wanted == "edgetpu":
                raise AcceleratorError(
                    f"{exc}; or set runtime.accelerator: auto to serve the cpu variant "
                    "when there is no TPU"
                ) from exc
            if files.cpu is None:
                raise ModelError(
                    f"{files.label} is compiled for the Edge TPU and has no cpu variant, and "
                    f"the Edge TPU is unavailable: {exc}"
                ) from exc
            note = f"Edge TPU unavailable, serving the cpu variant: {exc}"
    assert files.cpu is not None  # every branch without a cpu variant has returned or raised
    return _load(
        files,
        files.cpu,
        "cpu",
        backends,
        runtime,
        labels,
        top_k,
        min_score,
        note,
        pace,
        iou_threshold,
    )


def _load(
    files: ModelFiles,
    path: Path,
    kind: str,
    backends: Mapping[str, BackendFactory],
    runtime: RuntimeConfig,
    labels: dict[int, str],
    top_k: int,
    min_score: float,
    note: str = "",
    pace: Pace = _now,
    iou_threshold: float = DEFAULT_IOU,
) -> LoadedModel:
    def make(threads: int) -> Backend:
        backend = backends[kind](msgspec.structs.replace(runtime, threads=threads))
        pace()  # allocating the tensors holds the GIL (~25 ms for a 6 MB model here)
        backend.load(path)
        return backend

    loaded: list[Backend] = []
    try:
        choice, loaded = _interpreters(files, path, kind, runtime, make)
        first = loaded[0]
        adapter = Adapter.build(
            files.task,
            first.outputs,
            labels,
            top_k,
            min_score,
            input_shape=first.inputs[0].shape if first.inputs else (),
            detection_format=files.detection_format,
            iou_threshold=iou_threshold,
        )
        model = LoadedModel(files, first, adapter, note, loaded[1:], choice)
        model.warmup(runtime.warmup_runs, pace)
    except RuntimeError as exc:  # the delegate failed on its first inferences
        for backend in loaded:
            backend.close()
        error = AcceleratorError if kind == "edgetpu" else ModelError
        raise error(f"{files.label}: the {kind} failed its warm-up: {exc}") from exc
    except BaseException:
        for backend in loaded:
            backend.close()
        raise
    return model


def _interpreters(
    files: ModelFiles,
    path: Path,
    kind: str,
    runtime: RuntimeConfig,
    make: Callable[[int], Backend],
) -> tuple[Choice, list[Backend]]:
    """The interpreters to serve from: as configured, or the calibration's choice."""
    interpreters, threads = runtime.interpreters, runtime.threads
    if kind == "edgetpu":  # one interpreter per TPU: a second would queue on the device
        ignored = (
            f"runtime.interpreters: {interpreters} ignored: one interpreter per Edge TPU"
            if interpreters != 1
            else ""
        )
        if ignored:
            log.info("%s: %s", files.label, ignored)
        wanted = 1 if threads == "auto" else threads  # the TPU does the work
        return Choice(1, wanted, "config", ignored), [make(wanted)]
    plan = calibration.candidates(interpreters, threads, calibration.cores())
    # The next version of a model reuses the choice, under the same settings only (a
    # reload with runtime.threads: 1 must not keep an earlier calibration's 1x2).
    key = (files.name, kind, *plan)
    earlier = calibration.remembered(key) if len(plan) > 1 else None
    if len(plan) == 1 or earlier is not None:
        chosen = earlier or plan[0]
        loaded: list[Backend] = []
        try:
            for _ in range(chosen.interpreters):
                loaded.append(make(chosen.threads))
        except BaseException:
            for backend in loaded:
                backend.close()
            raise
        how: Literal["config", "calibration"] = "config" if earlier is None else "calibration"
        return Choice(chosen.interpreters, chosen.threads, how), loaded
    started = time.monotonic()
    winner, loaded, measured = calibration.calibrate(plan, make)
    calibration.remember(key, winner)
    figures = ", ".join(
        f"{m.candidate.interpreters}x{m.candidate.threads} {m.per_s:.0f}/s" for m in measured
    )
    log.info(
        "%s: serving on %d interpreter(s) of %d thread(s), chosen by calibration in %.2f s "
        "(interpreters x threads: %s)",
        files.label,
        winner.interpreters,
        winner.threads,
        time.monotonic() - started,
        figures,
    )
    return Choice(winner.interpreters, winner.threads, "calibration"), loaded
