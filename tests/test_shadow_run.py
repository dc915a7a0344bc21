"""``ShadowRun`` on the real interpreter and the ``Shadows`` controller with its I/O
passed in: sampling, the CPU bound, errors, promotion, clear, failure."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import RuntimeConfig
from agent.errors import ModelError
from agent.frames import Item, Result
from agent.modelgen import COLOUR_LABELS
from agent.mqtt import Incoming
from agent.runtime import LoadedModel, ModelFiles, load_model
from agent.shadow.control import Shadows
from agent.shadow.instruction import Promote, ShadowInstruction
from agent.shadow.run import ShadowRun
from agent.update.policy import Failed
from tests.conftest import Models

RUNTIME = RuntimeConfig(warmup_runs=1, threads=1)


def _model(models: Models, labels: list[str], tmp_path: Path, version: int = 2) -> LoadedModel:
    path = tmp_path / f"labels-{version}.txt"
    path.write_text("\n".join(labels) + "\n")
    files = ModelFiles.from_file(models.path("classifier.tflite"), "classification", path)
    files = dataclasses.replace(files, name="colours", version=version)
    return load_model(files, RUNTIME, top_k=1)


def _frames(n: int) -> list[np.ndarray]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return [np.full((24, 32, 3), colours[i % 3], np.uint8) for i in range(n)]


def _feed(run: ShadowRun, active: LoadedModel, frames: list[np.ndarray]) -> None:
    for i, frame in enumerate(frames):
        output = active.run(frame)
        item = Item(i, 0.0, 0.0, frame, None, None, None)
        run.observe(item, Result(i, 0.0, "colours", 1, "cpu", 1.0, 0.5, output))


def _instruction(**fields: Any) -> ShadowInstruction:
    return ShadowInstruction("colours", 2, 1000.0, "device", **fields)


def test_shadow_run_compares_the_sampled_frames(models: Models, tmp_path: Path) -> None:
    labels = list(COLOUR_LABELS)
    active = _model(models, labels, tmp_path, 1)
    same = ShadowRun(
        _model(models, labels, tmp_path), _instruction(sample_pct=100, max_cpu_pct=100)
    )
    rotated = ShadowRun(
        _model(models, labels[1:] + labels[:1], tmp_path, 3),
        _instruction(sample_pct=10, max_cpu_pct=100),
    )
    frames = _frames(60)
    _feed(same, active, frames)
    _feed(rotated, active, frames)
    assert same.agreement.doc() == {"metric": "top1", "value": 1.0, "frames": 60}
    assert rotated.agreement.doc() == {"metric": "top1", "value": 0.0, "frames": 6}
    figures = same.figures()
    assert figures[4] is not None and figures[4] > 0  # the candidate's latency
    assert figures[5] == 0.5  # the active model's, from its results
    same.close()
    rotated.close()
    _feed(same, active, frames[:3])  # closed: nothing more
    assert same.agreement.frames == 60
    active.close()


def test_shadow_run_keeps_under_its_cpu_share(models: Models, tmp_path: Path) -> None:
    class Slow:
        files = ModelFiles(name="colours", version=2, task="classification", cpu=tmp_path)

        def run(self, frame: np.ndarray) -> Any:
            clock[0] += 0.05  # each invoke takes 50 ms of the fake clock
            return active.run(frame)

        def close(self) -> None:
            pass

    clock = [0.0]
    active = _model(models, list(COLOUR_LABELS), tmp_path, 1)
    run = ShadowRun(Slow(), _instruction(sample_pct=100, max_cpu_pct=10), clock=lambda: clock[0])  # type: ignore[arg-type]
    for frame in _frames(200):
        clock[0] += 0.1  # frames 100 ms apart: 50 % would be wanted
        _feed(run, active, [frame])
    frames, skipped = run.agreement.frames, run.skipped
    assert frames + skipped == 200
    assert 0.05 <= frames * 0.05 / clock[0] <= 0.12  # held near 10 %
    active.close()


def test_shadow_run_counts_errors_and_promotes_only_when_the_rule_holds(
    models: Models, tmp_path: Path
) -> None:
    calls = {"n": 0}

    class Flaky:
        files = ModelFiles(name="colours", version=2, task="classification", cpu=tmp_path)

        def run(self, frame: np.ndarray) -> Any:
            calls["n"] += 1
            if calls["n"] <= 3:
                raise ModelError("invoke failed")
            return active.run(frame)

        def close(self) -> None:
            pass

    active = _model(models, list(COLOUR_LABELS), tmp_path, 1)
    promoted: list[ShadowRun] = []
    run = ShadowRun(
        Flaky(),  # type: ignore[arg-type]
        _instruction(sample_pct=100, max_cpu_pct=100, promote=Promote(0.9, 50)),
        on_promotable=promoted.append,
    )
    _feed(run, active, _frames(40))
    assert run.errors == 3 and run.error == "ModelError: invoke failed"
    assert promoted == []  # 37 frames: not yet
    _feed(run, active, _frames(40))
    assert promoted == [run]  # 77 frames, 3 errors (under 5 %), agreement 1.0
    active.close()


# -- the controller, its I/O passed in --------------------------------------------------


class Host:
    """The service's side of a Shadows: stage, load, attach, promote, events."""

    def __init__(self, models: Models, tmp_path: Path, stage_failures: list[Exception]) -> None:
        self.models, self.tmp_path = models, tmp_path
        self.stage_failures = stage_failures
        self.attached: tuple[Any, ...] = ()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.promoted: list[tuple[str, int]] = []
        self.changed = threading.Event()

    def stage(self, model: str, version: int) -> Any:
        if self.stage_failures:
            raise self.stage_failures.pop(0)
        return object()  # a release: load below ignores it

    def load(self, release: Any) -> LoadedModel:
        return _model(self.models, list(COLOUR_LABELS), self.tmp_path, 2)

    def attach(self, runs: tuple[Any, ...]) -> None:
        self.attached = runs

    def event(self, name: str, detail: Any) -> None:
        self.events.append((name, dict(detail)))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.shadow.control.STAGE_RETRY_S", 0.05)


def _controller(host: Host) -> Shadows:
    shadows = Shadows(
        "colours",
        prefix="edge",
        device="d1",
        groups=["g"],
        stage=host.stage,
        load=host.load,
        attach=host.attach,
        promote=lambda m, v, at: host.promoted.append((m, v)),
        event=host.event,  # type: ignore[arg-type]
    )
    shadows.start()
    return shadows


def _message(topic: str, **fields: Any) -> Incoming:
    doc = {"schema": 1, "model": "colours", "version": 2, "issued_at": time.time(), **fields}
    return Incoming(
        topic, json.dumps(doc).encode() if fields.get("clear") is None else b"", None, None
    )


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_controller_follows_runs_and_clears(models: Models, tmp_path: Path) -> None:
    host = Host(models, tmp_path, [Failed("registry unreachable", transient=True)])
    shadows = _controller(host)
    try:
        assert set(shadows.topics) == {"edge/d1/shadow/colours", "edge/groups/g/shadow/colours"}
        assert shadows.doc() is None
        shadows.on_message(_message("edge/groups/g/shadow/colours", sample_pct=50))
        _until(lambda: host.attached, "attached after one transient failure")
        doc = shadows.doc()
        assert doc is not None and doc["phase"] == "running" and doc["sample_pct"] == 50
        assert host.names() == ["shadow_started"]
        shadows.on_message(_message("edge/d1/shadow/colours", model="other"))  # refused
        assert host.events[-1][0] == "desired_invalid"
        assert "model: 'other'" in host.events[-1][1]["error"]
        shadows.on_message(Incoming("edge/groups/g/shadow/colours", b"", None, None))
        _until(lambda: (d := shadows.doc()) is not None and d["phase"] == "stopped", "stopped")
        assert host.attached == () and "shadow_stopped" in host.names()
    finally:
        shadows.stop()


def test_controller_reports_a_failed_candidate(models: Models, tmp_path: Path) -> None:
    host = Host(models, tmp_path, [Failed("manifest: signature bad", bad=True)])
    shadows = _controller(host)
    try:
        shadows.on_message(_message("edge/d1/shadow/colours"))
        _until(lambda: "shadow_failed" in host.names(), "failed")
        doc = shadows.doc()
        assert doc is not None and doc["phase"] == "failed"
        assert doc["error"] == "manifest: signature bad"
        assert host.attached == ()
    finally:
        shadows.stop()


def test_controller_promotes(models: Models, tmp_path: Path) -> None:
    host = Host(models, tmp_path, [])
    shadows = _controller(host)
    try:
        promote = {"min_agreement": 0.9, "min_frames": 5}
        shadows.on_message(
            _message("edge/d1/shadow/colours", sample_pct=100, max_cpu_pct=100, promote=promote)
        )
        _until(lambda: host.attached, "attached")
        run = host.attached[0]
        active = _model(models, list(COLOUR_LABELS), tmp_path, 1)
        _feed(run, active, _frames(5))
        active.close()
        _until(lambda: host.promoted == [("colours", 2)], "promoted")
        _until(lambda: (d := shadows.doc()) is not None and d["phase"] == "promoted", "phase")
        assert host.attached == ()
        detail = dict(host.events)["shadow_promoted"]
        assert detail["agreement"] == {"metric": "top1", "value": 1.0, "frames": 5}
    finally:
        shadows.stop()


def test_shadow_run_of_a_detector_reports_f1(models: Models, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(COLOUR_LABELS) + "\n")

    def detector(version: int) -> LoadedModel:
        files = ModelFiles.from_file(models.path("detector.tflite"), "detection", labels)
        files = dataclasses.replace(files, name="colours", version=version)
        return load_model(files, RUNTIME, top_k=3, min_score=0.0)

    active = detector(1)
    assert active.run(_frames(1)[0]).detections  # boxes to match, not an empty agreement
    run = ShadowRun(detector(2), _instruction(sample_pct=100, max_cpu_pct=100))
    _feed(run, active, _frames(9))
    assert run.agreement.doc() == {"metric": "f1", "value": 1.0, "frames": 9}
    run.close()
    active.close()
