"""Several models, as the operator sees them: events naming their model, each model's
store in ``edge-agent status``, Home Assistant's entities per pipeline.

The device is the real agent (``edge-agent run``) serving two generated models on two
synthetic streams from a ``file://`` registry, reporting to a real mosquitto; its stores
are damaged between runs the way a power cut or a bad card does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.fleet.publish import publish
from agent.store import POINTER, Store
from tests.agentproc import MODEL, AgentProcess, Tap, publish_models, wait_alive
from tests.broker import Mosquitto
from tests.conftest import Models
from tests.pipecfg import two_pipelines

DEV = "dev-ops"
OTHER = "boxes"


def _agent(
    tmp_path: Path, models: Models, broker: Mosquitto, **extra: dict[str, Any]
) -> AgentProcess:
    registry = tmp_path / "registry"
    publish_models(registry, models.root, (1,))
    publish(
        [models.path("detector.tflite")],
        model=OTHER,
        version=1,
        registry=registry,
        task="detection",
        labels=models.labels,
        channels=("stable",),
    )
    agent = AgentProcess(
        tmp_path / DEV,
        DEV,
        {
            "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
            **extra,
        },
    )
    return two_pipelines(agent, OTHER)


def _status_text(agent: AgentProcess, *args: str) -> str:
    """``edge-agent status`` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", *args, "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _status(agent: AgentProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_status_text(agent, "--json"))
    return doc


def _events(tap: Tap, name: str) -> list[dict[str, Any]]:
    return [d for d in tap.docs("/events") if d["event"] == name]


def _serving(tap: Tap, version: int, after: int = 0) -> bool:
    """Both models serving ``version`` in a state sent after the first ``after`` ones."""
    states = tap.docs("/state")[after:]
    found = states[-1].get("models", {}) if states else {}
    return {m: p.get("serving") for m, p in found.items()} == {MODEL: version, OTHER: version}


def test_a_damaged_store_of_the_second_model_is_reported_with_its_model(
    tmp_path: Path, models: Models, broker: Mosquitto, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, models, broker)
    agents.append(agent)
    root = agent.root / "store"
    boxes = root / "models" / OTHER
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent.start()
        wait_alive(lambda: _serving(tap, 1), 60, "both models serving v1", agent)
        assert agent.terminate() == 0

        # status, no agent running: each model's store, the second one's own folder
        status = _status(agent)
        assert {m: p["store"] for m, p in status["models"].items()} == {
            MODEL: str(root),
            OTHER: str(boxes),
        }
        assert [p["active"]["version"] for p in status["models"].values()] == [1, 1]
        assert [p["stored_versions"] for p in status["models"].values()] == [[1], [1]]

        # the root's pointer damaged: the other model's store is listed as ever, the
        # damaged one named in one line (the agent takes the root as the first model's)
        kept = (root / POINTER).read_bytes()
        (root / POINTER).write_bytes(b'{"schema": 1, "mo')
        status = _status(agent)
        assert "damaged pointer" in status["store_error"]
        assert "damaged pointer" in status["models"][MODEL]["error"]
        assert status["models"][OTHER]["active"]["version"] == 1
        assert status["models"][OTHER]["store"] == str(boxes)
        text = _status_text(agent).splitlines()
        (damaged,) = [line for line in text if line.startswith(f"  {MODEL}:")]
        assert damaged.startswith(f"  {MODEL}: {root}: cannot read: ") and "damaged" in damaged
        assert any(line.startswith(f"  {OTHER}: v1 (since ") for line in text), text
        (root / POINTER).write_bytes(kept)

        # the second model's pointer damaged: status says so for that model alone
        (boxes / POINTER).write_bytes(b'{"schema": 1, "model": "bo')
        status = _status(agent)
        assert "damaged pointer" in status["models"][OTHER]["error"]
        assert status["models"][MODEL]["active"]["version"] == 1
        # ... and the agent's repair names the model whose store it was
        before = len(tap.docs("/state"))
        agent.start()
        wait_alive(lambda: bool(_events(tap, "state_repaired")), 30, "state_repaired", agent)
        (repaired,) = _events(tap, "state_repaired")
        assert (repaired["model"], repaired["file"]) == (OTHER, str(boxes / POINTER))
        wait_alive(lambda: _serving(tap, 1, before), 60, "both models serving again", agent)
        assert agent.terminate() == 0

        # the second model's file damaged: it cannot be loaded, and model_failed says which
        active = Store(boxes).active()
        assert active is not None
        (model_file,) = [f for f in active.manifest.files if f.role == "model"]
        blob = boxes / "blobs" / model_file.sha256
        blob.chmod(0o644)
        blob.write_bytes(b"not a model" * 100)
        agent.start()
        wait_alive(lambda: bool(_events(tap, "model_failed")), 30, "model_failed", agent)
        (failed,) = _events(tap, "model_failed")
        assert (failed["model"], failed["version"]) == (OTHER, 1)
        assert agent.alive()
        # status beside the running agent: each model's line, the failed one's error
        lines = {
            line.split(":")[0].strip(): line
            for line in _status_text(agent).splitlines()
            if line.startswith(f"  {MODEL}:") or line.startswith(f"  {OTHER}:")
        }
        assert lines[MODEL] == lines[MODEL].split(";")[0] + "; previous none; stored v1"
        assert "; last error: v1: " in lines[OTHER], lines
        assert agent.terminate() == 0
    finally:
        tap.close()
    assert "Traceback" not in agent.log()


def test_home_assistant_gets_each_pipelines_sensors_reading_the_real_documents(
    tmp_path: Path, models: Models, broker: Mosquitto, agents: list[AgentProcess]
) -> None:
    """The retained discovery configs of a two-pipeline agent, their templates rendered
    (jinja2's sandbox, as Home Assistant does) against what the agent really sends."""
    ha = {"discovery": True, "labels": ["red", "person"]}
    agent = _agent(tmp_path, models, broker, homeassistant=ha, telemetry={"interval_s": 1})
    agents.append(agent)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#", "homeassistant/#"])
    env = ImmutableSandboxedEnvironment()

    def config(component: str, object_id: str) -> dict[str, Any]:
        found = tap.docs(f"homeassistant/{component}/{DEV}/{object_id}/config")
        return found[-1] if found else {}

    def render(entity: dict[str, Any]) -> str | None:
        stream = entity["state_topic"].removeprefix(f"edge/{DEV}")
        docs = tap.docs(stream)
        if not docs:
            return None
        return env.from_string(entity["value_template"]).render(value_json=docs[-1]).strip()

    try:
        agent.start()
        wait_alive(lambda: _serving(tap, 1), 60, "both models serving v1", agent)
        wanted = [
            ("sensor", f"{p}_{s}") for p in ("door", "yard") for s in ("fps", "latency_p95")
        ] + [
            ("binary_sensor", f"{p}_{label}_detected")
            for p in ("door", "yard")
            for label in ("red", "person")
        ]
        wait_alive(lambda: all(config(*w) for w in wanted), 30, "the discovery configs", agent)
        assert not config("binary_sensor", "red_detected")  # the single model's: not made
        assert config("binary_sensor", "yard_red_detected")["state_topic"] == (
            f"edge/{DEV}/results/yard"
        )
        wait_alive(
            lambda: all(
                render(config("sensor", f"{p}_fps")) not in (None, "None") for p in ("door", "yard")
            ),
            30,
            "each pipeline's fps in telemetry",
            agent,
        )
        for pipeline in ("door", "yard"):
            assert float(render(config("sensor", f"{pipeline}_fps")) or "") > 0
            assert float(render(config("sensor", f"{pipeline}_latency_p95")) or "") > 0
        # the colour classifier on the synthetic stream: door's results carry classes
        assert render(config("binary_sensor", "door_red_detected")) in ("ON", "OFF")
        assert render(config("binary_sensor", "yard_person_detected")) in ("ON", "OFF")
        assert agent.terminate() == 0
    finally:
        tap.close()
    assert "Traceback" not in agent.log()
