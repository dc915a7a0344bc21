"""Home Assistant MQTT discovery: the payloads against HA's documented schema, their
templates rendered with jinja2 (as HA renders them), and a real agent under the shipped
ACL publishing, republishing and clearing them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.config import HomeAssistantConfig, ResultsConfig, ha_slug, load_config, parse_config
from agent.errors import ConfigError
from agent.homeassistant import Discovery, discovery_configs, label_off_delay, stale_topics
from agent.homeassistant_publish import STATE_FILE, DiscoveryPublisher
from agent.mqtt import Incoming
from tests.agentproc import AgentProcess, wait_alive
from tests.broker import Mosquitto, SecureBroker, subscriber

BASE = "edge/pi-door-01"
ON = HomeAssistantConfig(discovery=True, labels=["person", "Traffic light"], off_delay_s=7)

# What Home Assistant documents for each MQTT platform (home-assistant.io/integrations/
# sensor.mqtt, binary_sensor.mqtt, update.mqtt; the device block and availability in
# the MQTT integration's discovery section). HA drops keys it does not know without a
# word, so a misspelt key would silently do nothing: every key must be listed here.
COMMON_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "icon", "json_attributes_template", "json_attributes_topic", "name",
    "origin", "qos", "unique_id", "state_topic", "value_template",
}  # fmt: skip
PLATFORM_KEYS = {
    "sensor": {
        "device_class", "expire_after", "force_update", "last_reset_value_template",
        "options", "state_class", "suggested_display_precision", "unit_of_measurement",
    },
    "binary_sensor": {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off",
        "payload_on",
    },
    "update": {
        "command_topic", "device_class", "display_precision", "latest_version_template",
        "latest_version_topic", "payload_install", "release_summary", "release_url",
        "retain", "title",
    },
}  # fmt: skip
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "update": set()}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
DEVICE_CLASSES = {
    "sensor": {"duration", "temperature", "enum"},
    "binary_sensor": {"occupancy", "motion"},
}
UNITS = {"duration": {"ms", "s", "min", "h", "d"}, "temperature": {"°C", "°F", "K"}}
STATE_CLASSES = {"measurement", "total", "total_increasing"}

_env = ImmutableSandboxedEnvironment()  # what HA's templates run in


def render(template: str, payload: bytes) -> str:
    """A value_template as HA renders it: ``value`` (text) and ``value_json`` (parsed)."""
    text = payload.decode()
    return _env.from_string(template).render(value=text, value_json=json.loads(text)).strip()


def configs(
    config: HomeAssistantConfig = ON,
    device: str = "pi-door-01",
    results: ResultsConfig | None = None,
    pipelines: tuple[tuple[str, ResultsConfig], ...] = (),
    models: tuple[str, ...] = (),
) -> list[Discovery]:
    return discovery_configs(
        device,
        f"edge/{device}",
        config,
        agent_version="0.1.0",
        telemetry_interval_s=10,
        results=results,
        pipelines=pipelines,
        models=models,
    )


# pipelines: (names as the config allows them), each publishing its own way
PIPELINES = (
    ("door", ResultsConfig(publish="every")),
    ("Yard-2", ResultsConfig(publish="on_change")),
)
MODELS = ("people", "Faces.v2")  # served by them (a model name may hold '.' and capitals)


def by_id(found: list[Discovery]) -> dict[str, Discovery]:
    return {d.object_id: d for d in found}


# -- the payloads against the schema ---------------------------------------------------------


def test_discovery_is_off_by_default_and_off_publishes_nothing() -> None:
    assert HomeAssistantConfig().discovery is False
    assert configs(HomeAssistantConfig()) == []
    assert configs(HomeAssistantConfig(labels=["person"])) == []


def test_one_device_with_the_sensors_a_binary_sensor_per_label_and_an_update_entity() -> None:
    found = configs()
    assert [(d.component, d.object_id) for d in found] == [
        ("sensor", "fps"),
        ("sensor", "latency_p95"),
        ("sensor", "temperature"),
        ("sensor", "tpu_temperature"),
        ("sensor", "cpu"),
        ("sensor", "memory"),
        ("sensor", "model_version"),
        ("sensor", "update_phase"),
        ("binary_sensor", "person_detected"),
        ("binary_sensor", "traffic_light_detected"),
        ("update", "model"),
    ]
    assert {json.dumps(d.config["device"]) for d in found} == {
        json.dumps(found[0].config["device"])
    }


@pytest.mark.parametrize(
    "discovery",
    configs() + configs(pipelines=PIPELINES, models=MODELS),
    ids=lambda d: f"{d.component}-{d.object_id}",
)
def test_payload_follows_home_assistants_documented_schema(discovery: Discovery) -> None:
    doc = json.loads(discovery.payload())  # what goes on the wire, not the Python dict
    component = discovery.component
    assert discovery.topic == f"homeassistant/{component}/pi-door-01/{discovery.object_id}/config"
    assert set(doc) <= COMMON_KEYS | PLATFORM_KEYS[component], set(doc) - COMMON_KEYS
    assert REQUIRED[component] <= set(doc)
    assert set(doc["device"]) == DEVICE_KEYS and doc["device"]["identifiers"]
    assert doc["unique_id"].startswith("edge_pi-door-01_")
    entity_id = doc["default_entity_id"]
    assert entity_id.startswith(f"{component}.pi_door_01_"), entity_id
    assert entity_id.split(".", 1)[1] == ha_slug(entity_id.split(".", 1)[1])
    assert doc["origin"] == {"name": "edge-agent", "sw_version": "0.1.0"}
    (availability,) = doc["availability"]
    assert availability["topic"] == f"{BASE}/status"
    assert (availability["payload_available"], availability["payload_not_available"]) == (
        "online",
        "offline",
    )
    for key in ("state_topic", "json_attributes_topic"):
        if key in doc:
            assert doc[key].startswith(f"{BASE}/"), doc[key]
    if "device_class" in doc:
        assert doc["device_class"] in DEVICE_CLASSES.get(component, set())
        if doc["device_class"] in UNITS:
            assert doc["unit_of_measurement"] in UNITS[doc["device_class"]]
        if doc["device_class"] == "enum":
            assert doc["options"] and "state_class" not in doc and "unit_of_measurement" not in doc
    if "state_class" in doc:
        assert doc["state_class"] in STATE_CLASSES
    if "entity_category" in doc:
        assert doc["entity_category"] in ("diagnostic", "config")
    for key in ("value_template", "json_attributes_template", "availability"):
        templates = [a["value_template"] for a in doc[key]] if key == "availability" else []
        templates += [doc[key]] if isinstance(doc.get(key), str) else []
        for template in templates:
            _env.parse(template)  # valid Jinja


def test_unique_ids_are_unique_across_devices_and_entities() -> None:
    ids = [d.config["unique_id"] for dev in ("pi-a", "pi-b") for d in configs(device=dev)]
    assert len(ids) == len(set(ids)) == 22


def test_the_discovery_prefix_and_off_delay_come_from_the_config() -> None:
    cats = HomeAssistantConfig(discovery=True, prefix="ha/site1", labels=["cat"])
    found = by_id(configs(cats, results=ResultsConfig(publish="every")))
    assert found["cat_detected"].topic == "ha/site1/binary_sensor/pi-door-01/cat_detected/config"
    assert found["cat_detected"].config["off_delay"] == 10
    every = ResultsConfig(publish="every")
    assert by_id(configs(results=every))["person_detected"].config["off_delay"] == 7


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        (ResultsConfig(publish="on_change"), None),  # the change sends OFF; a delay would lie
        (ResultsConfig(publish="every"), 7),
        (ResultsConfig(publish="interval", interval_s=2), 7),
        (ResultsConfig(publish="interval", interval_s=30), 61),  # longer than two intervals
    ],
)
def test_off_delay_follows_how_results_are_published(
    results: ResultsConfig, expected: int | None
) -> None:
    assert label_off_delay(7, results) == expected
    config = by_id(configs(results=results))["person_detected"].config
    assert config.get("off_delay") == expected


@pytest.mark.parametrize("device", ["pi-door-01", "cam_2", "A-b_c-9"])
def test_discovery_topics_match_home_assistants_pattern(device: str) -> None:
    # homeassistant/components/mqtt/discovery.py: TOPIC_MATCHER's node id and object id
    pattern = re.compile(
        r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
    )
    several = configs(device=device, pipelines=PIPELINES, models=MODELS)
    for discovery in configs(device=device) + several:
        rest = discovery.topic.removeprefix("homeassistant/")
        assert pattern.fullmatch(rest), discovery.topic


def test_a_device_id_with_a_dot_is_refused_with_discovery_on(tmp_path: Path) -> None:
    base = f"device: {{id: cam.lobby}}\nstore: {{dir: {tmp_path}}}\n"
    with pytest.raises(ConfigError) as refused:
        parse_config(base + "homeassistant: {discovery: true}\n")
    assert "homeassistant.discovery: device.id 'cam.lobby' has a '.'" in str(refused.value)
    assert parse_config(base).device.id == "cam.lobby"  # without discovery the id is fine


# -- the templates, rendered against the agent's documents -----------------------------------

TELEMETRY = {
    "schema": 1, "seq": 3, "id": "ab", "ts": 1.0, "agent_version": "0.1.0", "cpu_pct": 12.5,
    "mem_pct": 41.0, "temp_c": 48.3, "tpu_temp_c": None,
    "inference": {"fps": 19.7, "latency_ms_p95": 12.25, "model": "colours"},
}  # fmt: skip
STATE = {
    "schema": 1, "seq": 2, "id": "cd", "ts": 1.0, "agent_version": "0.1.0", "model": "colours",
    "version": 2, "serving": 2, "backend": "cpu", "previous": 1, "phase": "succeeded",
    "update": {"version": 2, "phase": "probation", "outcome": "succeeded"}, "desired": None,
}  # fmt: skip


def _with(doc: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**doc, **changes}).encode()


@pytest.mark.parametrize(
    ("object_id", "payload", "expected"),
    [
        ("fps", _with(TELEMETRY), "19.7"),
        ("fps", _with(TELEMETRY, inference=None), "None"),  # HA: unknown
        ("latency_p95", _with(TELEMETRY), "12.25"),
        ("temperature", _with(TELEMETRY), "48.3"),
        ("temperature", _with(TELEMETRY, temp_c=None), "None"),
        ("tpu_temperature", _with(TELEMETRY), "None"),
        ("tpu_temperature", _with(TELEMETRY, tpu_temp_c=61.0), "61.0"),
        ("cpu", _with(TELEMETRY), "12.5"),
        ("memory", _with(TELEMETRY), "41.0"),
        ("model_version", _with(STATE), "2"),
        ("model_version", _with(STATE, version=None), "None"),
        ("update_phase", _with(STATE), "succeeded"),
        ("update_phase", _with(STATE, phase="downloading"), "downloading"),
    ],
)
def test_sensor_templates_give_the_documents_values(
    object_id: str, payload: bytes, expected: str
) -> None:
    assert render(by_id(configs())[object_id].config["value_template"], payload) == expected


def test_several_pipelines_get_label_sensors_fps_and_latency_each() -> None:
    found = configs(pipelines=PIPELINES)
    ids = [(d.component, d.object_id) for d in found]
    assert ids[:8] == [(d.component, d.object_id) for d in configs()][:8]  # the device's
    assert ids[8:] == [
        ("sensor", "door_fps"),
        ("sensor", "door_latency_p95"),
        ("sensor", "Yard-2_fps"),
        ("sensor", "Yard-2_latency_p95"),
        ("binary_sensor", "door_person_detected"),
        ("binary_sensor", "door_traffic_light_detected"),
        ("binary_sensor", "Yard-2_person_detected"),
        ("binary_sensor", "Yard-2_traffic_light_detected"),
        ("update", "model"),
    ]
    got = by_id(found)
    yard = got["Yard-2_person_detected"].config
    assert yard["state_topic"] == f"{BASE}/results/Yard-2"
    assert yard["name"] == "Yard-2: person detected"
    assert yard["default_entity_id"] == "binary_sensor.pi_door_01_yard_2_person_detected"
    assert "off_delay" not in yard  # on_change: the change sends OFF
    assert got["door_person_detected"].config["off_delay"] == 7  # every: the delay
    assert got["door_fps"].config["state_topic"] == f"{BASE}/telemetry"
    assert got["door_fps"].config["expire_after"] == 60
    ids_only = [d.config["unique_id"] for d in found]
    assert len(ids_only) == len(set(ids_only))


def test_object_ids_a_pipeline_and_a_label_spell_alike_stay_distinct() -> None:
    config = HomeAssistantConfig(discovery=True, labels=["b c", "c"])
    found = configs(config, pipelines=(("a", ResultsConfig()), ("a_b", ResultsConfig())))
    labels = [d.object_id for d in found if d.component == "binary_sensor"]
    assert labels == ["a_b_c_detected", "a_c_detected", "a_b_b_c_detected", "a_b_c_detected_2"]
    topics = [d.topic for d in found]
    assert len(topics) == len(set(topics))


PIPELINE_TELEMETRY = {
    **TELEMETRY,
    "pipelines": {
        "door": {"fps": 9.5, "latency_ms_p95": 30.25, "model": "colours", "cascade": None},
    },
}


@pytest.mark.parametrize(
    ("object_id", "payload", "expected"),
    [
        ("door_fps", _with(PIPELINE_TELEMETRY), "9.5"),
        ("door_latency_p95", _with(PIPELINE_TELEMETRY), "30.25"),
        ("Yard-2_fps", _with(PIPELINE_TELEMETRY), "None"),  # nothing serving there yet
        ("door_fps", _with(TELEMETRY), "None"),  # no pipelines in the document
        ("door_fps", _with(TELEMETRY, pipelines=None), "None"),
        ("door_fps", _with(TELEMETRY, pipelines={"door": None}), "None"),
        ("door_fps", _with(TELEMETRY, pipelines={"door": {"fps": None}}), "None"),
        ("fps", _with(PIPELINE_TELEMETRY), "19.7"),  # the device's: the first pipeline's
    ],
)
def test_pipeline_sensor_templates_read_their_pipelines_figures(
    object_id: str, payload: bytes, expected: str
) -> None:
    template = by_id(configs(pipelines=PIPELINES))[object_id].config["value_template"]
    assert render(template, payload) == expected


def _result(**found: list[str]) -> bytes:
    doc: dict[str, Any] = {"schema": 1, "seq": 1, "id": "x", "ts": 1.0, "frame": 3}
    for key, labels in found.items():
        doc[key] = [{"id": i, "label": label, "score": 0.9} for i, label in enumerate(labels)]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("object_id", "payload", "expected"),
    [
        ("person_detected", _result(detections=["dog", "person"]), "ON"),
        ("person_detected", _result(classes=["person"]), "ON"),
        ("person_detected", _result(detections=["dog"]), "OFF"),
        ("person_detected", _result(detections=[]), "OFF"),
        ("person_detected", _result(), "OFF"),  # a regression model's values
        ("person_detected", _result(detections=["Person"]), "OFF"),  # labels are exact
        ("traffic_light_detected", _result(detections=["Traffic light"]), "ON"),
    ],
)
def test_label_templates_turn_on_for_their_label_only(
    object_id: str, payload: bytes, expected: str
) -> None:
    assert render(by_id(configs())[object_id].config["value_template"], payload) == expected


def test_pipeline_label_sensors_turn_on_for_their_label_only() -> None:
    found = by_id(configs(pipelines=PIPELINES))
    template = found["Yard-2_person_detected"].config["value_template"]
    assert render(template, _result(detections=["dog", "person"])) == "ON"
    assert render(template, _result(detections=["dog"])) == "OFF"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"installed_version": "2", "latest_version": "2", "in_progress": False}),
        (
            {"phase": "downloading", "update": {"version": 3, "phase": "downloading"}},
            {"installed_version": "2", "latest_version": "3", "in_progress": True},
        ),
        (
            {"desired": {"model": "colours", "version": 1, "issued_at": 1.0, "source": "device"}},
            {"installed_version": "2", "latest_version": "1", "in_progress": False},
        ),
        (
            {"model": None, "version": None, "update": None, "phase": "idle"},
            {"installed_version": None, "latest_version": None, "in_progress": False},
        ),
        (  # v3 rolled back: not "an update available" for ever
            {"update": {"version": 3, "phase": "probation", "outcome": "rolled_back"}},
            {"installed_version": "2", "latest_version": "2", "in_progress": False},
        ),
        (
            {"update": {"version": 3, "phase": "activating", "outcome": "failed"}},
            {"installed_version": "2", "latest_version": "2", "in_progress": False},
        ),
        (  # a desired release this device marked bad
            {
                "desired": {"model": "colours", "version": 3, "issued_at": 1.0, "source": "device"},
                "bad": ["colours@3"],
            },
            {"installed_version": "2", "latest_version": "2", "in_progress": False},
        ),
    ],
)
def test_update_entity_reads_installed_and_latest_from_the_state(
    changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    rendered = json.loads(
        render(by_id(configs())["model"].config["value_template"], _with(STATE, **changes))
    )
    assert {k: rendered[k] for k in expected} == expected


# -- several models: a version sensor and an update entity each ---------------------------------


def test_several_models_get_a_version_sensor_and_an_update_entity_each() -> None:
    found = configs(pipelines=PIPELINES, models=MODELS)
    ids = [(d.component, d.object_id) for d in found]
    assert ("sensor", "model_version") not in ids and ("update", "model") not in ids
    assert [i for i in ids if i[1].startswith("model_")] == [
        ("sensor", "model_people_version"),
        ("sensor", "model_faces_v2_version"),
        ("update", "model_people"),
        ("update", "model_faces_v2"),
    ]
    got = by_id(found)
    faces = got["model_faces_v2"]
    assert faces.topic == "homeassistant/update/pi-door-01/model_faces_v2/config"
    assert faces.config["unique_id"] == "edge_pi-door-01_model_faces_v2"
    assert faces.config["default_entity_id"] == "update.pi_door_01_model_faces_v2"
    assert faces.config["title"] == "Faces.v2" and faces.config["state_topic"] == f"{BASE}/state"
    version = got["model_people_version"].config
    assert version["unique_id"] == "edge_pi-door-01_model_people_version"
    assert version["default_entity_id"] == "sensor.pi_door_01_model_people_version"
    # the legacy shape keeps exactly its entities and topics
    legacy = by_id(configs())
    assert legacy["model"].topic == "homeassistant/update/pi-door-01/model/config"
    assert legacy["model"].config["unique_id"] == "edge_pi-door-01_model"
    assert legacy["model_version"].config["unique_id"] == "edge_pi-door-01_model_version"
    assert configs() == configs(models=())


def test_models_whose_names_slug_alike_keep_distinct_entities() -> None:
    found = configs(models=("a.b", "a_b", "A-B"))
    ids = [d.object_id for d in found if d.object_id.startswith("model_")]
    assert ids == [
        "model_a_b_version",
        "model_a_b_version_2",
        "model_a_b_version_3",
        "model_a_b",
        "model_a_b_2",
        "model_a_b_3",
    ]
    unique = [d.config["unique_id"] for d in found]
    assert len(unique) == len(set(unique))


def _part(**changes: Any) -> dict[str, Any]:
    fields = ("model", "version", "serving", "backend", "previous", "phase", "update", "desired")
    return {**{k: STATE[k] for k in fields}, "bad": [], "last_error": None, **changes}


TWO_MODELS = _with(
    STATE,
    models={
        "people": _part(model="people", version=3),
        "Faces.v2": _part(
            model="Faces.v2",
            version=5,
            phase="downloading",
            update={"version": 6, "phase": "downloading"},
        ),
    },
)


@pytest.mark.parametrize(
    ("model", "payload", "expected"),
    [
        ("people", TWO_MODELS, {"installed_version": "3", "latest_version": "2"}),
        (
            "Faces.v2",
            TWO_MODELS,
            {"installed_version": "5", "latest_version": "6", "in_progress": True},
        ),
        ("people", _with(STATE), {}),  # an older agent's state: HA ignores "{}"
        ("other", TWO_MODELS, {}),  # not (yet) in the state
        ("people", _with(STATE, models=None), {}),
    ],
)
def test_each_models_update_entity_reads_its_own_part_of_the_state(
    model: str, payload: bytes, expected: dict[str, Any]
) -> None:
    found = by_id(configs(models=("people", "Faces.v2", "other")))
    config = found[f"model_{ha_slug(model)}"].config
    rendered = json.loads(render(config["value_template"], payload))
    assert {k: rendered[k] for k in expected} == expected and bool(rendered) == bool(expected)


@pytest.mark.parametrize(
    ("model", "payload", "version", "attributes"),
    [
        ("people", TWO_MODELS, "3", {"model": "people", "serving": 2}),
        ("Faces.v2", TWO_MODELS, "5", {"model": "Faces.v2", "serving": 2}),
        ("Faces.v2", _with(STATE), "None", {}),
        ("people", _with(STATE, models={"people": "junk"}), "None", {}),
    ],
)
def test_each_models_version_sensor_reads_its_own_part_of_the_state(
    model: str, payload: bytes, version: str, attributes: dict[str, Any]
) -> None:
    config = by_id(configs(models=MODELS))[f"model_{ha_slug(model)}_version"].config
    assert render(config["value_template"], payload) == version
    got = json.loads(render(config["json_attributes_template"], payload))
    assert {k: got[k] for k in attributes} == attributes and bool(got) == bool(attributes)


def test_a_model_no_longer_served_has_its_configs_cleared(tmp_path: Path) -> None:
    two = configs(pipelines=PIPELINES, models=MODELS)
    one = configs(pipelines=PIPELINES[:1], models=MODELS[:1])
    assert stale_topics([d.topic for d in two], one) == [
        "homeassistant/binary_sensor/pi-door-01/Yard-2_person_detected/config",
        "homeassistant/binary_sensor/pi-door-01/Yard-2_traffic_light_detected/config",
        "homeassistant/sensor/pi-door-01/Yard-2_fps/config",
        "homeassistant/sensor/pi-door-01/Yard-2_latency_p95/config",
        "homeassistant/sensor/pi-door-01/model_faces_v2_version/config",
        "homeassistant/update/pi-door-01/model_faces_v2/config",
    ]
    # the publisher's state file carries them across a restart: the next start clears them
    sent: list[tuple[str, bytes]] = []
    first = DiscoveryPublisher("pi-door-01", two, "homeassistant", tmp_path, lambda *_: True)
    first.start()
    first.on_connect()
    later = DiscoveryPublisher(
        "pi-door-01", one, "homeassistant", tmp_path, lambda t, p: sent.append((t, p)) is None
    )
    later.start()
    later.on_connect()
    cleared = sorted(t for t, p in sent if p == b"")
    assert cleared == stale_topics([d.topic for d in two], one)
    assert json.loads((tmp_path / STATE_FILE).read_text())["topics"] == sorted(d.topic for d in one)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"state":"online","groups":[],"agent_version":"0.1.0"}', "online"),
        (b'{"state":"offline","reason":"lost","groups":[]}', "offline"),  # the Last Will
    ],
)
def test_availability_follows_the_status_topic(payload: bytes, expected: str) -> None:
    for discovery in configs():
        (availability,) = discovery.config["availability"]
        assert render(availability["value_template"], payload) == expected


HA_PYTHON = os.environ.get("EDGE_AGENT_HA_PYTHON")


@pytest.mark.skipif(
    not HA_PYTHON,
    reason="EDGE_AGENT_HA_PYTHON: a Python with homeassistant (docs/homeassistant.md)",
)
def test_home_assistants_own_code_accepts_the_payloads_and_renders_the_values(
    tmp_path: Path,
) -> None:
    found = configs()
    request = {
        "configs": [{"component": d.component, "payload": d.payload().decode()} for d in found],
        "documents": {
            "telemetry": TELEMETRY,
            "state": {**STATE, "phase": "downloading", "update": {"version": 3}},
            "results": json.loads(_result(detections=["person"])),
            "status": {"state": "offline", "reason": "lost"},
        },
    }
    script = Path(__file__).with_name("ha_schema_check.py")
    done = subprocess.run(
        [str(HA_PYTHON), str(script), str(tmp_path)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = dict(zip([d.object_id for d in found], json.loads(done.stdout), strict=True))
    assert not [r for r in results.values() if "error" in r], results
    # keys newer than the Home Assistant tested may be dropped, never ours otherwise
    assert {k for r in results.values() for k in r["dropped"]} <= {"default_entity_id", "options"}
    assert {r["available"] for r in results.values()} == {"offline"}
    assert results["fps"]["value"] == "19.7" and results["tpu_temperature"]["value"] == "None"
    assert results["person_detected"]["value"] == "ON"
    assert results["traffic_light_detected"]["value"] == "OFF"
    assert json.loads(results["model"]["value"]) == {
        "installed_version": "2",
        "latest_version": "3",
        "in_progress": True,
        "title": "colours",
    }


# -- which retained configs to clear ------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "config", "expected"),
    [
        ([], ON, []),
        ([d.topic for d in configs()], ON, []),
        (
            [d.topic for d in configs()],
            HomeAssistantConfig(discovery=True, labels=["person"]),
            ["homeassistant/binary_sensor/pi-door-01/traffic_light_detected/config"],
        ),
        ([d.topic for d in configs()], HomeAssistantConfig(), sorted(d.topic for d in configs())),
    ],
)
def test_stale_topics_are_those_published_before_and_no_longer_wanted(
    previous: list[str], config: HomeAssistantConfig, expected: list[str]
) -> None:
    assert stale_topics(previous, configs(config)) == expected


# -- the config section -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("{discovery: yes please}", "homeassistant.discovery: 'yes please' is not true or"),
        ("{prefix: 'ha/#'}", "homeassistant.prefix: must be topic levels joined by '/'"),
        ("{labels: ['a\"b']}", "homeassistant.labels[0]: must be letters, digits, spaces"),
        ("{labels: [person, Person]}", "'person' and 'Person' give the same entity id"),
        ("{off_delay_s: 0}", "homeassistant.off_delay_s: Expected `int` >= 1"),
        ("{labels: person}", "homeassistant.labels: Expected `array`, got `str`"),
        ("{discover: true}", "homeassistant.discover: unknown key"),
    ],
)
def test_a_bad_homeassistant_section_is_one_line_naming_the_key(
    tmp_path: Path, section: str, error: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"homeassistant: {section}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    text = str(raised.value)
    assert error in text and "\n" not in text.strip(), text


# -- the publisher's state file --------------------------------------------------------------


def _publisher(
    tmp_path: Path, config: HomeAssistantConfig, sent: list[tuple[str, bytes]]
) -> DiscoveryPublisher:
    def publish(topic: str, payload: bytes) -> bool:
        sent.append((topic, payload))
        return True

    return DiscoveryPublisher("pi-door-01", configs(config), config.prefix, tmp_path, publish)


def test_publisher_clears_what_a_damaged_or_foreign_state_file_cannot_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).write_text(
        '{"topics": ["homeassistant/sensor/pi-door-01/fps/config",'
        ' "edge/pi-door-01/desired", "homeassistant/sensor/other/fps/config"]}'
    )
    sent: list[tuple[str, bytes]] = []
    publisher = _publisher(tmp_path, HomeAssistantConfig(), sent)
    publisher.start()
    publisher.on_connect()
    # only this device's discovery topics are ever cleared, whatever the file says
    assert sent == [("homeassistant/sensor/pi-door-01/fps/config", b"")]
    assert json.loads((tmp_path / STATE_FILE).read_text())["topics"] == []
    for damaged in ("{not json", "[" * 100_000, '["a"]', '{"topics": "a"}'):
        (tmp_path / STATE_FILE).write_text(damaged)
        publisher = _publisher(tmp_path, HomeAssistantConfig(), sent)
        publisher.start()  # one log line, never an exception
        assert "not valid" in caplog.text and not publisher.active
        caplog.clear()


def test_birth_message_republishes_only_for_online_and_not_in_a_flood(tmp_path: Path) -> None:
    sent: list[tuple[str, bytes]] = []
    publisher = _publisher(tmp_path, ON, sent)
    publisher.start()
    publisher.on_connect()
    assert len(sent) == 11
    publisher._last -= 10  # as if connected 10 s ago
    for payload in (b"offline", b"online" * 1000, b"online", b"online", b"online"):
        publisher.on_birth(Incoming("homeassistant/status", payload, None, None))
    assert len(sent) == 22  # one republish: the rest came within BIRTH_MIN_S


# -- a real agent -------------------------------------------------------------------------------


def _serving(states: list[Any]) -> bool:
    return bool(states) and json.loads(states[-1].payload)["serving"] == 1


def _agent(
    tmp_path: Path, url: str, registry: Path, ha: dict[str, Any], mqtt: dict[str, Any] | None = None
) -> AgentProcess:
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        "mqtt": {"url": url, "reconnect_max_s": 1, "keepalive_s": 5, **(mqtt or {})},
        "homeassistant": ha,
    }
    return AgentProcess(tmp_path / "dev-a", "dev-a", settings)


def test_agent_under_the_shipped_acl_publishes_keeps_and_clears_its_discovery_configs(
    tmp_path: Path, secure_broker: SecureBroker, registry: Path, agents: list[AgentProcess]
) -> None:
    tls = secure_broker.agent_mqtt("dev-a")
    url = tls.pop("url")
    ha = {"discovery": True, "labels": ["red", "green", "blue"], "off_delay_s": 5}
    agent = _agent(tmp_path, url, registry, ha, tls).start()
    agents.append(agent)
    expected = {
        d.topic
        for d in discovery_configs(
            "dev-a",
            "edge/dev-a",
            HomeAssistantConfig(**ha),
            agent_version="x",
            telemetry_interval_s=1,
        )
    }
    assert len(expected) == 12
    with secure_broker.client("fleet", ["edge/dev-a/#"]) as fleet:
        wait_alive(lambda: _serving(fleet.messages("edge/dev-a/state")), 30, "v1 serving", agent)
        wait_alive(lambda: bool(fleet.messages("edge/dev-a/results")), 30, "results", agent)
        # Home Assistant, arriving later, gets every config retained
        with secure_broker.client("fleet", ["homeassistant/#"]) as hass:
            got = hass.wait_for(lambda ms: {m.topic for m in ms} >= expected, 10)
            assert all(m.retain for m in got)
            configs_seen = {m.topic: json.loads(m.payload) for m in got}

            # its birth message makes the agent publish them again
            # (at most every BIRTH_MIN_S: a flood of them is not a flood of configs)
            def republished() -> bool:
                assert hass.publish("homeassistant/status", b"online") == "Success"
                time.sleep(0.5)
                return sum(m.topic in expected for m in hass.messages()) >= 24

            wait_alive(republished, 15, "configs published again on the birth message", agent)
        # the templates give the real documents' values
        telemetry = fleet.messages("edge/dev-a/telemetry")[-1].payload
        state = fleet.messages("edge/dev-a/state")[-1].payload
        cpu = configs_seen["homeassistant/sensor/dev-a/cpu/config"]
        assert cpu["state_topic"] == "edge/dev-a/telemetry"
        assert float(render(cpu["value_template"], telemetry)) == json.loads(telemetry)["cpu_pct"]
        fps = configs_seen["homeassistant/sensor/dev-a/fps/config"]
        assert (
            float(render(fps["value_template"], telemetry))
            == json.loads(telemetry)["inference"]["fps"]
        )
        update = configs_seen["homeassistant/update/dev-a/model/config"]
        assert json.loads(render(update["value_template"], state))["installed_version"] == "1"
        for message in fleet.messages("edge/dev-a/results")[-5:]:
            label = json.loads(message.payload)["classes"][0]["label"]
            on = configs_seen[f"homeassistant/binary_sensor/dev-a/{label}_detected/config"]
            assert render(on["value_template"], message.payload) == "ON"
        status_config = configs_seen["homeassistant/sensor/dev-a/temperature/config"][
            "availability"
        ][0]
        status = fleet.messages("edge/dev-a/status")[-1].payload
        assert render(status_config["value_template"], status) == "online"

        # SIGKILL: the Last Will makes every entity unavailable
        agent.kill()
        fleet.wait_for(lambda _: b'"lost"' in fleet.messages("edge/dev-a/status")[-1].payload, 15)
        status = fleet.messages("edge/dev-a/status")[-1].payload
        assert render(status_config["value_template"], status) == "offline"

    # discovery off: the next start clears every config it had published
    agent = _agent(tmp_path, url, registry, {"discovery": False}, tls)
    with secure_broker.client("fleet", ["homeassistant/#"]) as hass:
        agents.append(agent.start())
        hass.wait_for(lambda ms: {m.topic for m in ms if m.payload == b""} >= expected, 30)
    # and a newcomer finds none retained (the marker proves the retained ones came)
    with secure_broker.client("fleet") as admin:
        marked = admin.publish("homeassistant/zz/marker", b"m", retain=True)
        assert marked in ("Success", "No matching subscribers")
    with secure_broker.client("fleet", ["homeassistant/#"]) as late:
        late.wait_for_topic("homeassistant/zz/marker")
        assert {m.topic for m in late.messages()} == {"homeassistant/zz/marker"}
    assert agent.terminate() == 0


def test_configs_come_back_after_a_broker_restart_without_persistence(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, broker.url, registry, {"discovery": True}).start()
    agents.append(agent)
    topic = "homeassistant/update/dev-a/model/config"
    with subscriber(broker.url, ["homeassistant/#"]) as hass:
        wait_alive(lambda: bool(hass.messages(topic)), 30, "the update config", agent)
    broker.restart()  # persistence false: every retained message is gone
    with subscriber(broker.url, ["homeassistant/#"]) as hass:
        wait_alive(lambda: bool(hass.messages(topic)), 30, "the config after the restart", agent)
    with subscriber(broker.url, ["homeassistant/#"]) as late:  # retained again
        assert late.wait_for_topic(topic).retain
        assert len(late.wait_for(lambda ms: len(ms) == 9)) == 9
    assert agent.terminate() == 0
