"""Defects found reviewing issue 20 (several pipelines, cascades, shadow runs), each
with the real models on the real interpreter where a model is involved."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import contract
from agent.config import RuntimeConfig, parse_config
from agent.desired import DesiredState, sign_desired
from agent.errors import ModelError
from agent.fleet.shadow import shadow_payload
from agent.frames import Result
from agent.outbox import MAX_MESSAGE, Outbox, Record
from agent.pipeline import PACE_WAIT_S, Stats
from agent.runtime import LoadedModel, ModelFiles, load_model
from agent.runtime.adapters import Detection, Output
from agent.shadow.instruction import parse_shadow
from agent.shadow.outputs import MAX_LABEL, OutputStats
from agent.units import ModelUnit
from agent.verify import KeyRing, generate_keypair, load_private_key
from tests.agentproc import AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto
from tests.conftest import (
    MODEL,
    Device,
    Fleet,
    Models,
    serving_v1_with_v2_published,
)
from tests.pipecfg import write_cascade
from tests.registry_server import RegistryServer
from tests.test_pipelines import CASCADE, DEV, OTHER, _registry

RUNTIME = RuntimeConfig(warmup_runs=1, threads=1)


def _load(models: Models) -> LoadedModel:
    files = ModelFiles(
        name="people",
        version=2,
        task="classification",
        cpu=models.path("classifier.tflite"),
        labels=models.labels,
    )
    return load_model(files, RUNTIME)


class _Target:
    """A serving target; ``stalled``: it does not take a model (a pipeline whose frame
    in hand outlasts the timeout: the model is withdrawn and closed, ModelError)."""

    def __init__(self, config: Any, stalled: bool = False) -> None:
        self.results = config.results
        self.stalled = stalled
        self.model: LoadedModel | None = None

    def swap(self, model: LoadedModel, timeout: float) -> None:
        if self.stalled:
            model.close()
            raise ModelError(f"the pipeline did not take the new model within {timeout:g} s")
        self.model = model

    def between_frames(self, timeout: float = PACE_WAIT_S) -> bool:
        return True

    def stats(self) -> Stats | None:
        return None


class _Reporter:
    def event(self, name: Any, detail: Any = None) -> None:
        pass

    def state(self, state: Any) -> None:
        pass


def _unit(tmp_path: Path, targets: list[_Target]) -> ModelUnit:
    config = parse_config(
        f"model: {{name: people}}\nstore: {{dir: {tmp_path / 'store'}}}\n"
        f"telemetry: {{outbox: {tmp_path / 'outbox.db'}}}\n",
        env={},
    )
    return ModelUnit("people", config, list(targets), _Reporter())


def test_a_further_target_refusing_its_copy_never_closes_the_model_the_first_serves(
    tmp_path: Path, models: Models
) -> None:
    config = parse_config("model: {name: people}", env={})
    first, stalled = _Target(config), _Target(config, stalled=True)
    unit = _unit(tmp_path, [first, stalled])
    model = _load(models)
    # the updater closes the model when swap raises (Steps.activate): swap must not
    # raise once the first pipeline serves it
    unit.swap(model, 0.1)
    assert first.model is model
    frame = np.zeros((32, 32, 3), np.uint8)
    assert model.run(frame).classes  # still usable: not closed under the first pipeline
    model.close()


def test_the_first_target_refusing_closes_the_copies_and_raises(
    tmp_path: Path, models: Models
) -> None:
    config = parse_config("model: {name: people}", env={})
    stalled, second = _Target(config, stalled=True), _Target(config)
    unit = _unit(tmp_path, [stalled, second])
    copies: list[LoadedModel] = []
    load = unit._load

    def loading(files: ModelFiles, results: Any) -> LoadedModel:
        copies.append(load(files, results))
        return copies[-1]

    unit._load = loading  # type: ignore[method-assign]
    with pytest.raises(ModelError):
        unit.swap(_load(models), 0.1)
    assert second.model is None and len(copies) == 1
    with pytest.raises(RuntimeError, match="closed"):
        copies[0].run(np.zeros((32, 32, 3), np.uint8))


def test_a_message_over_the_brokers_packet_limit_is_never_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped broker disconnects a client that sends a packet over 256 KiB: kept in
    the outbox, such a message (8 pipelines' telemetry, a cascade's nested results) would
    be sent again on every reconnect, and the device would report nothing any more."""
    outbox = Outbox(tmp_path / "outbox.sqlite", 10**8).open()
    try:
        big = Record("results", "edge/d/results/door", {"ts": 1.0, "pad": "x" * MAX_MESSAGE})
        small = Record("results", "edge/d/results/door", {"ts": 1.0, "pad": "x"})
        messages, _ = outbox.write([big, small])
        assert len(messages) == 1 and len(messages[0].payload) < 1000
        assert [len(m.payload) for m in outbox.pending(0, 10)] == [len(messages[0].payload)]
        for _ in range(20):  # one a frame: the log says so once a minute, not each time
            assert outbox.write([big])[0] == []
        lines = [r for r in caplog.records if "over the" in r.getMessage()]
        assert len(lines) == 1 and "results message" in lines[0].getMessage()
    finally:
        outbox.close()


def test_eight_models_output_statistics_fit_one_telemetry_message(tmp_path: Path) -> None:
    """A labels file of many long labels (non-ASCII: escaped in JSON) must not make the
    ``outputs`` of 8 pipelines' models, each version and its previous, outgrow the
    broker's packet limit (then no telemetry would ever be sent)."""
    labels = [f"{'é' * 300} {i}" for i in range(1000)]
    outputs = {}
    kept = []
    for m in range(8):
        (tmp_path / f"m{m}").mkdir()
        stats = OutputStats(f"model-{m}", tmp_path / f"m{m}")
        kept.append(stats)
        for version in (1, 2):
            for start in range(0, len(labels), 50):
                found = [
                    Detection(i, label, 0.5, (0.0, 0.0, 1.0, 1.0))
                    for i, label in enumerate(labels[start : start + 50])
                ]
                result = Result(
                    0,
                    0.0,
                    f"model-{m}",
                    version,
                    "cpu",
                    1.0,
                    1.0,
                    Output("detection", detections=found),
                )
                stats.observe(None, result)  # type: ignore[arg-type]
        doc = stats.doc()
        assert doc is not None and doc["previous"] is not None and doc["classes"]
        outputs[f"model-{m}"] = doc
    size = len(json.dumps({"outputs": outputs}))
    assert size < MAX_MESSAGE // 2, size
    first = outputs["model-0"]
    assert all(len(label) <= MAX_LABEL for label in first["classes"])
    # a restart reads outputs.json back within the same bounds
    kept[0].save()
    again = OutputStats("model-0", tmp_path / "m0").doc()
    assert again is not None and again["classes"] == first["classes"]


def test_the_state_published_is_composed_under_the_lock_never_an_earlier_one(
    tmp_path: Path,
) -> None:
    """The single model's update worker and its shadow controller both publish the state:
    a state one of them computed before the other's newer one must not come in last."""
    from agent.service import Service

    config = parse_config(
        f"model: {{name: people}}\nstore: {{dir: {tmp_path / 'store'}}}\n"
        f"telemetry: {{outbox: {tmp_path / 'outbox.db'}}}\n"
        f"control: {{socket: {tmp_path / 'agent.sock'}}}\n",
        env={},
    )
    service = Service(config)
    published: list[Any] = []
    service.telemetry.state = published.append  # type: ignore[method-assign]
    fresh = service.updates.state()
    stale = {**fresh, "phase": "downloading", "last_error": "computed a while ago"}
    service.publish_state(stale)  # type: ignore[arg-type]
    assert published[-1]["phase"] == fresh["phase"] != "downloading"
    assert published[-1]["last_error"] == fresh["last_error"]


def test_a_signed_shadow_instruction_copied_onto_the_desired_topic_is_refused(
    tmp_path: Path,
) -> None:
    """Shadow instructions are signed with the deploy keys and the same ``target``:
    whoever can write the desired topic (not holding the key) must not turn one into
    an update to the candidate it only tries out."""
    key_path, pub = generate_keypair(tmp_path)
    ring = KeyRing.load((pub,), "update.desired_public_key")
    payload = shadow_payload(
        "people", 4, "device:dev1", time.time(), sign_key=key_path
    )  # what edge-fleet deploy --shadow retains on edge/dev1/shadow/people
    assert parse_shadow(payload, "device", "dev1", model="people", key=ring) is not None
    state = DesiredState("edge", "dev1", [], ring, model="people")
    for topic in ("edge/dev1/desired", "edge/dev1/desired/people"):
        with pytest.raises(ValueError, match="sample_pct: a shadow instruction's field"):
            state.update(topic, payload)
    assert state.winner() is None
    # a desired state signed the same way is taken as ever
    desired = json.dumps(
        sign_desired(
            {"model": "people", "version": 4, "issued_at": time.time(), "target": "device:dev1"},
            load_private_key(key_path),
        )
    ).encode()
    assert state.update("edge/dev1/desired/people", desired) is not None


def test_a_shadow_run_of_a_cascade_model_is_refused_out_loud(tmp_path: Path) -> None:
    """No pipeline runs a cascade model on whole frames, so there is nothing to compare
    a candidate with: the device says so (``shadow_failed``) instead of staying silent
    while the fleet waits for a shadow run."""
    from agent.mqtt import Incoming
    from agent.service import Service

    config = parse_config(
        f"model: {{name: people}}\ncascade: {{model: {{name: faces}}}}\n"
        f"device: {{id: dev1}}\nstore: {{dir: {tmp_path / 'store'}}}\n"
        f"telemetry: {{outbox: {tmp_path / 'outbox.db'}}}\n"
        f"control: {{socket: {tmp_path / 'agent.sock'}}}\n",
        env={},
    )
    service = Service(config)
    events: list[tuple[str, Any]] = []
    service.telemetry.event = lambda name, detail=None: events.append((name, detail))  # type: ignore[method-assign]
    payload = shadow_payload("faces", 3, "device:dev1", time.time())
    service.telemetry._on_message(Incoming("edge/dev1/shadow/faces", payload, None, None))
    assert [name for name, _ in events] == ["shadow_failed"]
    detail = events[0][1]
    assert (detail["model"], detail["version"]) == ("faces", 3)
    assert "cascade model" in detail["error"]
    wrong = shadow_payload("people", 3, "device:dev1", time.time())  # another model's
    service.telemetry._on_message(Incoming("edge/dev1/shadow/faces", wrong, None, None))
    assert events[-1][0] == "desired_invalid"
    service.telemetry._on_message(Incoming("edge/dev1/shadow/faces", b"", None, None))
    assert len(events) == 2  # a cleared one: nothing to say


def test_the_top_level_cascade_reports_its_figures_in_telemetry(
    tmp_path: Path, broker: Mosquitto, models: Models, agents: list[AgentProcess]
) -> None:
    """The single model with a top-level cascade: its results stay on ``results``, and
    telemetry carries ``pipelines.main`` with the cascade's figures (else a cascade's
    crops and errors were reported nowhere)."""
    registry = _registry(tmp_path, models)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = AgentProcess(
            tmp_path / DEV,
            DEV,
            {
                "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
                "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
            },
        )
        write_cascade(agent, OTHER, {"model": {"name": CASCADE}, "max_crops": 2})
        agents.append(agent)
        agent.start()

        def figures() -> dict[str, Any] | None:
            docs = tap.docs("/telemetry")
            main = docs[-1].get("pipelines", {}).get("main") if docs else None
            return main if isinstance(main, dict) and main.get("cascade") else None

        wait_alive(
            lambda: (figures() or {}).get("cascade", {}).get("crops", 0) > 0,
            60,
            "telemetry with the cascade's figures",
            agent,
        )
        cascade = figures()["cascade"]  # type: ignore[index]
        assert (cascade["model"], cascade["version"], cascade["errors"]) == (CASCADE, 1, 0)
        contract.validator("telemetry").validate_python(tap.docs("/telemetry")[-1])
        assert tap.docs(f"edge/{DEV}/results") and not tap.docs("/results/main")
    finally:
        tap.close()


class _Worker:
    """The model's update worker as the shadow run sees it: its phase, its steps."""

    def __init__(self, steps: Any, phase: str) -> None:
        self.steps = steps
        self.current = phase

    def phase(self) -> str:
        return self.current


def test_a_shadow_candidate_is_not_downloaded_while_an_update_is_under_way(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    """The candidate's download holds the model's store lock from start to end: during
    an update's probation a failing release could not be rolled back then (the store
    busy). The real registry and store: refused (transient) while the update is on,
    staged (never activated) once the worker is idle."""
    from agent.shadow.unit import stage_candidate
    from agent.update.policy import Failed
    from agent.update.steps import DeviceSteps

    serving_v1_with_v2_published(fleet, device, server, 4096)
    store = device.store
    worker = _Worker(DeviceSteps(device.config, store, None, None), "probation")  # type: ignore[arg-type]
    with pytest.raises(Failed) as refused:
        stage_candidate(worker, MODEL, 2)  # type: ignore[arg-type]
    assert refused.value.transient and "probation" in str(refused.value)
    assert store.release(MODEL, 2) is None  # nothing fetched meanwhile
    with store.lock():  # and the lock is free again: a rollback could take it
        pass
    worker.current = "succeeded"
    staged = stage_candidate(worker, MODEL, 2)  # type: ignore[arg-type]
    assert staged is not None and staged.version == 2
    device.assert_serving(1)  # staged beside it, never activated


@pytest.mark.parametrize("planted", ["fifo", "deep", "link"])
def test_outputs_json_that_is_not_a_plain_file_of_ours_never_stops_the_start(
    tmp_path: Path, planted: str
) -> None:
    """The output statistics are read at the service's start: a FIFO there would block
    it for good, a deeply nested document raise RecursionError, a link be followed.
    Each is left unread (the statistics start afresh), at once."""
    import os
    import threading

    from agent.shadow.outputs import FILE

    path = tmp_path / FILE
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        secret = tmp_path / "elsewhere.json"
        secret.write_text(
            json.dumps({"current": {"version": 1, "frames": 1, "scores": [0] * 10, "classes": {}}})
        )
        path.symlink_to(secret)
    made: list[OutputStats] = []
    thread = threading.Thread(target=lambda: made.append(OutputStats("m", tmp_path)), daemon=True)
    thread.start()
    thread.join(5.0)
    if planted == "fifo" and thread.is_alive():  # unblock the reader before failing
        with open(path, "w"):
            pass
    assert made and made[0].doc() is None
