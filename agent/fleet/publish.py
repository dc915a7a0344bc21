"""Publishing a release into a registry folder (served by any web server, S3 or a CDN).

Atomic from a reader's point of view: the release folder is assembled under a
hidden staging name and renamed into place whole, and only then is ``index.json``
replaced (also by rename) to list it. A crash at any point leaves ``index.json``
naming complete releases only; publishing the same release again finishes the job.
A published version never changes: publishing other bytes under it is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.atomic import fsync_dir, fsync_file, write_atomic
from agent.errors import EdgeAgentError
from agent.faults import crash_point
from agent.manifest import (
    TASKS,
    check_file_name,
    dump_json,
    parse_index,
    parse_manifest,
)
from agent.verify import load_private_key, sha256_file, sign

TFLITE_IDENTIFIER = b"TFL3"
RESERVED_NAMES = ("manifest.json", "manifest.json.sig", "index.json")


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
    keys = ("model", "version", "task", "files", "selftest", "budget")
    return all(a.get(k) == b.get(k) for k in keys)


def publish(
    files: list[Path],
    *,
    model: str,
    version: int,
    registry: Path,
    task: str = "raw",
    labels: Path | None = None,
    sign_key: Path | None = None,
    channels: tuple[str, ...] = (),
    input_norm: tuple[float, float] | None = None,
) -> PublishResult:
    """Publish ``files`` as ``model`` v``version`` into the registry folder ``registry``.

    Raises PublishError naming what is wrong; the registry is unchanged then.
    """
    if task not in TASKS:
        raise PublishError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    if version < 1:
        raise PublishError(f"--version: {version} is not a positive integer")
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
    entries = [_model_entry(p) for p in files]
    if labels is not None:
        entries.append(_file_entry(labels, "labels", None))
    manifest: dict[str, object] = {
        "schema": 1,
        "model": model,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": task,
        "files": entries,
    }
    if input_norm is not None:  # (pixel - mean) / std is what the model expects
        manifest["input"] = {"mean": input_norm[0], "std": input_norm[1]}
    raw = dump_json(manifest)
    try:
        parse_manifest(raw, f"{model} v{version}")  # the device's own rules, applied here first
    except EdgeAgentError as exc:
        raise PublishError(str(exc)) from None
    key = load_private_key(sign_key) if sign_key is not None else None

    model_dir = registry / model
    model_dir.mkdir(parents=True, exist_ok=True)
    with _publish_lock(model_dir):
        created, manifest = _install(model_dir, version, paths, raw, manifest, key)
        _update_index(model_dir, model, version, channels)
    folder = model_dir / str(version)
    return PublishResult(folder, manifest, created)


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
    key: Ed25519PrivateKey | None,
) -> tuple[bool, dict[str, object]]:
    """Put the release folder in place. Returns (created, the manifest as published)."""
    folder = model_dir / str(version)
    if folder.exists():
        try:
            existing_raw = (folder / "manifest.json").read_bytes()
            existing = json.loads(existing_raw)
        except (OSError, ValueError) as exc:
            raise PublishError(
                f"{folder} exists but holds no readable manifest.json ({exc}); "
                "remove it or publish a new version"
            ) from None
        if not _same_release(existing, manifest):
            raise PublishError(
                f"{manifest['model']} v{version} is already published with different "
                "content; a version never changes: publish a new version"
            )
        sig = folder / "manifest.json.sig"
        if key is not None and not sig.exists():  # signing a release published unsigned
            write_atomic(sig, sign(key, existing_raw))
        return False, existing
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)  # what a crashed publish left
    staging.mkdir()
    try:
        for path in paths:
            shutil.copyfile(path, staging / path.name)
            fsync_file(staging / path.name)
        write_atomic(staging / "manifest.json", raw)
        if key is not None:
            write_atomic(staging / "manifest.json.sig", sign(key, raw))
        fsync_dir(staging)
        crash_point("publish_staged")
        os.rename(staging, folder)
        fsync_dir(model_dir)
        crash_point("publish_renamed")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True, manifest


def _update_index(model_dir: Path, model: str, version: int, channels: tuple[str, ...]) -> None:
    path = model_dir / "index.json"
    if path.exists():
        try:
            index = parse_index(path.read_bytes(), str(path))
        except EdgeAgentError as exc:
            raise PublishError(f"{exc}; fix or remove it first") from None
        versions, current = set(index.versions), dict(index.channels)
    else:
        versions, current = set(), {}
    versions.add(version)
    current.update({channel: version for channel in channels})
    data = {"schema": 1, "model": model, "versions": sorted(versions), "channels": current}
    write_atomic(path, dump_json(data))
