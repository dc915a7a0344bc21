"""Updates on a running device: which release to run, getting it there, keeping it only
if it works.

What to run comes from the desired state pushed over MQTT (``agent.desired``), else
from the registry channel, polled with ETag/If-None-Match every
``registry.poll_interval_s`` (jittered). One worker thread takes one update at a time
through its phases:

    downloading -> verifying -> validating -> activating -> probation

and every update ends in a terminal outcome: ``succeeded``, ``failed`` or
``rolled_back``, each with a reason. Phases and outcomes are published in the
retained ``state`` and as events, and recorded in a journal (``updates.json`` in the
store) that is rewritten atomically at every step. After a crash or power cut the
journal tells the next start where the update stood: an interrupted download or
validation ends as ``failed`` (and is retried), an interrupted probation goes on, and
a release under which the agent keeps restarting (``update.crash_loop_restarts``
unclean starts during probation) is rolled back before it is loaded again.

A release that fails its self-test, its latency budget or its probation is marked bad
on this device: the channel never offers it again, and a desired state issued before
the marking is ignored. A desired state issued after it is the operator's deliberate
retry, and is tried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__, logs
from agent.atomic import write_atomic
from agent.backoff import backoff_delay
from agent.commands import CommandError
from agent.config import Config
from agent.desired import Desired, DesiredState
from agent.errors import (
    AcceleratorError,
    EdgeAgentError,
    ModelError,
    RefusedError,
    StoreError,
    TransportError,
    UpdateError,
    ValidationError,
)
from agent.faults import crash_point
from agent.registry import Registry
from agent.store import Pointer, Release, Store
from agent.updater import Updater, channel_hold
from agent.verify import KeyRing

if TYPE_CHECKING:
    from agent.mqtt import Incoming
    from agent.pipeline import Stats
    from agent.runtime.model import LoadedModel

log = logging.getLogger(__name__)

JOURNAL = "updates.json"
PHASES = ("downloading", "verifying", "validating", "activating", "probation")
OUTCOMES = ("succeeded", "failed", "rolled_back")
RETRY_FIRST_S = 5.0
DEADLINE_GRACE_S = 30.0  # past a phase's deadline by this much, the update is stuck
PROBATION_TICK_S = 0.25
CONNECT_WAIT_S = 5.0  # at start, how long retained desired state may take to arrive
BAD_MAX = 64
LOCAL_OFFLINE = "local-offline"  # Attempt.source of a pull made while the agent was stopped


class Serving(Protocol):
    """What the service does for the updater: load a release, switch the stream to it."""

    def load(self, release: Release) -> LoadedModel:
        """Load (and warm up) ``release`` beside the running model. Raises ModelError."""
        ...

    def swap(self, model: LoadedModel, timeout: float) -> None:
        """Serve ``model`` from now on (starting the stream if there was none).

        Raises ModelError when it is not taken within ``timeout``; the old one serves on.
        """
        ...

    def stats(self) -> Stats | None: ...


class Reporter(Protocol):
    def event(self, name: str, detail: Mapping[str, Any] | None = None) -> None: ...

    def state(self, state: Mapping[str, Any]) -> None: ...


Validate = Callable[[Release, "LoadedModel"], Mapping[str, Any]]
"""The validation gate: raises ValidationError, returns a report for the event."""


@dataclass
class Attempt:
    """One update, as the journal keeps it."""

    id: str
    model: str
    version: int
    source: str  # device, group:NAME, channel:NAME, local, local-offline
    issued_at: float | None
    previous: tuple[str, int] | None  # the release to go back to
    phase: str = "downloading"
    outcome: str | None = None
    reason: str = ""
    transient: bool = False  # a failure worth retrying (the network, an interruption)
    started_at: float = field(default_factory=time.time)
    phase_at: float = field(default_factory=time.time)
    deadline_s: float | None = None  # of the current phase
    probation_until: float | None = None  # wall clock
    starts: int = 0  # unclean agent starts seen during probation
    clean_stop: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "source": self.source,
            "issued_at": self.issued_at,
            "phase": self.phase,
            "outcome": self.outcome,
            "reason": self.reason or None,
            "started_at": round(self.started_at, 3),
            "deadline_s": self.deadline_s,
            "retry": self.transient if self.outcome == "failed" else None,
        }


class _Journal:
    """``updates.json``: the last attempt, the desired state applied, the bad versions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.attempt: Attempt | None = None
        self.applied: dict[str, Any] | None = None  # Desired.to_dict() of the last one done
        self.bad: list[dict[str, Any]] = []  # {"model", "version", "at", "reason"}
        self.crashes: dict[str, int] = {}  # "model@version" -> unclean starts mid-update
        self.pinned = False  # a desired state is in force: the channel is not followed
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_bytes())
            attempt = doc.get("attempt")
            if attempt is not None:
                previous = attempt.get("previous")
                attempt["previous"] = tuple(previous) if previous else None
                self.attempt = Attempt(**attempt)
            self.applied = doc.get("applied")
            self.bad = list(doc.get("bad", []))
            self.crashes = dict(doc.get("crashes", {}))
            self.pinned = bool(doc.get("pinned", False))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Never let a damaged journal stop the agent: it only loses history.
            log.error("%s: damaged, starting a new one: %s", self.path, exc)

    def save(self) -> None:
        doc = {
            "schema": 1,
            "attempt": asdict(self.attempt) if self.attempt else None,
            "applied": self.applied,
            "bad": self.bad[-BAD_MAX:],
            "crashes": self.crashes,
            "pinned": self.pinned,
        }
        try:
            write_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as exc:  # a full disk must not stop an update or a rollback
            log.error("cannot write %s: %s", self.path, exc)

    def bad_mark(self, model: str, version: int) -> dict[str, Any] | None:
        return next(
            (b for b in reversed(self.bad) if b["model"] == model and b["version"] == version),
            None,
        )

    def mark_bad(self, model: str, version: int, reason: str) -> None:
        self.unmark(model, version)
        self.bad.append({"model": model, "version": version, "at": time.time(), "reason": reason})

    def unmark(self, model: str, version: int) -> None:
        self.bad = [b for b in self.bad if (b["model"], b["version"]) != (model, version)]


def note_offline_pull(store: Store, release: Release, previous: Pointer | None) -> None:
    """Journal an activation by ``edge-agent models pull`` while no agent runs.

    The next start finds it ``validating`` (source ``local-offline``): the agent runs
    the gate before serving it, then probation, and goes back to ``previous`` when
    either fails. Call it before activating, holding the agent lock.
    """
    journal = _Journal(store.root / JOURNAL)
    journal.attempt = Attempt(
        uuid.uuid4().hex[:12],
        release.model,
        release.version,
        LOCAL_OFFLINE,
        None,
        (previous.model, previous.version) if previous else None,
        phase="validating",
        clean_stop=True,
    )
    journal.save()


class _Failed(Exception):
    """An update ends here: ``outcome`` and ``reason``; ``bad`` marks the version."""

    def __init__(self, reason: str, *, transient: bool = False, bad: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.bad = bad


class Updates:
    """Decides what to run and gets it there; one update at a time, in its own thread."""

    def __init__(
        self,
        config: Config,
        store: Store,
        serving: Serving,
        reporter: Reporter,
        validate: Validate,
        *,
        connected: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.serving = serving
        self.reporter = reporter
        self.validate = validate
        self.connected = connected
        self.desired = DesiredState(
            config.mqtt.topic_prefix,
            config.device.id,
            list(config.device.groups),
            KeyRing.load(config.update.desired_keys, "update.desired_public_key(s)"),
        )
        self.journal = _Journal(store.root / JOURNAL)
        self.last_error = ""
        self._lock = threading.Lock()  # held while the active model changes
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self._channel_version: int | None = None
        self._next_poll = 0.0
        self._retry_at: dict[tuple[str, int], tuple[float, int]] = {}  # -> (when, attempts)
        self._ignored: set[tuple[str, int, float]] = set()  # desired states reported ignored
        self._probation: Attempt | None = None
        self._supersede = False  # a new target came during probation: end it early
        self._phase_started = time.monotonic()  # for deadlines: immune to clock steps
        self._probation_end = 0.0  # monotonic
        self._desired_seen = False  # a desired-state message arrived since start
        self._manual: tuple[str, int, str, float | None, bool] | None = None  # request_pull
        self._gate: Attempt | None = None  # pulled while stopped: validated at start

    # -- start and stop --------------------------------------------------------------

    def recover(self) -> None:
        """Settle what the journal says was under way when the agent last stopped.

        Called at start, before the active release is loaded: a release the agent keeps
        crashing under is rolled back here, before it can crash the agent again.
        """
        attempt = self.journal.attempt
        if attempt is None or attempt.outcome is not None:
            return
        pointer = self.store.pointer()
        on_target = pointer is not None and (pointer.model, pointer.version) == (
            attempt.model,
            attempt.version,
        )
        if attempt.source == LOCAL_OFFLINE and attempt.phase == "validating" and on_target:
            key = f"{attempt.model}@{attempt.version}"
            crashes = self.journal.crashes.get(key, 0) + (not attempt.clean_stop)
            self.journal.crashes[key] = crashes
            attempt.clean_stop = False
            self.journal.save()
            if crashes >= self.config.update.crash_loop_restarts:
                reason = f"the agent died {crashes} times validating this release at start"
                self._roll_back(attempt, reason, serve=False)
            else:
                self._gate = attempt  # the service runs the gate before serving it
            return
        if attempt.phase in ("activating", "probation") and on_target:
            if not attempt.clean_stop:
                attempt.starts += 1
            attempt.clean_stop = False
            window = self.config.update.probation_s
            attempt.phase, attempt.deadline_s = "probation", window
            if attempt.probation_until is None:  # it stopped while activating
                attempt.probation_until = time.time() + window
            # The wall clock may have stepped since (no RTC, NTP at boot): clamp.
            left = min(max(attempt.probation_until - time.time(), 0.0), window)
            self._probation_end = time.monotonic() + left
            self.journal.save()
            limit = self.config.update.crash_loop_restarts
            if attempt.starts >= limit:
                log.error(
                    "%s v%d: the agent restarted %d times in probation: rolling back",
                    attempt.model,
                    attempt.version,
                    attempt.starts,
                )
                self._roll_back(
                    attempt,
                    f"crash loop: the agent restarted {attempt.starts} times in probation",
                    serve=False,  # the service loads the active release next
                )
            else:
                self._probation = attempt
            return
        phase = attempt.phase
        key = f"{attempt.model}@{attempt.version}"
        crashes = self.journal.crashes.get(key, 0) + (not attempt.clean_stop)
        self.journal.crashes[key] = crashes
        limit = self.config.update.crash_loop_restarts
        if phase in ("validating", "activating") and crashes >= limit:
            # Loading or testing this release keeps killing the agent (a segfault in a
            # delegate, the OOM killer): stop trying it.
            self._finish(
                attempt,
                "failed",
                f"the agent died {crashes} times in phase {phase} of this release",
                bad=True,
            )
            return
        self._finish(
            attempt,
            "failed",
            f"interrupted in phase {phase}: the agent stopped or crashed",
            transient=True,
        )

    def fall_back(self, reason: str) -> Release | None:
        """The active release cannot be loaded: make the newest earlier stored one active.

        Marks the failing version bad. Returns the release now active, or None when
        there is none to go back to (then nothing changed).
        """
        pointer = self.store.pointer()
        if pointer is None:
            return None
        try:  # the previously active stored release, files re-checked; marks this one
            with self.store.lock():
                release = self.store.rollback()
        except EdgeAgentError as exc:
            log.error("cannot fall back from v%d: %s", pointer.version, exc)
            return None
        attempt = self.journal.attempt
        if attempt is not None and attempt.outcome is None and attempt.version == pointer.version:
            self._probation = None
            self._finish(attempt, "rolled_back", reason, bad=True)
        else:
            self.journal.mark_bad(pointer.model, pointer.version, reason)
            self.journal.save()
        self.reporter.event(
            "rolled_back", {"from": pointer.version, "to": release.version, "reason": reason}
        )
        return release

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the worker; False when it is still busy (a download that will not end).

        An update in probation goes on at the next start; one stopped mid-way ends
        ``failed`` (retried at the next start).
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        attempt = self.journal.attempt
        if attempt is not None and attempt.outcome is None:
            attempt.clean_stop = True  # not a crash: the next start does not count it
            self.journal.save()
        return True

    # -- inputs (any thread) ------------------------------------------------------------

    def on_desired(self, message: Incoming) -> None:
        """A retained desired-state message (paho's thread): note it, wake the worker."""
        try:
            desired = self.desired.update(message.topic, message.payload)
        except ValueError as exc:
            log.error("%s: ignored: %s", message.topic, exc)
            self.reporter.event("desired_invalid", {"topic": message.topic, "error": str(exc)})
            return
        if desired is None:
            log.info("desired state from %s: cleared", message.topic)
        else:
            logs.event(log, "desired_state", {"topic": message.topic, **desired.to_dict()})
        self._desired_seen = True
        attempt = self._probation
        winner = self.desired.winner()
        if attempt is not None and winner is not None:
            # Only an instruction the worker will act on ends probation early: not one
            # older than the release on probation (a cleared device state that leaves
            # an older group state in force is ignored as stale afterwards, and must
            # not cut the probation short).
            newer = attempt.issued_at is None or winner.issued_at > attempt.issued_at
            self._supersede = newer and (winner.model, winner.version) != (
                attempt.model,
                attempt.version,
            )
        self._wake.set()

    def check_now(self) -> dict[str, Any]:
        """The ``check-updates`` command: poll the channel now; the worker does the rest."""
        if self.config.registry.url is None:
            raise CommandError("registry.url is not set: there is nothing to check")
        winner = self.desired.winner()
        if winner is not None:
            self._wake.set()
            return {"desired": winner.to_dict(), "note": "desired state is pushed: no polling"}
        version = self._read_channel()
        pointer = self.store.pointer()
        changed = pointer is None or (
            self._wanted_from_channel(version) and pointer.version != version
        )
        attempt = self._probation
        if changed and attempt is not None and attempt.version != version:
            self._supersede = True
        self._etag = None  # the worker polls now, and fetches the index whole
        self._next_poll = 0.0
        self._retry_at.clear()
        self._wake.set()
        return {"version": version, "changed": changed}

    def _read_channel(self) -> int:
        """The version the model's channel names now; CommandError when unreadable."""
        registry = Registry.from_config(self.config.registry)
        try:
            return Updater(self.config, self.store, registry).channel_version()
        except EdgeAgentError as exc:
            raise CommandError(f"cannot read the channel: {exc}") from exc
        finally:
            registry.close()

    def rollback(self, to: int | None) -> dict[str, Any]:
        """The ``rollback`` command: back to the previous stored release (or ``to``).

        Refused while an update is between downloading and activating; during
        probation it ends the probation as ``rolled_back``.
        """
        if not self._lock.acquire(timeout=1.0):
            attempt = self.journal.attempt
            doing = f" (v{attempt.version}, {attempt.phase})" if attempt else ""
            raise CommandError(f"busy: an update is in progress{doing}; try again when it ends")
        try:
            before = self.store.pointer()
            with self.store.lock():
                release = self.store.rollback(to)
            try:
                self._serve(release)
            except EdgeAgentError:
                self._restore(before)
                raise
            attempt = self._probation
            if attempt is not None and before is not None and attempt.version == before.version:
                self._probation = None
                self._finish(attempt, "rolled_back", "rolled back by an operator's command")
            self.reporter.event(
                "rolled_back",
                {
                    "from": before.version if before else None,
                    "to": release.version,
                    "reason": "command",
                },
            )
            self.publish_state()
            return {"version": release.version, "from": before.version if before else None}
        finally:
            self._lock.release()

    def request_pull(self, version: int | None) -> dict[str, Any]:
        """The local ``pull`` (``edge-agent models pull`` through the control socket).

        Queues ``version`` (default: the channel's) for the worker, which takes it
        through the same phases as any update (``source: local``); a downgrade is
        refused there as by an offline pull. Refused while an update is under way, and
        while a desired state from the fleet is in force (a local pull would fight it).
        Returns the queued target; the outcome shows in ``state()``'s ``update``.
        """
        model = self.config.model.name
        if model is None or self.config.registry.url is None:
            raise CommandError("registry.url and model.name are not set: nothing to pull")
        attempt = self.journal.attempt
        if self._manual is not None or (attempt is not None and attempt.outcome is None):
            doing = f" (v{attempt.version}, {attempt.phase})" if attempt else ""
            raise CommandError(f"busy: an update is in progress{doing}; try again when it ends")
        winner = self.desired.winner()
        if winner is not None or (self.journal.pinned and not self._desired_seen):
            what = f"{winner.model} v{winner.version} from {winner.source}" if winner else "pinned"
            raise CommandError(
                f"the fleet's desired state is in force ({what}): a local pull would fight "
                "it; change it with `edge-fleet deploy --device "
                f"{self.config.device.id} --model {model} --version N` (or --clear)"
            )
        if version is None:
            version = self._read_channel()
        self._retry_at.pop((model, version), None)
        self._manual = (model, version, "local", None, False)
        self._wake.set()
        return {"model": model, "version": version, "queued": True}

    def gate(self, release: Release, model: LoadedModel) -> None:
        """At start: run the validation gate on a release an offline pull activated.

        Puts it on probation when it passes; raises ModelError when it fails (the
        service then falls back to the release before it, which marks it bad).
        """
        attempt = self._gate
        if attempt is None or (attempt.model, attempt.version) != (release.model, release.version):
            return
        self._gate = None
        try:
            report = self.validate(release, model)
        except ValidationError as exc:
            raise ModelError(f"validation: {exc}") from exc
        self.reporter.event(
            "update_validated", {"version": release.version, "model": release.model, **report}
        )
        window = self.config.update.probation_s
        if window <= 0:
            self._finish(attempt, "succeeded", "validated at start")
            return
        attempt.probation_until = time.time() + window
        self._probation_end = time.monotonic() + window
        self._probation = attempt
        self._phase(attempt, "probation", window)

    # -- what the service and sd_notify read -----------------------------------------

    def phase(self) -> str:
        """The current phase, the last outcome, or ``idle``."""
        attempt = self.journal.attempt
        if attempt is None:
            return "idle"
        return attempt.outcome or attempt.phase

    def overdue(self) -> str | None:
        """Why the update is stuck (a phase far past its deadline), or None."""
        attempt = self.journal.attempt
        if attempt is None or attempt.outcome is not None or attempt.deadline_s is None:
            return None
        if attempt.phase not in ("validating", "activating"):
            return None  # the registry's own deadlines bound downloads; probation is a window
        late = time.monotonic() - self._phase_started - attempt.deadline_s
        if late > DEADLINE_GRACE_S:
            return f"phase {attempt.phase} of v{attempt.version} exceeded its deadline"
        return None

    def give_up(self, reason: str) -> None:
        """End a stuck update as failed (before the process exits to get unstuck)."""
        attempt = self.journal.attempt
        if attempt is not None and attempt.outcome is None:
            bad = attempt.phase in ("validating", "activating")  # the model hangs the runtime
            self._finish(attempt, "failed", reason, transient=not bad, bad=bad)

    def status_line(self) -> str:
        attempt = self.journal.attempt
        if attempt is None or attempt.outcome is not None:
            return ""
        return f"updating to v{attempt.version}: {attempt.phase}"

    def publish_state(self) -> None:
        """The retained ``state``: active release, what serves, the update, the errors."""
        self.reporter.state(self.state())

    def state(self) -> dict[str, Any]:
        """The document of the retained ``state`` (also the control socket's ``status``)."""
        try:
            pointer: Pointer | None = self.store.pointer()
        except StoreError as exc:
            pointer, self.last_error = None, str(exc)
        stats = self.serving.stats()
        attempt = self.journal.attempt
        return {
            "agent_version": __version__,
            "model": pointer.model if pointer else self.config.model.name,
            "version": pointer.version if pointer else None,
            "sha256": pointer.manifest_sha256 if pointer else None,
            "backend": stats.backend if stats else None,
            "serving": stats.version if stats else None,
            "previous": pointer.previous if pointer else None,
            "phase": self.phase(),
            "last_error": self.last_error or None,
            "update": attempt.summary() if attempt else None,
            "desired": self.journal.applied,
            "bad": [f"{b['model']}@{b['version']}" for b in self.journal.bad],
        }

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        self._wait_for_desired_state()
        while not self._stop.is_set():
            try:
                if self._probation is not None:
                    self._watch_probation()
                    continue
                target = self._next_target()
                if target is not None:
                    self._apply(*target)
                    continue
            except Exception:  # a bug must not end updates for good: report, go on
                log.exception("update worker failed")
                self.reporter.event("update_error", {"error": "internal error; see the log"})
                self._stop.wait(RETRY_FIRST_S)
            self._wake.wait(self._sleep_s())
            self._wake.clear()

    def _wait_for_desired_state(self) -> None:
        """Give the broker a moment to deliver retained desired state before polling."""
        if self.connected is None:
            return
        deadline = time.monotonic() + CONNECT_WAIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.connected():
                self._stop.wait(1.0)  # retained messages follow the SUBACK at once
                return
            self._stop.wait(0.1)

    def _sleep_s(self) -> float:
        now = time.monotonic()
        waits = [when - now for when, _ in list(self._retry_at.values()) if when > now]
        if self._following_channel():
            waits.append(self._next_poll - now)
        return max(0.2, min([60.0, *waits]))

    def _following_channel(self) -> bool:
        """No desired state in force: follow the registry channel.

        A device that was given a desired state stays on it across restarts until the
        fleet clears it, even while the broker cannot be reached.
        """
        if self.config.registry.url is None or self.config.model.name is None:
            return False
        if self.desired.winner() is not None:
            return False
        return not (self.journal.pinned and not self._desired_seen)

    def _next_target(self) -> tuple[str, int, str, float | None, bool] | None:
        """(model, version, source, issued_at, allow_downgrade) to apply now, or None."""
        manual, self._manual = self._manual, None
        if manual is not None:  # accepted by request_pull: an operator on the device
            return manual
        desired = self.desired.winner()
        if desired is not None:
            if not self.journal.pinned:
                self.journal.pinned = True
                self.journal.save()
            return self._from_desired(desired)
        if self.journal.pinned and self._desired_seen:  # the fleet cleared it
            self.journal.pinned = False
            self.journal.save()
        if not self._following_channel():
            return None
        now = time.monotonic()
        if now >= self._next_poll:
            jitter = self.config.update.poll_jitter
            interval = self.config.registry.poll_interval_s
            self._next_poll = now + interval * random.uniform(1 - jitter, 1 + jitter)
            self._poll()
        version = self._channel_version
        if version is None or not self._wanted_from_channel(version):
            return None
        model = self.config.model.name
        if model is None or not self._due(model, version):
            return None
        return (model, version, f"channel:{self.config.model.channel}", None, False)

    def _poll(self) -> None:
        registry = Registry.from_config(self.config.registry)
        try:
            version, self._etag = Updater(self.config, self.store, registry).poll_channel(
                self._etag
            )
        except EdgeAgentError as exc:
            log.warning(
                "polling the registry failed: %s; polling again in %.0f s "
                "(registry.poll_interval_s)",
                exc,
                max(self._next_poll - time.monotonic(), 0.0),
            )
            self.last_error = f"poll: {exc}"
            return
        finally:
            registry.close()
        if version is not None:
            log.debug("channel %s names v%d", self.config.model.channel, version)
            self._channel_version = version

    def _wanted_from_channel(self, version: int) -> bool:
        model = self.config.model.name
        assert model is not None
        pointer = self.store.pointer()
        if pointer is not None and pointer.model == model and pointer.version == version:
            return False
        if self.journal.bad_mark(model, version) is not None:
            return False
        return channel_hold(self.store, model, self.config.model.channel, version) is None

    def _from_desired(self, desired: Desired) -> tuple[str, int, str, float, bool] | None:
        applied = self.journal.applied
        if applied is not None:
            key = (applied["model"], applied["version"], applied["issued_at"])
            if desired.key == key:
                return None  # done (or refused) once: the same instruction is not redone
            if desired.issued_at < applied["issued_at"]:
                self._ignore(desired, "stale: issued before the desired state already applied")
                return None
        mark = self.journal.bad_mark(desired.model, desired.version)
        if mark is not None and mark["at"] >= desired.issued_at:
            self._ignore(desired, f"v{desired.version} failed on this device: {mark['reason']}")
            self._applied(desired)
            self.publish_state()
            return None
        pointer = self.store.pointer()
        if pointer is not None and (pointer.model, pointer.version) == (
            desired.model,
            desired.version,
        ):
            attempt = self.journal.attempt
            if attempt is None or attempt.outcome is not None:
                self._applied(desired)  # already running it: nothing to do
                self.publish_state()
                return None
        if not self._due(desired.model, desired.version):
            return None
        return (desired.model, desired.version, desired.source, desired.issued_at, True)

    def _ignore(self, desired: Desired, why: str) -> None:
        if desired.key in self._ignored:
            return
        self._ignored.add(desired.key)
        log.warning("desired %s v%d ignored: %s", desired.model, desired.version, why)
        self.reporter.event("desired_ignored", {**desired.to_dict(), "reason": why})

    def _applied(self, desired: Desired) -> None:
        self.journal.applied = desired.to_dict()
        self.journal.save()

    def _due(self, model: str, version: int) -> bool:
        retry = self._retry_at.get((model, version))
        return retry is None or time.monotonic() >= retry[0]

    # -- one update ---------------------------------------------------------------------

    def _apply(
        self,
        model: str,
        version: int,
        source: str,
        issued_at: float | None,
        allow_downgrade: bool,
    ) -> None:
        pointer = self.store.pointer()
        previous = (pointer.model, pointer.version) if pointer else None
        attempt = Attempt(uuid.uuid4().hex[:12], model, version, source, issued_at, previous)
        self.journal.attempt = attempt
        log.info("update to %s v%d (from %s) started", model, version, source)
        self.reporter.event(
            "update_started",
            {"model": model, "version": version, "source": source, "update_id": attempt.id},
        )
        with self._lock:
            try:
                release = self._stage(attempt, allow_downgrade)
                if release is None:  # it was the active one already
                    self._finish(attempt, "succeeded", "already active")
                    return
                self._check_superseded(attempt)
                candidate = self._validate(attempt, release)
                try:
                    self._check_superseded(attempt)
                except _Failed:
                    candidate.close()
                    raise
                self._activate(attempt, release, candidate)
            except _Failed as failure:
                self._finish(
                    attempt,
                    "failed",
                    failure.reason,
                    transient=failure.transient,
                    bad=failure.bad,
                )
                return
            except Exception as exc:  # a bug, MemoryError: end it all the same, and say so
                log.exception("update to v%d failed unexpectedly", version)
                self._restore(pointer)
                self._finish(attempt, "failed", f"internal error: {exc!r}", transient=True)
                return
            window = self.config.update.probation_s
            if window > 0:
                attempt.probation_until = time.time() + window
                self._probation_end = time.monotonic() + window
                self._supersede = False
                self._probation = attempt  # under the lock: a rollback command sees it
                self._phase(attempt, "probation", window)
            else:
                self._finish(attempt, "succeeded", "")

    def _check_superseded(self, attempt: Attempt) -> None:
        """Raise _Failed when a newer desired state for another release arrived while
        this update was under way: it is not activated (a download cannot be cut short,
        but a release nobody wants any more is neither activated nor put on probation)."""
        winner = self.desired.winner()
        if winner is None or (winner.model, winner.version) == (attempt.model, attempt.version):
            return
        if attempt.issued_at is not None and winner.issued_at <= attempt.issued_at:
            return
        raise _Failed(f"superseded before activation by a newer desired state (v{winner.version})")

    def _stage(self, attempt: Attempt, allow_downgrade: bool) -> Release | None:
        try:
            registry = Registry.from_config(self.config.registry)
        except UpdateError as exc:  # no registry.url: a desired state cannot be fetched
            raise _Failed(str(exc)) from exc
        try:
            updater = Updater(self.config, self.store, registry, model=attempt.model)
            staged = updater.stage(
                attempt.version,
                allow_downgrade=allow_downgrade,
                on_phase=lambda phase: self._phase(attempt, phase),
            )
        except TransportError as exc:
            raise _Failed(f"download failed: {exc}", transient=True) from exc
        except StoreError as exc:  # a full disk, a busy store: may clear up
            raise _Failed(f"store: {exc}", transient=True) from exc
        except RefusedError as exc:
            raise _Failed(f"refused: {exc}") from exc
        except UpdateError as exc:  # verification, the registry's refusals
            raise _Failed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            registry.close()
        return None if staged.active else staged.release

    def _validate(self, attempt: Attempt, release: Release) -> LoadedModel:
        self._phase(attempt, "validating", self.config.update.validate_timeout_s)
        crash_point("update_validating")
        try:
            candidate = self.serving.load(release)
        except AcceleratorError as exc:  # the TPU's fault, not the release's: try again
            raise _Failed(f"cannot load on this device: {exc}", transient=True) from exc
        except ModelError as exc:
            raise _Failed(f"cannot load on this device: {exc}", bad=True) from exc
        except MemoryError as exc:
            raise _Failed("cannot load on this device: out of memory", bad=True) from exc
        try:
            report = self.validate(release, candidate)
        except ValidationError as exc:
            candidate.close()
            raise _Failed(f"validation: {exc}", bad=True) from exc
        except MemoryError as exc:
            candidate.close()
            raise _Failed("validation: out of memory", bad=True) from exc
        except EdgeAgentError as exc:  # the TPU failing, a store file unreadable: the device's
            candidate.close()
            raise _Failed(f"validation could not run: {exc}", transient=True) from exc
        except BaseException:
            candidate.close()
            raise
        detail = {"version": release.version, "model": release.model, "update_id": attempt.id}
        self.reporter.event("update_validated", {**detail, **report})
        return candidate

    def _activate(self, attempt: Attempt, release: Release, candidate: LoadedModel) -> None:
        timeout = self.config.update.activate_timeout_s
        self._phase(attempt, "activating", timeout)
        before = self.store.pointer()
        try:
            with self.store.lock():
                self.store.activate(release)
            crash_point("update_activated")
            self.serving.swap(candidate, timeout)
        except (ModelError, StoreError) as exc:
            candidate.close()
            self._restore(before)
            # It passed the gate: a stream that would not take it (a source down) or a
            # busy store is the device's state, not the release's fault. Try again.
            raise _Failed(f"activation: {exc}", transient=True) from exc
        self.publish_state()

    def _watch_probation(self) -> None:
        """Watch the new release until its window ends; roll back when it misbehaves."""
        attempt = self._probation
        assert attempt is not None
        cfg = self.config.update
        first = self.serving.stats()
        base_errors, base_results = (first.errors, first.results) if first else (0, 0)
        while not self._stop.is_set():
            with self._lock:
                if self._probation is not attempt:  # ended by an operator's rollback
                    return
                stats = self.serving.stats()
                if stats is None:
                    self._probation = None
                    self._roll_back(attempt, "probation: the model is not serving")
                    return
                errors = stats.errors - base_errors
                results = stats.results - base_results
                rate = errors / max(errors + results, 1)
                if errors >= cfg.probation_min_errors and rate > cfg.probation_max_error_rate:
                    self._probation = None
                    self._roll_back(
                        attempt,
                        f"probation: {errors} of {errors + results} frames failed "
                        f"({rate:.0%} > update.probation_max_error_rate "
                        f"{cfg.probation_max_error_rate:.0%})",
                    )
                    return
                if self._supersede:
                    self._supersede = False
                    self._probation = None
                    self._finish(
                        attempt,
                        "succeeded",
                        f"superseded by a newer target during probation ({results} results, "
                        f"{errors} errors so far)",
                    )
                    return
                if time.monotonic() >= self._probation_end:
                    self._probation = None
                    self._finish(
                        attempt,
                        "succeeded",
                        f"probation passed ({results} results, {errors} errors)",
                    )
                    return
            self._stop.wait(PROBATION_TICK_S)

    def _roll_back(self, attempt: Attempt, reason: str, serve: bool = True) -> None:
        """Go back to the attempt's previous release, mark its version bad, end it.

        ``serve`` False (at start) only switches the store: the service loads it next.
        """
        previous = attempt.previous
        release = self.store.release(*previous) if previous else None
        if release is None:
            self._finish(
                attempt,
                "failed",
                f"{reason}; and there is no earlier release to go back to",
                bad=True,
            )
            return
        before = self.store.pointer()
        try:
            self.store.verify(release)
            with self.store.lock():
                self.store.activate(release, rolled_back_from=attempt.version)
            if serve:
                self._serve(release)
        except EdgeAgentError as exc:
            self._restore(before)  # the store names what serves: still the new release
            self._finish(attempt, "failed", f"{reason}; and going back failed: {exc}", bad=True)
            return
        self.reporter.event(
            "rolled_back",
            {
                "from": attempt.version,
                "to": release.version,
                "reason": reason,
                "update_id": attempt.id,
            },
        )
        self._finish(attempt, "rolled_back", reason, bad=True)

    def _serve(self, release: Release) -> None:
        model = self.serving.load(release)
        try:
            self.serving.swap(model, self.config.update.activate_timeout_s)
        except BaseException:
            model.close()
            raise

    def _restore(self, before: Pointer | None) -> None:
        """Make ``before`` active again after a failed switch, so the store never names a
        release the stream is not serving."""
        if before is None:
            return
        release = self.store.release(before.model, before.version)
        if release is not None:
            with contextlib.suppress(StoreError), self.store.lock():
                self.store.activate(release)

    # -- journal and reports ----------------------------------------------------------

    def _phase(self, attempt: Attempt, phase: str, deadline_s: float | None = None) -> None:
        if deadline_s is None and phase in ("downloading", "verifying"):
            deadline_s = self.config.registry.deadline_s
        if self._stop.is_set() and phase != "probation":
            raise _Failed(f"stopped before phase {phase}", transient=True)
        attempt.phase, attempt.phase_at, attempt.deadline_s = phase, time.time(), deadline_s
        self._phase_started = time.monotonic()
        self.journal.save()
        log.info("update v%d: %s", attempt.version, phase)
        self.reporter.event(
            "update_phase",
            {
                "version": attempt.version,
                "phase": phase,
                "deadline_s": deadline_s,
                "update_id": attempt.id,
            },
        )
        self.publish_state()

    def _finish(
        self,
        attempt: Attempt,
        outcome: str,
        reason: str,
        *,
        transient: bool = False,
        bad: bool = False,
    ) -> None:
        attempt.outcome, attempt.reason, attempt.transient = outcome, reason, transient
        attempt.deadline_s = None
        key = (attempt.model, attempt.version)
        if bad:
            self.journal.mark_bad(attempt.model, attempt.version, reason)
        elif outcome == "succeeded":
            self.journal.unmark(attempt.model, attempt.version)
        if outcome == "succeeded":
            self.journal.crashes.pop(f"{attempt.model}@{attempt.version}", None)
        plan = ""
        if transient:
            _, tries = self._retry_at.get(key, (0.0, 0))
            delay = backoff_delay(tries + 1, RETRY_FIRST_S, self.config.update.retry_max_s, 0.5)
            self._retry_at[key] = (time.monotonic() + delay, tries + 1)
            plan = (
                f"; retrying in {delay:.0f} s (backoff up to "
                f"{self.config.update.retry_max_s:g} s, update.retry_max_s)"
            )
        elif outcome == "failed" and attempt.issued_at is None:
            # A channel's release refused (not found yet on a CDN, a bad signature): look
            # again only after retry_max_s, never in a loop.
            self._retry_at[key] = (time.monotonic() + self.config.update.retry_max_s, 0)
        else:
            self._retry_at.pop(key, None)
            if attempt.issued_at is not None:  # a desired state: done once, whatever came
                source = attempt.source
                self.journal.applied = Desired(
                    attempt.model, attempt.version, attempt.issued_at, source
                ).to_dict()
        self.journal.save()
        self.last_error = "" if outcome == "succeeded" else f"v{attempt.version}: {reason}"
        detail = {
            "model": attempt.model,
            "version": attempt.version,
            "source": attempt.source,
            "update_id": attempt.id,
            "reason": reason or None,
            "seconds": round(time.time() - attempt.started_at, 2),
        }
        if outcome == "succeeded":
            log.info("update to v%d succeeded %s", attempt.version, reason)
            self.reporter.event("update_succeeded", detail)
            if reason != "already active":
                self._clean_up()
        else:
            log.error("update to v%d %s: %s%s", attempt.version, outcome, reason, plan)
            if outcome == "failed":
                self.reporter.event("update_failed", {**detail, "retry": transient})
        self.publish_state()

    def _clean_up(self) -> None:
        """Drop releases beyond store.keep, only once the new one has passed probation."""
        try:
            with self.store.lock():
                self.store.gc()
        except (EdgeAgentError, OSError) as exc:
            log.warning("clean-up of old releases failed: %s", exc)
