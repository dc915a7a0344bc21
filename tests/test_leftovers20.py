"""Issue 20's device-side leftovers: a cascade model's shadow instruction read with the
keys loaded once; a cascade model's output statistics over its crops, on real models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent import verify
from agent.config import parse_config
from agent.fleet.shadow import shadow_payload
from agent.mqtt import Incoming
from agent.verify import generate_keypair
from tests.conftest import Models


def test_a_cascade_models_shadow_instruction_is_read_with_the_keys_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal for a cascade model reads the instruction as the shadow controller
    does (signature, target, model) with the deploy keys loaded when the service was
    built: not again for every message (a key file replaced under a running agent
    changes nothing until a reload, as for desired states)."""
    from agent.service import Service

    key_path, pub = generate_keypair(tmp_path, "deploy")
    config = parse_config(
        "model: {name: people}\ncascade: {model: {name: faces}}\n"
        f"device: {{id: dev1}}\nstore: {{dir: {tmp_path / 'store'}}}\n"
        f"update: {{desired_public_key: {pub}}}\n"
        f"telemetry: {{outbox: {tmp_path / 'outbox.db'}}}\n"
        f"control: {{socket: {tmp_path / 'agent.sock'}}}\n",
        env={},
    )
    service = Service(config)
    loads: list[Any] = []
    real_load = verify.KeyRing.load.__func__  # type: ignore[attr-defined]

    def counted(cls: Any, *args: Any) -> Any:
        loads.append(args)
        return real_load(cls, *args)

    monkeypatch.setattr(verify.KeyRing, "load", classmethod(counted))
    pub.write_text("not a key any more\n")  # read at start only: the ring in memory serves
    events: list[tuple[str, Any]] = []
    service.telemetry.event = lambda name, detail=None: events.append((name, detail))  # type: ignore[method-assign]
    topic = "edge/dev1/shadow/faces"
    for version in (3, 4, 5):
        signed = shadow_payload("faces", version, "device:dev1", time.time(), sign_key=key_path)
        service.telemetry._on_message(Incoming(topic, signed, None, None))
    assert [(n, d["version"]) for n, d in events] == [("shadow_failed", v) for v in (3, 4, 5)]
    unsigned = shadow_payload("faces", 6, "device:dev1", time.time())
    service.telemetry._on_message(Incoming(topic, unsigned, None, None))
    assert events[-1][0] == "desired_invalid" and "signature" in events[-1][1]["error"]
    group = shadow_payload("faces", 7, "group:g", time.time(), sign_key=key_path)
    service.telemetry._on_message(Incoming(topic, group, None, None))  # another target
    assert events[-1][0] == "desired_invalid" and "target" in events[-1][1]["error"]
    assert loads == []


# -- a cascade model's output statistics ------------------------------------------------


def _crops_of(cascade: Any, detector: Any, frames: int) -> None:
    from tests.test_cascade import first, painted

    for _ in range(frames):
        cascade.run(*first(detector, painted()))


def test_a_cascade_models_output_statistics_count_its_crops_per_version(
    models: Models, tmp_path: Path
) -> None:
    """Each crop the second model answered counts as one frame of its output statistics
    (top score into the histogram, top label into the class mix), per version across a
    swap, ``previous`` kept in its store across a restart; no invoke beyond the crops."""
    from agent.cascade import Cascade, CascadeRules
    from agent.shadow.outputs import OutputStats
    from tests.test_cascade import load

    detector = load(models, "detector.tflite", "detection", name="colours")
    first_model = load(models, "classifier.tflite", "classification", 1, name="faces")
    invokes: list[int] = []
    real_run = first_model.run

    def counted(frame: Any) -> Any:
        invokes.append(1)
        return real_run(frame)

    first_model.run = counted  # type: ignore[method-assign]
    cascade = Cascade(first_model, CascadeRules())
    stats = OutputStats("faces", tmp_path)
    cascade.set_outputs(stats.add)
    try:
        _crops_of(cascade, detector, 2)
        assert len(invokes) == cascade.stats().crops == 6  # 3 crops a frame, nothing more
        doc = stats.doc()
        assert doc is not None
        assert (doc["version"], doc["frames"], doc["previous"]) == (1, 6, None)
        assert doc["classes"] == {"red": 2, "green": 2, "blue": 2}  # each crop's own colour
        # top scores 1.0, .78, .59 (the crop's colour strength): bins 9, 7, 5
        assert [doc["scores"][b] for b in (9, 7, 5)] == [2, 2, 2] and sum(doc["scores"]) == 6
        old = cascade.swap(load(models, "classifier.tflite", "classification", 2, name="faces"))
        assert old is first_model
        old.close()
        _crops_of(cascade, detector, 1)
        doc = stats.doc()
        assert doc is not None and (doc["version"], doc["frames"]) == (2, 3)
        assert doc["previous"] is not None
        assert (doc["previous"]["version"], doc["previous"]["frames"]) == (1, 6)
        again = OutputStats("faces", tmp_path).doc()  # outputs.json written at the swap
        assert again is not None and again["previous"] == doc["previous"]
    finally:
        cascade.close()
        detector.close()


def test_the_service_counts_a_cascade_only_model_in_telemetry_outputs(
    models: Models, tmp_path: Path
) -> None:
    """A model served only as a cascade model gets its output statistics (in its own
    store, telemetry ``outputs[MODEL]``); the primary's stay the pipeline's."""
    from agent.service import Service
    from agent.shadow.outputs import OutputStats
    from tests.test_cascade import first, load, painted

    config = parse_config(
        "model: {name: people}\ncascade: {model: {name: faces}, min_score: 0.1}\n"
        f"device: {{id: dev1}}\nstore: {{dir: {tmp_path / 'store'}}}\n"
        f"telemetry: {{outbox: {tmp_path / 'outbox.db'}}}\n"
        f"control: {{socket: {tmp_path / 'agent.sock'}}}\n",
        env={},
    )
    service = Service(config)
    assert set(service.served.crop_outputs) == {"faces"} and "faces" not in service.served.shadows
    stats = service.served.crop_outputs["faces"]
    assert stats.path == tmp_path / "store" / "models" / "faces" / "outputs.json"
    assert "outputs" not in service.served.telemetry()  # nothing counted yet
    detector = load(models, "detector.tflite", "detection", name="people")
    slot = service.cascades["main"]
    slot.swap(load(models, "classifier.tflite", "classification", 4, name="faces"), 5.0)
    try:
        slot.cascade.run(*first(detector, painted()))
        outputs = service.served.telemetry()["outputs"]
        assert list(outputs) == ["faces"]
        assert (outputs["faces"]["version"], outputs["faces"]["frames"]) == (4, 3)
        assert outputs["faces"]["classes"] == {"red": 1, "green": 1, "blue": 1}
        stats.save()  # as the service's stop does
        kept = OutputStats("faces", stats.path.parent).doc()
        assert kept is not None and kept["frames"] == 3
    finally:
        slot.stop()
        detector.close()
