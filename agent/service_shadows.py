"""Shadow runs and output statistics of the models a service serves, wired per model.

``ServedShadows`` holds one ``ShadowUnit`` per model a pipeline serves (on the first
pipeline serving it, agent/shadow/) and the output statistics of each model served only
as a cascade model; it routes ``…/shadow/MODEL`` messages to them (refusing, out loud,
a run for a cascade model) and gathers their state and telemetry parts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.desired import shadow_topic
from agent.errors import EdgeAgentError
from agent.shadow.control import Reader
from agent.shadow.outputs import OutputStats
from agent.shadow.unit import ShadowUnit
from agent.units import CascadeSlot, ModelUnit, PipelineSlot

if TYPE_CHECKING:
    from agent.config import Config
    from agent.contract import EventName, ShadowDoc, TelemetryExtra
    from agent.mqtt import Incoming

log = logging.getLogger(__name__)


class ServedShadows:
    """The shadow side of a service: built empty (its handlers are needed before the
    units exist), then ``attach(units)``; ``start``/``stop`` with the service."""

    def __init__(
        self,
        config: Config,
        models: Mapping[str, Any],
        event: Callable[[EventName, Mapping[str, Any] | None], None],
    ) -> None:
        self.config = config
        self.models = models
        self._event = event
        self.shadows: dict[str, ShadowUnit] = {}  # by model: what pipelines serve
        self.crop_outputs: dict[str, OutputStats] = {}  # by model: cascade models alone
        self._readers: dict[str, Reader] = {}  # the others': refused when asked for

    def attach(self, units: list[ModelUnit]) -> None:
        """Build each model's shadow unit or crop statistics over the units' targets."""
        self.shadows = self._build_shadows(units)
        self.crop_outputs = self._build_crop_outputs(units)
        self._readers = self._shadow_readers()

    def start(self) -> None:
        for shadow in self.shadows.values():
            shadow.start()

    def stop(self) -> None:
        """Stop the shadow runs (the crop statistics are saved by ``save``)."""
        for shadow in self.shadows.values():
            shadow.stop()

    def save(self) -> None:
        for stats in self.crop_outputs.values():
            stats.save()

    def _build_shadows(self, units: list[ModelUnit]) -> dict[str, ShadowUnit]:
        """Output statistics and shadow runs of each model a pipeline serves, on the
        first pipeline serving it (agent/shadow/)."""
        shadows: dict[str, ShadowUnit] = {}
        for unit in units:
            slots = [t for t in unit.targets if isinstance(t, PipelineSlot)]
            name = unit.name or self._pointed_model(unit)
            if not slots or name is None:
                continue
            slot = slots[0]
            shadow = ShadowUnit(
                unit.config,
                name,
                unit.store.root,
                updates=lambda unit=unit: unit.updates,  # type: ignore[misc]
                load=unit.load,
                event=self._event,
                pipeline=lambda slot=slot: slot,  # type: ignore[misc]
            )
            slot.set_observers(shadow.observers())
            unit.updates.shadows = self.states
            shadows[name] = shadow
        return shadows

    def _build_crop_outputs(self, units: list[ModelUnit]) -> dict[str, OutputStats]:
        """Output statistics of each model served only as a cascade model, over its crop
        answers on the first pipeline whose cascade names it (kept in its store)."""
        outputs: dict[str, OutputStats] = {}
        for unit in units:
            crops = [t for t in unit.targets if isinstance(t, CascadeSlot)]
            if unit.name is None or unit.name in self.shadows or not crops:
                continue
            stats = OutputStats(unit.name, unit.store.root)
            crops[0].cascade.set_outputs(stats.add)
            outputs[unit.name] = stats
        return outputs

    @staticmethod
    def _pointed_model(unit: ModelUnit) -> str | None:
        try:
            pointer = unit.store.pointer()
        except EdgeAgentError:
            return None
        return pointer.model if pointer else None

    def on_message(self, model: str, message: Incoming) -> None:
        shadow = self.shadows.get(model)
        if shadow is not None:
            shadow.on_message(message)
        elif message.payload:  # a cascade model's: no pipeline runs it on whole frames
            self._no_shadow_run(model, message)

    def _shadow_readers(self) -> dict[str, Reader]:
        """How a shadow instruction for each model without a shadow controller (a
        cascade model) is read: the key ring loaded once here (a config reload builds a
        new service, and so reads the keys again)."""
        from agent.verify import KeyRing

        cfg = self.config
        missing = [name for name in self.models if name not in self.shadows]
        if not missing:
            return {}
        key = KeyRing.load(cfg.update.desired_keys, "update.desired_public_key(s)")
        return {
            name: Reader(
                name,
                prefix=cfg.mqtt.topic_prefix,
                device=cfg.device.id,
                groups=list(cfg.device.groups),
                key=key,
                max_skew_s=cfg.update.max_clock_skew_s,
            )
            for name in missing
        }

    def _no_shadow_run(self, model: str, message: Incoming) -> None:
        """A shadow instruction for a model no pipeline has as its primary one (a cascade
        model): checked as any, then refused out loud (``shadow_failed``), not dropped."""
        reader = self._readers.get(model)
        if reader is None:
            return
        try:
            read = reader.read(message)
        except ValueError as exc:
            self._event("desired_invalid", {"topic": message.topic, "error": str(exc)})
            return
        if read is None or read[1] is None:
            return
        error = (
            f"{model} is a cascade model here: a shadow run compares a pipeline's own "
            "model on its frames"
        )
        log.warning("%s: %s", message.topic, error)
        self._event("shadow_failed", {"model": model, "version": read[1].version, "error": error})

    def handlers(self) -> dict[str, Callable[[Incoming], None]]:
        """``…/shadow/MODEL`` of the device and its groups, for each model served."""
        cfg = self.config
        prefix, device = cfg.mqtt.topic_prefix, cfg.device.id
        handlers: dict[str, Callable[[Incoming], None]] = {}
        targets = [f"device:{device}", *(f"group:{g}" for g in cfg.device.groups)]
        for name in self.models:
            for target in targets:
                handlers[shadow_topic(prefix, target, name)] = functools.partial(
                    self.on_message, name
                )
        return handlers

    def states(self) -> dict[str, ShadowDoc]:
        return {k: v for shadow in self.shadows.values() for k, v in shadow.state().items()}

    def telemetry(self) -> TelemetryExtra:
        extra: TelemetryExtra = {}
        for shadow in self.shadows.values():
            part = shadow.telemetry()
            if "shadows" in part:
                extra.setdefault("shadows", {}).update(part["shadows"])
            if "outputs" in part:
                extra.setdefault("outputs", {}).update(part["outputs"])
        for name, stats in self.crop_outputs.items():
            doc = stats.doc()
            if doc is not None:
                extra.setdefault("outputs", {})[name] = doc
        return extra
