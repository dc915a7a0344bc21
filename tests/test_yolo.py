"""YOLO detection: Ultralytics' raw heads decoded on the device.

Pure decoding and NMS on arrays (tables), the layouts told apart by shape, then real
generated ``.tflite`` models with exactly the exports' output layouts (agent/modelgen_yolo)
through ``load_model`` on non-square frames, float, int8 and the Edge TPU path.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import manifest
from agent.config import RuntimeConfig
from agent.errors import ModelError, VerificationError
from agent.modelgen_yolo import yolo_detector
from agent.runtime import ModelFiles, load_model
from agent.runtime.adapters import detection_head
from agent.runtime.backends import TensorSpec
from agent.runtime.yolo import (
    DETECTION_FORMATS,
    Boxes,
    YoloLayout,
    anchor_counts,
    candidates,
    detect,
    is_yolo_head,
    nms,
    yolo_layout,
)

RUNTIME = RuntimeConfig(warmup_runs=1, threads=1)
COCO = [f"class{i}" for i in range(80)]
COCO[0], COCO[1], COCO[2], COCO[79] = "person", "bicycle", "car", "toothbrush"


def out(*shape: int, dtype: Any = np.float32) -> TensorSpec:
    return TensorSpec(0, "output0", shape, dtype, 0.0, 0)


def image(size: int = 320, width: int | None = None) -> tuple[int, ...]:
    return (1, size, width or size, 3)


# -- layouts by shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "input_shape", "declared", "expected"),
    [
        ((1, 84, 8400), image(640), None, YoloLayout("yolov8", 80, True)),
        ((1, 8400, 84), image(640), None, YoloLayout("yolov8", 80, False)),  # transposed
        ((1, 84, 2100), image(320), None, YoloLayout("yolov8", 80, True)),
        ((1, 25200, 85), image(640), None, YoloLayout("yolov5", 80, False)),
        ((1, 6300, 85), image(320), None, YoloLayout("yolov5", 80, False)),
        ((1, 6, 2100), image(320), None, YoloLayout("yolov8", 2, True)),
        ((1, 15120, 7), image(384, 640), None, YoloLayout("yolov5", 2, False)),  # 384x640
        ((1, 102000, 85), image(1280), None, YoloLayout("yolov5", 80, False)),  # P6
        ((1, 84, 34000), image(1280), None, YoloLayout("yolov8", 80, True)),  # P6
        # anchors that match no head for the input: the declared format, longer axis
        ((1, 84, 1000), image(300), "yolov8", YoloLayout("yolov8", 80, True)),
        ((1, 1000, 85), image(300), "yolov5", YoloLayout("yolov5", 80, False)),
        ((1, 1000, 85), image(300), "yolov8", YoloLayout("yolov8", 81, False)),
        ((1, 6300, 85), image(320), "yolov8", YoloLayout("yolov8", 81, False)),
    ],
)
def test_yolo_layout_is_told_by_the_shape_and_the_input(
    shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    declared: str | None,
    expected: YoloLayout,
) -> None:
    assert yolo_layout([out(*shape)], input_shape, declared) == expected


def test_anchor_counts_follow_strides_8_16_32_and_64() -> None:
    assert anchor_counts(image(640)) == {"yolov8": (8400, 8500), "yolov5": (25200, 25500)}
    assert anchor_counts(image(320)) == {"yolov8": (2100, 2125), "yolov5": (6300, 6375)}
    assert anchor_counts(image(352)) == {"yolov8": (2541,), "yolov5": (7623,)}  # 32, not 64
    assert anchor_counts(image(300)) == {"yolov8": (), "yolov5": ()}
    assert anchor_counts((1, 4, 2)) == {}


def test_what_is_no_yolo_head_is_refused_naming_the_shapes() -> None:
    with pytest.raises(ModelError, match=r"one output .*this one has \[\[1, 84\], \[1, 2\]\]"):
        yolo_layout([out(1, 84), out(1, 2)], image(320))
    with pytest.raises(ModelError, match=r"too narrow for a yolov5 head"):
        yolo_layout([out(1, 1000, 5)], image(300), "yolov5")
    # BlazeFace's raw boxes are no YOLO head: refused, saying how to declare one
    with pytest.raises(ModelError) as info:
        yolo_layout([out(1, 896, 16)], image(128))
    assert str(info.value) == (
        "output [1, 896, 16] has no axis of the anchors a YOLO head has for the input "
        "[1, 128, 128, 3] (yolov8 336/340, yolov5 1008/1020); if it is one, publish it "
        "with --detection-format yolov5 or yolov8"
    )
    with pytest.raises(ModelError, match=r"\(its sides are not multiples of 32\)"):
        yolo_layout([out(1, 84, 1000)], image(300))


def test_detection_head_tells_ssd_from_yolo_by_outputs_or_declared_format() -> None:
    ssd = [out(1, 10, 4), out(1, 10), out(1, 10), out(1)]
    assert detection_head(ssd, image(300)) == ((0, 1, 2, 3), None)
    _, layout = detection_head([out(1, 84, 2100)], image(320))
    assert layout == YoloLayout("yolov8", 80, True)
    with pytest.raises(ModelError, match=r"4 post-processed SSD outputs .* or one YOLO output"):
        detection_head([out(1, 84), out(1, 2)], image(320))
    with pytest.raises(ModelError, match=r"4 post-processed SSD outputs"):
        detection_head([out(1, 84, 2100)], image(320), "ssd")  # the manifest decides
    with pytest.raises(ModelError, match=r"takes an image \[1, H, W, C\]"):
        detection_head([out(1, 84, 2100)], (1, 16))
    assert is_yolo_head([out(1, 84, 2100)], image(320))
    assert not is_yolo_head([out(1, 896, 16)], image(128))  # BlazeFace's raw boxes
    assert DETECTION_FORMATS == manifest.DETECTION_FORMATS


# -- decoding and NMS on arrays ---------------------------------------------------------


def v8_raw(rows: list[tuple[float, float, float, float, int, float]], classes: int = 3) -> Any:
    """[1, 4+classes, A]: one anchor per row (cx, cy, w, h, class, score)."""
    raw = np.zeros((1, 4 + classes, len(rows)), np.float32)
    for a, (cx, cy, w, h, cid, score) in enumerate(rows):
        raw[0, :4, a] = (cx, cy, w, h)
        raw[0, 4 + cid, a] = score
    return raw


V8 = YoloLayout("yolov8", 3, True)


@pytest.mark.parametrize(
    ("rows", "iou", "limit", "kept"),
    [
        # the weaker of two overlapping boxes of one class goes
        ([(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 0, 0.8)], 0.45, 10, [0]),
        # the same overlap between two classes keeps both (class-aware)
        ([(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 1, 0.8)], 0.45, 10, [0, 1]),
        # IoU 0.818 stays above a 0.9 threshold
        ([(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 0, 0.8)], 0.9, 10, [0, 1]),
        # apart: both, best first; the limit caps the picks
        ([(10, 10, 8, 8, 2, 0.6), (90, 90, 8, 8, 2, 0.7)], 0.45, 10, [1, 0]),
        ([(10, 10, 8, 8, 2, 0.6), (90, 90, 8, 8, 2, 0.7)], 0.45, 1, [1]),
        # under min_score (0.5): never a candidate
        ([(10, 10, 8, 8, 2, 0.4)], 0.45, 10, []),
    ],
)
def test_class_aware_nms(
    rows: list[tuple[float, float, float, float, int, float]],
    iou: float,
    limit: int,
    kept: list[int],
) -> None:
    found = detect(v8_raw(rows), V8, (100, 100), 0.5, iou, limit)
    expected = [rows[i] for i in kept]
    assert found.scores.tolist() == pytest.approx([r[5] for r in expected])
    assert found.classes.tolist() == [r[4] for r in expected]


def test_boxes_in_pixels_or_normalised_come_out_in_input_pixels() -> None:
    pixels = v8_raw([(160, 80, 64, 32, 1, 0.9)])
    normalised = v8_raw([(0.5, 0.25, 0.2, 0.1, 1, 0.9)])
    for raw in (pixels, normalised):
        found = candidates(raw, V8, (320, 320), 0.5)
        assert found.xyxy[0].tolist() == pytest.approx([128, 64, 192, 96])


@pytest.mark.parametrize(
    "broken",
    [
        (math.nan, 50, 20, 20),  # a NaN centre
        (50, 50, math.inf, 20),  # an infinite width: inf - inf
        (50, 50, 20, -math.inf),
    ],
)
def test_a_box_that_is_not_finite_is_left_out_not_published(
    broken: tuple[float, float, float, float],
) -> None:
    raw = v8_raw([(*broken, 0, 0.9), (100, 100, 20, 20, 1, 0.8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on stderr either
        found = candidates(raw, V8, (320, 320), 0.5)
    assert found.classes.tolist() == [1]
    assert np.isfinite(found.xyxy).all()


def test_yolov5_score_is_objectness_times_class_probability() -> None:
    raw = np.zeros((1, 3, 7), np.float32)  # [1, A, 5+2]
    raw[0, 0] = (0.5, 0.5, 0.1, 0.1, 0.9, 0.2, 0.8)  # obj 0.9 × class 1 0.8 = 0.72
    raw[0, 1] = (0.2, 0.2, 0.1, 0.1, 0.4, 1.0, 0.0)  # obj 0.4: under min_score 0.5
    raw[0, 2] = (0.8, 0.8, 0.1, 0.1, 0.6, 0.5, 0.1)  # 0.6 × 0.5 = 0.3: under too
    found = candidates(raw, YoloLayout("yolov5", 2, False), (100, 100), 0.5)
    assert found.classes.tolist() == [1] and found.scores.tolist() == pytest.approx([0.72])


@pytest.mark.parametrize("version", ["yolov8", "yolov5"])
def test_quantised_outputs_are_searched_as_they_are_and_only_candidates_dequantised(
    version: str,
) -> None:
    """int8 with scale 1/255, zero point -128 (0..1): q -1 is 0.498, q 0 is 0.502, so at
    min_score 0.5 the anchor at q 0 passes and the one at q -1 does not."""
    quant = (1 / 255, -128)
    layout = YoloLayout(version, 2, version == "yolov8")  # type: ignore[arg-type]
    first = layout.first_class
    real = np.zeros((3, first + 2), np.float32)  # [A, C]: 3 anchors
    real[:, :4] = (0.5, 0.5, 0.25, 0.25)
    real[:, 4:] = 1.0  # v5: class probabilities 1, objectness 1
    real[:, first + 1] = (0.502, 0.498, 1.0)  # class 1 decides (v5: objectness × 1.0)
    real[:, first] = (0.1, 0.1, 0.2)
    if version == "yolov5":
        real[:, 4] = real[:, first + 1]
        real[:, first + 1] = 1.0
    q = np.clip(np.round(real * 255 - 128), -128, 127).astype(np.int8)
    raw = q.T[np.newaxis] if version == "yolov8" else q[np.newaxis]
    found = candidates(raw, layout, (320, 320), 0.5, quant=quant)
    assert sorted(found.scores.tolist()) == pytest.approx([128 / 255, 1.0], abs=1e-6)
    assert found.classes.tolist() == [1, 1]
    assert found.xyxy[0].tolist() == pytest.approx([120, 120, 200, 200], abs=1.0)
    assert candidates(raw, layout, (320, 320), 1.01, quant=quant).scores.size == 0
    assert candidates(raw, layout, (320, 320), 0.0, quant=quant).scores.size == 3


def test_candidates_are_capped_before_nms() -> None:
    rng = np.random.default_rng(1)
    raw = np.zeros((1, 5, 8400), np.float32)
    raw[0, :2] = rng.uniform(0, 1, (2, 8400))
    raw[0, 2:4] = 0.01
    raw[0, 4] = rng.uniform(0.5, 1.0, 8400)  # every anchor passes min_score
    layout = YoloLayout("yolov8", 1, True)
    found = candidates(raw, layout, (640, 640), 0.5, max_candidates=300)
    assert found.scores.shape == (300,)
    assert found.scores.min() >= np.sort(raw[0, 4])[-300]  # the best 300
    assert nms(Boxes(found.xyxy[:0], found.scores[:0], found.classes[:0]), 0.45, 5).size == 0


# -- real generated models --------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("yolo")
    made = {
        "v8.tflite": yolo_detector("yolov8"),
        "v8_transposed.tflite": yolo_detector("yolov8", transposed=True),
        "v8_pixels.tflite": yolo_detector("yolov8", pixels=True),
        "v8_int8.tflite": yolo_detector("yolov8", int8=True),
        "v5.tflite": yolo_detector("yolov5"),
        "v5_int8.tflite": yolo_detector("yolov5", int8=True),
    }
    for name, data in made.items():
        (root / name).write_bytes(data)
    (root / "coco.txt").write_text("\n".join(COCO) + "\n")
    return root


def frame(rgb: tuple[int, int, int], width: int, height: int) -> Any:
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[...] = rgb
    return pixels


def found(model: Any, pixels: Any) -> list[tuple[str, float, list[float]]]:
    return [(d.label, d.score, list(d.box)) for d in model.run(pixels).detections]


@pytest.mark.parametrize(
    "name",
    ["v8.tflite", "v8_transposed.tflite", "v8_pixels.tflite", "v5.tflite"],
)
def test_yolo_model_gives_known_boxes_in_frame_pixels_on_a_non_square_frame(
    yolo_models: Path, name: str
) -> None:
    files = ModelFiles.from_file(yolo_models / name, "detection", yolo_models / "coco.txt")
    model = load_model(files, RUNTIME, top_k=5, min_score=0.5)
    # 640x480 fits 320x320 at scale 0.5, padded below: the red mean is 0.75. The class-0
    # box (cx .25, cy .25, w .3, h .3 of the input) is x, y 32..128 of the input, 64..256
    # of the frame; its overlapping twin of class 0 goes; the same box as "car" stays.
    assert found(model, frame((255, 0, 0), 640, 480)) == [
        ("person", pytest.approx(0.75, abs=1e-3), pytest.approx([64, 64, 256, 256], abs=0.05)),
        ("car", pytest.approx(0.6, abs=1e-3), pytest.approx([64, 64, 256, 256], abs=0.05)),
    ]
    # 240x480 (portrait) at scale 2/3, padded right: the blue box (cx .5, cy .85, w .5,
    # h .2) is x 80..240, y 240..304 of the input; x 120..360 clipped to the frame's 240
    ((label, score, box),) = found(model, frame((0, 0, 255), 240, 480))
    assert label == "toothbrush" and score == pytest.approx(0.5, abs=1e-3)
    assert box == pytest.approx([120, 360, 240, 456], abs=0.05)
    assert found(model, frame((0, 0, 0), 640, 480)) == []  # background stays under 0.5


@pytest.mark.parametrize("name", ["v8_int8.tflite", "v5_int8.tflite"])
def test_int8_yolo_model_is_quantised_in_and_dequantised_out(yolo_models: Path, name: str) -> None:
    files = ModelFiles.from_file(yolo_models / name, "detection", yolo_models / "coco.txt")
    model = load_model(files, RUNTIME, top_k=5, min_score=0.5)
    assert model.input.dtype == np.int8 and model.backend.outputs[0].dtype == np.int8
    (person, car) = found(model, frame((255, 0, 0), 640, 480))
    step = 320 / 255 / 0.5  # one quantisation step of a box value, in frame pixels
    assert person[0] == "person" and person[1] == pytest.approx(0.75, abs=0.01)
    assert person[2] == pytest.approx([64, 64, 256, 256], abs=step)
    assert car[0] == "car" and car[1] == pytest.approx(0.6, abs=0.01)


def test_declared_format_in_the_files_decides(yolo_models: Path) -> None:
    path = yolo_models / "v8.tflite"
    as_ssd = ModelFiles("m", 1, "detection", cpu=path, detection_format="ssd")
    with pytest.raises(ModelError, match=r"4 post-processed SSD outputs"):
        load_model(as_ssd, RUNTIME)
    as_v5 = ModelFiles("m", 1, "detection", cpu=path, detection_format="yolov5")
    model = load_model(as_v5, RUNTIME)  # [1, 84, 2100] read as v5: 79 classes
    assert model.adapter.yolo == YoloLayout("yolov5", 79, True)


def test_iou_threshold_reaches_the_nms(yolo_models: Path) -> None:
    files = ModelFiles.from_file(yolo_models / "v8.tflite", "detection")
    model = load_model(files, RUNTIME, top_k=5, min_score=0.5, iou_threshold=0.95)
    scores = [d.score for d in model.run(frame((255, 0, 0), 640, 480)).detections]
    assert scores == pytest.approx([0.75, 0.675, 0.6], abs=1e-3)  # the twin (IoU .88) stays


def test_compiled_int8_yolo_runs_on_the_edgetpu_path(
    yolo_models: Path, fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in delegate takes no ops: the int8 model runs as the edgetpu variant,
    its outputs read exactly as a compiled export's (the same int8 tensor)."""
    monkeypatch.setenv("FAKE_EDGETPU_PRESENT", "1")
    files = ModelFiles(
        "yolo",
        1,
        "detection",
        cpu=yolo_models / "v8.tflite",
        edgetpu=yolo_models / "v8_int8.tflite",
        labels=yolo_models / "coco.txt",
    )
    model = load_model(files, RuntimeConfig(edgetpu_library=str(fake_edgetpu)), min_score=0.5)
    assert model.backend_name == "edgetpu"
    labels = [label for label, _, _ in found(model, frame((255, 0, 0), 640, 480))]
    assert labels == ["person", "car"]


def test_results_payload_of_a_yolo_model_fits_the_contract(yolo_models: Path) -> None:
    from agent.contract import validator

    files = ModelFiles.from_file(yolo_models / "v5.tflite", "detection", yolo_models / "coco.txt")
    model = load_model(files, RUNTIME, min_score=0.5)
    body = model.run(frame((255, 0, 0), 640, 480)).to_dict()
    message = {
        "schema": 1, "seq": 1, "id": "x", "ts": 1.0, "frame": 1, "model": "yolo",
        "version": 1, "backend": "cpu", "latency_ms": 1.0, "infer_ms": 1.0, **body,
    }  # fmt: skip
    validator("results").validate_python(json.loads(json.dumps(message)))
    for d in body["detections"]:
        assert set(d) == {"id", "label", "score", "box"} and len(d["box"]) == 4
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 640 and 0 <= y0 <= y1 <= 480


# -- the manifest ----------------------------------------------------------------------


def _manifest(**fields: Any) -> bytes:
    doc = {
        "schema": 1,
        "model": "yolo",
        "version": 1,
        "created": "2026-01-01T00:00:00Z",
        "task": "detection",
        "files": [
            {"name": "m.tflite", "role": "model", "variant": "cpu", "size": 1, "sha256": "0" * 64}
        ],
        **fields,
    }
    return json.dumps(doc).encode()


def test_manifest_detection_format_is_validated_naming_the_field() -> None:
    assert manifest.parse_manifest(_manifest(detection_format="yolov8")).detection_format == (
        "yolov8"
    )
    assert manifest.parse_manifest(_manifest()).detection_format is None
    with pytest.raises(VerificationError) as info:
        manifest.parse_manifest(_manifest(detection_format="yolo"))
    assert str(info.value).count("\n") == 0
    assert "detection_format" in str(info.value) and "'yolo'" in str(info.value)
    with pytest.raises(VerificationError, match=r"detection_format: only for task detection"):
        manifest.parse_manifest(_manifest(task="raw", detection_format="ssd"))


# -- the daemon -------------------------------------------------------------------------


def test_daemon_serves_a_published_yolo_release_and_publishes_its_boxes(
    tmp_path: Path, broker: Any, agents: list[Any]
) -> None:
    """A YOLOv8 release (float cpu variant, int8 edgetpu variant, COCO-style labels,
    ``--detection-format yolov8``) published to a registry, pulled and verified by a
    real ``edge-agent run``, which serves it on 640x480 images and publishes, over a
    real mosquitto, the boxes the model is known to give, in frame pixels."""
    import cv2
    import yaml

    from agent.fleet.publish import publish
    from tests.agentproc import MODEL, AgentProcess, Tap, wait_alive

    src = tmp_path / "src"
    src.mkdir()
    (src / "yolov8n.tflite").write_bytes(yolo_detector("yolov8"))
    (src / "yolov8n_edgetpu.tflite").write_bytes(yolo_detector("yolov8", int8=True))
    (src / "coco.txt").write_text("\n".join(COCO) + "\n")
    registry = tmp_path / "registry"
    publish(
        [src / "yolov8n.tflite", src / "yolov8n_edgetpu.tflite"],
        model=MODEL,
        version=1,
        registry=registry,
        task="detection",
        detection_format="yolov8",
        labels=src / "coco.txt",
        channels=("stable",),
    )
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "red.png"), np.full((480, 640, 3), (0, 0, 255), np.uint8))
    agent = AgentProcess(
        tmp_path / "dev-yolo",
        "dev-yolo",
        {
            "registry": {"url": registry.as_uri()},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
            "results": {"publish": "every", "min_score": 0.5, "top_k": 5},
        },
    )
    agents.append(agent)
    agent.settings["source"] = {"type": "images", "path": str(images), "loop": True, "fps": 10}
    agent.config_path.write_text(yaml.safe_dump(agent.settings))
    tap = Tap("127.0.0.1", broker.port, ["edge/dev-yolo/results"])
    try:
        agent.start()
        wait_alive(lambda: len(tap.docs("/results")) >= 3, 60, "3 results", agent)
        results = tap.docs("/results")
    finally:
        tap.close()
    for doc in results[:3]:
        assert doc["model"] == MODEL and doc["version"] == 1 and doc["backend"] == "cpu"
        assert [(d["label"], d["id"]) for d in doc["detections"]] == [("person", 0), ("car", 2)]
        assert doc["detections"][0]["score"] == pytest.approx(0.75, abs=0.01)
        assert doc["detections"][0]["box"] == pytest.approx([64, 64, 256, 256], abs=0.5)
