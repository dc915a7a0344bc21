"""The on-device validation gate: a release's self-test and latency budget.

Before a new release is activated the daemon loads it and calls ``validate``; a
release that fails is refused with a ValidationError naming what failed. Both checks
are optional, present when the manifest has ``selftest`` and ``budget``.

The self-test files (part of the registry contract; any publisher may write them):

- ``selftest.inputs`` names a ``.npz`` with one array per model input, ``input_0``,
  ``input_1``, … in the interpreter's input order. Each is ``[N, *input_shape]``: N
  samples, each of the input's full shape including its batch dimension of 1, of
  exactly the input tensor's dtype (``uint8`` for a quantised input: raw values).
- ``selftest.expect`` names a ``.npz`` with ``output_0``, ``output_1``, … of shape
  ``[N, *output_shape]`` and exactly the output tensor's dtype.
- Outputs are compared dequantised: for a quantised output (scale != 0) both actual
  and expected values are read as ``(q - zero_point) * scale``; ``atol`` is in those
  units. A NaN or infinity in an actual output fails the test.
- Members are plain ``.npy`` arrays (stored or deflated), never pickles; at most
  MAX_SAMPLES samples and MAX_ARRAY_BYTES of arrays per file.

The budget: ``backend.infer`` is timed on the self-test inputs (cycling through the
samples), or on zeros of the input shapes when there is no self-test, after a few
untimed warm-up runs; the release fails when the p95 exceeds ``latency_ms_p95``.
"""

from __future__ import annotations

import io
import math
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import AcceleratorError, StoreError, ValidationError

if TYPE_CHECKING:
    import numpy as np

    from agent.manifest import SelfTest
    from agent.runtime.backends import Backend, TensorSpec
    from agent.runtime.model import LoadedModel, Pace
    from agent.store import Release

MAX_SAMPLES = 1000
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # decompressed, all arrays of one file together
MAX_FILE_BYTES = MAX_ARRAY_BYTES + 1024 * 1024  # a self-test file on disk
WARMUP_RUNS = 3  # untimed: the first invokes pay for caches and lazy allocation

Kind = Literal["input", "output"]


@dataclass(frozen=True)
class ValidationReport:
    """What the gate measured on a release that passed it."""

    selftest_samples: int  # 0 when the manifest has no selftest
    max_abs_error: float | None  # largest |output - expected| over all outputs and samples
    latency_ms_p95: float | None  # measured, when the manifest has a budget
    runs: int  # invokes timed for the budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "selftest_samples": self.selftest_samples,
            "max_abs_error": self.max_abs_error,
            "latency_ms_p95": self.latency_ms_p95,
            "runs": self.runs,
        }


def validate(
    release: Release,
    model: LoadedModel,
    *,
    budget_runs: int = 50,
    deadline_s: float = 60.0,
    pace: Pace | None = None,
) -> ValidationReport:
    """Run ``release``'s self-test and latency budget on ``model`` (the release, loaded).

    Returns what was measured when both pass (or are absent). Raises ValidationError
    naming what failed: a self-test file that cannot be read or does not fit the
    model, an output beyond ``atol`` (or NaN), a p95 latency over the budget, or
    ``deadline_s`` passing first. Raises AcceleratorError when the Edge TPU fails an
    inference (the device's fault, not the release's) and StoreError when a file
    cannot be read from the store.

    Beside a running pipeline, ``pace`` is its ``between_frames``: each invoke waits for
    a gap between frames, so the gate neither starves the stream nor times itself
    against the serving model.
    """
    if budget_runs < 1:
        raise ValueError("budget_runs must be at least 1")
    manifest = release.manifest
    backend = model.backend
    deadline = time.monotonic() + deadline_s
    from agent.runtime.model import patient

    step = patient(pace) if pace is not None else None
    feeds: list[list[np.ndarray]] = []
    max_abs_error: float | None = None
    if manifest.selftest is not None:
        feeds, expect = _read_selftest(release, manifest.selftest, backend)
        max_abs_error = _selftest(
            backend, feeds, expect, manifest.selftest.atol, deadline, deadline_s, step
        )
    p95: float | None = None
    runs = 0
    if manifest.budget is not None:
        import numpy as np

        blank = [[np.zeros(spec.shape, dtype=spec.dtype) for spec in backend.inputs]]
        p95 = _p95_ms(backend, feeds or blank, budget_runs, deadline, deadline_s, step)
        runs = budget_runs
        if p95 > manifest.budget.latency_ms_p95:
            raise ValidationError(
                f"budget: p95 latency {_ms(p95)} ms on {backend.name} exceeds the manifest's "
                f"{manifest.budget.latency_ms_p95:g} ms ({runs} runs)"
            )
    return ValidationReport(len(feeds), max_abs_error, p95, runs)


# ----- the self-test files -----


def _read_selftest(
    release: Release, selftest: SelfTest, backend: Backend
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """The self-test's inputs, sample by sample, and its expected outputs, all checked."""
    inputs_entry = release.manifest.file(selftest.inputs)
    expect_entry = release.manifest.file(selftest.expect)
    for entry in (inputs_entry, expect_entry):
        # zipfile reads a member directory whole: bound the file before opening it
        if entry.size > MAX_FILE_BYTES:
            raise ValidationError(
                f"selftest: {entry.name} is {entry.size} bytes, over {MAX_FILE_BYTES}"
            )
    inputs = read_samples(
        release.path(inputs_entry), f"selftest: {inputs_entry.name}", "input", backend.inputs
    )
    expect = read_samples(
        release.path(expect_entry), f"selftest: {expect_entry.name}", "output", backend.outputs
    )
    if len(expect[0]) != len(inputs[0]):
        raise ValidationError(
            f"selftest: {expect_entry.name} holds {len(expect[0])} samples, "
            f"{inputs_entry.name} {len(inputs[0])}"
        )
    _check_finite(expect, f"selftest: {expect_entry.name}")
    return _feeds(inputs), expect


def read_samples(
    path: Path, what: str, kind: Kind, specs: Sequence[TensorSpec]
) -> list[np.ndarray]:
    """The arrays ``<kind>_0``, ``<kind>_1``, … of the npz at ``path``, one per spec.

    Guarantees each is ``[N, *spec.shape]`` of ``spec.dtype``, with the same N of
    1..MAX_SAMPLES throughout. Never unpickles; refuses before reading when the
    arrays' headers promise more than MAX_ARRAY_BYTES. ``what`` starts every error
    message. Raises ValidationError, or StoreError when ``path`` cannot be opened.
    """
    arrays = _load_npz(path, what)
    expected = [f"{kind}_{i}" for i in range(len(specs))]
    if sorted(arrays) != sorted(expected):
        have = ", ".join(sorted(arrays)) or "nothing"
        raise ValidationError(
            f"{what}: holds {have}; the model has {len(specs)} {kind}(s): {', '.join(expected)}"
        )
    import numpy as np

    samples: int | None = None
    out = []
    for i, (name, spec) in enumerate(zip(expected, specs, strict=True)):
        array = arrays[name]
        needs = "(N, " + ", ".join(str(n) for n in spec.shape) + ")"
        if array.ndim != len(spec.shape) + 1 or tuple(array.shape[1:]) != spec.shape:
            raise ValidationError(
                f"{what}: {name} has shape {tuple(array.shape)}, "
                f"the model's {kind} {i} needs {needs}"
            )
        if array.dtype != np.dtype(spec.dtype):
            raise ValidationError(
                f"{what}: {name} has dtype {array.dtype}, "
                f"the model's {kind} {i} is {np.dtype(spec.dtype)}"
            )
        n = array.shape[0]
        if n == 0:
            raise ValidationError(f"{what}: {name} holds no samples")
        if n > MAX_SAMPLES:
            raise ValidationError(f"{what}: {name} holds {n} samples, more than {MAX_SAMPLES}")
        if samples is not None and n != samples:
            raise ValidationError(f"{what}: {name} holds {n} samples, {expected[0]} {samples}")
        samples = n
        out.append(array)
    return out


# What a damaged or hostile zip or .npy raises while being read.
_PARSE_ERRORS = (
    ValueError,
    EOFError,
    KeyError,
    NotImplementedError,
    zipfile.BadZipFile,
    zlib.error,
)


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)  # the bytes come from a registry
    except OSError as exc:
        raise StoreError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
    except _PARSE_ERRORS as exc:
        raise ValidationError(f"{what}: not a valid .npz file: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValidationError(f"{what}: a single .npy array, not an .npz file")
    with loaded as npz:
        try:
            _check_sizes(npz.zip, what)
            return {name: npz[name] for name in npz.files}
        except _PARSE_ERRORS as exc:
            raise ValidationError(f"{what}: not a valid .npz file: {exc}") from exc
        except OSError as exc:  # a read that failed half-way
            raise ValidationError(f"{what}: cannot be read: {exc}") from exc


def _check_sizes(archive: zipfile.ZipFile, what: str) -> None:
    """Refuse non-array members and arrays whose headers promise too much, before reading.

    numpy allocates what an array's header declares before it reads the data, so
    the header is what must be bounded; the zip's own sizes bound the rest.
    """
    import numpy as np

    members = archive.infolist()
    if len(members) > 64:
        raise ValidationError(f"{what}: {len(members)} members; a self-test file holds a few")
    total = 0
    for info in members:
        if not info.filename.endswith(".npy"):
            raise ValidationError(f"{what}: member {info.filename!r} is not an .npy array")
        if info.file_size > MAX_ARRAY_BYTES + 65536:
            raise ValidationError(
                f"{what}: {info.filename} unpacks to {info.file_size} bytes, "
                f"more than {MAX_ARRAY_BYTES}"
            )
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValidationError(f"{what}: {info.filename}: .npy format {version} refused")
        if dtype.hasobject:
            raise ValidationError(f"{what}: {info.filename} holds Python objects (a pickle)")
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValidationError(f"{what}: {info.filename} has a bad shape {tuple(shape)}")
        total += math.prod(shape) * dtype.itemsize
        if total > MAX_ARRAY_BYTES:
            raise ValidationError(
                f"{what}: its arrays hold more than {MAX_ARRAY_BYTES} bytes "
                f"({info.filename} has shape {tuple(shape)} of {dtype})"
            )


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of ``arrays``, byte-for-byte the same for the same arrays.

    ``np.savez`` leaves the zip's timestamps and layout to numpy and zipfile; fixed
    ones here keep a re-published release's hash unchanged.
    """
    import numpy as np

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.lib.format.write_array(
                data, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data.getvalue())
    return out.getvalue()


# ----- running -----


def _selftest(
    backend: Backend,
    feeds: list[list[np.ndarray]],
    expect: list[np.ndarray],
    atol: float,
    deadline: float,
    deadline_s: float,
    pace: Pace | None = None,
) -> float:
    """Run every sample and compare; returns the largest deviation. Raises ValidationError."""
    import numpy as np

    worst = 0.0
    failing: list[tuple[float, int, int]] = []  # (deviation, output, sample)
    for sample, feed in enumerate(feeds):
        if time.monotonic() > deadline:
            raise ValidationError(
                f"selftest: the {deadline_s:g} s deadline passed after {sample} of "
                f"{len(feeds)} samples"
            )
        outputs = _infer(backend, feed, f"selftest: sample {sample}", pace)
        for k, (spec, actual) in enumerate(zip(backend.outputs, outputs, strict=True)):
            got = _dequantised(actual, spec)
            if not np.all(np.isfinite(got)):
                raise ValidationError(f"selftest failed: output_{k} sample {sample} is not finite")
            deviation = float(np.max(np.abs(got - _dequantised(expect[k][sample], spec))))
            worst = max(worst, deviation)
            if deviation > atol:
                failing.append((deviation, k, sample))
    if failing:
        deviation, k, sample = max(failing, key=lambda f: (f[0], -f[2]))
        more = f"; {len(failing)} of {len(feeds) * len(expect)} comparisons fail"
        raise ValidationError(
            f"selftest failed: output_{k} sample {sample} differs by {deviation:.4g} "
            f"(atol {atol:g}){more if len(failing) > 1 else ''}"
        )
    return worst


def _dequantised(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    import numpy as np

    values = np.asarray(array, dtype=np.float64)
    return (values - spec.zero_point) * spec.scale if spec.quantised else values


def _infer(
    backend: Backend, feed: list[np.ndarray], what: str, pace: Pace | None = None
) -> list[np.ndarray]:
    if pace is not None:
        pace()
    try:
        return backend.infer(feed)
    except (RuntimeError, ValueError) as exc:
        if backend.name == "edgetpu":  # the accelerator failed; the release may be fine
            raise AcceleratorError(f"{what}: the Edge TPU failed: {exc}") from exc
        raise ValidationError(f"{what}: inference failed on the {backend.name}: {exc}") from exc


def _feeds(inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Sample by sample, one contiguous tensor per input (what ``set_tensor`` takes)."""
    import numpy as np

    return [[np.ascontiguousarray(a[i]) for a in inputs] for i in range(len(inputs[0]))]


def _check_finite(expect: list[np.ndarray], what: str) -> None:
    import numpy as np

    for k, array in enumerate(expect):
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ValidationError(f"{what}: output_{k} holds NaN or infinity")


def _p95_ms(
    backend: Backend,
    feeds: list[list[np.ndarray]],
    runs: int,
    deadline: float,
    deadline_s: float,
    pace: Pace | None = None,
) -> float:
    """p95 in ms of ``runs`` timed invokes, cycling through ``feeds``, after a warm-up;
    each after ``pace`` returns, which is not timed."""
    import numpy as np

    for i in range(WARMUP_RUNS):
        _infer(backend, feeds[i % len(feeds)], "budget: warm-up", pace)
    times = []
    for i in range(runs):
        if time.monotonic() > deadline:
            raise ValidationError(
                f"budget: the {deadline_s:g} s deadline passed after {i} of {runs} runs"
            )
        feed = feeds[i % len(feeds)]
        if pace is not None:
            pace()
        start = time.perf_counter()
        _infer(backend, feed, f"budget: run {i}")
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 95))


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"
