"""The running agent: wires store, model, source, pipeline, telemetry and commands.

Start order: outbox and telemetry first (so every later step can be reported), then the
active model and the stream, then commands. Stop runs in reverse. The service holds no
logic of its own beyond that wiring and the three commands (``ping``, ``rollback``,
``check-updates``); each part reports through telemetry.

Not here yet (the daemon issue): desired state from MQTT, registry polling, the
validation gate and probation, sd_notify.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from agent.commands import CommandError, Commands
from agent.config import Config
from agent.errors import EdgeAgentError
from agent.oneshot import reloader
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.registry import Registry
from agent.runtime.model import LoadedModel, ModelFiles, load_model
from agent.sources import make_source
from agent.store import Pointer, Release, Store
from agent.sysinfo import SystemProbe
from agent.telemetry import Telemetry
from agent.updater import Updater

log = logging.getLogger(__name__)


class Service:
    """One agent process: build with a validated config, then start(), then stop()."""

    def __init__(self, config: Config, environ: dict[str, str] | None = None) -> None:
        """Build the parts; raises ConfigError for unusable MQTT settings, OutboxError for
        an outbox that cannot be opened."""
        self.config = config
        self.started = time.monotonic()
        self.store = Store(config.store.dir, config.store.keep).open()
        self.outbox = Outbox(config.telemetry.outbox, int(config.telemetry.outbox_max_mb * 1e6))
        self.commands = Commands(
            {"ping": self.ping, "rollback": self.rollback, "check-updates": self.check_updates},
            self._reply,
            reply_topic=f"{config.mqtt.topic_prefix}/{config.device.id}/reply",
            max_bytes=config.mqtt.command_max_bytes,
        )
        self.telemetry = Telemetry(
            config.device.id,
            self.outbox,
            config.mqtt,
            config.results,
            interval_s=config.telemetry.interval_s,
            probe=SystemProbe(config.store.dir),
            stats=self._stats,
            handlers={"cmd/+": self.commands.submit},
            environ=environ,
        )
        self.pipeline: Pipeline | None = None
        self.last_error = ""
        self._lock = threading.Lock()  # one model change at a time

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start telemetry, then serve the active release (pulling one if there is none).

        A model that cannot be loaded is reported (event, state's last_error) and the
        agent keeps running without inference, reachable by commands.
        """
        self.telemetry.start()
        self.telemetry.event("agent_started")
        with self._lock:
            release = self.store.active()
            if release is None and self.config.registry.url is not None:
                release = self._pull(None)
            if release is not None:
                with contextlib.suppress(EdgeAgentError):  # reported; commands can fix it
                    self._serve(release)
            self._publish_state("idle")
        self.commands.start()

    def stop(self) -> None:
        """Stop in reverse order; each step runs even when an earlier one failed."""
        try:
            self.commands.stop()
            with self._lock:
                if self.pipeline is not None:
                    self.pipeline.stop()
        finally:
            try:
                self.telemetry.event("agent_stopped")
                self.telemetry.stop()
            finally:
                self.outbox.close()

    # -- model changes (under _lock) ------------------------------------------------

    def _load(self, release: Release) -> LoadedModel:
        return load_model(
            ModelFiles.from_release(release),
            self.config.runtime,
            self.config.results.top_k,
            self.config.results.min_score,
        )

    def _serve(self, release: Release) -> None:
        """Load ``release`` beside the running model and switch to it (or start).

        Raises the load's ModelError (reported first), or CommandError when the pipeline
        did not take the model; the running model keeps serving in both cases.
        """
        try:
            model = self._load(release)
        except EdgeAgentError as exc:
            self.last_error = f"v{release.version}: {exc}"
            log.error("cannot load %s v%d: %s", release.model, release.version, exc)
            self.telemetry.event("model_failed", {"version": release.version, "error": str(exc)})
            raise
        if self.pipeline is None:
            cfg, runtime = self.config, self.config.runtime
            self.pipeline = Pipeline(
                make_source(cfg.source),
                model,
                on_result=self.telemetry.result,
                on_event=self.telemetry.event,
                fps=cfg.source.fps,
                reconnect_max_s=cfg.source.reconnect_max_s,
                invoke_timeout_s=runtime.invoke_timeout_ms / 1000.0,
                reload=reloader(runtime, cfg.results.top_k, cfg.results.min_score),
            )
            self.pipeline.start()
        elif not self.pipeline.swap(model):
            model.close()
            raise CommandError("the pipeline did not take the new model in time")

    def _serve_or_restore(self, release: Release, before: Pointer | None) -> None:
        """Serve ``release``; if that fails, make ``before`` active again and re-raise, so
        the store never points at a release the pipeline is not serving."""
        try:
            self._serve(release)
        except EdgeAgentError:
            if before is not None and before.version != release.version:
                previous = self.store.release(before.model, before.version)
                if previous is not None:
                    with self.store.lock():
                        self.store.activate(previous)
            self._publish_state("idle")
            raise

    def _pull(self, version: int | None, allow_downgrade: bool = False) -> Release | None:
        registry = Registry.from_config(self.config.registry)
        try:
            result = Updater(self.config, self.store, registry).pull(
                version, allow_downgrade=allow_downgrade
            )
        except EdgeAgentError as exc:
            self.last_error = str(exc)
            log.error("update failed: %s", exc)
            self.telemetry.event("update_failed", {"error": str(exc)})
            return None
        finally:
            registry.close()
        if result.changed:
            self.telemetry.event("update_succeeded", {"version": result.release.version})
        return result.release

    def _publish_state(self, phase: str) -> None:
        pointer = self.store.pointer()
        stats = self.pipeline.stats() if self.pipeline else None
        self.telemetry.state(
            {
                "model": pointer.model if pointer else self.config.model.name,
                "version": pointer.version if pointer else None,
                "sha256": pointer.manifest_sha256 if pointer else None,
                "backend": stats.backend if stats else None,
                "serving": stats.version if stats else None,
                "previous": pointer.previous if pointer else None,
                "phase": phase,
                "last_error": self.last_error or None,
            }
        )

    def _stats(self) -> dict[str, Any] | None:
        pipeline = self.pipeline
        return pipeline.stats().to_dict() if pipeline else None

    # -- commands (the commands thread) ------------------------------------------------

    def _reply(self, topic: str, body: Any, correlation: bytes | None) -> None:
        self.telemetry.reply(topic, body, correlation)

    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        pointer = self.store.pointer()
        return {
            "pong": True,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": pointer.model if pointer else None,
            "version": pointer.version if pointer else None,
        }

    def rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        """Go back to the previous stored release (or ``{"version": N}``) and serve it."""
        to = args.get("version")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
            raise CommandError("version: must be a positive integer")
        with self._lock:
            before = self.store.pointer()
            with self.store.lock():
                release = self.store.rollback(to)
            self._serve_or_restore(release, before)
            self.telemetry.event(
                "rolled_back",
                {"from": before.version if before else None, "to": release.version},
            )
            self._publish_state("idle")
        return {"version": release.version, "from": before.version if before else None}

    def check_updates(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pull the configured channel's release now, and serve it when it changed."""
        if self.config.registry.url is None:
            raise CommandError("registry.url is not set: there is nothing to check")
        with self._lock:
            before = self.store.pointer()
            release = self._pull(None)
            if release is None:
                raise CommandError(f"update failed: {self.last_error}")
            changed = before is None or before.version != release.version
            if changed or self.pipeline is None:
                self._serve_or_restore(release, before)
            self._publish_state("idle")
        return {"version": release.version, "changed": changed}
