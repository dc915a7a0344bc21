"""The running agent: its parts, wired, started and stopped.

``Service`` builds the parts from a validated config and starts them in order: outbox
and telemetry first (so every later step can be reported), then the journal's
recovery (``Updates.recover``: a release the agent crash-loops under is rolled back
before it is loaded), the active release and the stream, the update worker, and
commands. ``stop()`` runs in reverse. The service holds no update logic: that is
``agent.update``; it only lends the updater its ``load`` and ``swap``.

The daemon's main loop around a service (signals, sd_notify, reloads) is
``agent.daemon``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.cascade import Cascade
from agent.commands import Commands
from agent.config import Config, PipelineConfig
from agent.config_pipelines import served_models
from agent.contract import (
    EventName,
    InferenceDoc,
    PipelineInferenceDoc,
    ShadowDoc,
    StateDoc,
    TelemetryExtra,
)
from agent.control import ControlServer
from agent.desired import desired_topics, shadow_topic
from agent.diagnostics import Diagnostics
from agent.errors import EdgeAgentError
from agent.homeassistant import discovery_configs
from agent.homeassistant_publish import DiscoveryPublisher
from agent.outbox import Outbox
from agent.pipeline import Pipeline, Result, Stats
from agent.reloading import Reloads
from agent.shadow.control import Reader
from agent.shadow.outputs import OutputStats
from agent.shadow.unit import ShadowUnit
from agent.store import Store
from agent.stores import store_dirs, unit_config
from agent.sysinfo import SystemProbe
from agent.telemetry import ResultGate, Telemetry, Topics
from agent.units import CascadeSlot, ModelUnit, PipelineSlot, Target, compose_state

if TYPE_CHECKING:
    import numpy as np

    from agent.metrics import Metrics, Snapshot
    from agent.metrics_models import PipelineFigures
    from agent.mqtt import Incoming

log = logging.getLogger(__name__)

LOCK_WAIT_S = 30.0  # at start, how long a command-line pull may keep the store


# a unit's events that carry no model of their own
_NAMED_EVENTS = frozenset({"model_failed", "state_repaired", "rolled_back", "update_error"})


class _Reporter:
    """A unit's reporter: events as they are (with several models, ``model_failed``,
    ``rolled_back``, ``update_error`` and a store's ``state_repaired`` name the unit's
    model); its state merged into the one state document (with several models, every
    unit's part under ``models``)."""

    def __init__(self, service: Service, model: str | None = None) -> None:
        self.service = service
        self.model = model

    def event(self, name: EventName, detail: Mapping[str, Any] | None = None) -> None:
        if self.model is not None and name in _NAMED_EVENTS:
            detail = {**(detail or {}), "model": self.model}
        self.service.telemetry.event(name, detail)

    def state(self, state: StateDoc) -> None:
        self.service.publish_state(state)


class Service:
    """One agent process: build with a validated config, then start(), then stop()."""

    def __init__(
        self,
        config: Config,
        environ: dict[str, str] | None = None,
        observe: Callable[[str, Mapping[str, Any]], None] | None = None,
        reloads: Reloads | None = None,
    ) -> None:
        """Build the parts (the outbox and the locks are taken by start()); raises
        ConfigError for unusable MQTT settings. ``reloads``: the process's reload
        requests (``run`` serves them; the control socket's ``reload`` asks)."""
        self.config = config
        self.reloads = reloads or Reloads()
        self.started = time.monotonic()
        self.store = Store(config.store.dir, config.store.keep).open()
        self.pipelines = config.pipeline_list()
        self.models = served_models(self.pipelines)
        # several models (pipelines:, or a cascade): state and commands name them
        self.multi = bool(config.pipelines) or len(self.models) > 1
        self.outbox = Outbox(config.telemetry.outbox, int(config.telemetry.outbox_max_mb * 1e6))
        topics = Topics(config.mqtt.topic_prefix, config.device.id)
        self.commands = Commands(
            {"ping": self.ping, "rollback": self._rollback, "check-updates": self._check},
            self._reply,
            reply_topic=topics("reply"),
            max_bytes=config.mqtt.command_max_bytes,
        )
        self.control = ControlServer(
            config.control_socket,
            {
                **self.commands.handlers,
                "status": self.status,
                "pull": self._pull,
                "reload": self._reload_request,
            },
        )
        self._stopped = False
        self._state_lock = threading.Lock()
        ha = config.homeassistant
        self.discovery = DiscoveryPublisher(
            config.device.id,
            discovery_configs(
                config.device.id,
                topics.base,
                ha,
                agent_version=__version__,
                telemetry_interval_s=config.telemetry.interval_s,
                results=self.pipelines[0].results,
                # with pipelines: each pipeline's label sensors, fps and latency
                pipelines=[(p.name, p.results) for p in config.pipelines],
                # several models: a version sensor and an update entity each
                models=list(self.models) if self.multi else (),
            ),
            ha.prefix,
            config.store.dir,
            lambda topic, payload: self.telemetry.publish_retained(topic, payload),
        )
        handlers: dict[str, Callable[[Incoming], None]] = {
            **self.discovery.handlers(),
            topics("cmd/+"): self.commands.submit,
            **self._desired_handlers(),
            **self._shadow_handlers(),
        }
        self.telemetry = Telemetry(
            config.device.id,
            self.outbox,
            config.mqtt,
            config.results,
            interval_s=config.telemetry.interval_s,
            probe=SystemProbe(config.store.dir),
            stats=self._stats,
            handlers=handlers,
            environ=environ,
            observe=observe,
            status={"groups": list(config.device.groups), "agent_version": __version__},
            on_connect=self.discovery.on_connect,
            pipelines=self._pipelines_figures if self.multi else None,  # a cascade too
            extra=self._shadow_telemetry,
        )
        self.metrics = self._build_metrics()
        self.slots = [self._slot(p) for p in self.pipelines]
        self.cascades = self._build_cascades()  # by pipeline name
        self.units = self._build_units()
        self.shadows = self._build_shadows()  # by model: what pipelines serve
        self.crop_outputs = self._build_crop_outputs()  # by model: cascade models alone
        self._readers = self._shadow_readers()  # the others': refused when asked for
        first = self.units[0]
        self.updates = first.updates  # the first pipeline's model (the legacy shape's one)
        self.lock = next(u.lock for u in self.units if u.store.root == self.store.root)
        diagnostics = Diagnostics(
            config,
            self.store,
            self.telemetry.snapshot,
            self._stats,
            self._last_frame,
            self.telemetry.event,
        )
        self.commands.handlers.update(diagnostics.handlers())  # MQTT only: not the socket

    def _slot(self, pipeline: PipelineConfig) -> PipelineSlot:
        # the single-model shape: results as ever; pipelines: results/<name>
        publish = self._publisher(pipeline) if self.config.pipelines else self.telemetry.result
        if self.metrics is not None:  # several models: each pipeline's own series
            named = (pipeline.name, pipeline.model.name or "") if self.multi else (None, "")
            publish = self.metrics.observing(publish, *named)
        return PipelineSlot(
            pipeline,
            self.config.runtime,
            publish,
            self._event,
        )

    def _event(self, name: EventName, detail: Mapping[str, Any] | None = None) -> None:
        self.telemetry.event(name, detail)

    def _publisher(self, pipeline: PipelineConfig) -> Callable[[Result], None]:
        """``results/<name>`` with ``"pipeline": name``, per the pipeline's results."""
        gate, name, qos = ResultGate(pipeline.results), pipeline.name, pipeline.results.qos

        def publish(result: Result) -> None:
            if gate.admit(result):
                self.telemetry.record(
                    f"results/{name}", {**result.to_dict(), "pipeline": name}, qos=qos
                )

        return publish

    def _build_units(self) -> list[ModelUnit]:
        """One unit per served model, each with its store; its targets are the pipelines
        whose primary model it is and the cascade stages that name it."""
        config = self.config
        link = self.telemetry.link
        connected = (lambda: link.connected.is_set()) if link is not None else None
        if not self.multi:  # the single model: the root store, the config as it is
            unit = ModelUnit(
                config.model.name, config, list(self.slots), _Reporter(self), connected=connected
            )
            return [unit]
        try:
            pointer = self.store.pointer()
        except EdgeAgentError:
            pointer = None  # damaged: the root unit repairs it at start
        dirs = store_dirs(config.store.dir, pointer.model if pointer else None, list(self.models))
        units: list[ModelUnit] = []
        for index, (name, model) in enumerate(self.models.items()):
            targets: list[Target] = [s for s in self.slots if s.config.model.name == name]
            targets += [c for c in self.cascades.values() if c.model_name == name]
            results = targets[0].results
            units.append(
                ModelUnit(
                    name,
                    unit_config(config, model, results, dirs[name]),
                    targets,
                    _Reporter(self, name),
                    connected=connected,
                    only_model=True,
                    not_served=(lambda m: m not in self.models) if index == 0 else None,
                )
            )
        return units

    def _build_cascades(self) -> dict[str, CascadeSlot]:
        """Each pipeline's cascade stage (``cascade:``), without its model until the
        cascade model's unit serves it (results pass through until then)."""
        from agent.cascade_rules import CascadeRules

        cascades: dict[str, CascadeSlot] = {}
        for slot in self.slots:
            cascade = slot.config.cascade
            if cascade is None or cascade.model.name is None:
                continue
            rules = CascadeRules(
                labels=frozenset(cascade.labels) if cascade.labels else None,
                max_crops=cascade.max_crops,
                min_score=(
                    cascade.min_score
                    if cascade.min_score is not None
                    else slot.config.results.min_score
                ),
                padding=cascade.padding,
                min_size=cascade.min_size,
            )
            cascades[slot.name] = CascadeSlot(
                slot, Cascade(None, rules), cascade.model.name, cascade.top_k
            )
        return cascades

    def _build_shadows(self) -> dict[str, ShadowUnit]:
        """Output statistics and shadow runs of each model a pipeline serves, on the
        first pipeline serving it (agent/shadow/)."""
        shadows: dict[str, ShadowUnit] = {}
        for unit in self.units:
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
            unit.updates.shadows = self._shadow_states
            shadows[name] = shadow
        return shadows

    def _build_crop_outputs(self) -> dict[str, OutputStats]:
        """Output statistics of each model served only as a cascade model, over its crop
        answers on the first pipeline whose cascade names it (kept in its store)."""
        outputs: dict[str, OutputStats] = {}
        for unit in self.units:
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

    def _on_shadow(self, model: str, message: Incoming) -> None:
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

    def _shadow_handlers(self) -> dict[str, Callable[[Incoming], None]]:
        """``…/shadow/MODEL`` of the device and its groups, for each model served."""
        cfg = self.config
        prefix, device = cfg.mqtt.topic_prefix, cfg.device.id
        handlers: dict[str, Callable[[Incoming], None]] = {}
        targets = [f"device:{device}", *(f"group:{g}" for g in cfg.device.groups)]
        for name in self.models:
            for target in targets:
                handlers[shadow_topic(prefix, target, name)] = functools.partial(
                    self._on_shadow, name
                )
        return handlers

    def _shadow_states(self) -> dict[str, ShadowDoc]:
        return {k: v for shadow in self.shadows.values() for k, v in shadow.state().items()}

    def _shadow_telemetry(self) -> TelemetryExtra:
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

    def _desired_handlers(self) -> dict[str, Callable[[Incoming], None]]:
        """The one desired-state topic of older fleets (device and groups) goes to every
        unit (each takes the states of its model); ``…/desired/MODEL`` to its unit."""
        cfg = self.config
        prefix, device, groups = cfg.mqtt.topic_prefix, cfg.device.id, list(cfg.device.groups)
        handlers: dict[str, Callable[[Incoming], None]] = {
            topic: self._on_desired for topic in desired_topics(prefix, device, groups)
        }
        for index, name in enumerate(self.models):
            for topic in desired_topics(prefix, device, groups, name):
                handlers[topic] = functools.partial(self._on_model_desired, index)
        return handlers

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Take the outbox and the stores (OutboxError, StoreError: another agent uses
        them), start telemetry, settle each journal, serve each active release, start
        the updates.

        A release that cannot be loaded is reported (event, state's last_error) and the
        agent keeps running without inference, reachable by commands and updates.
        """
        # One agent per outbox and store: a second one is refused here, at once.
        self.outbox.open()
        # A command-line pull may be finishing on a store: give it a moment.
        for unit in self.units:
            unit.lock.acquire(wait_s=LOCK_WAIT_S)
        self.discovery.start()  # before the first connect: it clears what is stale
        self.telemetry.start()
        if self.metrics is not None:
            self.metrics.start()
        self.telemetry.event("agent_started", {"pid": os.getpid()})
        for unit in self.units:
            unit.repair()
            unit.updates.recover()
            unit.serve_active()
        self.units[0].updates.publish_state()
        for unit in self.units:
            unit.updates.start()
        for shadow in self.shadows.values():
            shadow.start()
        self.commands.start()
        self.control.start()

    def stop(self) -> bool:
        """Stop in reverse order; each step runs even when an earlier one failed.

        Returns False when an update worker did not stop (a transfer that would not
        end): the process should exit then rather than start another service beside it.
        """
        if self._stopped:
            return True
        self._stopped = True
        clean = True
        try:
            self.control.stop()
            self.commands.stop()
            for unit in self.units:
                clean = unit.updates.stop() and clean
            for shadow in self.shadows.values():
                shadow.stop()
            for slot in self.slots:
                slot.stop()
            for cascade in self.cascades.values():
                cascade.stop()
            for stats in self.crop_outputs.values():
                stats.save()
            if self.metrics is not None:
                self.metrics.stop()
        finally:
            try:
                self.telemetry.event("agent_stopped")
                self.telemetry.stop()
            finally:
                self.outbox.close()
                for unit in self.units:
                    unit.lock.release()
        return clean

    @property
    def pipeline(self) -> Pipeline | None:
        """The first pipeline's stream (None until it serves)."""
        return self.slots[0].pipeline

    def ready(self) -> bool:
        """Config, models and sources are up; or a model has no release to serve yet."""
        for unit in self.units:
            for target in unit.targets:
                if not isinstance(target, PipelineSlot):
                    continue  # a cascade model: it has no stream of its own
                stats = target.stats()
                if stats is None:
                    if not (unit.store.pointer() is None or unit.updates.last_error):
                        return False
                elif not (stats.source_connected and stats.results > 0):
                    return False
        return True

    def overdue(self) -> tuple[ModelUnit, str] | None:
        """A unit whose update got stuck past its deadline, and why."""
        for unit in self.units:
            stuck = unit.updates.overdue()
            if stuck:
                return unit, stuck
        return None

    def status_line(self) -> str:
        """One line for systemctl status (STATUS=)."""
        stats = self._pipeline_stats()
        update = self.updates.status_line()
        if stats is None:
            line = "no model serving" + (
                f": {self.updates.last_error}" if self.updates.last_error else ""
            )
        else:
            source = "" if stats.source_connected else ", source reconnecting"
            line = (
                f"{stats.model} v{stats.version} on {stats.backend}: {stats.fps:.1f} fps, "
                f"p95 {stats.latency_ms_p95:.1f} ms{source}"
            )
        if len(self.slots) > 1:
            line += f" (+{len(self.slots) - 1} more pipelines)"
        mqtt = self.telemetry.link
        if mqtt is not None and not mqtt.connected.is_set():
            line += f"; broker unreachable, {self.telemetry.depth()} queued"
        return f"{line}; {update}" if update else line

    def stats(self) -> Stats | None:
        return self._pipeline_stats()

    def pipelines_stats(self) -> dict[str, Stats | None]:
        """Each pipeline's figures, by name (None: not serving yet)."""
        return {slot.name: slot.stats() for slot in self.slots}

    def _pipeline_stats(self) -> Stats | None:
        return self.slots[0].stats()

    def _pipelines_figures(self) -> dict[str, PipelineInferenceDoc]:
        """Telemetry's ``pipelines``: each serving pipeline's figures."""
        figures: dict[str, PipelineInferenceDoc] = {}
        for slot in self.slots:
            stats = slot.stats()
            if stats is not None:
                cascade = self.cascades.get(slot.name)
                figures[slot.name] = {
                    **stats.to_dict(),
                    "cascade": cascade.figures() if cascade is not None else None,
                }
        return figures

    def publish_state(self, state: StateDoc | None = None) -> None:
        """The one retained ``state``: the first pipeline's model as the top-level
        fields; with several models, every model's part and the pipelines too."""
        # Composed and queued in one go: never an older one last. ``state`` (computed
        # before the lock by the caller) is not used: a unit's worker and its shadow
        # controller both publish, and the one computed first may come in last.
        with self._state_lock:
            self.telemetry.state(self._state_doc())

    def _state_doc(self) -> StateDoc:
        doc = self.updates.state()
        if not self.multi:
            return doc
        parts = {unit.name or "": unit.updates.state() for unit in self.units}
        return compose_state(doc, parts, self.pipelines)

    def _build_metrics(self) -> Metrics | None:
        """The Prometheus endpoint when ``metrics.listen`` is set; without
        prometheus_client, one line and the agent serves on without it."""
        listen = self.config.metrics.listen
        if listen is None:
            return None
        try:
            from agent.metrics import Metrics
        except ImportError as exc:
            log.error(
                "metrics.listen: %s; serving on without metrics "
                "(pip install 'edge-agent[metrics]')",
                exc,
            )
            return None
        return Metrics(listen, self._metrics_snapshot, per_pipeline=self.multi)

    def _metrics_snapshot(self) -> Snapshot:
        """What a scrape reads: the figures telemetry sends (the endpoint's thread)."""
        from agent.metrics import Snapshot
        from agent.metrics_models import UpdateFigures

        extra = self._shadow_telemetry()
        pipelines: tuple[PipelineFigures, ...] = ()
        models: dict[str, UpdateFigures] = {}
        if self.multi:  # every pipeline and every model, labelled
            pipelines = tuple(self._pipeline_figures(slot) for slot in self.slots)
            models = {
                unit.name or "": UpdateFigures(unit.updates.phase(), dict(unit.updates.outcomes))
                for unit in self.units
            }
        return Snapshot(
            agent_version=__version__,
            inference=self._pipeline_stats(),
            phase=self.updates.phase(),
            outcomes=dict(self.updates.outcomes),
            figures=self.telemetry.snapshot(),
            machine=self.telemetry.machine,
            pipelines=pipelines,
            models=models,
            shadows=extra.get("shadows", {}),
            outputs=extra.get("outputs", {}),
        )

    def _pipeline_figures(self, slot: PipelineSlot) -> PipelineFigures:
        from agent.metrics_models import PipelineFigures

        stats = slot.stats()
        cascade = self.cascades.get(slot.name)
        return PipelineFigures(
            slot.name,
            slot.config.model.name or (stats.model if stats else ""),
            stats,
            cascade.figures() if cascade is not None else None,
        )

    def _last_frame(self) -> np.ndarray | None:
        return self.slots[0].last_frame()

    def _stats(self) -> InferenceDoc | None:
        stats = self._pipeline_stats()
        return stats.to_dict() if stats else None

    # -- MQTT and commands --------------------------------------------------------------

    def _on_desired(self, message: Incoming) -> None:
        for unit in self.units:  # each takes its model's (the first reports another's)
            unit.updates.on_desired(message)

    def _on_model_desired(self, index: int, message: Incoming) -> None:
        self.units[index].updates.on_desired(message)

    def _reply(self, topic: str, body: Any, correlation: bytes | None) -> None:
        self.telemetry.reply(topic, body, correlation)

    def _unit(self, args: Mapping[str, Any]) -> ModelUnit:
        """The unit of the command's ``model`` (default: the first pipeline's)."""
        from agent.commands import CommandError

        name = args.get("model")
        if name is None:
            return self.units[0]
        for unit in self.units:
            if unit.name == name and isinstance(name, str):
                return unit
        served = ", ".join(u.name for u in self.units if u.name) or "none"
        raise CommandError(f"model: {name!r} is not served here (served: {served})")

    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        pointer = self.store.pointer() if not self.multi else self.units[0].store.pointer()
        reply: dict[str, Any] = {
            "pong": True,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": pointer.model if pointer else None,
            "version": pointer.version if pointer else None,
            "phase": self.updates.phase(),
        }
        if self.multi:
            models = {}
            for unit in self.units:
                held = unit.store.pointer()
                models[unit.name or ""] = {
                    "version": held.version if held else None,
                    "phase": unit.updates.phase(),
                }
            reply["models"] = models
        return reply

    def _rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        from agent.commands import CommandError

        to = args.get("version")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
            raise CommandError("version: must be a positive integer")
        return self._unit(args).updates.rollback(to)

    def _check(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._unit(args).updates.check_now()

    def _pull(self, args: dict[str, Any]) -> dict[str, Any]:
        from agent.commands import CommandError

        version = args.get("version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 1
        ):
            raise CommandError("version: must be a positive integer")
        return self._unit(args).updates.request_pull(version)

    def _reload_request(self, args: dict[str, Any]) -> dict[str, Any]:
        """Ask ``run``'s loop for a reload; ``status``'s ``reload.done`` reaches the
        ticket when it is done (edge-agent reload waits for that)."""
        return {"ticket": self.reloads.request()}

    def status(self, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What this agent serves now: the retained state's fields, plus the stream's
        figures, the broker link and the process (the control socket's ``status``);
        with several pipelines, each one's figures under ``pipelines_stats``."""
        stats = self._pipeline_stats()
        link = self.telemetry.link
        doc: dict[str, Any] = {
            **self._state_doc(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "stats": stats.to_dict() if stats else None,
            "broker": {
                "url": self.config.mqtt.url,
                "connected": link is not None and link.connected.is_set(),
                "queued": self.telemetry.depth(),
            },
            "status_line": self.status_line(),
            "reload": self.reloads.report(),
        }
        if self.multi:
            doc["pipelines_stats"] = {
                slot.name: (s.to_dict() if (s := slot.stats()) is not None else None)
                for slot in self.slots
            }
        return doc
