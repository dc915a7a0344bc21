"""A cascade with real models on the real interpreter: detect colours, then classify crops.

The first model is ``colour_detector`` (agent/modelgen.py): one fixed box per colour —
red the top-left quadrant, green the top-right one, blue the middle of the bottom
half — scored by how much of that colour the whole frame has. The frames paint each
box in its colour (at different strengths, so the scores differ), so the second
model, ``colour_classifier``, must name the crop's own colour, and the crop's pixels
say how strong it is.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cascade import Cascade, CascadeRules
from agent.cascade_rules import crop_box
from agent.config import RuntimeConfig
from agent.frames import Item, Result
from agent.modelgen_yolo import yolo_detector
from agent.pipeline import Pipeline
from agent.runtime import LoadedModel, ModelFiles, load_model
from agent.runtime.adapters import Output
from agent.sources import MemorySource, pattern_frames
from tests.conftest import Models

RUNTIME = RuntimeConfig(warmup_runs=1, threads=1)
SIZE = 64
STRENGTH = {"red": 255, "green": 200, "blue": 150}  # detector scores .25, .20, .15


def painted(size: int = SIZE, strength: dict[str, int] = STRENGTH) -> np.ndarray:
    """Each colour_detector box painted in its colour, the rest black."""
    frame = np.zeros((size, size, 3), np.uint8)
    half, quarter = size // 2, size // 4
    frame[:half, :half, 0] = strength["red"]
    frame[:half, half:, 1] = strength["green"]
    frame[half:, quarter : size - quarter, 2] = strength["blue"]
    return frame


def load(models: Models, file: str, task: str, version: int = 1, name: str = "") -> LoadedModel:
    files = ModelFiles(
        name=name or file.split(".")[0],
        version=version,
        task=task,
        cpu=models.path(file),
        labels=models.labels,
    )
    return load_model(files, RUNTIME)


@pytest.fixture
def detector(models: Models) -> Any:
    model = load(models, "detector.tflite", "detection", name="colours")
    yield model
    model.close()


def first(
    detector: LoadedModel, frame: np.ndarray, mono: float | None = None
) -> tuple[Item, Result]:
    """The frame's item and the primary model's result, as the pipeline makes them."""
    mono = time.monotonic() if mono is None else mono
    item = Item(0, time.time(), mono, frame, None, None, None)
    output = detector.run(frame)
    result = Result(0, item.ts, detector.name, detector.version, "cpu", 1.0, 1.0, output)
    return item, result


def test_each_detection_carries_the_colour_of_its_crop(
    models: Models, detector: LoadedModel
) -> None:
    item, result = first(detector, painted(), mono=time.monotonic() - 1.0)
    assert [d.label for d in result.output.detections] == ["red", "green", "blue"]
    cascade = Cascade(load(models, "classifier.tflite", "classification", 7), CascadeRules())
    out = cascade.run(item, result)
    assert out is not result and all(d.cascade is None for d in result.output.detections)
    nested = [d.cascade for d in out.output.detections]
    assert all(
        part is not None and (part.model, part.version) == ("classifier", 7) for part in nested
    )
    tops = [part.output.classes[0] for part in nested if part is not None]
    assert [label for _, label, _ in tops] == ["red", "green", "blue"]  # the crop's own colour
    assert [round(score * 255) for _, _, score in tops] == [255, 200, 150]  # only that colour
    # the payload: nested under each detection, the rest of the result as it was
    doc = out.to_dict()
    assert doc["detections"][1]["cascade"]["model"] == "classifier"
    assert doc["detections"][1]["cascade"]["version"] == 7
    assert doc["detections"][1]["cascade"]["classes"][0]["label"] == "green"
    assert doc["detections"][1]["box"] == result.to_dict()["detections"][1]["box"]
    assert (out.frame, out.model, out.infer_ms) == (result.frame, result.model, result.infer_ms)
    assert out.latency_ms >= 1000  # capture to the end of the cascade
    stats = cascade.stats()
    assert (stats.frames, stats.crops, stats.skipped, stats.errors) == (1, 3, 0, 0)
    assert stats.infer_ms_p50 > 0
    assert stats.to_dict() == {
        "model": "classifier",
        "version": 7,
        "crops": 3,
        "infer_ms_p50": round(stats.infer_ms_p50, 2),
        "errors": 0,
    }
    assert "green 0.20 at [32, 0, 64, 32] (green 0.78" in out.output.summary()
    cascade.close()


def test_label_filter_and_the_crop_limit_keep_the_best_of_the_allowed(
    models: Models, detector: LoadedModel
) -> None:
    item, result = first(detector, painted())
    rules = CascadeRules(labels=frozenset({"green", "blue"}), max_crops=1)
    cascade = Cascade(load(models, "classifier.tflite", "classification"), rules)
    out = cascade.run(item, result)
    nested = {d.label: d.cascade for d in out.output.detections}
    assert nested["red"] is None  # not an allowed label
    assert nested["blue"] is None  # allowed, but over the limit: green scores higher
    assert nested["green"] is not None and nested["green"].output.classes[0][1] == "green"
    stats = cascade.stats()
    assert (stats.crops, stats.skipped) == (1, 1)
    cascade.close()


def test_min_score_and_min_size_skip_crops_and_padding_widens_them(
    models: Models, detector: LoadedModel
) -> None:
    item, result = first(detector, painted())
    classifier = load(models, "classifier.tflite", "classification")
    cascade = Cascade(classifier, CascadeRules(min_size=33))  # every box is 32 x 32
    assert cascade.run(item, result) is result  # nothing to crop: unchanged
    assert cascade.stats().crops == 0
    # padding 0.25: 8 px each side (clipped at the edges), so 40 x 40 or more: cropped,
    # and the crops now hold some of their neighbours' colours
    cascade.rules = CascadeRules(min_size=33, padding=0.25, min_score=0.18)
    out = cascade.run(item, result)
    red, green, blue = (d.cascade for d in out.output.detections)
    assert blue is None  # scored .15, under min_score
    assert red is not None and green is not None
    assert red.output.classes[0][1] == "red" and green.output.classes[0][1] == "green"
    scores = dict((label, score) for _, label, score in green.output.classes)
    assert scores["red"] > 0.1 and scores["blue"] > 0  # the padding reached the neighbours
    cascade.close()


def test_a_detecting_second_model_reports_boxes_in_frame_pixels(
    models: Models, detector: LoadedModel
) -> None:
    item, result = first(detector, painted())
    cascade = Cascade(load(models, "detector.tflite", "detection", name="parts"), CascadeRules())
    out = cascade.run(item, result)
    green = out.output.detections[1].cascade
    assert green is not None and green.model == "parts"
    boxes = {d.label: d.box for d in green.output.detections}
    # the crop is x 32..64, y 0..32; the second detector's green box is its top-right quadrant
    assert boxes["green"] == pytest.approx((48, 0, 64, 16))
    assert boxes["blue"] == pytest.approx((40, 16, 56, 32))
    assert out.to_dict()["detections"][1]["cascade"]["detections"][0]["box"] == [48, 0, 64, 16]
    cascade.close()


def test_a_raw_second_model_nests_its_values(models: Models, detector: LoadedModel) -> None:
    item, result = first(detector, painted())
    cascade = Cascade(load(models, "classifier.tflite", "raw"), CascadeRules(max_crops=1))
    part = cascade.run(item, result).to_dict()["detections"][0]["cascade"]
    assert part["values"][0]["values"] == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    cascade.close()


def test_a_failing_crop_is_counted_and_the_frame_still_goes_out(
    models: Models, detector: LoadedModel
) -> None:
    # a sensor model takes [1, 4, 2] windows: no crop fits its input
    regressor = load(models, "regressor.tflite", "regression")
    cascade = Cascade(regressor, CascadeRules())
    item, result = first(detector, painted())
    out = cascade.run(item, result)
    assert [d.cascade for d in out.output.detections] == [None, None, None]
    assert out.output.detections == result.output.detections
    stats = cascade.stats()
    assert (stats.crops, stats.errors) == (3, 3)
    cascade.close()


def test_results_without_detections_pass_through_unchanged(models: Models) -> None:
    classifier = load(models, "classifier.tflite", "classification")
    cascade = Cascade(classifier, CascadeRules())
    frame = painted()
    item = Item(0, time.time(), time.monotonic(), frame, None, None, None)
    classified = Result(0, item.ts, "c", 1, "cpu", 1.0, 1.0, classifier.run(frame))
    assert cascade.run(item, classified) is classified
    empty = Result(0, item.ts, "d", 1, "cpu", 1.0, 1.0, Output("detection"))  # found nothing
    assert cascade.run(item, empty) is empty
    assert cascade.stats().crops == 0
    cascade.close()


def test_without_a_second_model_results_pass_until_one_is_swapped_in(
    models: Models, detector: LoadedModel
) -> None:
    cascade = Cascade(None, CascadeRules())
    item, result = first(detector, painted())
    assert cascade.run(item, result) is result
    assert cascade.model() is None and cascade.stats().model is None
    assert cascade.swap(load(models, "classifier.tflite", "classification", 3)) is None
    out = cascade.run(item, result)
    assert all(d.cascade is not None and d.cascade.version == 3 for d in out.output.detections)
    assert cascade.stats().version == 3
    cascade.close()
    assert cascade.model() is None
    assert cascade.run(item, result) is result  # closed: passes through


def classifier_v(models: Models, version: int) -> LoadedModel:
    """The colour classifier whose scores carry ``1000 * version`` (v1..v3.tflite)."""
    return load(models, f"v{version}.tflite", "classification", version, name="colours-crop")


def test_in_a_pipeline_every_result_carries_its_crops(
    models: Models, detector: LoadedModel
) -> None:
    frames = [painted(), painted(strength={"red": 100, "green": 250, "blue": 180})]
    got: list[Result] = []
    pipeline = Pipeline(MemorySource(frames * 30), detector, got.append, close_model=False)
    cascade = Cascade(classifier_v(models, 1), CascadeRules(labels=frozenset({"green", "blue"})))
    pipeline.set_stages((cascade,))
    pipeline.start()
    try:
        assert pipeline.wait(20)
    finally:
        pipeline.stop()
    assert [r.frame for r in got] == list(range(60))
    for result in got:
        nested = {d.label: d.cascade for d in result.output.detections}
        assert nested["red"] is None
        for label in ("green", "blue"):
            part = nested[label]
            assert part is not None and part.output.classes[0][1] == label
    # the second frame's green is the best detection: the crop order follows the scores
    assert got[1].output.detections[0].label == "green"
    assert pipeline.stats().errors == 0
    assert cascade.stats().crops == 120
    cascade.close()


def test_swapping_the_second_model_under_a_running_stream_loses_no_frame_nor_mixes_versions(
    models: Models, detector: LoadedModel
) -> None:
    got: list[Result] = []
    pipeline = Pipeline(MemorySource([painted()] * 900), detector, got.append, close_model=False)
    cascade = Cascade(classifier_v(models, 1), CascadeRules())
    pipeline.set_stages((cascade,))
    closed: list[int | None] = []

    def swaps() -> None:
        for version in (2, 3):
            while len(got) < 250 * (version - 1):
                time.sleep(0.005)
            old = cascade.swap(classifier_v(models, version))
            assert old is not None
            closed.append(old.version)
            old.close()  # handed back once no frame runs on it: closing it is safe

    swapper = threading.Thread(target=swaps)
    pipeline.start()
    swapper.start()
    try:
        assert pipeline.wait(60)
        swapper.join(20)
    finally:
        pipeline.stop()
    assert closed == [1, 2]
    assert [r.frame for r in got] == list(range(900))  # every frame, once
    per_frame = []
    for result in got:
        parts = [d.cascade for d in result.output.detections]
        assert all(part is not None for part in parts)
        versions = {part.version for part in parts if part is not None}
        assert len(versions) == 1  # one model per frame
        (version,) = versions
        # each crop's output came from the model it names (its scores carry the offset)
        offsets = {int(part.output.classes[0][2] // 1000) for part in parts if part is not None}
        assert offsets == {version}
        per_frame.append(version)
    assert per_frame == sorted(per_frame) and set(per_frame) == {1, 2, 3}
    assert pipeline.stats().errors == 0 and cascade.stats().errors == 0
    cascade.close()


def test_a_swap_while_a_frame_runs_on_the_old_model_waits_for_that_frame(
    models: Models, detector: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = classifier_v(models, 1)
    running, release = threading.Event(), threading.Event()

    def hold(model: LoadedModel) -> None:
        """Its crops wait for ``release``: a frame in flight on it."""
        real_run = model.run

        def held(frame: np.ndarray) -> Any:
            running.set()
            assert release.wait(10)
            return real_run(frame)

        monkeypatch.setattr(model, "run", held)

    hold(old)
    cascade = Cascade(old, CascadeRules())
    item, result = first(detector, painted())
    out: list[Result] = []
    frame = threading.Thread(target=lambda: out.append(cascade.run(item, result)))
    frame.start()
    assert running.wait(10)
    # not handed back while the frame runs on it: after a short timeout the cascade keeps it
    assert cascade.swap(classifier_v(models, 2), timeout=0.05) is None
    assert old.backend._interpreter is not None  # type: ignore[attr-defined]
    release.set()
    frame.join(10)
    assert old.backend._interpreter is None  # type: ignore[attr-defined]  # closed after it
    assert {d.cascade.version for d in out[0].output.detections if d.cascade} == {1}
    assert cascade.model() is not None and cascade.model().version == 2  # type: ignore[union-attr]
    # a swap with time to wait returns the old model once its frame is done
    running.clear()
    release.clear()
    newer = classifier_v(models, 3)
    current = cascade.model()
    assert current is not None
    hold(current)
    frame = threading.Thread(target=lambda: out.append(cascade.run(item, result)))
    frame.start()
    assert running.wait(10)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    handed = cascade.swap(newer)
    assert handed is current and time.monotonic() - started >= 0.15
    frame.join(10)
    assert {d.cascade.version for d in out[1].output.detections if d.cascade} == {2}
    handed.close()
    cascade.close()


class LateBy:
    """A stage that says its result came out ``ms`` after capture."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def run(self, item: Item, result: Result) -> Result:
        import dataclasses

        return dataclasses.replace(result, latency_ms=self.ms)


def test_the_pipeline_latency_figures_are_those_of_the_published_results(
    detector: LoadedModel,
) -> None:
    got: list[Result] = []
    pipeline = Pipeline(MemorySource([painted()] * 20), detector, got.append, close_model=False)
    pipeline.set_stages((LateBy(5000.0),))
    pipeline.start()
    try:
        assert pipeline.wait(20)
    finally:
        pipeline.stop()
    assert {r.latency_ms for r in got} == {5000.0}
    assert pipeline.stats().latency_ms_p50 == 5000.0  # a cascade's time is in the latency


def test_a_yolo_primary_crops_its_decoded_boxes(models: Models, tmp_path: Path) -> None:
    """A YOLOv8 head (agent/modelgen_yolo: known boxes scored by the frame's channel
    means) as the first model: each allowed box's crop, padded, gets the classifier's
    answer on exactly those frame pixels."""
    (tmp_path / "yolo.tflite").write_bytes(yolo_detector("yolov8", 320))
    files = ModelFiles("yolo", 1, "detection", cpu=tmp_path / "yolo.tflite")
    yolo = load_model(files, RUNTIME, min_score=0.2)
    frame = pattern_frames(480, 480)[0]  # red and green means ~0.5, blue 0.25
    item = Item(0, time.time(), time.monotonic(), frame, None, None, None)
    output = yolo.run(frame)
    assert sorted(d.label for d in output.detections) == ["0", "1", "2", "79"]
    result = Result(0, item.ts, "yolo", 1, "cpu", 1.0, 1.0, output)
    classifier = load(models, "classifier.tflite", "classification")
    rules = CascadeRules(labels=frozenset({"0", "79"}), padding=0.1)
    cascade = Cascade(classifier, rules)
    out = cascade.run(item, result)
    for found in out.output.detections:
        if found.label not in rules.labels:  # type: ignore[operator]
            assert found.cascade is None
            continue
        bounds = crop_box(found.box, 480, 480, 0.1)
        assert found.cascade is not None and bounds is not None
        x0, y0, x1, y1 = bounds
        assert found.cascade.output == classifier.run(frame[y0:y1, x0:x1])
    assert cascade.stats().crops == 2
    cascade.close()
    yolo.close()


def test_on_change_publishes_when_only_a_crop_s_answer_changes(
    models: Models, detector: LoadedModel
) -> None:
    from agent.config import ResultsConfig
    from agent.telemetry import ResultGate

    gate = ResultGate(ResultsConfig(publish="on_change"))
    classifier = load(models, "classifier.tflite", "classification")
    classifier.adapter = dataclasses.replace(classifier.adapter, top_k=1)  # the crop's colour
    cascade = Cascade(classifier, CascadeRules(labels=frozenset({"red"})))
    red_box = painted()
    purple_box = painted()
    purple_box[:32, :24, 2] = 255  # most of the red box now blue: the crop reads blue
    purple_box[:32, :24, 0] = 0
    admitted = []
    for frame in (red_box, red_box, purple_box, purple_box):
        item, result = first(detector, frame)
        out = cascade.run(item, result)
        assert {d.label for d in out.output.detections} == {"red", "green", "blue"}
        admitted.append(gate.admit(out))
    # the primary finds the same three labels each time; only the crop's answer changes
    assert admitted == [True, False, True, False]
    cascade.close()
