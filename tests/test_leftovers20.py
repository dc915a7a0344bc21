"""Issue 20's device-side leftovers: a cascade model's shadow instruction read with the
keys loaded once, ``edge-agent status`` beside a damaged store root."""

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
