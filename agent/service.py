"""The running agent: its parts, wired, started and stopped.

``Service`` builds the parts from a validated config and starts them in order: outbox
and telemetry first (so every later step can be reported), then the journal's
recovery (``Updates.recover``: a release the agent crash-loops under is rolled back
before it is loaded), the active release and the stream, the update worker, and
commands. ``stop()`` runs in reverse. The service holds no update logic: that is
``agent.update``; it only lends the updater its ``load`` and ``swap``.

Each model's unit and each pipeline's cascade stage are built by
``agent.service_units``; shadow runs and output statistics are wired per model by
``agent.service_shadows``.

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
from agent.commands import Commands
from agent.config import Config, PipelineConfig
from agent.config_pipelines import served_models
from agent.contract import (
    EventName,
    InferenceDoc,
    PipelineInferenceDoc,
    StateDoc,
)
from agent.control import ControlServer
from agent.desired import desired_topics
from agent.diagnostics import Diagnostics
from agent.homeassistant import discovery_configs
from agent.homeassistant_publish import DiscoveryPublisher
from agent.outbox import Outbox
from agent.pipeline import Pipeline, Result, Stats
from agent.reloading import Reloads
from agent.service_shadows import ServedShadows
from agent.service_units import UnitReporter, build_cascades, build_units
from agent.store import Store
from agent.sysinfo import SystemProbe
from agent.telemetry import ResultGate, Telemetry, Topics
from agent.units import ModelUnit, PipelineSlot, compose_state

if TYPE_CHECKING:
    import numpy as np

    from agent.metrics import Metrics, Snapshot
    from agent.metrics_models import PipelineFigures
    from agent.mqtt import Incoming

log = logging.getLogger(__name__)

LOCK_WAIT_S = 30.0  # at start, how long a command-line pull may keep the store


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
        # shadow runs and output statistics per model: filled in once the units exist
        self.served = ServedShadows(config, self.models, self._event)
        handlers: dict[str, Callable[[Incoming], None]] = {
            **self.discovery.handlers(),
            topics("cmd/+"): self.commands.submit,
            **self._desired_handlers(),
            **self.served.handlers(),
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
            extra=self.served.telemetry,
        )
        self.metrics = self._build_metrics()
        self.slots = [self._slot(p) for p in self.pipelines]
        self.cascades = build_cascades(self.slots)  # by pipeline name
        link = self.telemetry.link
        self.units = build_units(
            config,
            self.store,
            self.models,
            self.slots,
            self.cascades,
            lambda model: UnitReporter(self._event, self.publish_state, model),
            multi=self.multi,
            connected=(lambda: link.connected.is_set()) if link is not None else None,
        )
        self.served.attach(self.units)
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
        self.served.start()
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
            self.served.stop()
            for slot in self.slots:
                slot.stop()
            for cascade in self.cascades.values():
                cascade.stop()
            self.served.save()
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

        extra = self.served.telemetry()
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
