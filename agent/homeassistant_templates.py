"""The Jinja templates of the Home Assistant discovery entities
(:mod:`agent.homeassistant`): each reads one of the agent's own documents (``value_json``:
telemetry, state, results) and gives the entity's state, ``None`` (HA: unknown) or ``{}``
(ignored) when the document lacks the part. Pure strings; tests/test_homeassistant.py
renders every one with jinja2 against real documents."""

from __future__ import annotations

import json

from agent.contract import UPDATE_PHASES


def value_number(path: str) -> str:
    """A template giving ``value_json.<path>``, or ``None`` (HA: unknown) when a part is
    missing or null (``inference`` is null while nothing serves)."""
    parts = path.split(".")
    guards = [f"value_json.{'.'.join(parts[: i + 1])} is not none" for i in range(len(parts))]
    defined = f"value_json.{parts[0]} is defined"
    return f"{{{{ value_json.{path} if ({defined} and {' and '.join(guards)}) else None }}}}"


# The update entity's state: JSON with the keys Home Assistant's MQTT update reads.
UPDATE_BODY = (
    "{% set installed = s.version|string if s.version is not none else None %}"
    # a desired state that is not refused, else an update under way or done; a failed or
    # rolled-back one is not "an update available"
    "{% if s.desired and (s.desired.model ~ '@' ~ s.desired.version) not in (s.bad or []) %}"
    "{% set latest = s.desired.version|string %}"
    # s['update'], not s.update: Jinja's dot finds the dict's update() method first
    "{% elif s['update'] and s['update'].outcome not in ('failed', 'rolled_back') %}"
    "{% set latest = s['update'].version|string %}"
    "{% else %}{% set latest = installed %}{% endif %}"
    "{{ {'installed_version': installed, 'latest_version': latest,"
    " 'title': s.model, 'in_progress': s.phase in " + json.dumps(list(UPDATE_PHASES)) + "}"
    " | tojson }}"
)
UPDATE_TEMPLATE = "{% set s = value_json %}" + UPDATE_BODY

ATTRIBUTES_BODY = (
    "{{ {'model': s.model, 'serving': s.serving,"
    " 'backend': s.backend, 'previous': s.previous} | tojson }}"
)
MODEL_ATTRIBUTES_TEMPLATE = "{% set s = value_json %}" + ATTRIBUTES_BODY


def _served(model: str, body: str, missing: str) -> str:
    """``body`` (a template reading ``s``) with ``s`` = the state's ``models[<model>]``;
    ``missing`` while the state has no such part (an older agent, or before the model
    serves). Model names are ``[A-Za-z0-9][A-Za-z0-9._-]*``: their JSON form is a valid
    Jinja literal."""
    name, models = json.dumps(model), "value_json.models"
    guard = f"{models} is defined and {models} is mapping and {name} in {models}"
    return (
        f"{{% if {guard} and {models}[{name}] is mapping %}}"
        f"{{% set s = {models}[{name}] %}}{body}{{% else %}}{missing}{{% endif %}}"
    )


def model_update_template(model: str) -> str:
    """The update entity of one served model (the state's ``models[<model>]``); ``{}``
    while the state has no such part: Home Assistant ignores an empty JSON state."""
    return _served(model, UPDATE_BODY, "{}")


def model_version_template(model: str) -> str:
    """The state's ``models[<model>].version``, or ``None`` (HA: unknown)."""
    return _served(model, "{{ s.version if s.version is not none else None }}", "None")


def model_attributes_template(model: str) -> str:
    """The version sensor's attributes for one served model (``{}`` while absent)."""
    return _served(model, ATTRIBUTES_BODY, "{}")


def pipeline_number(pipeline: str, key: str) -> str:
    """A template giving telemetry's ``pipelines[<pipeline>][<key>]``, or ``None`` while
    that pipeline serves nothing (absent) or telemetry has no ``pipelines``. Pipeline
    names are ``[A-Za-z0-9][A-Za-z0-9_-]*``: their JSON form is a valid Jinja literal."""
    name, field = json.dumps(pipeline), json.dumps(key)
    figures = "value_json.pipelines"
    guard = (
        f"{figures} is defined and {figures} is mapping and {name} in {figures}"
        f" and {figures}[{name}] is mapping and {figures}[{name}][{field}] is number"
    )
    return f"{{{{ {figures}[{name}][{field}] if ({guard}) else None }}}}"


def label_template(label: str) -> str:
    """``ON`` when a result's classes or detections include ``label``, else ``OFF``.

    ``label`` matches ``HA_LABEL_PATTERN`` (no quotes or backslashes), so its JSON form is
    a valid Jinja string literal.
    """
    quoted = json.dumps(label)
    return (
        "{% set found = (value_json.classes | default([]) | map(attribute='label') | list)"
        " + (value_json.detections | default([]) | map(attribute='label') | list) %}"
        f"{{{{ 'ON' if {quoted} in found else 'OFF' }}}}"
    )
