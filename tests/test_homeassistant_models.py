"""Home Assistant discovery of a real agent serving several models (issue 20's
leftovers): two pipelines and a cascade (three models) give a version sensor and an
update entity per model whose templates read the agent's real state, none of the single
model's; a restart serving one model clears the other two's configs. Real agent, real
mosquitto, the ``file://`` registry of tests/test_pipelines.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from agent.config import ha_slug
from tests.agentproc import MODEL, AgentProcess, wait_alive
from tests.broker import Mosquitto, Received, subscriber
from tests.conftest import Models
from tests.test_homeassistant import render
from tests.test_pipelines import CASCADE, DEV, OTHER, _registry, _two_pipelines


def _topics(model: str) -> tuple[str, str]:
    """The update entity's and the version sensor's discovery topics of ``model``."""
    slug = ha_slug(model)
    return (
        f"homeassistant/update/{DEV}/model_{slug}/config",
        f"homeassistant/sensor/{DEV}/model_{slug}_version/config",
    )


def _all_serving(messages: list[Received]) -> bool:
    states = [m for m in messages if m.topic == f"edge/{DEV}/state"]
    if not states:
        return False
    served = json.loads(states[-1].payload).get("models", {})
    return set(served) == {MODEL, OTHER, CASCADE} and all(
        m["serving"] == 1 for m in served.values()
    )


def test_an_agent_serving_three_models_has_an_update_entity_each_and_clears_removed_ones(
    tmp_path: Path, broker: Mosquitto, models: Models, agents: list[AgentProcess]
) -> None:
    agent = _two_pipelines(tmp_path, broker, _registry(tmp_path, models))
    settings = yaml.safe_load(agent.config_path.read_text())
    settings["homeassistant"] = {"discovery": True}
    agent.config_path.write_text(yaml.safe_dump(settings))
    agents.append(agent.start())
    wanted = {topic for m in (MODEL, OTHER, CASCADE) for topic in _topics(m)}
    with subscriber(broker.url, ["homeassistant/#", f"edge/{DEV}/state"]) as tap:
        wait_alive(
            lambda: _all_serving(tap.messages()) and wanted <= {m.topic for m in tap.messages()},
            60,
            "three models serving and their discovery configs",
            agent,
        )
        got = {m.topic: json.loads(m.payload) for m in tap.messages() if m.payload}
        state = [m for m in tap.messages() if m.topic == f"edge/{DEV}/state"][-1].payload
    # the single model's entities are not made: each model has its own
    assert f"homeassistant/update/{DEV}/model/config" not in got
    assert f"homeassistant/sensor/{DEV}/model_version/config" not in got
    for model in (MODEL, OTHER, CASCADE):
        update_topic, version_topic = _topics(model)
        update, version = got[update_topic], got[version_topic]
        assert update["title"] == model
        rendered = json.loads(render(update["value_template"], state))
        assert (rendered["installed_version"], rendered["latest_version"]) == ("1", "1")
        assert render(version["value_template"], state) == "1"
        attributes = json.loads(render(version["json_attributes_template"], state))
        assert attributes["model"] == model
    assert agent.terminate() == 0

    # only the door pipeline (MODEL) from now on: the other two models' configs go
    settings["pipelines"] = settings["pipelines"][:1]
    agent.config_path.write_text(yaml.safe_dump(settings))
    gone = {topic for m in (OTHER, CASCADE) for topic in _topics(m)} | {
        f"homeassistant/sensor/{DEV}/yard_{sensor}/config" for sensor in ("fps", "latency_p95")
    }  # and the yard pipeline's own sensors
    with subscriber(broker.url, ["homeassistant/#"]) as hass:
        agent.start()
        cleared = hass.wait_for(lambda ms: {m.topic for m in ms if m.payload == b""} >= gone, 30)
        assert {m.topic for m in cleared if m.payload == b""} == gone
        kept = {m.topic for m in cleared if m.payload}
        assert set(_topics(MODEL)) <= kept
    with subscriber(broker.url, ["homeassistant/#"]) as late:  # nothing of theirs retained
        late.wait_for(lambda ms: set(_topics(MODEL)) <= {m.topic for m in ms}, 10)
        assert not gone & {m.topic for m in late.messages()}
    assert agent.terminate() == 0
