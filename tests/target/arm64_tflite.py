"""The second runtime on aarch64: tflite-runtime instead of ai-edge-litert.

docs/install.md tells 32-bit ARM (and anyone who prefers it) to install
``tflite-runtime`` 2.14.0 with ``numpy<2`` and ``opencv-python-headless<4.12``. These
checks prove that install on the emulated arm64 root filesystem of arm64.py, in a venv
of its own beside the first one, offline from its own wheelhouse, on the models,
photos, keys and store the first checks left: ``infer`` with the float and the
quantised model, ``check-config``, the daemon serving the stored release, and ``demo``
refusing in one line that names ``[litert]`` (it generates its models with
ai-edge-litert).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from tests.target import common
from tests.target.common import REPO, Failed, Overlay
from tests.target.inside import WORK, background, inside, inside_env, stop, wait_serving

VENV = "/opt/tflite-runtime/venv"
REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2", "opencv-python-headless<4.12")
PROBE = (
    "import importlib.util as u, tflite_runtime, numpy, cv2; "
    "print(u.find_spec('ai_edge_litert') is None, tflite_runtime.__version__, "
    "numpy.__version__, cv2.__version__)"
)


def wheelhouse(wheel: Path, platforms: Sequence[str]) -> Path:
    """The wheels for the project without ``[litert]``, plus tflite-runtime's set."""
    requirements = [f"{wheel}[video,serial]", *REQUIREMENTS]
    return common.wheelhouse(platforms, requirements, [REPO / "pyproject.toml"])


def install(view: Overlay, wheel: Path, house: Path) -> str:
    """A second venv, offline, with tflite-runtime and without ai-edge-litert."""
    view.bind(house, "/wheels-tflite", readonly=True)
    inside(view, f"python3 -m venv {VENV}", timeout=300)
    wanted = " ".join(shlex.quote(r) for r in REQUIREMENTS)
    inside(
        view,
        f"{VENV}/bin/pip install --no-index --find-links /wheels-tflite --quiet"
        f" '/wheels-project/{wheel.name}[video,serial]' {wanted}",
        timeout=900,
        venv=VENV,
    )
    found = inside(view, f"python -c {shlex.quote(PROBE)}", timeout=300, venv=VENV).split()
    if found[0] != "True":
        raise Failed("ai-edge-litert is importable in the tflite-runtime venv: not a fair test")
    return f"tflite-runtime {found[1]}, numpy {found[2]}, OpenCV {found[3]}, no ai-edge-litert"


def check_infer(view: Overlay) -> str:
    """The generated float (v1) and quantised (v2) classifiers name each photo's colour."""
    shown = []
    for version in (1, 2):
        out = inside(
            view,
            f"edge-agent infer --json --model {WORK}/v{version}.tflite"
            f" --labels {WORK}/colours.txt"
            f" {WORK}/images/0.jpg {WORK}/images/1.jpg {WORK}/images/2.jpg",
            timeout=300,
            venv=VENV,
        )
        rows = [json.loads(line) for line in out.splitlines()]
        labels = [row["classes"][0]["label"] for row in rows]
        scores = [row["classes"][0]["score"] for row in rows]
        if labels != ["red", "green", "blue"] or min(scores) < 0.7:
            raise Failed(f"v{version}: expected red, green, blue > 0.7, got {labels} {scores}")
        shown.append(f"v{version} " + " ".join(f"{s:.2f}" for s in scores))
    return "; ".join(shown)


def check_serves(view: Overlay) -> str:
    """check-config accepts the device's config; the daemon serves the stored release."""
    config = f"{WORK}/device.yaml"
    inside(view, f"edge-agent check-config --config {config}", timeout=300, venv=VENV)
    background(view, "agent-tflite", f"edge-agent run --config {config}", venv=VENV)
    status = wait_serving(view, 2, 5, timeout=300, venv=VENV)
    stop(view, "agent-tflite")
    stats = status.get("stats")
    backend = stats.get("backend") if isinstance(stats, dict) else None
    return f"check-config ok; run serves the stored v2 on {backend}"


def check_demo_refuses(view: Overlay) -> str:
    """Without ai-edge-litert the demo cannot generate its models: one line, exit 1."""
    done = view.chroot("edge-agent demo 2>&1", timeout=300, check=False, env=inside_env(VENV))
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 or len(lines) != 1 or "[litert]" not in lines[0]:
        raise Failed(f"demo: exit {done.returncode}, {len(lines)} lines: {lines[:5]}")
    return f"exit {done.returncode}: {lines[0]}"
