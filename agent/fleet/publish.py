"""Publishing a release into a registry folder (served by any web server, S3 or a CDN).

Atomic from a reader's point of view: the release folder is assembled under a
hidden staging name and renamed into place whole, and only then is ``index.json``
replaced (also by rename) to list it. A crash at any point leaves ``index.json``
naming complete releases only; publishing the same release again finishes the job.
A published version never changes: publishing other bytes under it is refused.

``index.json`` carries a ``version`` raised by one on every change and an ``expires``
time (``index_expiry_days`` ahead), and with signing keys a detached signature
``index.json.sig`` over its exact bytes (agent/signed_index.py is the device's side).
:func:`renew_index` re-signs it with a new expiry and no other change (a cron job).
Signing an already published release again with another key adds that key's
signature and keeps the others: the manifest bytes never change.

A release may carry a self-test and a latency budget (agent/validate.py holds the
file contract). Inputs are the operator's or seeded random ones; expected outputs
are the operator's or computed here by running the cpu variant on the local TFLite
runtime. Generated files are written byte-for-byte reproducibly, so publishing the
same model with the same options again is recognised as unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.atomic import fsync_dir, fsync_file, write_atomic
from agent.errors import ConfigError, DocumentError, EdgeAgentError, ValidationError
from agent.faults import crash_point
from agent.manifest import (
    MAX_BYTES,
    TASKS,
    Index,
    check_file_name,
    dump_json,
    parse_index,
    parse_manifest,
)
from agent.signed_index import rfc3339
from agent.strictjson import parse_object
from agent.validate import MAX_ARRAY_BYTES, MAX_SAMPLES, npz_bytes, read_samples
from agent.verify import (
    add_signatures,
    key_id,
    load_private_key,
    parse_signatures,
    sha256_file,
)

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.backends import CpuBackend, TensorSpec

TFLITE_IDENTIFIER = b"TFL3"
RESERVED_NAMES = ("manifest.json", "manifest.json.sig", "index.json", "index.json.sig")
DEFAULT_INDEX_EXPIRY_DAYS = 30.0
SELFTEST_INPUTS = "selftest.npz"
SELFTEST_EXPECT = "selftest-expect.npz"
DEFAULT_ATOL = 0.02


class PublishError(EdgeAgentError):
    """The release cannot be published as asked; the registry is unchanged."""


@dataclass(frozen=True)
class PublishResult:
    folder: Path
    manifest: dict[str, object]
    created: bool  # False: this exact release was already published


def _file_entry(path: Path, role: str, variant: str | None) -> dict[str, object]:
    entry: dict[str, object] = {"name": path.name, "role": role}
    if variant is not None:
        entry["variant"] = variant
    entry["size"] = path.stat().st_size
    entry["sha256"] = sha256_file(path)
    return entry


def _model_entry(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != TFLITE_IDENTIFIER:
        raise PublishError(f"{path}: not a TFLite model (no 'TFL3' identifier)")
    variant = "edgetpu" if path.name.endswith("_edgetpu.tflite") else "cpu"
    return _file_entry(path, "model", variant)


def _same_release(a: dict[str, object], b: dict[str, object]) -> bool:
    keys = ("model", "version", "task", "files", "selftest", "budget", "detection_format")
    return all(a.get(k) == b.get(k) for k in keys)


def publish(
    files: list[Path],
    *,
    model: str,
    version: int,
    registry: Path,
    task: str = "raw",
    detection_format: str | None = None,
    labels: Path | None = None,
    sign_key: Path | Sequence[Path] | None = None,
    channels: tuple[str, ...] = (),
    index_expiry_days: float = DEFAULT_INDEX_EXPIRY_DAYS,
    input_norm: tuple[float, float] | None = None,
    selftest_inputs: Path | None = None,
    selftest_random: int | None = None,
    selftest_expect: Path | None = None,
    atol: float | None = None,
    budget_p95_ms: float | None = None,
) -> PublishResult:
    """Publish ``files`` as ``model`` v``version`` into the registry folder ``registry``.

    With ``selftest_inputs`` (an npz) or ``selftest_random`` (N seeded random
    samples), the release carries a self-test with tolerance ``atol`` (default 0.02);
    its expected outputs are ``selftest_expect`` or, without it, computed with the cpu
    variant. ``budget_p95_ms`` sets the release's latency budget. ``sign_key`` (one
    private key or several, while keys are rotated) signs the manifest and the index;
    ``detection_format`` (ssd, yolov5, yolov8; task detection only) tells devices how
    to read a detection model's outputs instead of their shapes;
    the index expires ``index_expiry_days`` from now.

    Raises ConfigError for options that do not go together, PublishError naming what
    is wrong otherwise; the registry is unchanged then.
    """
    _check_selftest_options(selftest_inputs, selftest_random, selftest_expect, atol, budget_p95_ms)
    if task not in TASKS:
        raise PublishError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    if detection_format is not None and task != "detection":
        raise PublishError(
            f"--detection-format: only for --task detection (this release is --task {task})"
        )
    if version < 1:
        raise PublishError(f"--version: {version} is not a positive integer")
    _check_expiry_days(index_expiry_days)
    paths = [*files, *([labels] if labels else [])]
    for path in paths:
        if not path.is_file():
            raise PublishError(f"{path}: no such file")
        try:
            check_file_name(path.name)
        except ValueError as exc:
            raise PublishError(f"{path}: {exc}") from None
        if path.name in RESERVED_NAMES:
            raise PublishError(f"{path}: {path.name!r} is the registry's own file name")
    for path in files:
        if path.suffix != ".tflite":
            raise PublishError(f"{path}: model files must end in .tflite")
    for given in (selftest_inputs, selftest_expect):
        if given is not None and not given.is_file():
            raise PublishError(f"{given}: no such file")
    entries = [_model_entry(p) for p in files]
    cpu = next((p for p, e in zip(files, entries, strict=True) if e["variant"] == "cpu"), None)
    if labels is not None:
        entries.append(_file_entry(labels, "labels", None))
    with tempfile.TemporaryDirectory(prefix="edge-fleet-selftest-") as scratch:
        manifest: dict[str, object] = {
            "schema": 1,
            "model": model,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": task,
            "files": entries,
        }
        if selftest_inputs is not None or selftest_random is not None:
            made = _selftest_files(
                cpu, Path(scratch), selftest_inputs, selftest_random, selftest_expect
            )
            paths += made
            entries += [_file_entry(path, "selftest", None) for path in made]
            manifest["selftest"] = {
                "inputs": SELFTEST_INPUTS,
                "expect": SELFTEST_EXPECT,
                "atol": DEFAULT_ATOL if atol is None else atol,
            }
        if budget_p95_ms is not None:
            manifest["budget"] = {"latency_ms_p95": _plain_number(budget_p95_ms)}
        if detection_format is not None:
            manifest["detection_format"] = detection_format
        if input_norm is not None:  # (pixel - mean) / std is what the model expects
            manifest["input"] = {"mean": input_norm[0], "std": input_norm[1]}
        raw = dump_json(manifest)
        try:
            parse_manifest(raw, f"{model} v{version}")  # the device's own rules, applied here
        except EdgeAgentError as exc:
            raise PublishError(str(exc)) from None
        keys = load_keys(sign_key)

        model_dir = registry / model
        model_dir.mkdir(parents=True, exist_ok=True)
        with _publish_lock(model_dir):
            old_index = _read_index(model_dir, keys)
            created, manifest = _install(model_dir, version, paths, raw, manifest, keys)
            _update_index(model_dir, old_index, model, version, channels, keys, index_expiry_days)
    folder = model_dir / str(version)
    return PublishResult(folder, manifest, created)


def _plain_number(value: float) -> float | int:
    """40.0 as 40, as an operator writes it; other values as they are."""
    return int(value) if float(value).is_integer() else float(value)


# ----- the self-test -----


def _check_selftest_options(
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


def _selftest_files(
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
        assert inputs is not None  # _check_selftest_options: inputs or random
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


@contextlib.contextmanager
def _publish_lock(model_dir: Path) -> Iterator[None]:
    """Serialise publishers of one model on this machine (index.json is read-modify-write)."""
    fd = os.open(model_dir / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _install(
    model_dir: Path,
    version: int,
    paths: list[Path],
    raw: bytes,
    manifest: dict[str, object],
    keys: Sequence[Ed25519PrivateKey],
) -> tuple[bool, dict[str, object]]:
    """Put the release folder in place. Returns (created, the manifest as published)."""
    folder = model_dir / str(version)
    if folder.exists():
        try:
            existing_raw = (folder / "manifest.json").read_bytes()
            existing = parse_object(
                existing_raw, what=f"{folder}/manifest.json", max_bytes=MAX_BYTES
            )
        except (OSError, DocumentError) as exc:
            raise PublishError(
                f"{folder} exists but holds no readable manifest.json ({exc}); "
                "remove it or publish a new version"
            ) from None
        if not _same_release(existing, manifest):
            raise PublishError(
                f"{manifest['model']} v{version} is already published with different "
                "content; a version never changes: publish a new version"
            )
        if keys:  # sign it (again): add these keys' signatures, keep the others
            _sign_file(folder / "manifest.json.sig", existing_raw, keys)
        return False, existing
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)  # what a crashed publish left
    staging.mkdir()
    try:
        for path in paths:
            shutil.copyfile(path, staging / path.name)
            fsync_file(staging / path.name)
        write_atomic(staging / "manifest.json", raw)
        if keys:
            _sign_file(staging / "manifest.json.sig", raw, keys)
        fsync_dir(staging)
        crash_point("publish_staged")
        os.rename(staging, folder)
        fsync_dir(model_dir)
        crash_point("publish_renamed")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True, manifest


def load_keys(sign_key: Path | Sequence[Path] | None) -> list[Ed25519PrivateKey]:
    """The private keys named by ``--sign-key`` (none, one or several).

    Raises VerificationError naming a file that is not an Ed25519 private key.
    """
    if sign_key is None:
        return []
    paths = [sign_key] if isinstance(sign_key, Path) else list(sign_key)
    return [load_private_key(path) for path in paths]


def _sign_file(path: Path, data: bytes, keys: Sequence[Ed25519PrivateKey]) -> None:
    """Write ``path`` (a signature file of ``data``) with each of ``keys``' signature
    added or replaced; written only when that changes it."""
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        existing = None
    try:
        new = add_signatures(existing, keys, data, path.name)
    except EdgeAgentError as exc:
        raise PublishError(f"{path}: {exc}") from None
    if new != existing:
        write_atomic(path, new)


def _check_expiry_days(days: float) -> None:
    if not (math.isfinite(days) and 0 < days <= 3650):
        raise ConfigError([f"--index-expiry-days: {days:g} is not a number of days in (0, 3650]"])


@dataclass(frozen=True)
class IndexInfo:
    """What an operator wants to know about a published index."""

    path: Path
    version: int | None
    expires: str | None
    channels: dict[str, int]
    versions: list[int]
    keyids: list[str]  # of index.json.sig; empty when unsigned


def _read_index(model_dir: Path, keys: Sequence[Ed25519PrivateKey]) -> Index | None:
    """The current index (None: none yet). Refuses to drop a signature it cannot renew:
    an index signed before must stay signed, or devices with keys refuse it."""
    path = model_dir / "index.json"
    if not path.exists():
        return None
    try:
        index = parse_index(path.read_bytes(), str(path))
    except EdgeAgentError as exc:
        raise PublishError(f"{exc}; fix or remove it first") from None
    if not keys and (model_dir / "index.json.sig").exists():
        raise PublishError(
            f"{path} is signed (index.json.sig) and changing it unsigned would make devices "
            "with registry.public_key refuse it: pass --sign-key"
        )
    return index


def _write_index(
    model_dir: Path,
    old: Index | None,
    versions: list[int],
    channels: dict[str, int],
    model: str,
    keys: Sequence[Ed25519PrivateKey],
    expiry_days: float,
) -> Index:
    """Write index.json with the next version and a new expiry, then its signature."""
    data = {
        "schema": 1,
        "model": model,
        "versions": versions,
        "channels": channels,
        "version": (old.version or 0) + 1 if old is not None else 1,
        "expires": rfc3339(time.time() + expiry_days * 86400),
    }
    raw = dump_json(data)
    index = parse_index(raw, "index.json")  # the device's own rules, applied here
    path = model_dir / "index.json"
    write_atomic(path, raw)
    sig = model_dir / "index.json.sig"
    if keys:
        # A device reading between these two renames refuses the pair once (bad
        # signature) and reads both again on its next poll.
        write_atomic(sig, add_signatures(None, keys, raw, sig.name))
    else:
        sig.unlink(missing_ok=True)  # _read_index refused this for a signed index
    return index


def _update_index(
    model_dir: Path,
    old: Index | None,
    model: str,
    version: int,
    channels: tuple[str, ...],
    keys: Sequence[Ed25519PrivateKey],
    expiry_days: float,
) -> None:
    versions = set(old.versions) if old is not None else set()
    current = dict(old.channels) if old is not None else {}
    versions.add(version)
    current.update({channel: version for channel in channels})
    unchanged = (
        old is not None
        and sorted(versions) == old.versions
        and current == old.channels
        and old.version is not None
    )
    if unchanged and not keys:
        return  # nothing to change and nothing to re-sign: leave it byte for byte
    _write_index(model_dir, old, sorted(versions), current, model, keys, expiry_days)


def renew_index(
    registry: Path,
    model: str,
    sign_key: Path | Sequence[Path],
    expiry_days: float = DEFAULT_INDEX_EXPIRY_DAYS,
) -> IndexInfo:
    """Re-sign ``model``'s index.json with a new expiry and the next version, nothing
    else changed (for a cron job: run it well before the expiry).

    Raises PublishError (no such index, or one that cannot be read), ConfigError for a
    bad expiry, VerificationError for a key that cannot be loaded.
    """
    _check_expiry_days(expiry_days)
    keys = load_keys(sign_key)
    if not keys:
        raise ConfigError(["--renew needs --sign-key: an index is renewed by signing it"])
    model_dir = registry / model
    if not (model_dir / "index.json").is_file():
        raise PublishError(f"{model_dir / 'index.json'}: no such file; publish a release first")
    with _publish_lock(model_dir):
        old = _read_index(model_dir, keys)
        assert old is not None
        _write_index(
            model_dir, old, list(old.versions), dict(old.channels), model, keys, expiry_days
        )
    return index_info(registry, model)


def index_info(registry: Path, model: str) -> IndexInfo:
    """What ``model``'s index.json says and who signed it. Raises PublishError."""
    path = registry / model / "index.json"
    try:
        index = parse_index(path.read_bytes(), str(path))
    except OSError as exc:
        raise PublishError(f"{path}: cannot read: {exc.strerror}") from None
    except EdgeAgentError as exc:
        raise PublishError(str(exc)) from None
    sig = path.with_name("index.json.sig")
    keyids: list[str] = []
    if sig.exists():
        try:
            keyids = [
                s.keyid or "(no key id)" for s in parse_signatures(sig.read_bytes(), str(sig))
            ]
        except EdgeAgentError as exc:
            raise PublishError(str(exc)) from None
    return IndexInfo(
        path, index.version, index.expires, dict(index.channels), list(index.versions), keyids
    )


def signing_key_ids(sign_key: Path | Sequence[Path] | None) -> list[str]:
    """The key ids of the ``--sign-key`` files, for the operator's output."""
    return [key_id(k) for k in load_keys(sign_key)]
