"""Run under a Python that has Home Assistant installed (not this project's venv):
validates discovery payloads with HA's own MQTT DISCOVERY_SCHEMAs and renders their
templates with HA's own template engine.

stdin: ``{"configs": [{"component", "payload"}], "documents": {stream: doc}}``;
stdout: one JSON list, per config ``{"error"}`` or ``{"dropped", "value", "available"}``.
Used by tests/test_homeassistant.py when ``EDGE_AGENT_HA_PYTHON`` names such a Python
(docs/homeassistant.md says how to make one).
"""

import asyncio
import json
import sys

from homeassistant.components.mqtt import binary_sensor, sensor, update
from homeassistant.core import HomeAssistant
from homeassistant.helpers.template import Template

SCHEMAS = {
    "sensor": sensor.DISCOVERY_SCHEMA,
    "binary_sensor": binary_sensor.DISCOVERY_SCHEMA,
    "update": update.DISCOVERY_SCHEMA,
}


async def main() -> None:
    request = json.load(sys.stdin)
    documents = request["documents"]
    hass = HomeAssistant(sys.argv[1])
    out = []
    for item in request["configs"]:
        raw = json.loads(item["payload"])
        try:
            validated = SCHEMAS[item["component"]](dict(raw))
        except Exception as exc:  # voluptuous.Invalid and friends
            out.append({"error": str(exc)})
            continue
        stream = raw["state_topic"].rsplit("/", 1)[1]
        value = Template(raw["value_template"], hass).async_render_with_possible_json_value(
            json.dumps(documents[stream])
        )
        status = Template(raw["availability"][0]["value_template"], hass)
        out.append(
            {
                "dropped": sorted(set(raw) - set(validated)),
                "value": str(value),
                "available": str(
                    status.async_render_with_possible_json_value(json.dumps(documents["status"]))
                ),
            }
        )
    json.dump(out, sys.stdout)


asyncio.run(main())
