"""Issue 20's acceptance, the way an operator runs it: the real CLIs as subprocesses.

``edge-fleet keygen`` and ``publish`` (a YOLOv8-layout detector with known boxes,
``--detection-format yolov8``; a colour classifier for its crops; a second classifier),
one ``edge-agent run`` with two pipelines (the detector with a cascade: label filter,
one crop per frame; the classifier on a synthetic stream), a real mosquitto and a
``file://`` registry, releases and desired states signed. Then, each step bounded:

1. the results of each pipeline carry the known boxes in frame pixels and the crop's
   known class nested under its detection; ``edge-fleet devices`` shows every model;
2. ``deploy --model M --version 2 --wait`` moves M alone; the cascade model alone too;
3. ``deploy --shadow`` of a disagreeing candidate of the SECOND pipeline's model:
   ``status --model`` shows the run and its agreement 0, its results never go out,
   ``--shadow --clear`` stops it; an agreeing candidate, ``promote --wait``: an update
   through the gate;
4. across that update telemetry ``outputs`` keeps the previous version's statistics
   and ``status --model`` prints the drift.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent import contract, modelgen
from agent.modelgen_yolo import YoloObject, yolo_detector
from tests.agentproc import AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto

DEV = "dev-acc"
GROUP = "acc"
DETECTOR, CROPS, SECOND = "people", "shades", "colours"
YOLO_LABELS = ("person", "bicycle", "car")
SIZE = 640  # the frame; the detector's input is 320: scale 0.5, no letterbox padding

# Known objects (normalised to the input; score = mean of the frame's red channel x gain).
# In frame pixels: A [64, 64, 256, 256], B [384, 64, 576, 256], C [192, 384, 448, 576].
OBJECTS = (
    YoloObject((0.25, 0.25, 0.3, 0.3), 0, channel=0, gain=1.0),  # A: person
    YoloObject((0.75, 0.25, 0.3, 0.3), 0, channel=0, gain=0.9),  # B: person, weaker
    YoloObject((0.5, 0.75, 0.4, 0.3), 2, channel=0, gain=0.8),  # C: car
)
# a candidate that finds the same objects half a box lower (higher for the car): IoU 1/3
MOVED = tuple(
    YoloObject(
        (o.box[0], o.box[1] + (0.15 if o.box[1] < 0.5 else -0.15), *o.box[2:]),
        o.class_id,
        0,
        o.gain,
    )
    for o in OBJECTS
)
A, B, C = [64, 64, 256, 256], [384, 64, 576, 256], [192, 384, 448, 576]
RED = 1 - 2 * (192 * 192) / SIZE**2  # the red mean: red frame, A painted blue, B green


def _frame() -> np.ndarray:
    """Red, A's box blue (its crop: "blue"), B's box green (would be "green")."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[...] = (255, 0, 0)
    pixels[A[1] : A[3], A[0] : A[2]] = (0, 0, 255)
    pixels[B[1] : B[3], B[0] : B[2]] = (0, 255, 0)
    return pixels


def _run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout
    )


def fleet(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``edge-fleet ARGS`` as a subprocess; fails the test on a non-zero exit."""
    done = _run("agent.fleet.cli", *args, timeout=timeout)
    assert done.returncode == 0, f"edge-fleet {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done


@dataclass
class Site:
    root: Path
    broker: Mosquitto
    registry: Path
    keys: Path
    tap: Tap
    agent: AgentProcess

    def fleet(
        self, command: str, *args: str, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return fleet(command, "--broker", self.broker.url, *args, timeout=timeout)

    def publish(self, model: str, version: int, file: Path, labels: Path, *extra: str) -> None:
        fleet(
            "publish", str(file), "--model", model, "--version", str(version),
            "--registry", str(self.registry), "--labels", str(labels),
            "--sign-key", str(self.keys / "registry.key"), *extra,
        )  # fmt: skip

    def deploy(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.fleet(
            "deploy", "--device", DEV, "--sign-key", str(self.keys / "deploy.key"), *args,
            timeout=timeout,
        )  # fmt: skip

    def status(self, model: str) -> tuple[dict[str, Any], str]:
        as_json = json.loads(self.fleet("status", "--model", model, "--json").stdout)
        return as_json, self.fleet("status", "--model", model).stdout

    def results(self, pipeline: str) -> list[dict[str, Any]]:
        return self.tap.docs(f"{DEV}/results/{pipeline}")

    def state(self) -> dict[str, Any]:
        states = self.tap.docs(f"{DEV}/state")
        return states[-1] if states else {}

    def telemetry(self) -> dict[str, Any]:
        docs = self.tap.docs(f"{DEV}/telemetry")
        return docs[-1] if docs else {}

    def events(self, name: str, model: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.tap.docs(f"{DEV}/events")
            if e.get("event") == name and (model is None or e.get("model") == model)
        ]

    def wait(self, condition: Any, what: str, timeout: float = 30) -> None:
        wait_alive(condition, timeout, what, self.agent)

    def serving(self, pipeline: str, model: str, version: int, n: int = 3) -> bool:
        docs = self.results(pipeline)
        return len(docs) >= n and all(
            (d["model"], d["version"]) == (model, version) for d in docs[-n:]
        )


def _models(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    made = {
        "people1.tflite": yolo_detector("yolov8", 320, classes=3, objects=OBJECTS, seed=1),
        "people2.tflite": yolo_detector("yolov8", 320, classes=3, objects=OBJECTS, seed=2),
        "people3.tflite": yolo_detector("yolov8", 320, classes=3, objects=MOVED, seed=3),
        # v4: the same objects from a full-integer YOLOv5 export (int8 in and out)
        "people4.tflite": yolo_detector("yolov5", 320, 3, int8=True, objects=OBJECTS, seed=4),
        "shades3.tflite": modelgen.colour_classifier(offset=0.002),
        "shades1.tflite": modelgen.colour_classifier(),
        "shades2.tflite": modelgen.colour_classifier(offset=0.001),
        "colours1.tflite": modelgen.colour_classifier(offset=1.0),
        "colours2.tflite": modelgen.colour_classifier(offset=2.0),
        "colours3.tflite": modelgen.colour_classifier(offset=3.0),
    }
    paths = {}
    for name, data in made.items():
        (folder / name).write_bytes(data)
        paths[name.removesuffix(".tflite")] = folder / name
    labels = list(modelgen.COLOUR_LABELS)
    for name, lines in (
        ("yolo", YOLO_LABELS),
        ("colours", labels),
        ("rotated", labels[1:] + labels[:1]),  # never the same top label
    ):
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture
def site(tmp_path: Path, broker: Mosquitto, agents: list[AgentProcess]) -> Any:
    keys, registry = tmp_path / "keys", tmp_path / "registry"
    fleet("keygen", "--out", str(keys), "--name", "registry")
    fleet("keygen", "--out", str(keys), "--name", "deploy")
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    assert cv2.imwrite(str(frames / "door.png"), _frame()[:, :, ::-1])
    agent = AgentProcess(tmp_path / DEV, DEV, {})
    settings = {k: v for k, v in agent.settings.items() if k not in ("model", "source", "results")}
    settings["device"]["groups"] = [GROUP]
    settings["registry"] = {
        "url": registry.as_uri(),
        "poll_interval_s": 3600,
        "public_key": str(keys / "registry.pub"),
    }
    settings["mqtt"] = {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5}
    settings["update"]["desired_public_key"] = str(keys / "deploy.pub")
    settings["pipelines"] = [
        {
            "name": "door",
            "model": {"name": DETECTOR},
            "source": {"type": "images", "path": str(frames), "loop": True, "fps": 10},
            "results": {"publish": "every", "min_score": 0.4, "top_k": 5},
            "cascade": {
                "model": {"name": CROPS},
                "labels": ["person"],
                "max_crops": 1,
                "padding": 0.0,
            },
        },
        {
            "name": "yard",
            "model": {"name": SECOND},
            "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 20},
            "results": {"publish": "every", "min_score": 0.0, "top_k": 1},
        },
    ]
    agent.config_path.write_text(yaml.safe_dump(settings))
    agents.append(agent)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        yield Site(tmp_path, broker, registry, keys, tap, agent)
    finally:
        tap.close()


def _box(detection: dict[str, Any]) -> list[float]:
    box: list[float] = detection["box"]
    return box


def test_yolo_two_pipelines_a_cascade_and_a_shadow_deploy_that_disagrees(site: Site) -> None:
    paths = _models(site.root / "models")
    yolo = ("--task", "detection", "--detection-format", "yolov8")
    site.publish(DETECTOR, 1, paths["people1"], paths["yolo"], *yolo, "--channel", "stable")
    site.publish(DETECTOR, 2, paths["people2"], paths["yolo"], *yolo)
    site.publish(DETECTOR, 3, paths["people3"], paths["yolo"], *yolo)
    v5 = ("--task", "detection", "--detection-format", "yolov5")
    site.publish(DETECTOR, 4, paths["people4"], paths["yolo"], *v5)
    for version in (1, 2, 3):
        channel = ("--channel", "stable") if version == 1 else ()
        site.publish(
            CROPS, version, paths[f"shades{version}"], paths["colours"],
            "--task", "classification", *channel,
        )  # fmt: skip
    site.publish(
        SECOND, 1, paths["colours1"], paths["colours"], "--task", "classification",
        "--channel", "stable",
    )  # fmt: skip
    site.publish(SECOND, 2, paths["colours2"], paths["rotated"], "--task", "classification")
    site.publish(SECOND, 3, paths["colours3"], paths["colours"], "--task", "classification")
    site.agent.start()

    # 1. Two pipelines, the cascade, the known answers.
    site.wait(
        lambda: site.serving("door", DETECTOR, 1) and site.serving("yard", SECOND, 1),
        "both pipelines serving v1",
        60,
    )
    site.wait(
        lambda: any("cascade" in d for r in site.results("door")[-3:] for d in r["detections"]),
        "the cascade's crops nested",
    )
    door = site.results("door")[-1]
    assert door["pipeline"] == "door"
    a, b, c = door["detections"]
    assert (a["label"], b["label"], c["label"]) == ("person", "person", "car")
    assert a["score"] == pytest.approx(RED, abs=0.01)
    assert b["score"] == pytest.approx(0.9 * RED, abs=0.01)
    assert c["score"] == pytest.approx(0.8 * RED, abs=0.01)
    for found, known in ((a, A), (b, B), (c, C)):
        assert _box(found) == pytest.approx(known, abs=1.0)
    nested = a["cascade"]
    assert (nested["model"], nested["version"]) == (CROPS, 1)
    assert nested["classes"][0]["label"] == "blue"  # the crop's known class
    assert "cascade" not in b  # max_crops 1: the best person only
    assert "cascade" not in c  # the label filter: persons only
    yard = site.results("yard")[-1]
    assert yard["pipeline"] == "yard" and yard["classes"][0]["label"] in modelgen.COLOUR_LABELS
    site.wait(
        lambda: set(site.state().get("models", {})) == {DETECTOR, CROPS, SECOND},
        "the state lists the three models",
    )
    rows = json.loads(site.fleet("devices", "--json").stdout)
    (row,) = [r for r in rows if r["device"] == DEV]
    assert set(row["models"]) == {DETECTOR, CROPS, SECOND}
    text = site.fleet("devices").stdout
    assert all(m in text for m in (DETECTOR, CROPS, SECOND)), text
    followed = site.fleet(
        "telemetry", "--device", DEV, "--stream", "results", "--count", "10", "--seconds", "20",
        "--json",
    )  # fmt: skip
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert {line["doc"]["pipeline"] for line in lines} == {"door", "yard"}, followed.stdout
    assert all(line["stream"] == "results" for line in lines)
    followed = site.fleet("telemetry", "--device", DEV, "--stream", "results", "--count", "10")
    assert "door: v1 person" in followed.stdout and "yard: v1 " in followed.stdout, followed

    # 2. A deploy moves its model alone: the detector, then the cascade model.
    started_before = len(site.events("update_started"))
    done = site.deploy("--model", DETECTOR, "--version", "2", "--wait", "60", timeout=120)
    assert "succeeded" in done.stdout, done.stdout
    site.wait(lambda: site.serving("door", DETECTOR, 2), "door on v2")
    yard_count = len(site.results("yard"))
    site.wait(lambda: len(site.results("yard")) > yard_count + 5, "yard serving on")
    assert {r["version"] for r in site.results("yard")} == {1}
    door = site.results("door")[-1]
    assert [v for d in door["detections"] for v in _box(d)] == pytest.approx(A + B + C, abs=1.0)
    assert door["detections"][0]["cascade"]["version"] == 1  # the cascade model stays
    started = [(e["model"], e["version"]) for e in site.events("update_started")]
    assert started[started_before:] == [(DETECTOR, 2)]
    site.deploy("--model", CROPS, "--version", "2", "--wait", "60", timeout=120)
    site.wait(
        lambda: all(
            r["detections"][0].get("cascade", {}).get("version") == 2
            for r in site.results("door")[-3:]
        ),
        "the crops on shades v2",
    )
    door = site.results("door")[-1]
    assert door["version"] == 2 and door["detections"][0]["cascade"]["classes"][0]["label"] == (
        "blue"
    )
    models = site.state()["models"]
    assert {m: models[m]["version"] for m in models} == {DETECTOR: 2, CROPS: 2, SECOND: 1}
    started = [(e["model"], e["version"]) for e in site.events("update_started")]
    assert started[started_before:] == [(DETECTOR, 2), (CROPS, 2)]
    desired = [t for t, _, r in site.tap.messages if "/desired" in t and r is False]
    assert set(desired) >= {f"edge/{DEV}/desired/{DETECTOR}", f"edge/{DEV}/desired/{CROPS}"}
    for stream, doc in (
        ("state", site.state()),
        ("telemetry", site.telemetry()),
        ("results", site.results("door")[-1]),
    ):
        contract.validator(stream).validate_python(doc)  # the documents as typed
    # the detector's output statistics across its update: the same objects, no drift
    site.wait(
        lambda: (site.telemetry().get("outputs") or {}).get(DETECTOR, {}).get("version") == 2,
        "the detector's outputs of v2",
    )
    detector = site.telemetry()["outputs"][DETECTOR]
    assert detector["previous"]["version"] == 1
    assert set(detector["classes"]) == {"person", "car"}
    status, text = site.status(DETECTOR)
    assert status["drift"][DEV]["classes"] == 0.0, status["drift"]
    assert f"drift: {DEV} v1 -> v2: classes 0.000" in text, text
    # the cascade model's statistics over its crops (it has no frames of its own) across
    # its update: the same crops named the same, no drift, in status like any model's
    site.wait(
        lambda: ((site.telemetry().get("outputs") or {}).get(CROPS) or {}).get("version") == 2,
        "the cascade model's outputs of v2",
    )
    crops = site.telemetry()["outputs"][CROPS]
    assert crops["previous"]["version"] == 1 and crops["previous"]["frames"] > 0
    assert set(crops["classes"]) == set(crops["previous"]["classes"]) == {"blue"}
    status, text = site.status(CROPS)
    assert status["drift"][DEV]["classes"] == 0.0, status["drift"]
    assert (status["drift"][DEV]["previous_version"], status["drift"][DEV]["version"]) == (1, 2)
    assert f"drift: {DEV} v1 -> v2: classes 0.000" in text, text

    # 3a. A disagreeing detector in the shadow of the group: f1 of matched boxes, 0.
    site.fleet(
        "deploy", "--shadow", "--model", DETECTOR, "--version", "3", "--group", GROUP,
        "--sample", "100", "--max-cpu", "100", "--sign-key", str(site.keys / "deploy.key"),
    )  # fmt: skip

    def shadow_frames(model: str, version: int, phase: str = "running") -> int:
        run = (site.telemetry().get("shadows") or {}).get(model)
        if not run or run["version"] != version or run["phase"] != phase:
            return -1
        frames: int = run["agreement"]["frames"]
        return frames

    site.wait(lambda: shadow_frames(DETECTOR, 3) >= 10, "10 detector frames compared", 60)
    status, text = site.status(DETECTOR)
    assert (status["shadows"][DEV]["metric"], status["shadows"][DEV]["agreement"]) == ("f1", 0.0)
    assert f"shadow run: {DEV} v3 running, f1 0.000" in text, text
    assert {r["version"] for r in site.results("door")} == {1, 2}  # v3's never go out
    site.fleet("deploy", "--shadow", "--clear", "--model", DETECTOR, "--group", GROUP)
    site.wait(lambda: shadow_frames(DETECTOR, 3, "stopped") >= 0, "the detector's run stopped")

    # A cascade model has no frames of its own to shadow: refused, said, not silent.
    site.deploy("--shadow", "--model", CROPS, "--version", "1")
    site.wait(lambda: bool(site.events("shadow_failed", CROPS)), "the cascade's shadow refused")
    (refused,) = site.events("shadow_failed", CROPS)
    assert refused["version"] == 1 and "cascade" in refused["error"], refused
    site.fleet("deploy", "--shadow", "--clear", "--model", CROPS, "--device", DEV)

    # 3. A candidate the registry does not have fails, said in status; the model serves on.
    site.deploy("--shadow", "--model", SECOND, "--version", "9")
    site.wait(lambda: bool(site.events("shadow_failed", SECOND)), "shadow_failed")
    (failed,) = site.events("shadow_failed", SECOND)
    assert failed["version"] == 9 and failed["error"]
    site.wait(
        lambda: (site.state().get("shadows") or {}).get(SECOND, {}).get("phase") == "failed",
        "the failed run in the state",
    )
    status, text = site.status(SECOND)
    assert status["shadows"][DEV]["phase"] == "failed" and status["shadows"][DEV]["error"]
    assert f"shadow run: {DEV} v9 failed" in text, text
    assert site.serving("yard", SECOND, 1)

    # A disagreeing candidate of the second pipeline's model in the shadow.
    done = site.deploy(
        "--shadow", "--model", SECOND, "--version", "2", "--sample", "100", "--max-cpu", "100"
    )
    assert "warning" not in done.stderr, done.stderr  # the device serves it

    def run_frames(version: int, phase: str = "running") -> int:
        return shadow_frames(SECOND, version, phase)

    site.wait(lambda: run_frames(2) >= 20, "20 frames compared", 60)
    status, text = site.status(SECOND)
    run = status["shadows"][DEV]
    assert (run["version"], run["phase"], run["metric"]) == (2, "running", "top1")
    assert run["agreement"] == 0.0  # rotated labels: never the same top label
    assert f"shadow run: {DEV} v2 running, top1 0" in text, text
    assert status["shadow"]["devices"][DEV]["version"] == 2
    assert f"{SECOND}: shadow v2 running agreement 0.000" in site.fleet("devices").stdout
    assert {r["version"] for r in site.results("yard")} == {1}  # v2's never go out
    assert site.telemetry()["shadows"][DETECTOR]["phase"] == "stopped"  # not this one's
    site.fleet("deploy", "--shadow", "--clear", "--model", SECOND, "--device", DEV)
    site.wait(lambda: run_frames(2, "stopped") >= 0, "the shadow run stopped")
    assert site.events("shadow_stopped", SECOND)

    # the device's own desired state of the model: a group's promotion must still reach it
    site.deploy("--model", SECOND, "--version", "1", "--wait", "30")
    site.fleet(
        "deploy", "--shadow", "--model", SECOND, "--version", "3", "--group", GROUP,
        "--sample", "100", "--max-cpu", "100", "--sign-key", str(site.keys / "deploy.key"),
    )  # fmt: skip
    site.wait(lambda: run_frames(3) >= 20, "20 frames of v3 compared", 60)
    status, _ = site.status(SECOND)
    assert status["shadows"][DEV]["agreement"] == 1.0
    done = site.fleet(
        "promote", "--model", SECOND, "--group", GROUP,
        "--sign-key", str(site.keys / "deploy.key"), "--wait", "60", timeout=120,
    )  # fmt: skip
    assert "succeeded" in done.stdout, done.stdout
    assert f"{DEV}: its own desired state of {SECOND} cleared" in done.stdout, done.stdout
    site.wait(lambda: site.serving("yard", SECOND, 3), "yard on v3")
    assert {r["version"] for r in site.results("yard")} <= {1, 3}
    validated = site.events("update_validated", SECOND)
    assert validated and validated[-1]["version"] == 3  # through the gate
    assert site.state()["models"][SECOND]["version"] == 3

    # 4. Output statistics across the update, and the drift in status.
    def outputs() -> dict[str, Any]:
        found: dict[str, Any] = (site.telemetry().get("outputs") or {}).get(SECOND) or {}
        return found

    site.wait(
        lambda: outputs().get("version") == 3 and (outputs().get("previous") or {}).get("frames"),
        "outputs of v3 with v1's kept",
    )
    assert outputs()["previous"]["version"] == 1
    status, text = site.status(SECOND)
    moved = status["drift"][DEV]
    assert (moved["previous_version"], moved["version"]) == (1, 3)
    assert moved["classes"] is not None and 0 <= moved["classes"] <= 1
    assert f"drift: {DEV} v1 -> v3: classes" in text, text

    # 5. An agreeing detector with a threshold set at deploy promotes itself (f1 1).
    site.fleet(
        "deploy", "--shadow", "--model", DETECTOR, "--version", "4", "--group", GROUP,
        "--sample", "100", "--max-cpu", "100", "--promote-at", "0.9", "--min-frames", "10",
        "--sign-key", str(site.keys / "deploy.key"),
    )  # fmt: skip
    site.wait(lambda: site.serving("door", DETECTOR, 4), "door on v4, promoted", 60)
    (promoted,) = site.events("shadow_promoted", DETECTOR)
    assert promoted["version"] == 4 and promoted["agreement"]["value"] == 1.0
    assert promoted["agreement"]["metric"] == "f1"
    site.wait(
        lambda: (
            (site.state()["models"][DETECTOR].get("update") or {}).get("outcome") == "succeeded"
        ),
        "v4 through probation",
    )
    assert site.state()["models"][DETECTOR]["update"]["source"] == "shadow"
    site.wait(lambda: bool(site.events("desired_ignored", DETECTOR)), "v2's desired state stale")
    (stale,) = site.events("desired_ignored", DETECTOR)
    assert stale["version"] == 2 and stale["reason"].startswith("stale"), stale
    door = site.results("door")[-1]
    step = 320 / 255 / 0.5  # one int8 step of a box value, in frame pixels
    assert [v for d in door["detections"] for v in _box(d)] == pytest.approx(A + B + C, abs=step)
    assert [d["score"] for d in door["detections"]] == pytest.approx(
        [RED, 0.9 * RED, 0.8 * RED], abs=0.02
    )
    assert door["detections"][0]["cascade"]["classes"][0]["label"] == "blue"

    # 6. A rollout of the cascade model to the group (its own desired topic per model).
    done = site.fleet(
        "rollout", "--model", CROPS, "--version", "3", "--group", GROUP, "--canary", "100",
        "--timeout", "60", "--sign-key", str(site.keys / "deploy.key"), timeout=120,
    )  # fmt: skip
    assert "succeeded" in done.stdout, done.stdout
    site.wait(
        lambda: site.results("door")[-1]["detections"][0].get("cascade", {}).get("version") == 3,
        "the crops on shades v3",
    )
    models = site.state()["models"]
    assert {m: models[m]["version"] for m in models} == {DETECTOR: 4, CROPS: 3, SECOND: 3}
    assert site.state()["pipelines"] == {
        "door": {"model": DETECTOR, "cascade": CROPS, "source": "images"},
        "yard": {"model": SECOND, "cascade": None, "source": "synthetic"},
    }
    site.wait(
        lambda: (site.telemetry()["pipelines"]["door"]["cascade"] or {}).get("version") == 3,
        "telemetry's cascade figures on shades v3",
    )
    figures = site.telemetry()["pipelines"]
    assert (figures["door"]["model"], figures["door"]["version"]) == (DETECTOR, 4)
    assert (figures["yard"]["model"], figures["yard"]["version"]) == (SECOND, 3)
    cascade = figures["door"]["cascade"]
    assert cascade["model"] == CROPS and cascade["crops"] > 0 and cascade["errors"] == 0

    # A restart keeps every model where it was and the statistics of the versions before.
    assert site.agent.terminate() == 0
    started = len(site.events("update_started"))
    site.tap.messages.clear()
    site.agent.start()
    site.wait(
        lambda: site.serving("door", DETECTOR, 4) and site.serving("yard", SECOND, 3),
        "both pipelines serving again",
        60,
    )
    site.wait(
        lambda: all(
            (site.telemetry().get("outputs") or {}).get(m, {}).get("previous")
            for m in (DETECTOR, SECOND)
        ),
        "the outputs after the restart",
    )
    kept = site.telemetry()["outputs"]
    assert (kept[DETECTOR]["version"], kept[DETECTOR]["previous"]["version"]) == (4, 2)
    assert (kept[SECOND]["version"], kept[SECOND]["previous"]["version"]) == (3, 1)
    assert not site.events("update_started"), started  # nothing pulled again
    site.wait(lambda: "cascade" in site.results("door")[-1]["detections"][0], "crops again")
    assert site.results("door")[-1]["detections"][0]["cascade"]["version"] == 3

    # the device's own view, through its control socket
    local = _run("agent.cli", "status", "--config", str(site.agent.config_path), "--json")
    assert local.returncode == 0, local.stderr
    local_doc = json.loads(local.stdout)
    assert local_doc["model"] == DETECTOR  # the first pipeline's, not null
    daemon = local_doc["daemon"]
    assert daemon["running"] and (daemon["status"]["model"], daemon["status"]["version"]) == (
        DETECTOR,
        4,
    )
    assert site.agent.terminate() == 0
    assert "Traceback" not in site.agent.log()
