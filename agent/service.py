"""The running agent: lifecycle, wiring, sd_notify and signals.

``Service`` builds the parts from a validated config and starts them in order: outbox
and telemetry first (so every later step can be reported), then the journal's
recovery (``Updates.recover``: a release the agent crash-loops under is rolled back
before it is loaded), the active release and the stream, the update worker, and
commands. ``stop()`` runs in reverse. The service holds no update logic: that is
``agent.update``; it only lends the updater its ``load`` and ``swap``.

``run()`` is the daemon's main loop (``edge-agent run``): READY=1 once the config,
the model and the source are up; WATCHDOG=1 only while frames are being processed
(or while there is honestly nothing to process: no release yet, a source
reconnecting); STATUS= a one-line summary; SIGHUP reloads the config; SIGTERM stops.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.commands import Commands
from agent.config import Config, load_config
from agent.contract import InferenceDoc
from agent.control import AgentLock, ControlServer
from agent.desired import desired_topics
from agent.diagnostics import Diagnostics
from agent.errors import ConfigError, EdgeAgentError, ModelError
from agent.homeassistant import discovery_configs
from agent.homeassistant_publish import DiscoveryPublisher
from agent.notify import Notifier
from agent.oneshot import reloader
from agent.outbox import Outbox
from agent.pipeline import Pipeline, Stats
from agent.preflight import check
from agent.reloading import Outcome, Reloads
from agent.runtime.model import LoadedModel, ModelFiles, load_model
from agent.shadow.unit import ShadowUnit
from agent.sources import make_source
from agent.store import Release, Store
from agent.sysinfo import SystemProbe
from agent.telemetry import Telemetry, Topics
from agent.update.worker import Updates

if TYPE_CHECKING:
    import numpy as np

    from agent.metrics import Metrics, Snapshot
    from agent.mqtt import Incoming

log = logging.getLogger(__name__)

SOURCE_WAIT_S = 10.0  # at start, how long READY waits for the first frame
STALL_S = 20.0  # no frame processed for this long (source up): no WATCHDOG=1
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
        self.outbox = Outbox(config.telemetry.outbox, int(config.telemetry.outbox_max_mb * 1e6))
        topics = Topics(config.mqtt.topic_prefix, config.device.id)
        self.commands = Commands(
            {"ping": self.ping, "rollback": self._rollback, "check-updates": self._check},
            self._reply,
            reply_topic=topics("reply"),
            max_bytes=config.mqtt.command_max_bytes,
        )
        self.lock = AgentLock(self.store.root)
        self.control = ControlServer(
            config.control_socket,
            {
                **self.commands.handlers,
                "status": self.status,
                "pull": self._pull,
                "reload": self._reload_request,
            },
        )
        self.pipeline: Pipeline | None = None
        self._pipeline_lock = threading.Lock()
        self._stopped = False
        ha = config.homeassistant
        self.discovery = DiscoveryPublisher(
            config.device.id,
            discovery_configs(
                config.device.id,
                topics.base,
                ha,
                agent_version=__version__,
                telemetry_interval_s=config.telemetry.interval_s,
                results=config.results,
            ),
            ha.prefix,
            config.store.dir,
            lambda topic, payload: self.telemetry.publish_retained(topic, payload),
        )
        pointer = self.store.pointer()  # agent/shadow/ (shadow runs, output statistics)
        self.shadow = ShadowUnit(
            config,
            pointer.model if pointer else config.model.name,
            self.store.root,
            updates=lambda: self.updates,
            load=self.load,
            event=lambda name, detail: self.telemetry.event(name, detail),
            pipeline=lambda: self.pipeline,
        )
        handlers: dict[str, Callable[[Incoming], None]] = {
            **self.discovery.handlers(),
            **dict.fromkeys(self.shadow.topics, self.shadow.on_message),
            topics("cmd/+"): self.commands.submit,
            **{
                topic: self._on_desired
                for topic in desired_topics(
                    config.mqtt.topic_prefix, config.device.id, list(config.device.groups)
                )
            },
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
            extra=self.shadow.telemetry,
        )
        diagnostics = Diagnostics(
            config,
            self.store,
            self.telemetry.snapshot,
            self._stats,
            self._last_frame,
            self.telemetry.event,
        )
        self.commands.handlers.update(diagnostics.handlers())  # MQTT only: not the socket
        link = self.telemetry.link
        self.updates = Updates(
            config,
            self.store,
            self,
            self.telemetry,
            self._validate,
            connected=(lambda: link.connected.is_set()) if link is not None else None,
        )
        self.updates.shadows = self.shadow.state
        self.metrics = self._build_metrics()
        self._on_result = (
            self.metrics.observing(self.telemetry.result) if self.metrics else self.telemetry.result
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Take the outbox and the store (OutboxError, StoreError: another agent uses
        them), start telemetry, settle the journal, serve the active release, start updates.

        A release that cannot be loaded is reported (event, state's last_error) and the
        agent keeps running without inference, reachable by commands and updates.
        """
        # One agent per outbox and store: a second one is refused here, at once.
        self.outbox.open()
        # A command-line pull may be finishing on the store: give it a moment.
        self.lock.acquire(wait_s=LOCK_WAIT_S)
        self.discovery.start()  # before the first connect: it clears what is stale
        self.telemetry.start()
        if self.metrics is not None:
            self.metrics.start()
        self.telemetry.event("agent_started", {"pid": os.getpid()})
        self._repair_store()
        self.updates.recover()
        try:
            release = self.store.active()
        except EdgeAgentError as exc:
            log.error("%s", exc)
            self.updates.last_error = str(exc)
            release = None
        for _ in range(3):  # the active release, else the ones before it
            if release is None:
                break
            try:
                model = self.load(release)
                try:  # a release pulled while the agent was stopped passes the gate first
                    self.updates.gate(release, model)
                except BaseException:
                    model.close()
                    raise
                self._swap_in(model, self.config.update.activate_timeout_s)
                break
            except EdgeAgentError as exc:
                log.error("cannot serve %s v%d: %s", release.model, release.version, exc)
                self.updates.last_error = f"v{release.version}: {exc}"
                self.telemetry.event(
                    "model_failed", {"version": release.version, "error": str(exc)}
                )
                release = self.updates.fall_back(f"cannot be loaded at start: {exc}")
        self.updates.publish_state()
        self.updates.start()
        self.shadow.start()
        self.commands.start()
        self.control.start()

    def _repair_store(self) -> None:
        """Repair a damaged pointer or planted store files before anything reads them;
        each repair is a ``state_repaired`` event naming the file and what was done."""
        try:
            repairs = self.store.repair()
        except EdgeAgentError as exc:  # busy: the holder repairs on taking the lock
            log.error("%s", exc)
            repairs = self.store.take_repairs()
        for repair in repairs:
            self.telemetry.event("state_repaired", repair.to_event())

    def stop(self) -> bool:
        """Stop in reverse order; each step runs even when an earlier one failed.

        Returns False when the update worker did not stop (a transfer that would not
        end): the process should exit then rather than start another service beside it.
        """
        if self._stopped:
            return True
        self._stopped = True
        clean = True
        try:
            self.control.stop()
            self.commands.stop()
            clean = self.updates.stop()
            self.shadow.stop()
            with self._pipeline_lock:
                if self.pipeline is not None:
                    self.pipeline.stop()
            if self.metrics is not None:
                self.metrics.stop()
        finally:
            try:
                self.telemetry.event("agent_stopped")
                self.telemetry.stop()
            finally:
                self.outbox.close()
                self.lock.release()
        return clean

    def ready(self) -> bool:
        """Config, model and source are up; or there is no release to serve yet."""
        stats = self._pipeline_stats()
        if stats is None:
            return self.store.pointer() is None or bool(self.updates.last_error)
        return stats.source_connected and stats.results > 0

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
        mqtt = self.telemetry.link
        if mqtt is not None and not mqtt.connected.is_set():
            line += f"; broker unreachable, {self.telemetry.depth()} queued"
        return f"{line}; {update}" if update else line

    # -- Serving, for the updater ---------------------------------------------------

    def load(self, release: Release) -> LoadedModel:
        pipeline = self.pipeline  # beside a running stream: load in its gaps between frames
        return load_model(
            ModelFiles.from_release(release),
            self.config.runtime,
            self.config.results.top_k,
            self.config.results.min_score,
            pace=pipeline.between_frames if pipeline is not None else None,
            iou_threshold=self.config.results.iou_threshold,
        )

    def swap(self, model: LoadedModel, timeout: float) -> None:
        self._swap_in(model, timeout)

    def stats(self) -> Stats | None:
        return self._pipeline_stats()

    def _swap_in(self, model: LoadedModel, timeout: float) -> None:
        with self._pipeline_lock:
            if self.pipeline is None:
                cfg, runtime = self.config, self.config.runtime
                self.pipeline = Pipeline(
                    make_source(cfg.source),
                    model,
                    on_result=self._on_result,
                    on_event=self.telemetry.event,
                    fps=cfg.source.fps,
                    reconnect_max_s=cfg.source.reconnect_max_s,
                    invoke_timeout_s=runtime.invoke_timeout_ms / 1000.0,
                    reload=reloader(
                        runtime,
                        cfg.results.top_k,
                        cfg.results.min_score,
                        cfg.results.iou_threshold,
                    ),
                )
                self.pipeline.set_observers(self.shadow.observers())
                self.pipeline.start()
                return
            pipeline = self.pipeline
        if not pipeline.swap(model, timeout) and pipeline.withdraw(model):
            raise ModelError(f"the pipeline did not take the new model within {timeout:g} s")

    def _pipeline_stats(self) -> Stats | None:
        pipeline = self.pipeline
        return pipeline.stats() if pipeline else None

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
        return Metrics(listen, self._metrics_snapshot)

    def _metrics_snapshot(self) -> Snapshot:
        """What a scrape reads: the figures telemetry sends (the endpoint's thread)."""
        from agent.metrics import Snapshot

        return Snapshot(
            agent_version=__version__,
            inference=self._pipeline_stats(),
            phase=self.updates.phase(),
            outcomes=dict(self.updates.outcomes),
            figures=self.telemetry.snapshot(),
            machine=self.telemetry.machine,
        )

    def _validate(self, release: Release, model: LoadedModel) -> Mapping[str, Any]:
        from agent.validate import validate

        cfg, pipeline = self.config.update, self.pipeline
        report = validate(  # beside a running stream: each invoke in a gap between frames
            release,
            model,
            budget_runs=cfg.budget_runs,
            deadline_s=cfg.validate_timeout_s,
            pace=pipeline.between_frames if pipeline is not None else None,
        )
        return report.to_dict()

    def _last_frame(self) -> np.ndarray | None:
        pipeline = self.pipeline
        return pipeline.last_frame() if pipeline else None

    def _stats(self) -> InferenceDoc | None:
        stats = self._pipeline_stats()
        return stats.to_dict() if stats else None

    # -- MQTT and commands --------------------------------------------------------------

    def _on_desired(self, message: Incoming) -> None:
        self.updates.on_desired(message)

    def _reply(self, topic: str, body: Any, correlation: bytes | None) -> None:
        self.telemetry.reply(topic, body, correlation)

    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        pointer = self.store.pointer()
        return {
            "pong": True,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": pointer.model if pointer else None,
            "version": pointer.version if pointer else None,
            "phase": self.updates.phase(),
        }

    def _rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        from agent.commands import CommandError

        to = args.get("version")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
            raise CommandError("version: must be a positive integer")
        return self.updates.rollback(to)

    def _check(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.updates.check_now()

    def _pull(self, args: dict[str, Any]) -> dict[str, Any]:
        from agent.commands import CommandError

        version = args.get("version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 1
        ):
            raise CommandError("version: must be a positive integer")
        return self.updates.request_pull(version)

    def _reload_request(self, args: dict[str, Any]) -> dict[str, Any]:
        """Ask ``run``'s loop for a reload; ``status``'s ``reload.done`` reaches the
        ticket when it is done (edge-agent reload waits for that)."""
        return {"ticket": self.reloads.request()}

    def status(self, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What this agent serves now: the retained state's fields, plus the stream's
        figures, the broker link and the process (the control socket's ``status``)."""
        stats = self._pipeline_stats()
        link = self.telemetry.link
        return {
            **self.updates.state(),
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


# -- the daemon's main loop ------------------------------------------------------------


@dataclass
class _Signals:
    """What the handlers saw; they only append (no locks, no I/O in a handler)."""

    received: list[int]

    def take(self) -> list[int]:
        count = len(self.received)  # a signal arriving meanwhile stays for the next take
        taken = self.received[:count]
        del self.received[:count]
        return taken


def _watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (from WATCHDOG_USEC), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class _Progress:
    """Proves the pipeline moves: results advance, or there is nothing it could do."""

    def __init__(self) -> None:
        self.results = -1
        self.moved_at = time.monotonic()

    def alive(self, stats: Stats | None) -> bool:
        now = time.monotonic()
        if stats is None or not stats.source_connected:
            self.moved_at = now  # no model yet, or a source reconnecting: the loop is alive
            return True
        if stats.results != self.results:
            self.results, self.moved_at = stats.results, now
        return now - self.moved_at < STALL_S


def run(config: Config, path: Path) -> int:
    """``edge-agent run``: serve until SIGTERM/SIGINT; SIGHUP reloads the config.

    Returns the exit code: 0 after a signal, 1 when an update got stuck past its
    deadline (systemd restarts the agent, and the journal ends that update).
    """
    findings = check(config)
    if findings.errors:
        raise ConfigError([f"{path}: {p}" for p in findings.errors])
    for warning in findings.warnings:
        log.warning("%s: %s", path, warning)
    signals = _Signals([])
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: signals.received.append(signum))
    notify = Notifier()
    interval = _watchdog_interval()
    reloads = Reloads()
    service = Service(config, reloads=reloads)
    code = 0
    try:
        notify.status("starting")
        service.start()
        _wait_ready(service, signals)
        notify.send("READY=1", f"STATUS={service.status_line()}")
        log.info("ready: %s", service.status_line())
        progress = _Progress()
        next_beat = 0.0
        while True:
            taken = signals.take()
            if signal.SIGTERM in taken or signal.SIGINT in taken:
                name = "SIGTERM" if signal.SIGTERM in taken else "SIGINT"
                log.info("%s: stopping (draining the pipeline and the outbox)", name)
                break
            if signal.SIGHUP in taken:
                reloads.request()
            ticket = reloads.due()
            if ticket is not None:  # SIGHUP, or edge-agent reload on the control socket
                service, config, outcome, error = _reload(service, config, path, notify)
                reloads.finish(ticket, outcome, error)
                if outcome == "exiting":
                    code = 1
                    break
            stuck = service.updates.overdue()
            if stuck:
                log.error("%s: restarting the agent to recover", stuck)
                service.updates.give_up(stuck)
                code = 1
                break
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + min(interval or 1.0, 1.0)
                if interval is not None and progress.alive(service.stats()):
                    notify.send("WATCHDOG=1")
                notify.status(service.status_line())
            time.sleep(0.2)
    finally:
        notify.send("STOPPING=1")
        service.stop()
    log.info("stopped (exit %d)", code)
    return code


def _wait_ready(service: Service, signals: _Signals) -> None:
    deadline = time.monotonic() + SOURCE_WAIT_S
    while time.monotonic() < deadline and not signals.received and not service.ready():
        time.sleep(0.05)


def _reload(
    service: Service, config: Config, path: Path, notify: Notifier
) -> tuple[Service, Config, Outcome, str | None]:
    """Re-read the config; an invalid one is reported and the running agent goes on.

    Returns the service now running, its config, the outcome and its error: "exiting"
    when the agent must exit (the old service would not stop cleanly, or neither
    config would start).
    """
    try:
        fresh = load_config(path)
        problems = check(fresh).errors
        if problems:
            raise ConfigError([f"{path}: {p}" for p in problems])
    except (ConfigError, OSError) as exc:
        log.error("reload: the new configuration is not used:\n%s", exc)
        service.telemetry.event("config_rejected", {"error": str(exc)})
        return service, config, "rejected", str(exc)
    if fresh == config:
        log.info("reload: configuration unchanged")
        return service, config, "unchanged", None
    log.info("reload: applying the new configuration")
    monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_us}")
    if not service.stop():
        log.error("reload: an update would not stop; exiting so that systemd restarts")
        return service, config, "exiting", "an update would not stop"
    failure: str | None = None
    for candidate in (fresh, config):  # the new config, else the one that was running
        which = "new" if candidate is fresh else "old"
        replacement: Service | None = None
        try:
            replacement = Service(candidate, reloads=service.reloads)
            replacement.start()
        except Exception as exc:  # whatever it was: clean up, try the old config next
            log.exception("reload: cannot start with the %s configuration", which)
            failure = failure or f"the new configuration failed to start: {exc}"
            if replacement is not None:
                replacement.stop()
            continue
        replacement.telemetry.event(
            "config_reloaded" if candidate is fresh else "config_rejected",
            {} if candidate is fresh else {"error": failure},
        )
        notify.send("READY=1")
        if candidate is fresh:
            return replacement, candidate, "reloaded", None
        return replacement, candidate, "failed", failure
    return service, config, "exiting", failure
