"""Publishing a release into a registry folder (served by any web server, S3 or a CDN).

Atomic from a reader's point of view: the release folder is assembled under a
hidden staging name and renamed into place whole, and only then is ``index.json``
replaced (also by rename) to list it. A crash at any point leaves ``index.json``
naming complete releases only; publishing the same release again finishes the job.
A published version never changes: publishing other bytes under it is refused.

Signing an already published release again with another key adds that key's
signature and keeps the others: the manifest bytes never change.

This module builds the manifest and puts the release folder in place; the index that
lists it (versions, channels, expiry, its signature, renewal) is
agent/fleet/registry_index.py, the self-test files agent/fleet/publish_selftest.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.atomic import fsync_dir, fsync_file, write_atomic
from agent.errors import DocumentError, EdgeAgentError
from agent.faults import crash_point
from agent.fleet.publish_selftest import (
    DEFAULT_ATOL,
    SELFTEST_EXPECT,
    SELFTEST_INPUTS,
    check_selftest_options,
    selftest_files,
)
from agent.fleet.registry_index import (
    DEFAULT_INDEX_EXPIRY_DAYS,
    PublishError,
    check_expiry_days,
    load_keys,
    publish_lock,
    read_index,
    update_index,
)
from agent.manifest import MAX_BYTES, TASKS, check_file_name, dump_json, parse_manifest
from agent.strictjson import parse_object
from agent.verify import add_signatures, sha256_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The names edge-fleet's commands and the tests import from here.
__all__ = ["PublishError", "PublishResult", "publish"]

TFLITE_IDENTIFIER = b"TFL3"
RESERVED_NAMES = ("manifest.json", "manifest.json.sig", "index.json", "index.json.sig")


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
    check_selftest_options(selftest_inputs, selftest_random, selftest_expect, atol, budget_p95_ms)
    if task not in TASKS:
        raise PublishError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    if detection_format is not None and task != "detection":
        raise PublishError(
            f"--detection-format: only for --task detection (this release is --task {task})"
        )
    if version < 1:
        raise PublishError(f"--version: {version} is not a positive integer")
    check_expiry_days(index_expiry_days)
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
            made = selftest_files(
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
        with publish_lock(model_dir):
            old_index = read_index(model_dir, keys)
            created, manifest = _install(model_dir, version, paths, raw, manifest, keys)
            update_index(model_dir, old_index, model, version, channels, keys, index_expiry_days)
    folder = model_dir / str(version)
    return PublishResult(folder, manifest, created)


def _plain_number(value: float) -> float | int:
    """40.0 as 40, as an operator writes it; other values as they are."""
    return int(value) if float(value).is_integer() else float(value)


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
