"""The fleet as the broker shows it: one record per device, built from its retained
``status``, ``state`` and ``telemetry`` and its own ``desired`` state, plus the groups'
desired states. ``edge-fleet devices``, ``status``, ``telemetry`` and the rollouts all
read the fleet through :class:`FleetView`; :mod:`agent.fleet.render` makes text of it.

The view only believes what devices report. It never guesses: a device that has not
reported a figure shows ``-``, and live figures (fps, p95, temperature) of a device
that is offline are shown as unknown, not as its last values.

Nor does it trust them (:mod:`agent.fleet.reports`): a message that is not a JSON object
by :func:`agent.strictjson.parse_object`'s rules is skipped, a field of the wrong type is
dropped, every string is made printable, and a topic whose device id or group name is
not a valid one is skipped; each device that sent such a thing is named once, in a
warning (stderr), and the rest of the fleet is shown as usual.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.config import MODEL_NAME_PATTERN
from agent.config_pipelines import PIPELINE_NAME_PATTERN
from agent.errors import DocumentError
from agent.fleet.acl import NAME_PATTERN, check_device_id
from agent.fleet.broker import Message
from agent.fleet.drift import freshest_run
from agent.fleet.reports import MAX_BYTES, MAX_DEPTH, clean, printable
from agent.strictjson import parse_object

REPORTS = ("status", "state", "telemetry", "desired")
PER_MODEL = ("desired", "shadow")  # streams with a topic per model: …/desired/MODEL
LIVE_S = 300.0  # telemetry older than this is not shown as a device's current figures
FOLLOWED = ("telemetry", "results", "events")
ACTIVE_PHASES = ("downloading", "verifying", "validating", "activating", "probation")
MAX_MODELS = 32  # models read from one device's state (it serves at most 8 pipelines' worth)


def warn_on_stderr(line: str) -> None:
    """How ``edge-fleet`` says what it skipped: one line on stderr."""
    print(f"edge-fleet: warning: {line}", file=sys.stderr, flush=True)


def number(value: Any) -> float | None:
    """A JSON number (not a bool) as a float; None for anything else."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def live_telemetry(online: bool | None, telemetry: Any, now: float) -> dict[str, Any]:
    """A device's telemetry document when its figures are live: the device online and
    the document at most :data:`LIVE_S` old (a device replaying its outbox after an
    outage sends hours-old telemetry, retained, for a while); else ``{}``."""
    if online is not True or not isinstance(telemetry, dict):
        return {}
    ts = number(telemetry.get("ts"))
    return telemetry if ts is not None and ts >= now - LIVE_S else {}


@dataclass
class DeviceView:
    """What one device last reported (each part None until it has)."""

    id: str
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    desired: dict[str, Any] | None = None  # its own retained desired state (legacy topic)
    desired_models: dict[str, dict[str, Any]] = field(default_factory=dict)  # …/desired/M
    shadows: dict[str, dict[str, Any]] = field(default_factory=dict)  # …/shadow/M
    last_seen: float | None = None  # the latest ``ts`` of anything it sent

    @property
    def online(self) -> bool | None:
        if self.status is None:
            return None
        return self.status.get("state") == "online"

    @property
    def groups(self) -> list[str]:
        groups = (self.status or {}).get("groups")
        return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []

    @property
    def model(self) -> str | None:
        model = (self.state or {}).get("model")
        return model if isinstance(model, str) else None

    @property
    def version(self) -> int | None:
        version = (self.state or {}).get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) else None

    @property
    def phase(self) -> str | None:
        phase = (self.state or {}).get("phase")
        return phase if isinstance(phase, str) else None

    @property
    def agent_version(self) -> str | None:
        """The agent's version from its status (else state, telemetry); None unless it is
        a short printable string (a device's text must not reach the terminal raw)."""
        for doc in (self.status, self.state, self.telemetry):
            version = (doc or {}).get("agent_version")
            if isinstance(version, str) and 0 < len(version) <= 32 and version.isprintable():
                return version
        return None

    def served(self) -> dict[str, dict[str, Any]]:
        """Every model the device serves -> its part of the state: ``state.models``
        (several pipelines, cascade models too) or, from an older agent, its one model."""
        state = self.state or {}
        models = state.get("models")
        if isinstance(models, dict):
            return {
                m: clean("state", part)[0]
                for m, part in sorted(models.items())[:MAX_MODELS]
                if isinstance(part, dict) and re.fullmatch(MODEL_NAME_PATTERN, m)
            }
        return {self.model: state} if self.model is not None else {}

    def own_desired(self, model: str | None) -> dict[str, Any] | None:
        """Its own retained desired state of ``model``: on the model's topic, else on
        the legacy topic when that names ``model``."""
        if model is None:
            return None
        if model in self.desired_models:
            return self.desired_models[model]
        return self.desired if (self.desired or {}).get("model") == model else None

    def models_row(self) -> dict[str, dict[str, Any]]:
        """Per served model: version, phase, the update, its own desired state, the
        shadow instruction retained for it and the shadow run's figures."""
        shadows = (self.state or {}).get("shadows")
        shadows = shadows if isinstance(shadows, dict) else {}
        reported = (self.telemetry or {}).get("shadows")
        reported = reported if isinstance(reported, dict) else {}
        out = {}
        for model, part in self.served().items():
            version = part.get("version")
            update = part.get("update")
            run = freshest_run(shadows.get(model), reported.get(model))
            out[model] = {
                "version": version if isinstance(version, int) else None,
                "phase": part.get("phase"),
                "backend": part.get("backend"),
                "update": update if isinstance(update, dict) else None,
                "desired": self.own_desired(model),
                "shadow": self.shadows.get(model),
                "shadow_run": run if isinstance(run, dict) else None,
            }
        return out

    def _inference(self) -> dict[str, Any]:
        inference = (self.telemetry or {}).get("inference")
        return inference if isinstance(inference, dict) else {}

    def row(self, now: float | None = None) -> dict[str, Any]:
        """The device as ``devices --json`` prints it.

        fps, p95 and temperature are None unless the device is online and its latest
        telemetry is recent (a device replaying its outbox after an outage sends
        hours-old telemetry, retained, for a while).
        """
        telemetry = self.telemetry or {}
        live = bool(live_telemetry(self.online, telemetry, time.time() if now is None else now))
        inference = self._inference() if live else {}
        outbox = telemetry.get("outbox")
        update = (self.state or {}).get("update")
        return {
            "device": self.id,
            "online": self.online,
            "groups": self.groups,
            "model": self.model,
            "version": self.version,
            "backend": inference.get("backend") or (self.state or {}).get("backend"),
            "fps": number(inference.get("fps")),
            "p95_ms": number(inference.get("latency_ms_p95")),
            "temp_c": number(telemetry.get("temp_c")) if live else None,
            "outbox": number(outbox.get("depth")) if isinstance(outbox, dict) else None,
            "phase": self.phase,
            "update": update if isinstance(update, dict) else None,
            "last_error": (self.state or {}).get("last_error"),
            "desired": self.own_desired(self.model) if self.model else self.desired,
            "models": self.models_row(),
            "last_seen": self.last_seen,
            "agent_version": self.agent_version,
        }


@dataclass
class Report:
    """A message the view took in: which device, which stream, the document."""

    device: str | None  # None for a group's desired state
    stream: str
    doc: dict[str, Any] | None  # None: cleared (empty retained message)
    retained: bool
    group: str | None = None
    model: str | None = None  # of a per-model topic (…/desired/MODEL, …/shadow/MODEL)


@dataclass
class FleetView:
    """Every device and group desired state seen under ``prefix``."""

    prefix: str = "edge"
    devices: dict[str, DeviceView] = field(default_factory=dict)
    group_desired: dict[str, dict[str, Any]] = field(default_factory=dict)
    # group -> model -> its retained document on …/groups/G/desired/M, …/shadow/M
    group_desired_models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    group_shadows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    warn: Callable[[str], None] = warn_on_stderr  # once per device (or topic) at most
    warned: set[str] = field(default_factory=set)

    def subscriptions(self, streams: Iterable[str] = REPORTS, device: str = "+") -> list[str]:
        topics = [f"{self.prefix}/{device}/{stream}" for stream in streams if stream != "shadow"]
        topics += [f"{self.prefix}/{device}/{s}/+" for s in PER_MODEL if s in streams]
        if "results" in streams:  # a device with several pipelines: …/results/PIPELINE
            topics.append(f"{self.prefix}/{device}/results/+")
        if "desired" in streams and device == "+":
            topics.append(f"{self.prefix}/groups/+/desired")
        if device == "+":
            topics += [f"{self.prefix}/groups/+/{s}/+" for s in PER_MODEL if s in streams]
        return topics

    def _per_model(self, message: Message, levels: list[str]) -> Report | None:
        """A message on ``…/ID/desired|shadow/MODEL`` or ``…/groups/G/desired|shadow/MODEL``."""
        group = levels[1] if len(levels) == 4 else None
        name, stream, model = (levels[1], levels[2], levels[3]) if group else levels
        who = f"topic {printable(message.topic, 120)}"
        if group is not None and not NAME_PATTERN.fullmatch(group):
            self._warn(who, "not a valid group name; skipped")
            return None
        if group is None and check_device_id(name) is not None:
            self._warn(who, "not a valid device id; skipped")
            return None
        if not re.fullmatch(MODEL_NAME_PATTERN, model):
            self._warn(who, "not a valid model name; skipped")
            return None
        usable, doc = self._read(
            message, "desired", f"group {group}" if group else f"device {name}"
        )
        if not usable:
            return None
        if group is not None:
            docs = self.group_desired_models if stream == "desired" else self.group_shadows
            held = docs.setdefault(group, {})
        else:
            device = self.devices.get(name)
            if device is None and doc is None:
                return Report(name, stream, None, message.retained, model=model)
            if device is None:
                device = self.devices[name] = DeviceView(name)
            held = device.desired_models if stream == "desired" else device.shadows
        if doc is None:
            held.pop(model, None)
        else:
            held[model] = doc
        return Report(None if group else name, stream, doc, message.retained, group, model)

    def desired_for(self, model: str) -> dict[str, dict[str, dict[str, Any]]]:
        """The retained desired states of ``model``: ``{"groups": {G: doc}, "devices":
        {ID: doc}}``, per-model topics first, else a legacy topic's naming ``model``."""
        groups = {g: d for g, d in self.group_desired.items() if d.get("model") == model}
        for g, docs in self.group_desired_models.items():
            if model in docs:
                groups[g] = docs[model]
        own = {
            i: d.desired
            for i, d in self.devices.items()
            if d.desired is not None and d.desired.get("model") == model
        }
        for i, d in self.devices.items():
            if model in d.desired_models:
                own[i] = d.desired_models[model]
        return {"groups": groups, "devices": own}

    def _warn(self, who: str, line: str) -> None:
        if who not in self.warned:
            self.warned.add(who)
            self.warn(f"{who}: {line}")

    def _read(self, message: Message, stream: str, who: str) -> tuple[bool, dict[str, Any] | None]:
        """(usable, document) of ``message``: the document parsed and cleaned (None for
        an empty message); not usable when it cannot be parsed (then said once)."""
        if not message.payload:
            return True, None
        try:
            doc = parse_object(
                message.payload, what=stream, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH
            )
        except DocumentError as exc:
            self._warn(who, f"{exc}; the message is ignored")
            return False, None
        cleaned, problems = clean(stream, doc)
        if problems:
            more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
            self._warn(who, f"{'; '.join(problems[:2])}{more}")
        return True, cleaned

    def take(self, message: Message) -> Report | None:
        """Take one message in; the report it made, or None when it is not the fleet's
        (another topic) or not usable (not a JSON object, an invalid device id or group
        name: said once through ``warn``). A usable document is cleaned
        (:func:`agent.fleet.reports.clean`), and problems with it are said once too."""
        if not message.topic.startswith(self.prefix + "/"):
            return None
        levels = message.topic[len(self.prefix) + 1 :].split("/")
        if (len(levels) == 3 and levels[0] != "groups" and levels[1] in PER_MODEL) or (
            len(levels) == 4 and levels[0] == "groups" and levels[2] in PER_MODEL
        ):
            return self._per_model(message, levels)
        if len(levels) == 3 and levels[0] == "groups" and levels[2] == "desired":
            group = levels[1]
            if not NAME_PATTERN.fullmatch(group):
                who = f"topic {printable(message.topic, 120)}"
                self._warn(who, "not a valid group name; skipped")
                return None
            usable, doc = self._read(message, "desired", f"group {group}")
            if not usable:
                return None
            if doc is None:
                self.group_desired.pop(levels[1], None)
            else:
                self.group_desired[levels[1]] = doc
            return Report(None, "desired", doc, message.retained, group=levels[1])
        pipeline = len(levels) == 3 and levels[0] != "groups" and levels[1] == "results"
        if (len(levels) != 2 and not pipeline) or levels[0] == "groups":
            return None
        device_id, stream = levels[:2]
        if check_device_id(device_id) is not None:
            who = f"topic {printable(message.topic, 120)}"
            self._warn(who, "not a valid device id; skipped")
            return None
        if pipeline and not re.fullmatch(PIPELINE_NAME_PATTERN, levels[2]):
            who = f"topic {printable(message.topic, 120)}"
            self._warn(who, "not a valid pipeline name; skipped")
            return None
        usable, doc = self._read(message, stream, f"device {device_id}")
        if not usable:
            return None
        device = self.devices.get(device_id)
        if device is None:
            if doc is None:
                return Report(device_id, stream, None, message.retained)
            device = self.devices[device_id] = DeviceView(device_id)
        if stream in REPORTS:
            setattr(device, stream, doc)
        ts = number((doc or {}).get("ts"))
        if ts is not None and stream != "desired":
            device.last_seen = max(device.last_seen or 0.0, ts)
        return Report(device_id, stream, doc, message.retained)

    def members(self, group: str) -> list[str]:
        """The devices whose status names ``group``, sorted."""
        return sorted(d.id for d in self.devices.values() if group in d.groups)

    def reporting(self) -> list[DeviceView]:
        """Devices that have sent a status or state (not just left a desired state)."""
        return sorted(
            (d for d in self.devices.values() if d.status or d.state),
            key=lambda d: d.id,
        )
