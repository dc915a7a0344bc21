"""Home Assistant MQTT discovery: the configs that make one HA device of this agent.

Pure: no I/O. :func:`discovery_configs` turns the agent's identity and the
``homeassistant`` config section into the retained discovery messages Home Assistant
reads under ``<prefix>/<component>/<device>/<object_id>/config`` (its MQTT discovery
schema: a ``device`` block, ``unique_id``, ``availability``, ``state_topic`` and
``value_template``). The entities read the agent's own retained topics, so nothing new
is published for them:

- sensors from ``<topic_prefix>/<device>/telemetry`` (fps, p95 latency, temperature,
  TPU temperature, CPU, memory) and ``…/state`` (model version, update phase);
- a binary sensor per configured label from ``…/results`` (``ON`` when a class or a
  detection has that label; ``off_delay`` turns it off);
- with several pipelines (``pipelines:``): the label sensors once per pipeline, from
  ``…/results/<pipeline>`` (object ids ``<pipeline>_<label>_detected``), and each
  pipeline's fps and p95 latency from telemetry's ``pipelines`` (``<pipeline>_fps``,
  ``<pipeline>_latency_p95``); the device's fps and latency stay the first pipeline's;
- an ``update`` entity from ``…/state``: installed = the active version, latest = the
  newest the agent was told of (its desired state's version, else its latest update's);
- with several models served (``pipelines:``, or a cascade): the model version sensor
  and the update entity once per model, from the state's ``models[<model>]`` (object
  ids ``model_<model>_version`` and ``model_<model>``); the legacy shape keeps its
  single ``model_version`` and ``model``.

Every entity is available only while ``…/status`` says ``online``: the Last Will marks
the whole device unavailable. :func:`stale_topics` says which configs published before
must be cleared (an empty retained message) because the config no longer wants them.
The entities' Jinja templates are :mod:`agent.homeassistant_templates`.
docs/homeassistant.md describes the same; tests/test_homeassistant.py renders every
template with jinja2 against real documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from typing_extensions import NotRequired, TypedDict

from agent.config import HomeAssistantConfig, ResultsConfig, ha_slug
from agent.contract import STATE_PHASES
from agent.homeassistant_templates import (
    MODEL_ATTRIBUTES_TEMPLATE,
    UPDATE_TEMPLATE,
    label_template,
    model_attributes_template,
    model_update_template,
    model_version_template,
    pipeline_number,
    value_number,
)

Component = Literal["sensor", "binary_sensor", "update"]  # the ACL grants these (fleet/acl.py)
MANUFACTURER = "edge-agent"
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
BIRTH_ONLINE = b"online"  # Home Assistant's birth message on <prefix>/status


class DeviceBlock(TypedDict):
    identifiers: list[str]
    name: str
    manufacturer: str
    model: str
    sw_version: str


class Origin(TypedDict):
    name: str
    sw_version: str


class Availability(TypedDict):
    topic: str
    value_template: str
    payload_available: str
    payload_not_available: str


class EntityConfig(TypedDict):
    """One discovery payload (the keys Home Assistant documents, in full, unabbreviated)."""

    name: str
    unique_id: str
    default_entity_id: str
    device: DeviceBlock
    origin: Origin
    availability: list[Availability]
    state_topic: str
    value_template: str
    qos: int
    unit_of_measurement: NotRequired[str]
    device_class: NotRequired[str]
    state_class: NotRequired[str]
    entity_category: NotRequired[str]
    expire_after: NotRequired[int]
    options: NotRequired[list[str]]
    icon: NotRequired[str]
    suggested_display_precision: NotRequired[int]
    json_attributes_topic: NotRequired[str]
    json_attributes_template: NotRequired[str]
    off_delay: NotRequired[int]
    payload_on: NotRequired[str]
    payload_off: NotRequired[str]
    title: NotRequired[str]


@dataclass(frozen=True)
class Discovery:
    """One retained discovery message: where it goes and what it says."""

    component: Component
    object_id: str
    topic: str
    config: EntityConfig

    def payload(self) -> bytes:
        return json.dumps(self.config, separators=(",", ":"), sort_keys=False).encode()


@dataclass(frozen=True)
class Sensor:
    """A sensor read from one of the agent's retained topics (a row of ``SENSORS``)."""

    object_id: str
    name: str
    stream: Literal["telemetry", "state"]
    template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    diagnostic: bool = False
    icon: str | None = None
    precision: int | None = None


SENSORS: tuple[Sensor, ...] = (
    Sensor(
        "fps",
        "Inference rate",
        "telemetry",
        value_number("inference.fps"),
        "fps",
        icon="mdi:speedometer",
        precision=1,
    ),
    Sensor(
        "latency_p95",
        "Latency p95",
        "telemetry",
        value_number("inference.latency_ms_p95"),
        "ms",
        "duration",
        precision=1,
    ),
    Sensor(
        "temperature",
        "Temperature",
        "telemetry",
        value_number("temp_c"),
        "°C",
        "temperature",
        precision=1,
    ),
    Sensor(
        "tpu_temperature",
        "TPU temperature",
        "telemetry",
        value_number("tpu_temp_c"),
        "°C",
        "temperature",
        precision=1,
    ),
    Sensor(
        "cpu", "CPU", "telemetry", value_number("cpu_pct"), "%", icon="mdi:cpu-64-bit", precision=0
    ),
    Sensor(
        "memory",
        "Memory",
        "telemetry",
        value_number("mem_pct"),
        "%",
        icon="mdi:memory",
        precision=0,
    ),
    Sensor(
        "model_version",
        "Model version",
        "state",
        value_number("version"),
        state_class=None,
        diagnostic=True,
        icon="mdi:brain",
    ),
    Sensor(
        "update_phase",
        "Update phase",
        "state",
        "{{ value_json.phase if value_json.phase is defined else None }}",
        device_class="enum",
        state_class=None,
        diagnostic=True,
    ),
)

# Each pipeline's sensors with pipelines: (telemetry's key, object id suffix, name, unit).
PIPELINE_SENSORS = (
    ("fps", "fps", "Inference rate", "fps"),
    ("latency_ms_p95", "latency_p95", "Latency p95", "ms"),
)


def _entity_slug(device: str) -> str:
    return ha_slug(device) or "edge_agent"


def discovery_configs(
    device: str,
    base: str,
    config: HomeAssistantConfig,
    *,
    agent_version: str,
    telemetry_interval_s: float,
    results: ResultsConfig | None = None,
    pipelines: Sequence[tuple[str, ResultsConfig]] = (),
    models: Sequence[str] = (),
) -> list[Discovery]:
    """The discovery messages ``config`` wants for ``device`` whose topics are under
    ``base`` (``<topic_prefix>/<device>``); none when discovery is off. The label
    sensors read ``<base>/results`` (with ``results``' publishing); with ``pipelines``
    (the ``pipelines:`` shape: each one's name and results), one set per pipeline
    reading ``<base>/results/<name>``, and each pipeline's fps and latency sensors.
    With ``models`` (the names of the models served with ``pipelines:`` or a cascade),
    a version sensor (``model_<model>_version``) and an update entity
    (``model_<model>``) per model, reading the state's ``models[<model>]``, instead of
    the single ``model_version`` and ``model`` (the legacy shape's, kept as they are).

    Guarantees: every ``unique_id`` is distinct and starts with ``edge_<device>_``; every
    topic a payload names is under ``base``; discovery topics are
    ``<prefix>/<component>/<device>/<object_id>/config``.
    """
    if not config.discovery:
        return []
    slug = _entity_slug(device)
    block: DeviceBlock = {
        "identifiers": [f"edge-agent_{device}"],
        "name": device,
        "manufacturer": MANUFACTURER,
        "model": "edge-agent",
        "sw_version": agent_version,
    }
    origin: Origin = {"name": "edge-agent", "sw_version": agent_version}
    availability: list[Availability] = [
        {
            "topic": f"{base}/status",
            "value_template": "{{ value_json.state }}",
            "payload_available": STATUS_ONLINE,
            "payload_not_available": STATUS_OFFLINE,
        }
    ]
    # Telemetry is retained: three missed intervals mean the writer is stuck, not offline.
    expire = max(60, int(telemetry_interval_s * 3 + 0.999))

    def common(component: Component, object_id: str, name: str) -> EntityConfig:
        return {
            "name": name,
            "unique_id": f"edge_{device}_{object_id}",
            "default_entity_id": f"{component}.{slug}_{object_id}",
            "device": block,
            "origin": origin,
            "availability": availability,
            "state_topic": "",
            "value_template": "",
            "qos": 1,
        }

    out: list[Discovery] = []

    def add(component: Component, object_id: str, entity: EntityConfig) -> None:
        topic = f"{config.prefix}/{component}/{device}/{object_id}/config"
        out.append(Discovery(component, object_id, topic, entity))

    for sensor in SENSORS:
        if models and sensor.object_id == "model_version":
            continue  # one per model below
        entity = common("sensor", sensor.object_id, sensor.name)
        entity["state_topic"] = f"{base}/{sensor.stream}"
        entity["value_template"] = sensor.template
        if sensor.unit is not None:
            entity["unit_of_measurement"] = sensor.unit
        if sensor.device_class is not None:
            entity["device_class"] = sensor.device_class
        if sensor.device_class == "enum":
            entity["options"] = list(STATE_PHASES)
        if sensor.state_class is not None:
            entity["state_class"] = sensor.state_class
        if sensor.stream == "telemetry":
            entity["expire_after"] = expire
        if sensor.diagnostic:
            entity["entity_category"] = "diagnostic"
        if sensor.icon is not None:
            entity["icon"] = sensor.icon
        if sensor.precision is not None:
            entity["suggested_display_precision"] = sensor.precision
        if sensor.object_id == "model_version":
            entity["json_attributes_topic"] = f"{base}/state"
            entity["json_attributes_template"] = MODEL_ATTRIBUTES_TEMPLATE
        add("sensor", sensor.object_id, entity)

    for model in models:
        object_id = _free_id(f"model_{ha_slug(model)}_version", out)
        entity = common("sensor", object_id, f"Model version ({model})")
        entity["default_entity_id"] = f"sensor.{slug}_{object_id}"
        entity["state_topic"] = f"{base}/state"
        entity["value_template"] = model_version_template(model)
        entity["entity_category"] = "diagnostic"
        entity["icon"] = "mdi:brain"
        entity["json_attributes_topic"] = f"{base}/state"
        entity["json_attributes_template"] = model_attributes_template(model)
        add("sensor", object_id, entity)

    for pipeline, _ in pipelines:
        for key, suffix, name, unit in PIPELINE_SENSORS:
            object_id = _free_id(f"{pipeline}_{suffix}", out)
            entity = common("sensor", object_id, f"{pipeline}: {name}")
            entity["default_entity_id"] = f"sensor.{slug}_{ha_slug(object_id)}"
            entity["state_topic"] = f"{base}/telemetry"
            entity["value_template"] = pipeline_number(pipeline, key)
            entity["unit_of_measurement"] = unit
            if unit == "ms":
                entity["device_class"] = "duration"
            entity["state_class"] = "measurement"
            entity["expire_after"] = expire
            entity["suggested_display_precision"] = 1
            add("sensor", object_id, entity)

    streams: list[tuple[str, str, str, ResultsConfig | None]] = [
        (f"{p}_", f"{p}: ", f"results/{p}", r) for p, r in pipelines
    ]
    for prefix, title, stream, published in streams or [("", "", "results", results)]:
        for label in config.labels:
            object_id = _free_id(f"{prefix}{ha_slug(label)}_detected", out)
            entity = common("binary_sensor", object_id, f"{title}{label} detected")
            entity["default_entity_id"] = f"binary_sensor.{slug}_{ha_slug(object_id)}"
            entity["state_topic"] = f"{base}/{stream}"
            entity["value_template"] = label_template(label)
            entity["payload_on"] = "ON"
            entity["payload_off"] = "OFF"
            delay = label_off_delay(config.off_delay_s, published or ResultsConfig())
            if delay is not None:
                entity["off_delay"] = delay
            entity["device_class"] = "occupancy" if ha_slug(label) == "person" else "motion"
            add("binary_sensor", object_id, entity)

    served: list[str | None] = [*models] or [None]  # None: the legacy single entity
    for served_model in served:
        object_id = (
            "model" if served_model is None else _free_id(f"model_{ha_slug(served_model)}", out)
        )
        entity = common(
            "update", object_id, "Model" if served_model is None else f"Model ({served_model})"
        )
        entity["default_entity_id"] = f"update.{slug}_{object_id}"
        entity["state_topic"] = f"{base}/state"
        entity["value_template"] = (
            UPDATE_TEMPLATE if served_model is None else model_update_template(served_model)
        )
        entity["title"] = served_model or "Model"
        entity["entity_category"] = "diagnostic"
        add("update", object_id, entity)
    return out


def _free_id(wanted: str, taken: Sequence[Discovery]) -> str:
    """``wanted``, or with ``_2``, ``_3`` … when another entity has it (pipeline names
    and label slugs can spell the same object id: ``a`` + ``b_c``, ``a_b`` + ``c``)."""
    used = {d.object_id for d in taken}
    found, n = wanted, 1
    while found in used:
        n += 1
        found = f"{wanted}_{n}"
    return found


def label_off_delay(off_delay_s: int, results: ResultsConfig) -> int | None:
    """The binary sensors' ``off_delay`` for how results are published: none with
    ``on_change`` (nothing is sent while the labels stay the same, and the change to
    "without it" sends OFF: a delay would turn a person still there OFF); with
    ``interval`` longer than two intervals (else it flaps between results)."""
    if results.publish == "on_change":
        return None
    if results.publish == "interval":
        return max(off_delay_s, int(2 * results.interval_s) + 1)
    return off_delay_s


def stale_topics(previous: Iterable[str], wanted: Sequence[Discovery]) -> list[str]:
    """Discovery topics published before that ``wanted`` no longer has (sorted): each is
    cleared with an empty retained message."""
    keep = {d.topic for d in wanted}
    return sorted(set(previous) - keep)
