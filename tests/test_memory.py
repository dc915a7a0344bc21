"""What the daemon keeps in memory (issue 19; the figures are bench/daemon.py's): the
synthetic source holds one gradient, not its 30 frames, and a resize never imports
OpenCV by itself, though it uses it once a source has."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np

from agent import modelgen
from agent.config import SyntheticSource as SyntheticConfig
from agent.sources import make_source, pattern_frames


def test_the_synthetic_source_makes_each_frame_when_read() -> None:
    tracemalloc.start()
    try:
        source = make_source(SyntheticConfig(width=640, height=480))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 3e6  # one 0.9 MB gradient; the 30 frames were 27.6 MB
    source.open()
    expected = pattern_frames(640, 480)
    frames = [source.read(timeout=1.0) for _ in range(65)]  # the pattern, over and over
    assert all(np.array_equal(f, expected[i % 30]) for i, f in enumerate(frames))
    frames[0][:] = 0  # each frame is the reader's own: the next round is intact
    assert all(np.array_equal(source.read(1.0), expected[i % 30]) for i in range(65, 95))
    source.close()


RESIZE = """
import sys
import numpy as np
from agent.config import RuntimeConfig
from agent.runtime.model import ModelFiles, load_model
from agent.runtime.resize import resizer, resize_bilinear
path = sys.argv[1]
if sys.argv[2] == "source-loaded-opencv":
    import cv2
model = load_model(ModelFiles(name="c", version=1, task="classification", cpu=path),
                   RuntimeConfig(), 3, 0.0)
frame = np.zeros((480, 640, 3), np.uint8); frame[..., 0] = 255  # 640x480 -> 32x32
print(model.run(frame).classes[0][0], "cv2" in sys.modules, resizer() is resize_bilinear)
"""


def test_a_resize_alone_does_not_import_opencv(tmp_path: Path) -> None:
    model = tmp_path / "colours.tflite"
    model.write_bytes(modelgen.colour_classifier())
    found = {}
    for case in ("nothing-else", "source-loaded-opencv"):
        result = subprocess.run(
            [sys.executable, "-c", RESIZE, str(model), case],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert result.returncode == 0, result.stderr
        found[case] = result.stdout.split()
    assert found["nothing-else"] == ["0", "False", "True"]  # red, no cv2, numpy's resize
    assert found["source-loaded-opencv"] == ["0", "True", "False"]  # OpenCV's once loaded
