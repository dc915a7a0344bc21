"""The fleet side of several models per device and of shadow runs (issue 20).

Pure rules by tables (drift, shadow options, a device's state about one model), then
``edge-fleet`` on a real mosquitto: devices' documents are left retained the way the
contract shapes them, and what the commands publish is read back from the broker (a
signed shadow instruction verified with the device's own verifier, clears, promote,
deploy --wait judged from ``state.models``).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.desired import parse_desired
from agent.fleet.deploy import model_state, running_of, serves, verdict_of
from agent.fleet.drift import drift, freshest_run, shadow_figures, tvd
from agent.fleet.shadow import Promote, check_options, shadow_payload
from agent.verify import KeyRing, generate_keypair, load_private_key
from tests.broker import Mosquitto, subscriber
from tests.test_fleet import run_fleet

# -- drift: total variation distance -------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"x": 5}, {"x": 9}, 0.0),  # same mix, other totals
        ({"x": 1}, {"y": 1}, 1.0),  # disjoint
        ({"x": 1, "y": 1}, {"x": 1}, 0.5),
        ({"x": 3, "y": 1}, {"x": 1, "y": 3}, 0.5),
        ({}, {"x": 1}, None),  # nothing to compare
        ({"x": 0}, {"x": 1}, None),
    ],
)
def test_tvd(a: dict[str, float], b: dict[str, float], expected: float | None) -> None:
    got = tvd(a, b)
    assert got == pytest.approx(expected) if expected is not None else got is None


def _outputs(version: int, scores: list[int], classes: dict[str, int]) -> dict[str, Any]:
    return {"version": version, "frames": sum(scores), "scores": scores, "classes": classes}


SAME = [0, 0, 0, 0, 0, 0, 0, 10, 20, 10]
LOWER = [0, 0, 0, 10, 20, 10, 0, 0, 0, 0]


def _update(now: tuple[list[int], dict[str, int]], was: tuple[list[int], dict[str, int]]) -> Any:
    return {**_outputs(3, *now), "previous": _outputs(2, *was)}


@pytest.mark.parametrize(
    ("outputs", "classes", "scores", "flagged"),
    [
        # the same behaviour after the update
        (_update((SAME, {"cat": 20, "dog": 20}), (SAME, {"cat": 10, "dog": 10})), 0.0, 0.0, False),
        # scores fell: the histogram moved entirely, the class mix did not
        (_update((LOWER, {"cat": 20, "dog": 20}), (SAME, {"cat": 1, "dog": 1})), 0.0, 1.0, True),
        # a class mix a little off: under the threshold
        (_update((SAME, {"cat": 12, "dog": 8}), (SAME, {"cat": 10, "dog": 10})), 0.1, 0.0, False),
        # a new class dominates: flagged on the classes
        (_update((SAME, {"cat": 2, "bus": 8}), (SAME, {"cat": 10})), 0.8, 0.0, True),
    ],
)
def test_drift_between_previous_and_current(
    outputs: dict[str, Any], classes: float, scores: float, flagged: bool
) -> None:
    got = drift(outputs)
    assert got is not None
    assert got["classes"] == pytest.approx(classes) and got["scores"] == pytest.approx(scores)
    assert got["flagged"] is flagged
    assert (got["previous_version"], got["version"]) == (2, 3)


@pytest.mark.parametrize(
    "outputs",
    [
        None,
        "x",
        _outputs(3, SAME, {"cat": 1}),  # no previous yet
        {**_outputs(3, SAME, {"cat": 1}), "previous": None},
        {"version": 3, "scores": [1] * 9, "previous": {"scores": [1] * 9}},  # not 10 bins
        {"scores": ["a"] * 10, "classes": {"x": -1}, "previous": {"scores": [1] * 10}},
        {"scores": [float("nan")] * 10, "previous": {"scores": [True] * 10, "classes": []}},
    ],
)
def test_drift_of_nothing_usable_is_none(outputs: Any) -> None:
    assert drift(outputs) is None


def test_shadow_figures_keep_typed_values_only() -> None:
    run = {
        "version": 4,
        "phase": "running",
        "frames": 600,
        "skipped": "many",
        "errors": 0,
        "agreement": {"metric": "f1", "value": 0.5, "frames": 600},
    }
    got = shadow_figures(run)
    assert got is not None
    assert (got["version"], got["phase"], got["frames"], got["skipped"]) == (
        4,
        "running",
        600,
        None,
    )
    assert (got["metric"], got["agreement"]) == ("f1", 0.5)
    assert shadow_figures("nope") is None


def _run_doc(issued_at: float, frames: int, phase: str = "running") -> dict[str, Any]:
    return {"issued_at": issued_at, "frames": frames, "skipped": 1, "errors": 0, "phase": phase}


@pytest.mark.parametrize(
    ("state", "telemetry", "expected"),
    [
        # the state stops at the run's last phase change; telemetry goes on
        (_run_doc(10, 0), _run_doc(10, 40), "telemetry"),
        (_run_doc(10, 40, "stopped"), _run_doc(10, 35), "state"),  # telemetry lags a stop
        (_run_doc(10, 40, "stopped"), _run_doc(10, 40), "state"),  # a tie: the state's phase
        (_run_doc(20, 0), _run_doc(10, 900), "state"),  # a newer run
        (_run_doc(10, 900), _run_doc(20, 0), "telemetry"),
        (None, _run_doc(10, 5), "telemetry"),
        (_run_doc(10, 5), None, "state"),
        (_run_doc(10, 5), "hostile", "state"),
        ({"frames": "many"}, _run_doc(10, 5), "telemetry"),
        (None, None, None),
    ],
)
def test_the_freshest_shadow_run_report_is_shown(state: Any, telemetry: Any, expected: Any) -> None:
    got = freshest_run(state, telemetry)
    assert got is {"state": state, "telemetry": telemetry, None: None}[expected]


# -- shadow options and the instruction --------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ((10, 25, None, None), []),
        ((100, 1, 0.95, 500), []),
        ((0, 25, None, None), ["--sample"]),
        ((10, 101, None, None), ["--max-cpu"]),
        ((2.5, 25, None, None), ["--sample"]),  # a device takes whole percentages only
        ((10, 25, 1.5, 10), ["--promote-at"]),
        ((10, 25, 0.9, 0), ["--min-frames"]),
        ((10, 25, 0.9, None), ["--promote-at and --min-frames"]),
    ],
)
def test_check_options_names_the_option(
    options: tuple[float, float, float | None, int | None], named: list[str]
) -> None:
    problems = check_options(*options)
    assert [p.split(":")[0] if ":" in p else p.split(" go")[0] for p in problems] == named


def test_the_shadow_instruction_is_signed_like_a_desired_state(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "deploy")
    key = load_private_key(private)
    payload = shadow_payload(
        "people", 4, "group:door", time.time(), sample_pct=20, promote=Promote(0.9, 50),
        sign_key=private,
    )  # fmt: skip
    doc = json.loads(payload)
    assert {k: doc[k] for k in ("schema", "model", "version", "sample_pct", "max_cpu_pct")} == {
        "schema": 1, "model": "people", "version": 4, "sample_pct": 20, "max_cpu_pct": 25,
    }  # fmt: skip
    assert doc["promote"] == {"min_agreement": 0.9, "min_frames": 50}
    ring = KeyRing.of([key.public_key()], "update.desired_public_key")
    assert parse_desired(payload, "group:door", target="group:door", key=ring) is not None
    tampered = json.dumps({**doc, "sample_pct": 100}).encode()
    with pytest.raises(ValueError, match="signature: bad"):
        parse_desired(tampered, "group:door", target="group:door", key=ring)
    with pytest.raises(ValueError, match="target"):  # not replayable onto another topic
        parse_desired(payload, "device", target="device:d1", key=ring)
    with pytest.raises(ValueError, match="--sample"):
        shadow_payload("people", 4, "group:door", time.time(), sample_pct=0)


# -- a device's state about one model ------------------------------------------------------

SEVERAL = {
    "model": "people",
    "version": 3,
    "models": {
        "people": {"model": "people", "version": 3, "phase": "idle"},
        "faces": {
            "model": "faces",
            "version": 2,
            "phase": "idle",
            "desired": {"model": "faces", "version": 2, "issued_at": 100.0},
            "update": {"model": "faces", "version": "2; rm", "issued_at": 100.0},
        },
    },
}


def test_model_state_reads_models_then_the_top_level() -> None:
    faces = model_state(SEVERAL, "faces")
    assert faces is not None and running_of(faces) == ("faces", 2)
    assert "version" not in faces["update"]  # cleaned like a state document
    assert model_state(SEVERAL, "cars") == {}  # reports its models; not this one
    assert running_of(model_state({"model": "people", "version": 1}, "people")) == ("people", 1)
    assert model_state(None, "people") is None
    # the verdict of a desired state of faces comes from faces' part, not the top level
    verdict = verdict_of(faces, True, running_of(faces), "faces", 2, 100.0)
    assert verdict.status == "succeeded"
    top = verdict_of(SEVERAL, True, running_of(SEVERAL), "faces", 2, 100.0)
    assert top.status == "pending"  # what the old rule (top level) would have said


@pytest.mark.parametrize(
    ("state", "model", "expected"),
    [
        (SEVERAL, "faces", True),
        (SEVERAL, "cars", False),  # it lists its models, not this one
        ({"model": "people", "version": 1}, "cars", True),  # an older agent may switch
        (None, "cars", True),  # not reported yet
        ({"models": "junk"}, "cars", True),
    ],
)
def test_serves(state: Any, model: str, expected: bool) -> None:
    assert serves(state, model) is expected


# -- edge-fleet on a real broker ---------------------------------------------------------


def _leave(broker: Mosquitto, docs: dict[str, Any]) -> None:
    with subscriber(broker.url, []) as operator:
        for topic, doc in docs.items():
            payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            assert operator.publish(topic, payload, retain=True) in (
                "Success",
                "No matching subscribers",
            )


def _retained(broker: Mosquitto, topic: str) -> dict[str, Any] | None:
    """The retained document on ``topic`` now (None: none)."""
    with subscriber(broker.url, [topic]) as sub:
        time.sleep(0.3)
        got = sub.messages(topic)
    return json.loads(got[-1].payload) if got and got[-1].payload else None


def _device(name: str, group: str, state: dict[str, Any], **more: Any) -> dict[str, Any]:
    now = time.time()
    docs = {
        f"edge/{name}/status": {"ts": now, "state": "online", "groups": [group]},
        f"edge/{name}/state": {"ts": now, **state},
    }
    docs |= {f"edge/{name}/{stream}": {"ts": now, **doc} for stream, doc in more.items()}
    return docs


def test_deploy_shadow_clear_and_promote_on_the_broker(broker: Mosquitto, tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "deploy")
    ring = KeyRing.of([load_private_key(private).public_key()], "update.desired_public_key")
    url = ("--broker", broker.url)
    _leave(broker, _device("cam-1", "door", SEVERAL))

    run = run_fleet(
        "deploy", *url, "--shadow", "--model", "faces", "--version", "3", "--group", "door",
        "--sample", "20", "--max-cpu", "30", "--promote-at", "0.9", "--min-frames", "50",
        "--sign-key", str(private), "--json",
    )  # fmt: skip
    assert run.code == 0, run.err
    assert "warning" not in run.err  # cam-1 serves faces
    assert run.json()["topic"] == "edge/groups/door/shadow/faces"
    doc = _retained(broker, "edge/groups/door/shadow/faces")
    assert doc is not None
    assert (doc["model"], doc["version"], doc["sample_pct"], doc["max_cpu_pct"]) == (
        "faces", 3, 20, 30,
    )  # fmt: skip
    assert doc["promote"] == {"min_agreement": 0.9, "min_frames": 50}
    payload = json.dumps(doc).encode()
    assert parse_desired(payload, "group:door", target="group:door", key=ring) is not None
    assert _retained(broker, "edge/groups/door/desired/faces") is None  # not a deploy

    bad = run_fleet("deploy", *url, "--shadow", "--model", "faces", "--version", "3",
                    "--group", "door", "--sample", "0")  # fmt: skip
    assert bad.code == 2 and "--sample: 0 is not a whole percentage from 1 to 100" in bad.err

    status = run_fleet("status", *url, "--model", "faces", "--json")
    assert status.code == 0, status.err
    assert status.json()["shadow"]["groups"]["door"]["version"] == 3
    assert status.json()["versions"] == {"2": ["cam-1"]}  # found in state.models

    # promote: the shadow's version becomes the desired state; the shadow run is cleared
    run = run_fleet("promote", *url, "--model", "faces", "--group", "door",
                    "--sign-key", str(private), "--json")  # fmt: skip
    assert run.code == 0, run.err
    assert (run.json()["version"], run.json()["topic"]) == (3, "edge/groups/door/desired/faces")
    desired = _retained(broker, "edge/groups/door/desired/faces")
    assert desired is not None and (desired["model"], desired["version"]) == ("faces", 3)
    made = parse_desired(json.dumps(desired).encode(), "group:door", target="group:door", key=ring)
    assert made is not None and made.version == 3
    assert _retained(broker, "edge/groups/door/shadow/faces") is None
    again = run_fleet("promote", *url, "--model", "faces", "--group", "door")
    assert again.code == 1 and "no shadow run of faces on group door" in again.err

    # a shadow run stopped by --clear
    assert run_fleet("deploy", *url, "--shadow", "--model", "faces", "--version", "4",
                     "--device", "cam-1").code == 0  # fmt: skip
    other = run_fleet("deploy", *url, "--shadow", "--model", "cars", "--version", "1",
                      "--group", "door")  # fmt: skip
    assert other.code == 0 and "0 of 1 device(s) report serving cars: not cam-1" in other.err
    assert _retained(broker, "edge/cam-1/shadow/faces") is not None
    cleared = run_fleet("deploy", *url, "--shadow", "--clear", "--model", "faces",
                        "--device", "cam-1")  # fmt: skip
    assert cleared.code == 0, cleared.err
    assert _retained(broker, "edge/cam-1/shadow/faces") is None


def test_deploy_clear_by_model_clears_its_topic_and_a_legacy_one_naming_it(
    broker: Mosquitto,
) -> None:
    url = ("--broker", broker.url)
    legacy = {"schema": 1, "model": "faces", "version": 1, "issued_at": 1.0}
    _leave(broker, {"edge/groups/door/desired": legacy, "edge/groups/yard/desired": legacy})
    assert (
        run_fleet("deploy", *url, "--model", "faces", "--version", "2", "--group", "door").code == 0
    )
    assert _retained(broker, "edge/groups/door/desired/faces") is not None
    run = run_fleet("deploy", *url, "--model", "faces", "--group", "door", "--clear", "--json")
    assert run.code == 0, run.err
    assert run.json()["topics"] == ["edge/groups/door/desired/faces", "edge/groups/door/desired"]
    assert _retained(broker, "edge/groups/door/desired/faces") is None
    assert _retained(broker, "edge/groups/door/desired") is None
    # another model's clear leaves a legacy state naming faces alone; no model: legacy only
    assert run_fleet("deploy", *url, "--model", "people", "--group", "yard", "--clear").code == 0
    assert _retained(broker, "edge/groups/yard/desired") == legacy
    assert run_fleet("deploy", *url, "--group", "yard", "--clear").code == 0
    assert _retained(broker, "edge/groups/yard/desired") is None


class FakeDevice:
    """Serves people (top level) and faces (in models); takes a desired state of faces
    on its per-model topic and reports it applied in ``state.models.faces`` only."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.broker, self.name = broker, name
        self.sub = subscriber(broker.url, [f"edge/{name}/desired/faces"])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stop.is_set() and time.monotonic() < deadline:
            got = [m for m in self.sub.messages(f"edge/{self.name}/desired/faces") if m.payload]
            if got and not got[-1].retain:
                doc = json.loads(got[-1].payload)
                faces = {
                    "model": "faces",
                    "version": doc["version"],
                    "phase": "idle",
                    "desired": {k: doc[k] for k in ("model", "version", "issued_at")},
                }
                state = {**SEVERAL, "models": {**SEVERAL["models"], "faces": faces}}
                _leave(self.broker, {f"edge/{self.name}/state": {"ts": time.time(), **state}})
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()


def test_deploy_wait_judges_the_model_by_state_models(broker: Mosquitto) -> None:
    url = ("--broker", broker.url)
    _leave(broker, _device("cam-2", "door", SEVERAL))
    device = FakeDevice(broker, "cam-2")
    try:
        run = run_fleet("deploy", *url, "--model", "faces", "--version", "5",
                        "--device", "cam-2", "--wait", "10", "--json")  # fmt: skip
    finally:
        device.close()
    assert run.code == 0, run.out + run.err
    assert run.json()["topic"] == "edge/cam-2/desired/faces"
    assert [d["status"] for d in run.json()["devices"]] == ["succeeded"]


def test_devices_and_status_show_every_model_drift_and_shadow_figures(broker: Mosquitto) -> None:
    url = ("--broker", broker.url)
    shadow_run = {
        "model": "faces", "version": 3, "phase": "running", "sample_pct": 10,
        "max_cpu_pct": 25, "frames": 640, "skipped": 3, "errors": 0, "error": None,
        "latency_ms_p50": 7.5, "active_latency_ms_p50": 5.0,
        "agreement": {"metric": "top1", "value": 0.42, "frames": 640},
    }  # fmt: skip
    outputs = {
        "faces": {
            **_outputs(2, LOWER, {"smile": 30, "frown": 10}),
            "previous": _outputs(1, SAME, {"smile": 10, "frown": 30}),
        }
    }
    state = {**SEVERAL, "shadows": {"faces": shadow_run}}
    _leave(broker, _device("cam-3", "door", state, telemetry={"outputs": outputs}))
    _leave(broker, _device("cam-4", "door", {"model": "faces", "version": 2, "phase": "idle"}))
    shadow = shadow_payload("faces", 3, "device:cam-3", time.time())
    _leave(broker, {"edge/cam-3/shadow/faces": shadow})

    run = run_fleet("devices", *url, "--json")
    assert run.code == 0, run.err
    rows = {r["device"]: r for r in run.json()}
    assert set(rows["cam-3"]["models"]) == {"people", "faces"}
    assert rows["cam-3"]["models"]["faces"]["version"] == 2
    assert rows["cam-3"]["models"]["faces"]["shadow"]["version"] == 3
    assert set(rows["cam-4"]["models"]) == {"faces"}  # an older agent: its one model
    table = run_fleet("devices", *url).out
    assert "people@3" in table and "faces@2" in table
    assert "faces: shadow v3 running agreement 0.420" in table, table

    run = run_fleet("status", *url, "--model", "faces", "--json")
    assert run.code == 0, run.err
    status = run.json()
    assert status["versions"] == {"2": ["cam-3", "cam-4"]}
    moved = status["drift"]["cam-3"]
    assert moved["classes"] == pytest.approx(0.5) and moved["scores"] == pytest.approx(1.0)
    assert moved["flagged"] is True and "cam-4" not in status["drift"]
    figures = status["shadows"]["cam-3"]
    assert (figures["agreement"], figures["frames"], figures["phase"]) == (0.42, 640, "running")
    text = run_fleet("status", *url, "--model", "faces").out
    assert "drift: cam-3 v1 -> v2: classes 0.500, scores 1.000  DRIFT" in text, text
    assert "shadow run: cam-3 v3 running, top1 0.420 over 640 frames" in text, text
    assert "shadow: device cam-3 -> v3" in text, text


def test_a_device_that_does_not_serve_the_model_fails_at_once_and_is_left_out_of_rollouts(
    broker: Mosquitto,
) -> None:
    url = ("--broker", broker.url)
    _leave(broker, _device("cam-5", "lab", SEVERAL))
    begun = time.monotonic()
    run = run_fleet("deploy", *url, "--model", "cars", "--version", "1", "--device", "cam-5",
                    "--wait", "30", "--json")  # fmt: skip
    assert run.code == 1 and time.monotonic() - begun < 10
    assert "warning: cam-5 does not serve cars" in run.err
    (device,) = run.json()["devices"]
    assert device["detail"] == "does not serve cars (it serves: faces, people)"
    run_issued = run.json()["issued_at"]
    run = run_fleet("rollout", *url, "--model", "cars", "--version", "1", "--group", "lab")
    assert run.code == 1
    assert "do not serve cars and are left out: cam-5" in run.out
    assert "no device reports group 'lab' under edge/ and serves cars" in run.err
    kept = _retained(broker, "edge/cam-5/desired/cars")  # deploy's, retained for later
    assert kept is not None and kept["issued_at"] == run_issued


def test_hostile_models_outputs_and_shadows_are_skipped_not_shown_raw(broker: Mosquitto) -> None:
    url = ("--broker", broker.url)
    many = {f"m{i:02d}": {"model": f"m{i:02d}", "version": 1} for i in range(60)}
    state = {
        "model": "faces",
        "version": 1,
        "models": {
            **many,
            "faces": {"model": "faces", "version": "1; rm", "phase": "\x1b[2J"},
            "bad name!": {"version": 1},
            "junk": "not an object",
        },
        "shadows": {"faces": {"phase": 7, "agreement": "high", "frames": -1}},
    }
    outputs = {"faces": {"scores": "x", "classes": [], "previous": {"scores": [1] * 10}}}
    _leave(broker, _device("cam-h", "lab", state, telemetry={"outputs": outputs}))
    run = run_fleet("devices", *url, "--json")
    assert run.code == 0, run.err
    (row,) = run.json()
    assert len(row["models"]) <= 32 and "bad name!" not in row["models"]
    assert "junk" not in row["models"]
    assert "\x1b" not in run.out + run.err and "\x1b" not in run_fleet("devices", *url).out
    status = run_fleet("status", *url, "--model", "faces", "--json")
    assert status.code == 0, status.err
    assert status.json()["drift"] == {}
    figures = status.json()["shadows"]["cam-h"]
    assert (figures["phase"], figures["agreement"], figures["frames"]) == (None, None, None)
    text = run_fleet("status", *url, "--model", "faces")
    assert text.code == 0 and "\x1b" not in text.out


def test_shadow_options_without_shadow_are_bad_usage() -> None:
    run = run_fleet("deploy", "--broker", "mqtt://127.0.0.1:1", "--model", "m", "--version", "2",
                    "--group", "g", "--sample", "50")  # fmt: skip
    assert run.code == 2 and "--sample: only with --shadow" in run.err
    run = run_fleet("deploy", "--broker", "mqtt://127.0.0.1:1", "--shadow", "--model", "m",
                    "--group", "g", "--version", "2", "--wait", "5")  # fmt: skip
    assert run.code == 2 and "--shadow: takes no --wait" in run.err
    run = run_fleet("deploy", "--broker", "mqtt://127.0.0.1:1", "--shadow", "--clear",
                    "--model", "m", "--group", "g", "--version", "2")  # fmt: skip
    assert run.code == 2 and "--shadow --clear: takes only" in run.err


def test_the_view_takes_each_pipelines_results_and_skips_a_bad_pipeline_name() -> None:
    from agent.fleet.broker import Message
    from agent.fleet.render import describe
    from agent.fleet.view import FleetView

    said: list[str] = []
    view = FleetView("edge", warn=said.append)
    assert "edge/+/results/+" in view.subscriptions(("results",))
    assert "edge/d1/results/+" in view.subscriptions(("results",), device="d1")
    body = {"model": "people", "version": 2, "pipeline": "door", "classes": []}
    report = view.take(Message("edge/d1/results/door", json.dumps(body).encode(), False))
    assert report is not None and (report.device, report.stream) == ("d1", "results")
    assert describe(report).endswith("results   door: v2 nothing"), describe(report)
    for topic in ("edge/d1/results/-x", "edge/d1/results/" + "a" * 33):
        assert view.take(Message(topic, json.dumps(body).encode(), False)) is None
    assert len(said) == 2 and all("not a valid pipeline name" in line for line in said), said
    assert view.take(Message("edge/d1/telemetry/door", b"{}", False)) is None  # not a stream
