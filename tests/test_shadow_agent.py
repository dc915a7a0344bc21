"""Shadow runs on a real agent (``edge-agent run`` subprocess, real mosquitto, a
``file://`` registry, the generated colour classifier on the real interpreter).

v1 serves; the fleet publishes a shadow instruction for v2 on
``edge/<dev>/shadow/colours``: the agent downloads and loads v2 beside v1, runs it on
the sampled frames, reports agreement, never publishes v2's results. A v2 whose labels
are rotated disagrees on every frame; one with the same labels agrees, and with
``promote`` becomes a normal update (source ``shadow``). A v2 that cannot be loaded
ends ``failed`` while v1 serves on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest

from agent import contract, modelgen
from agent.fleet.publish import publish
from tests.agentproc import MODEL, AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto
from tests.conftest import Models

DEV = "dev-sh"
SHADOW = f"edge/{DEV}/shadow/{MODEL}"


def _release(
    registry: Path, models: Models, version: int, model_file: str, labels: list[str]
) -> None:
    folder = registry.parent / f"src-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    publish(
        [models.path(model_file)],
        model=MODEL,
        version=version,
        registry=registry,
        task="classification",
        labels=folder / "labels.txt",
        channels=("stable",) if version == 1 else (),
    )


@pytest.fixture
def shadow_registry(tmp_path: Path, models: Models, request: pytest.FixtureRequest) -> Path:
    """v1 (stable) and a v2 as the test asks: ``disagree``, ``agree`` or ``broken``."""
    root = tmp_path / "registry"
    labels = list(modelgen.COLOUR_LABELS)
    _release(root, models, 1, "v1.tflite", labels)
    kind = request.param
    if kind == "disagree":  # the same model with its labels rotated: never the same top label
        _release(root, models, 2, "v2.tflite", labels[1:] + labels[:1])
    elif kind == "agree":
        _release(root, models, 2, "v2.tflite", labels)
    else:  # an Edge TPU-only model: it cannot be loaded on this CPU-only device
        _release(root, models, 2, "edgetpu_stub.tflite", labels)
    return root


def _start(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> AgentProcess:
    agent = AgentProcess(
        tmp_path / DEV,
        DEV,
        {
            "registry": {"url": registry.as_uri()},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        },
    )
    agents.append(agent)
    return agent.start()


def _instruct(broker: Mosquitto, **fields: Any) -> None:
    doc = {"schema": 1, "model": MODEL, "version": 2, "issued_at": time.time(), **fields}
    mqtt_publish.single(
        SHADOW, json.dumps(doc), qos=1, retain=True, hostname="127.0.0.1", port=broker.port
    )


def _clear(broker: Mosquitto) -> None:
    mqtt_publish.single(SHADOW, b"", qos=1, retain=True, hostname="127.0.0.1", port=broker.port)


def _shadow(tap: Tap) -> dict[str, Any] | None:
    docs = tap.docs("/telemetry")
    shadow: dict[str, Any] | None = docs[-1].get("shadows", {}).get(MODEL) if docs else None
    return shadow


def _events(tap: Tap, name: str) -> list[dict[str, Any]]:
    return [d for d in tap.docs("/events") if d.get("event") == name]


def _serving_v1(tap: Tap, agent: AgentProcess) -> None:
    wait_alive(
        lambda: any(d.get("serving") == 1 for d in tap.docs("/state")), 60, "v1 serving", agent
    )


def _ratio(tap: Tap, agent: AgentProcess, issued_at: float, span: int) -> float:
    """Compared frames per result of the pipeline over ``span`` results of one run."""

    def run_docs() -> list[dict[str, Any]]:
        return [
            d
            for d in tap.docs("/telemetry")
            if (s := d.get("shadows", {}).get(MODEL))
            and s["issued_at"] == issued_at
            and s["phase"] == "running"
            and d["inference"]
        ]

    wait_alive(lambda: len(run_docs()) >= 1, 60, "the shadow run running", agent)
    first = run_docs()[0]
    wait_alive(
        lambda: run_docs()[-1]["inference"]["results"] - first["inference"]["results"] >= span,
        60,
        f"{span} results during the run",
        agent,
    )
    last = run_docs()[-1]
    done = lambda d: d["shadows"][MODEL]["frames"] + d["shadows"][MODEL]["skipped"]  # noqa: E731
    return (done(last) - done(first)) / (
        last["inference"]["results"] - first["inference"]["results"]
    )


@pytest.mark.parametrize("shadow_registry", ["disagree"], indirect=True)
def test_a_disagreeing_candidate_runs_in_the_shadow_and_never_publishes(
    tmp_path: Path, broker: Mosquitto, shadow_registry: Path, agents: list[AgentProcess]
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = _start(tmp_path, broker, shadow_registry, agents)
        _serving_v1(tap, agent)
        _instruct(broker, sample_pct=100, max_cpu_pct=100)
        wait_alive(
            lambda: (s := _shadow(tap)) is not None and s["agreement"]["frames"] >= 20,
            60,
            "20 frames compared",
            agent,
        )
        shadow = _shadow(tap)
        assert shadow is not None
        assert shadow["phase"] == "running" and shadow["version"] == 2
        assert shadow["agreement"]["metric"] == "top1"
        assert shadow["agreement"]["value"] == 0.0  # rotated labels: never the same
        assert shadow["errors"] == 0 and shadow["latency_ms_p50"] > 0
        assert _events(tap, "shadow_started")[0]["version"] == 2
        state = tap.docs("/state")[-1]
        assert state["version"] == 1 and state["shadows"][MODEL]["version"] == 2
        for stream in ("state", "telemetry"):  # the documents as the contract types them
            contract.validator(stream).validate_python(tap.docs(f"/{stream}")[-1])
        results = tap.docs("/results")
        assert results and {r["version"] for r in results} == {1}  # v2's never go out
        outputs = tap.docs("/telemetry")[-1]["outputs"][MODEL]
        assert outputs["version"] == 1 and outputs["frames"] > 0
        assert sum(outputs["classes"].values()) == outputs["frames"]

        # every frame at 100 %, one in ten at 10 % (same CPU bound, off the bound)
        full = _ratio(tap, agent, _shadow(tap)["issued_at"], 40)  # type: ignore[index]
        _instruct(broker, sample_pct=10, max_cpu_pct=100)
        wait_alive(lambda: len(_events(tap, "shadow_started")) >= 2, 60, "the 10 % run", agent)
        tenth = _ratio(tap, agent, _shadow_issued(tap), 100)
        assert full == pytest.approx(1.0, abs=0.1)
        assert tenth == pytest.approx(0.1, abs=0.04)

        _clear(broker)
        wait_alive(
            lambda: (s := _shadow(tap)) is not None and s["phase"] == "stopped",
            30,
            "the run stopped",
            agent,
        )
        assert _events(tap, "shadow_stopped")
        stopped = _shadow(tap)
        time.sleep(1.0)
        assert _shadow(tap) == stopped  # nothing more compared
        assert {r["version"] for r in tap.docs("/results")} == {1}
    finally:
        tap.close()


def _shadow_issued(tap: Tap) -> float:
    """The issued_at of the latest run that telemetry shows running."""

    def latest() -> float | None:
        s = _shadow(tap)
        return s["issued_at"] if s and s["phase"] == "running" and s["sample_pct"] == 10 else None

    tap.wait(lambda: latest() is not None, 30, "the 10 % run in telemetry")
    value = latest()
    assert value is not None
    return value


@pytest.mark.parametrize("shadow_registry", ["agree"], indirect=True)
def test_an_agreeing_candidate_with_promote_becomes_an_update_through_the_gate(
    tmp_path: Path, broker: Mosquitto, shadow_registry: Path, agents: list[AgentProcess]
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = _start(tmp_path, broker, shadow_registry, agents)
        _serving_v1(tap, agent)
        _instruct(
            broker,
            sample_pct=100,
            max_cpu_pct=100,
            promote={"min_agreement": 0.95, "min_frames": 15},
        )
        wait_alive(
            lambda: any(
                d.get("version") == 2
                and d.get("serving") == 2
                and (d.get("update") or {}).get("outcome") == "succeeded"
                for d in tap.docs("/state")
            ),
            90,
            "v2 active after probation",
            agent,
        )
        promoted = _events(tap, "shadow_promoted")
        assert promoted and promoted[0]["version"] == 2
        assert promoted[0]["agreement"]["value"] == 1.0 and promoted[0]["agreement"]["frames"] >= 15
        state = [d for d in tap.docs("/state") if d.get("serving") == 2][-1]
        assert state["update"]["source"] == "shadow"
        assert state["shadows"][MODEL]["phase"] == "promoted"
        assert _events(tap, "update_validated")  # through the gate
        started = [e for e in _events(tap, "update_started") if e["version"] == 2]
        assert started and started[0]["source"] == "shadow"
        wait_alive(
            lambda: (
                (o := tap.docs("/telemetry")[-1].get("outputs", {}).get(MODEL)) is not None
                and o["version"] == 2
                and o["previous"] is not None
            ),
            30,
            "output statistics of v2 with v1's kept",
            agent,
        )
        outputs = tap.docs("/telemetry")[-1]["outputs"][MODEL]
        assert outputs["previous"]["version"] == 1 and outputs["previous"]["frames"] > 0
    finally:
        tap.close()


@pytest.mark.parametrize("shadow_registry", ["broken"], indirect=True)
def test_a_candidate_that_cannot_be_loaded_fails_and_the_active_model_serves_on(
    tmp_path: Path, broker: Mosquitto, shadow_registry: Path, agents: list[AgentProcess]
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = _start(tmp_path, broker, shadow_registry, agents)
        _serving_v1(tap, agent)
        _instruct(broker, sample_pct=100)
        wait_alive(lambda: bool(_events(tap, "shadow_failed")), 60, "shadow_failed", agent)
        failed = _events(tap, "shadow_failed")[0]
        assert failed["version"] == 2 and failed["error"]
        wait_alive(
            lambda: (s := _shadow(tap)) is not None and s["phase"] == "failed",
            30,
            "failed in telemetry",
            agent,
        )
        count = len(tap.docs("/results"))
        wait_alive(lambda: len(tap.docs("/results")) >= count + 10, 30, "results go on", agent)
        assert {r["version"] for r in tap.docs("/results")} == {1}
        assert tap.docs("/state")[-1]["serving"] == 1
        assert agent.alive()
    finally:
        tap.close()
