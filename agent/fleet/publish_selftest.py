"""The self-test a published release carries: its options checked, its files made.

A release may carry a self-test and a latency budget (agent/validate.py holds the
file contract). Inputs are the operator's or seeded random ones; expected outputs
are the operator's or computed here by running the cpu variant on the local TFLite
runtime. Generated files are written byte-for-byte reproducibly, so publishing the
same model with the same options again is recognised as unchanged.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError, EdgeAgentError, ValidationError
from agent.fleet.registry_index import PublishError
from agent.validate import MAX_ARRAY_BYTES, MAX_SAMPLES, npz_bytes, read_samples

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.backends import CpuBackend, TensorSpec

SELFTEST_INPUTS = "selftest.npz"
SELFTEST_EXPECT = "selftest-expect.npz"
DEFAULT_ATOL = 0.02


def check_selftest_options(
    inputs: Path | None,
    random: int | None,
    expect: Path | None,
    atol: float | None,
    budget_p95_ms: float | None,
) -> None:
    """Raise ConfigError (bad usage) when the self-test and budget options do not fit."""
    problems = []
    if inputs is not None and random is not None:
        problems.append("--selftest-inputs and --selftest-random exclude each other")
    if inputs is None and random is None:
        if expect is not None:
            problems.append(
                "--selftest-expect needs the inputs it answers: "
                "add --selftest-inputs (or --selftest-random)"
            )
        if atol is not None:
            problems.append(
                "--atol is the self-test's tolerance: add --selftest-inputs or --selftest-random"
            )
    if random is not None and not 1 <= random <= MAX_SAMPLES:
        problems.append(f"--selftest-random: {random} is not a sample count of 1..{MAX_SAMPLES}")
    if atol is not None and not (math.isfinite(atol) and atol >= 0):
        problems.append(f"--atol: {atol} is not a tolerance of 0 or more")
    if budget_p95_ms is not None and not (math.isfinite(budget_p95_ms) and budget_p95_ms > 0):
        problems.append(f"--budget-p95-ms: {budget_p95_ms} is not a latency above 0 ms")
    if problems:
        raise ConfigError(problems)


def selftest_files(
    cpu: Path | None,
    scratch: Path,
    inputs: Path | None,
    random: int | None,
    expect: Path | None,
) -> list[Path]:
    """Write ``selftest.npz`` and ``selftest-expect.npz`` into ``scratch``; return both.

    Files given are copied as they are, once checked against the cpu variant's
    tensors (when there is one); what is not given is generated from that variant.
    """
    out_inputs, out_expect = scratch / SELFTEST_INPUTS, scratch / SELFTEST_EXPECT
    if cpu is None:
        if random is not None:
            raise ConfigError(
                [
                    "--selftest-random needs a cpu variant to know the model's inputs: "
                    "pass --selftest-inputs and --selftest-expect"
                ]
            )
        if expect is None:
            raise ConfigError(
                [
                    "the release has only an edgetpu variant, so the expected outputs cannot "
                    "be computed here: pass --selftest-expect"
                ]
            )
        assert inputs is not None  # check_selftest_options: inputs or random
        shutil.copyfile(inputs, out_inputs)
        shutil.copyfile(expect, out_expect)
        return [out_inputs, out_expect]
    backend = _load_cpu(cpu)
    try:
        if random is not None:
            samples = _random_inputs(backend.inputs, random)
            out_inputs.write_bytes(npz_bytes(_named("input", samples)))
        else:
            assert inputs is not None
            samples = read_samples(inputs, str(inputs), "input", backend.inputs)
            shutil.copyfile(inputs, out_inputs)
        count = len(samples[0])
        if expect is not None:
            expected = read_samples(expect, str(expect), "output", backend.outputs)
            if len(expected[0]) != count:
                raise PublishError(
                    f"{expect}: holds {len(expected[0])} samples, the inputs {count}"
                )
            shutil.copyfile(expect, out_expect)
        else:
            _check_size(backend.outputs, count, "the expected outputs")
            out_expect.write_bytes(npz_bytes(_named("output", _run(backend, samples))))
    except ValidationError as exc:  # the operator's file does not fit the model
        raise PublishError(str(exc)) from None
    finally:
        backend.close()
    return [out_inputs, out_expect]


def _load_cpu(path: Path) -> CpuBackend:
    from agent.runtime.backends import CpuBackend

    backend = CpuBackend(threads=1)  # one thread: the same outputs, bit for bit, every time
    try:
        backend.load(path)
    except EdgeAgentError as exc:  # no runtime, or a model it cannot load
        raise PublishError(f"the self-test needs the cpu variant running here: {exc}") from None
    return backend


def _named(kind: str, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{kind}_{i}": array for i, array in enumerate(arrays)}


def _check_size(specs: Sequence[TensorSpec], samples: int, what: str) -> None:
    import numpy as np

    size = sum(samples * math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs)
    if size > MAX_ARRAY_BYTES:
        raise PublishError(
            f"{samples} samples of {what} take {size} bytes, more than a device accepts "
            f"({MAX_ARRAY_BYTES}): use fewer samples"
        )


def _random_inputs(specs: Sequence[TensorSpec], samples: int) -> list[np.ndarray]:
    """``samples`` seeded random inputs per spec: the dtype's whole range for integers,
    [0, 1) for floats. The same specs give the same arrays on every run."""
    import numpy as np

    _check_size(specs, samples, "random inputs")
    rng = np.random.default_rng(0)
    arrays = []
    for i, spec in enumerate(specs):
        dtype = np.dtype(spec.dtype)
        shape = (samples, *spec.shape)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays.append(rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True))
        elif dtype.kind == "f":
            arrays.append(rng.random(shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.integers(0, 1, shape, endpoint=True).astype(dtype))
        else:
            raise PublishError(
                f"input {i} is {dtype}: no random values for it; pass --selftest-inputs"
            )
    return arrays


def _run(backend: CpuBackend, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The outputs for every sample of ``inputs``, stacked: ``[N, *output_shape]`` each."""
    import numpy as np

    results = []
    for i in range(len(inputs[0])):
        try:
            results.append(backend.infer([np.ascontiguousarray(a[i]) for a in inputs]))
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"the cpu variant failed on self-test sample {i}: {exc}") from None
    return [np.stack([r[k] for r in results]) for k in range(len(backend.outputs))]
