"""The daemon's main loop (``edge-agent run``) around one ``Service``.

READY=1 once the config, the model and the source are up; WATCHDOG=1 only while
frames are being processed (or while there is honestly nothing to process: no
release yet, a source reconnecting); STATUS= a one-line summary; SIGHUP (or
``edge-agent reload``) reloads the config; SIGTERM stops. Signal handlers only note
the signal; the loop acts on it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, load_config
from agent.errors import ConfigError
from agent.notify import Notifier
from agent.pipeline import Stats
from agent.preflight import check
from agent.reloading import Outcome, Reloads
from agent.service import Service

log = logging.getLogger(__name__)

SOURCE_WAIT_S = 10.0  # at start, how long READY waits for the first frame
STALL_S = 20.0  # no frame processed for this long (source up): no WATCHDOG=1


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


class Progress:
    """Proves every pipeline moves: each one's results advance, or there is nothing it
    could do (no model yet, a source reconnecting). One stalled pipeline among several
    (an inference that never returns, a cascade crop on a hung accelerator) is enough to
    stop WATCHDOG=1, so that systemd restarts the agent."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seen: dict[str, tuple[int, float]] = {}  # pipeline -> (results, moved at)

    def alive(self, stats: Mapping[str, Stats | None]) -> bool:
        now = self.clock()
        alive = True
        for name, figures in stats.items():
            results, moved_at = self.seen.get(name, (-1, now))
            if figures is None or not figures.source_connected:
                moved_at = now  # nothing it could do: alive
            elif figures.results != results:
                results, moved_at = figures.results, now
            self.seen[name] = (results, moved_at)
            alive = alive and now - moved_at < STALL_S
        return alive


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
        progress = Progress()
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
            overdue = service.overdue()
            if overdue is not None:
                unit, stuck = overdue
                log.error("%s: restarting the agent to recover", stuck)
                unit.updates.give_up(stuck)
                code = 1
                break
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + min(interval or 1.0, 1.0)
                if interval is not None and progress.alive(service.pipelines_stats()):
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
