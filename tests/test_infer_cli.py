"""``edge-agent infer`` and ``edge-agent bench``: real model files, images and a video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Models


def edge_agent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # no config file at the default path: infer and bench take the runtime defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import cv2

    root = tmp_path_factory.mktemp("media")
    red = np.zeros((120, 160, 3), np.uint8)
    red[..., 2] = 255  # OpenCV writes BGR
    cv2.imwrite(str(root / "red.png"), red)
    writer = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for index in range(6):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[..., 2 - index % 3] = 255  # red, green, blue, red, …
        writer.write(frame)
    writer.release()
    return {"image": root / "red.png", "video": root / "clip.avi"}


def test_infer_prints_detections_for_images_and_every_video_frame(
    models: Models, media: dict[str, Path]
) -> None:
    result = edge_agent(
        "infer",
        "--model",
        str(models.path("detector.tflite")),
        "--labels",
        str(models.labels),
        "--min-score",
        "0.3",
        str(media["image"]),
        str(media["video"]),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 160x120 into 32x32 at scale 0.2: the red box (0,0)-(0.5,0.5) is (0,0)-(80,80)
    assert lines[0] == f"{media['image']}: red 0.75 at [0, 0, 80, 80]"
    labels = [line.split(": ")[1].split()[0] for line in lines[1:]]
    assert labels == ["red", "green", "blue", "red", "green", "blue"]
    assert f"{media['video']}: 6 frames, 0 errors" in result.stderr


def test_infer_json_lines_carry_results(models: Models, media: dict[str, Path]) -> None:
    result = edge_agent(
        "infer",
        "--json",
        "--model",
        str(models.path("classifier_uint8.tflite")),
        "--labels",
        str(models.labels),
        "--top-k",
        "1",
        str(media["video"]),
    )
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["frame"] for row in rows] == list(range(6))
    assert [row["classes"][0]["label"] for row in rows] == ["red", "green", "blue"] * 2
    assert all(row["backend"] == "cpu" and row["classes"][0]["score"] > 0.9 for row in rows)


def test_infer_compiled_model_without_tpu_fails_in_one_line(
    zoo_file: Any, media: dict[str, Path]
) -> None:
    model = zoo_file("mobilenet_v2_1.0_224_quant_edgetpu.tflite")
    result = edge_agent("infer", "--model", str(model), str(media["image"]))
    assert result.returncode == 1
    assert "edge-agent: model: " in result.stderr and "no cpu variant" in result.stderr
    assert "Traceback" not in result.stderr


def test_infer_names_a_missing_input_and_an_unreadable_image(
    models: Models, tmp_path: Path
) -> None:
    model = str(models.path("classifier.tflite"))
    result = edge_agent("infer", "--model", model, str(tmp_path / "nope.jpg"))
    assert result.returncode == 1 and "nope.jpg: no such file" in result.stderr
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg")
    result = edge_agent("infer", "--model", model, str(junk))
    assert result.returncode == 1 and "junk.jpg: not an image" in result.stderr


def test_infer_with_an_invalid_config_exits_78(
    models: Models, tmp_path: Path, media: dict[str, Path]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("runtime:\n  accelerator: tpu\n")
    result = edge_agent(
        "infer",
        "--config",
        str(config),
        "--model",
        str(models.path("classifier.tflite")),
        str(media["image"]),
    )
    assert result.returncode == 78 and "runtime.accelerator" in result.stderr


def test_bench_reports_pipeline_against_the_bare_loop(models: Models) -> None:
    result = edge_agent(
        "bench",
        "--json",
        "--model",
        str(models.path("classifier.tflite")),
        "--seconds",
        "0.3",
        "--rounds",
        "1",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["bare_fps"] > 0 and data["pipeline_fps"] > 0
    assert data["ratio"] == pytest.approx(data["pipeline_fps"] / data["bare_fps"], abs=0.001)
    assert 0 < data["latency_ms_p50"] <= data["latency_ms_p99"]


def test_infer_on_a_file_that_is_no_video_fails_at_once_naming_it(
    models: Models, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    result = edge_agent("infer", "--model", str(models.path("classifier.tflite")), str(notes))
    assert result.returncode == 1 and "notes.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_refuses_a_model_that_takes_no_image_and_bad_numbers(models: Models) -> None:
    result = edge_agent("bench", "--model", str(models.path("regressor.tflite")))
    assert result.returncode == 1 and "cannot take" in result.stderr
    assert "Traceback" not in result.stderr
    result = edge_agent("bench", "--model", str(models.path("regressor.tflite")), "--rounds", "0")
    assert result.returncode == 2 and "must be a number greater than 0" in result.stderr


def test_raw_outputs_print_as_a_line_not_a_python_dict(
    models: Models, media: dict[str, Path]
) -> None:
    model = str(models.path("classifier.tflite"))
    result = edge_agent("infer", "--task", "raw", "--model", model, str(media["image"]))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "{" not in line and "'" not in line, line
    assert line.startswith(f"{media['image']}: ") and " [1x3]: " in line, line


@pytest.mark.parametrize("kind", ["image", "video"])
def test_without_opencv_infer_names_the_extra_in_one_line(
    models: Models, media: dict[str, Path], kind: str
) -> None:
    code = (
        "import sys; sys.modules['cv2'] = None  # as if opencv were not installed\n"
        "from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    model = str(models.path("classifier.tflite"))
    result = subprocess.run(
        [sys.executable, "-c", code, "infer", "--model", model, str(media[kind])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"edge-agent: model: {media[kind]}: reading {kind}s needs OpenCV: "
        "pip install 'edge-agent[video]'"
    )


def test_infer_reads_a_yolo_head_through_the_pipeline_on_non_square_frames(
    tmp_path: Path,
) -> None:
    """``--task auto`` knows a YOLOv8 head by its anchors (2100 at 320x320); a 640x480
    video's frames go through the pipeline, letterboxed, and its boxes come back in
    frame pixels with the release's labels, the weaker overlapping box suppressed."""
    import cv2

    from agent.modelgen_yolo import yolo_detector

    model = tmp_path / "yolov8n_float32.tflite"
    model.write_bytes(yolo_detector("yolov8", 320))
    labels = tmp_path / "coco.txt"
    labels.write_text("person\nbicycle\ncar\n")
    video = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for _ in range(3):
        writer.write(np.full((480, 640, 3), (0, 0, 255), np.uint8))  # BGR: red
    writer.release()
    result = edge_agent(
        "infer", "--json", "--model", str(model), "--labels", str(labels),
        "--min-score", "0.5", str(video),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        # red mean 0.75 after the letterbox pads 480 rows up to 640; box .1-.4 of the
        # 320 input is 32-128 there, 64-256 in the frame
        assert [d["label"] for d in row["detections"]] == ["person", "car"]
        assert row["detections"][0]["score"] == pytest.approx(0.75, abs=0.01)
        assert row["detections"][0]["box"] == pytest.approx([64, 64, 256, 256], abs=0.5)
