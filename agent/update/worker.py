"""The daemon's update loop: one thread that owns the update state.

``Updates`` keeps the journal, the desired state, the retry schedule and the probation.
Only its worker thread changes them. Other threads hand it work through a queue: paho's
thread a desired-state message, the command thread ``rollback`` and ``check-updates``,
the control socket ``pull``; a request that needs an answer carries a reply the caller
waits for. What other threads read (``state``, ``phase``, ``overdue``) comes from an
immutable ``View`` the worker publishes after each change.

Before ``start()`` the thread calling ``recover``, ``gate`` and ``fall_back`` (the
service starting) is the owner; after ``stop()`` has joined the worker, again.

The rules are in ``agent.update.policy`` and ``agent.update.probation`` (pure); the I/O
of each step is behind ``agent.update.steps.Steps``.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent import __version__, logs
from agent.commands import CommandError
from agent.config import Config
from agent.contract import (
    UPDATE_OUTCOMES,
    AppliedDesiredDoc,
    EventName,
    ShadowDoc,
    StateDoc,
    StatePhase,
)
from agent.desired import Desired, DesiredState, NotServedHere, download_progress
from agent.errors import EdgeAgentError, ModelError, StoreError, ValidationError
from agent.faults import crash_point
from agent.pull import channel_hold
from agent.store import Pointer, Release, Store
from agent.update import policy
from agent.update.journal import (
    JOURNAL,
    LOCAL_OFFLINE,
    Applied,
    Attempt,
    BadMark,
    Journal,
    JournalDoc,
    Outcome,
    Phase,
)
from agent.update.policy import Failed
from agent.update.probation import Probation
from agent.update.steps import DeviceSteps, Serving, Steps, Validate
from agent.verify import KeyRing

if TYPE_CHECKING:
    from agent.mqtt import Incoming
    from agent.runtime.model import LoadedModel

log = logging.getLogger(__name__)

DEADLINE_GRACE_S = 30.0  # past a phase's deadline by this much, the update is stuck
PROBATION_TICK_S = 0.25
CONNECT_WAIT_S = 5.0  # at start, how long retained desired state may take to arrive
TAKE_WAIT_S = 1.0  # how long a command waits for the worker to take it ("busy" after)
REPLY_SLACK_S = 60.0  # beyond the step's own deadlines, how long a caller waits


class Reporter(Protocol):
    def event(self, name: EventName, detail: Mapping[str, Any] | None = None) -> None: ...

    def state(self, state: StateDoc) -> None: ...


Target = tuple[str, int, str, "float | None", bool]
"""(model, version, source, issued_at, allow_downgrade)"""


# -- the queue ----------------------------------------------------------------------------

Kind = Literal["wake", "desired", "poke", "rollback", "pull", "update"]


class _Request:
    """Work for the worker; ``take`` and ``cancel`` race safely (one of them wins)."""

    def __init__(self, kind: Kind, payload: Any = None) -> None:
        self.kind = kind
        self.payload = payload
        self._lock = threading.Lock()
        self._status = "queued"  # taken, cancelled
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def take(self) -> bool:
        with self._lock:
            if self._status != "queued":
                return False
            self._status = "taken"
            return True

    def cancel(self) -> bool:
        """True when the worker will never run it."""
        with self._lock:
            if self._status == "queued":
                self._status = "cancelled"
            return self._status == "cancelled"

    def reply(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def answer(self, timeout: float) -> Any:
        if not self._done.wait(timeout):
            raise CommandError(f"the update worker did not answer within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._result


@dataclass(frozen=True)
class View:
    """What other threads may read: a copy the worker replaces after each change."""

    attempt: Attempt | None = None
    applied: Applied | None = None
    bad: tuple[BadMark, ...] = ()
    last_error: str = ""
    winner: Desired | None = None
    phase_started: float = 0.0  # monotonic, for deadlines: immune to clock steps


# -- the loop -----------------------------------------------------------------------------


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
        steps: Steps | None = None,
        only_model: bool = False,
        not_served: Callable[[str], bool] | None = None,
    ) -> None:
        """``only_model``: one of several models on this device; a desired state for
        another model on the one topic older fleets use is not this worker's (and
        reported ``desired_ignored`` when ``not_served`` says no model here has it)."""
        self.config = config
        self.only_model = only_model
        self.not_served = not_served
        self.store = store
        self.serving = serving
        self.reporter = reporter
        self.validate = validate
        self.steps: Steps = steps or DeviceSteps(config, store, serving, validate)
        self.connected = connected
        self.desired = DesiredState(
            config.mqtt.topic_prefix,
            config.device.id,
            list(config.device.groups),
            KeyRing.load(config.update.desired_keys, "update.desired_public_key(s)"),
            max_skew_s=config.update.max_clock_skew_s,
            model=config.model.name,
            only_model=only_model,
        )
        self.journal = Journal.load(store.root / JOURNAL)
        self._last_error = ""
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self._channel_version: int | None = None
        self._next_poll = 0.0
        self._retry_at: dict[tuple[str, int], tuple[float, int]] = {}  # -> (when, tries)
        self._ignored: set[tuple[str, int, float]] = set()  # desired states reported ignored
        self._probation: Attempt | None = None
        self._judge: Probation | None = None
        self._supersede = False  # a new target came during probation: end it early
        self._phase_started = time.monotonic()
        self._probation_end = 0.0  # monotonic
        self._desired_seen = False  # a desired-state message arrived since start
        self._manual: Target | None = None  # accepted by a local pull
        self._gate: Attempt | None = None  # pulled while stopped: validated at start
        self._view = View()
        self.shadows: Callable[[], dict[str, ShadowDoc]] | None = (
            None  # agent/shadow/, set by the service
        )
        # terminal outcomes since start (Prometheus' edge_agent_update_outcomes_total);
        # every key is there from the start, so readers on other threads can copy it
        self.outcomes: collections.Counter[str] = collections.Counter(
            dict.fromkeys(UPDATE_OUTCOMES, 0)
        )
        self._refresh()

    @property
    def doc(self) -> JournalDoc:
        return self.journal.doc

    @property
    def last_error(self) -> str:
        return self._view.last_error

    @last_error.setter
    def last_error(self, value: str) -> None:  # the owner only
        self._last_error = value
        self._refresh()

    # -- start and stop --------------------------------------------------------------

    def recover(self) -> None:
        """Settle what the journal says was under way when the agent last stopped.

        Called at start, before the active release is loaded: a release the agent keeps
        crashing under is rolled back here, before it can crash the agent again. A
        damaged journal found at load is reported here (``state_repaired``).
        """
        repair = self.journal.repair
        if repair is not None:
            self.journal.repair = None
            self.reporter.event("state_repaired", repair.to_event())
            self._save()  # the fresh journal replaces the one set aside
        attempt = self.doc.attempt
        if attempt is None or not attempt.open:
            return
        pointer = self.store.pointer()
        key = f"{attempt.model}@{attempt.version}"
        plan = policy.recover(
            phase=attempt.phase,
            offline_pull=attempt.source == LOCAL_OFFLINE,
            on_target=pointer is not None
            and (pointer.model, pointer.version) == (attempt.model, attempt.version),
            clean_stop=attempt.clean_stop,
            crashes=self.doc.crashes.get(key, 0),
            starts=attempt.starts,
            limit=self.config.update.crash_loop_restarts,
            probation_until=attempt.probation_until,
            window_s=self.config.update.probation_s,
            now=time.time(),
        )
        if plan.crashes is not None:
            self.doc.crashes[key] = plan.crashes
        if plan.starts is not None:
            attempt.starts = plan.starts
        attempt.clean_stop = False
        if plan.starts is not None:  # it stopped activating or in probation, on the release
            window = self.config.update.probation_s
            attempt.phase, attempt.deadline_s = "probation", window
            if attempt.probation_until is None:  # it stopped while activating
                attempt.probation_until = time.time() + window
        if plan.action == "gate":
            self._save()
            self._gate = attempt  # the service runs the gate before serving it
        elif plan.action == "probation":
            self._probation_end = time.monotonic() + (plan.probation_left_s or 0.0)
            self._save()
            self._start_probation(attempt)
        elif plan.action == "roll_back":
            self._save()
            log.error("%s v%d: %s: rolling back", attempt.model, attempt.version, plan.reason)
            self._roll_back(attempt, plan.reason, serve=False)  # the service loads it next
        else:
            self._finish(attempt, "failed", plan.reason, transient=plan.transient, bad=plan.bad)

    def fall_back(self, reason: str) -> Release | None:
        """The active release cannot be loaded: make the newest earlier stored one active.

        Marks the failing version bad. Returns the release now active, or None when
        there is none to go back to (then nothing changed). Before ``start()`` only.
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
        attempt = self.doc.attempt
        if attempt is not None and attempt.open and attempt.version == pointer.version:
            self._probation = None
            self._finish(attempt, "rolled_back", reason, bad=True)
        else:
            self.doc.mark_bad(pointer.model, pointer.version, reason, time.time())
            self._save()
        self.reporter.event(
            "rolled_back", {"from": pointer.version, "to": release.version, "reason": reason}
        )
        return release

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
        self._start_probation(attempt)
        self._phase(attempt, "probation", window)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the worker; False when it is still busy (a download that will not end).

        An update in probation goes on at the next start; one stopped mid-way ends
        ``failed`` (retried at the next start).
        """
        self._stop.set()
        self._queue.put(_Request("wake"))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        attempt = self.doc.attempt
        if attempt is not None and attempt.open:
            attempt.clean_stop = True  # not a crash: the next start does not count it
            self._save()
        return True

    # -- inputs (any thread): handed to the worker -------------------------------------

    def on_desired(self, message: Incoming) -> None:
        """A retained desired-state message (paho's thread)."""
        self._queue.put(_Request("desired", message))

    def check_now(self) -> dict[str, Any]:
        """The ``check-updates`` command: read the channel now; the worker does the rest.

        The read happens on the caller's thread (it only fetches), so the reply does not
        wait for an update under way.
        """
        if self.config.registry.url is None:
            raise CommandError("registry.url is not set: there is nothing to check")
        view = self._view
        if view.winner is not None:
            self._queue.put(_Request("wake"))
            return {"desired": view.winner.to_dict(), "note": "desired state is pushed: no polling"}
        try:
            version = self.steps.read_channel()
        except EdgeAgentError as exc:
            raise CommandError(f"cannot read the channel: {exc}") from exc
        pointer = self.store.pointer()
        changed = pointer is None or (
            self._channel_wants(version, view.bad) and pointer.version != version
        )
        self._queue.put(_Request("poke", (version, changed)))
        return {"version": version, "changed": changed}

    def rollback(self, to: int | None) -> dict[str, Any]:
        """The ``rollback`` command: back to the previous stored release (or ``to``).

        Refused while an update is between downloading and activating; during
        probation it ends the probation as ``rolled_back``.
        """
        timeout = 2 * self.config.update.activate_timeout_s + REPLY_SLACK_S
        result: dict[str, Any] = self._ask(_Request("rollback", to), timeout)
        return result

    def request_pull(self, version: int | None) -> dict[str, Any]:
        """The local ``pull`` (``edge-agent models pull`` through the control socket).

        Queues ``version`` (default: the channel's) for the worker, which takes it
        through the same phases as any update (``source: local``); a downgrade is
        refused there as by an offline pull. Refused while an update is under way, and
        while a desired state from the fleet is in force (a local pull would fight it).
        Returns the queued target; the outcome shows in ``state()``'s ``update``.
        """
        if self.config.model.name is None or self.config.registry.url is None:
            raise CommandError("registry.url and model.name are not set: nothing to pull")
        timeout = self.config.registry.deadline_s + REPLY_SLACK_S
        result: dict[str, Any] = self._ask(_Request("pull", version), timeout)
        return result

    def request_update(
        self, model: str, version: int, source: str, issued_at: float | None = None
    ) -> None:
        """Update to ``version`` of ``model`` as soon as the worker is free, through the
        same phases as any update (gate, probation); ``source`` names who asked (a
        promoted shadow run: ``shadow``). The version was named (by the fleet's signed
        instruction), so it may be lower than the active one, as a desired state's.
        ``issued_at``: when that instruction was issued; the update then counts as a
        desired state issued then (a desired state issued before it neither cuts it
        short nor, once it is applied, undoes it; a later one wins as ever).
        Does not wait; the outcome shows in the state."""
        self._queue.put(_Request("update", (model, version, source, issued_at)))

    def _ask(self, request: _Request, timeout: float) -> Any:
        """Hand ``request`` to the worker and wait for its answer; busy when the worker
        does not take it within TAKE_WAIT_S (an update is under way)."""
        self._queue.put(request)
        if not request._done.wait(TAKE_WAIT_S) and request.cancel():
            raise CommandError(self._busy())
        return request.answer(timeout)

    def _busy(self) -> str:
        attempt = self._view.attempt
        doing = f" (v{attempt.version}, {attempt.phase})" if attempt and attempt.open else ""
        return f"busy: an update is in progress{doing}; try again when it ends"

    # -- what the service and sd_notify read (any thread) ------------------------------

    def phase(self) -> StatePhase:
        """The current phase, the last outcome, or ``idle``."""
        attempt = self._view.attempt
        if attempt is None:
            return "idle"
        return attempt.outcome or attempt.phase

    def overdue(self) -> str | None:
        """Why the update is stuck (a phase far past its deadline), or None."""
        view = self._view
        attempt = view.attempt
        if attempt is None or not attempt.open or attempt.deadline_s is None:
            return None
        if attempt.phase not in ("validating", "activating"):
            return None  # the registry's own deadlines bound downloads; probation is a window
        late = time.monotonic() - view.phase_started - attempt.deadline_s
        if late > DEADLINE_GRACE_S:
            return f"phase {attempt.phase} of v{attempt.version} exceeded its deadline"
        return None

    def give_up(self, reason: str) -> None:
        """End a stuck update as failed (before the process exits to get unstuck).

        The one write from another thread: the worker is stuck in a step that will not
        return, and the process exits right after.
        """
        attempt = self.doc.attempt
        if attempt is not None and attempt.open:
            bad = attempt.phase in ("validating", "activating")  # the model hangs the runtime
            self._finish(attempt, "failed", reason, transient=not bad, bad=bad)

    def status_line(self) -> str:
        attempt = self._view.attempt
        if attempt is None or not attempt.open:
            return ""
        return f"updating to v{attempt.version}: {attempt.phase}"

    def publish_state(self) -> None:
        """The retained ``state``: active release, what serves, the update, the errors."""
        self.reporter.state(self.state())

    def state(self) -> StateDoc:
        """The document of the retained ``state`` (also the control socket's ``status``)."""
        view = self._view
        last_error = view.last_error
        try:
            pointer: Pointer | None = self.store.pointer()
        except StoreError as exc:
            pointer, last_error = None, str(exc)
        stats = self.serving.stats()
        attempt = view.attempt
        doc: StateDoc = {
            "agent_version": __version__,
            "model": pointer.model if pointer else self.config.model.name,
            "version": pointer.version if pointer else None,
            "sha256": pointer.manifest_sha256 if pointer else None,
            "backend": stats.backend if stats else None,
            "serving": stats.version if stats else None,
            "previous": pointer.previous if pointer else None,
            "phase": self.phase(),
            "last_error": last_error or None,
            "update": attempt.summary() if attempt else None,
            "desired": _desired_dict(view.applied),
            "bad": [f"{b.model}@{b.version}" for b in view.bad],
            "runtime": stats.runtime if stats else None,
        }
        shadows = self.shadows() if self.shadows is not None else None
        if shadows:  # agent/shadow/: a shadow run is (or was) on
            doc["shadows"] = shadows
        return doc

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        self._wait_for_desired_state()
        while not self._stop.is_set():
            try:
                if self._probation is not None:
                    self._watch_probation()
                    self._serve_queue(PROBATION_TICK_S)
                    continue
                target = self._next_target()
                if target is not None:
                    self._apply(*target)
                    continue
            except Exception:  # a bug must not end updates for good: report, go on
                log.exception("update worker failed")
                self.reporter.event("update_error", {"error": "internal error; see the log"})
                self._stop.wait(policy.RETRY_FIRST_S)
            self._serve_queue(self._sleep_s())

    def _serve_queue(self, wait_s: float, *, busy: bool = False) -> None:
        """Handle what other threads handed in: wait up to ``wait_s`` for the first item,
        then take all that are queued. ``busy`` (mid-update): commands are refused."""
        try:
            request = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if request.take():
                try:
                    request.reply(self._handle(request, busy))
                except Exception as exc:  # CommandError, EdgeAgentError: the caller's answer
                    request.reply(error=exc)
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
        self._refresh()

    def _handle(self, request: _Request, busy: bool) -> Any:
        if request.kind == "desired":
            self._take_desired(request.payload)
        elif request.kind == "poke":
            self._poked(*request.payload)
        elif request.kind == "rollback":
            if busy:
                raise CommandError(self._busy())
            return self._rollback_command(request.payload)
        elif request.kind == "update":  # taken after the update under way, if any
            model, version, source, issued_at = request.payload
            self._retry_at.pop((model, version), None)
            self._manual = (model, version, source, issued_at, True)  # named: may be lower
        elif request.kind == "pull":
            if busy:
                raise CommandError(self._busy())
            return self._accept_pull(request.payload)
        return None

    def _wait_for_desired_state(self) -> None:
        """Give the broker a moment to deliver retained desired state before polling."""
        if self.connected is None:
            return
        deadline = time.monotonic() + CONNECT_WAIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.connected():
                until = time.monotonic() + 1.0  # retained messages follow the SUBACK at once
                while not self._stop.is_set() and time.monotonic() < until:
                    self._serve_queue(max(until - time.monotonic(), 0.01))
                return
            self._serve_queue(0.1)

    def _sleep_s(self) -> float:
        now = time.monotonic()
        waits = [when - now for when, _ in list(self._retry_at.values()) if when > now]
        if self._following_channel():
            waits.append(self._next_poll - now)
        return max(0.2, min([60.0, *waits]))

    # -- handed-in work (the worker) -----------------------------------------------------

    def _take_desired(self, message: Incoming) -> None:
        try:
            desired = self.desired.update(message.topic, message.payload)
        except NotServedHere as exc:  # another model's (several models on this device)
            self._desired_seen = True
            if self.not_served is not None and self.not_served(exc.desired.model):
                self._ignore(exc.desired, "not served here")
            return
        except ValueError as exc:
            if self.only_model and self.not_served is None and self.desired.shared(message.topic):
                return  # every model's worker reads that topic: the first one reports
            log.error("%s: ignored: %s", message.topic, exc)
            self.reporter.event("desired_invalid", {"topic": message.topic, "error": str(exc)})
            return
        if desired is None:
            log.info("desired state from %s: cleared", message.topic)
        else:
            logs.event(log, "desired_state", {"topic": message.topic, **desired.to_dict()})
        self._desired_seen = True
        attempt = self._probation
        if attempt is not None and self.desired.winner() is not None:
            # Only an instruction the worker will act on ends probation early.
            self._supersede = policy.supersedes(self.desired.winner(), attempt)

    def _poked(self, version: int, changed: bool) -> None:
        attempt = self._probation
        if changed and attempt is not None and attempt.version != version:
            self._supersede = True
        self._etag = None  # poll now, and fetch the index whole
        self._next_poll = 0.0
        self._retry_at.clear()

    def _rollback_command(self, to: int | None) -> dict[str, Any]:
        before, release = self.steps.rollback_command(to)
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

    def _accept_pull(self, version: int | None) -> dict[str, Any]:
        model = self.config.model.name
        assert model is not None
        attempt = self.doc.attempt
        if self._manual is not None or (attempt is not None and attempt.open):
            raise CommandError(self._busy())
        winner = self.desired.winner()
        if winner is not None or (self.doc.pinned and not self._desired_seen):
            what = f"{winner.model} v{winner.version} from {winner.source}" if winner else "pinned"
            raise CommandError(
                f"the fleet's desired state is in force ({what}): a local pull would fight "
                "it; change it with `edge-fleet deploy --device "
                f"{self.config.device.id} --model {model} --version N` (or --clear)"
            )
        if version is None:
            try:
                version = self.steps.read_channel()
            except EdgeAgentError as exc:
                raise CommandError(f"cannot read the channel: {exc}") from exc
        self._retry_at.pop((model, version), None)
        self._manual = (model, version, "local", None, False)
        return {"model": model, "version": version, "queued": True}

    # -- what to apply -------------------------------------------------------------------

    def _following_channel(self) -> bool:
        """No desired state in force: follow the registry channel.

        A device that was given a desired state stays on it across restarts until the
        fleet clears it, even while the broker cannot be reached.
        """
        if self.config.registry.url is None or self.config.model.name is None:
            return False
        if self.desired.winner() is not None:
            return False
        return not (self.doc.pinned and not self._desired_seen)

    def _next_target(self) -> Target | None:
        manual, self._manual = self._manual, None
        if manual is not None:  # accepted from a local pull: an operator on the device
            return manual
        desired = self.desired.winner()
        if desired is not None:
            if not self.doc.pinned:
                self.doc.pinned = True
                self._save()
            return self._from_desired(desired)
        if self.doc.pinned and self._desired_seen:  # the fleet cleared it
            self.doc.pinned = False
            self._save()
        if not self._following_channel():
            return None
        now = time.monotonic()
        if now >= self._next_poll:
            jitter = self.config.update.poll_jitter
            interval = self.config.registry.poll_interval_s
            self._next_poll = now + interval * random.uniform(1 - jitter, 1 + jitter)
            self._poll()
        version = self._channel_version
        if version is None or not self._channel_wants(version, tuple(self.doc.bad)):
            return None
        model = self.config.model.name
        if model is None or not self._due(model, version):
            return None
        return (model, version, f"channel:{self.config.model.channel}", None, False)

    def _poll(self) -> None:
        try:
            version, self._etag = self.steps.poll_channel(self._etag)
        except EdgeAgentError as exc:
            log.warning(
                "polling the registry failed: %s; polling again in %.0f s "
                "(registry.poll_interval_s)",
                exc,
                max(self._next_poll - time.monotonic(), 0.0),
            )
            self.last_error = f"poll: {exc}"
            return
        if version is not None:
            log.debug("channel %s names v%d", self.config.model.channel, version)
            self._channel_version = version

    def _channel_wants(self, version: int, bad: tuple[BadMark, ...]) -> bool:
        model = self.config.model.name
        assert model is not None
        pointer = self.store.pointer()
        return policy.channel_wants(
            model,
            version,
            active=(pointer.model, pointer.version) if pointer else None,
            bad=any((b.model, b.version) == (model, version) for b in bad),
            held=channel_hold(self.store, model, self.config.model.channel, version) is not None,
        )

    def _from_desired(self, desired: Desired) -> Target | None:
        mark = self.doc.bad_mark(desired.model, desired.version)
        pointer = self.store.pointer()
        attempt = self.doc.attempt
        verdict = policy.judge_desired(
            desired,
            applied=self.doc.applied.key if self.doc.applied else None,
            bad_at=mark.at if mark else None,
            bad_reason=mark.reason if mark else "",
            active=(pointer.model, pointer.version) if pointer else None,
            updating=attempt is not None and attempt.open,
            due=self._due(desired.model, desired.version),
            now=time.time(),
            max_skew_s=self.config.update.max_clock_skew_s,
        )
        if verdict.verdict == "ignore":
            self._ignore(desired, verdict.reason)
        if verdict.record or verdict.verdict == "done":
            self._applied(desired)
            self.publish_state()
        if verdict.verdict != "apply":
            return None
        return (desired.model, desired.version, desired.source, desired.issued_at, True)

    def _ignore(self, desired: Desired, why: str) -> None:
        if desired.key in self._ignored:
            return
        self._ignored.add(desired.key)
        log.warning("desired %s v%d ignored: %s", desired.model, desired.version, why)
        self.reporter.event("desired_ignored", {**desired.to_dict(), "reason": why})

    def _applied(self, desired: Desired) -> None:
        self.doc.applied = Applied(
            desired.model, desired.version, desired.issued_at, desired.source
        )
        self._save()

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
        attempt = Attempt.new(model, version, source, issued_at, previous)
        self.doc.attempt = attempt
        self._refresh()
        log.info("update to %s v%d (from %s) started", model, version, source)
        self.reporter.event(
            "update_started",
            {"model": model, "version": version, "source": source, "update_id": attempt.id},
        )
        try:
            release = self.steps.stage(
                model,
                version,
                allow_downgrade=allow_downgrade,
                on_phase=lambda phase: self._phase(attempt, _phase_name(phase)),
                # so the fleet tells a long download from silence
                progress=download_progress(
                    update_id=attempt.id,
                    model=model,
                    version=version,
                    issued_at=attempt.issued_at,
                    every_s=self.config.telemetry.interval_s,
                    event=self.reporter.event,
                ),
            )
            if release is None:  # it was the active one already
                self._finish(attempt, "succeeded", "already active")
                return
            self._check_superseded(attempt)
            self._phase(attempt, "validating", self.config.update.validate_timeout_s)
            crash_point("update_validating")
            candidate, report = self.steps.validate(release)
            detail = {"version": release.version, "model": release.model, "update_id": attempt.id}
            self.reporter.event("update_validated", {**detail, **report})
            try:
                self._check_superseded(attempt)
                self._phase(attempt, "activating", self.config.update.activate_timeout_s)
            except Failed:
                candidate.close()
                raise
            self.steps.activate(release, candidate, self.config.update.activate_timeout_s)
            self.publish_state()
        except Failed as failure:
            self._finish(
                attempt, "failed", failure.reason, transient=failure.transient, bad=failure.bad
            )
            return
        except Exception as exc:  # a bug, MemoryError: end it all the same, and say so
            log.exception("update to v%d failed unexpectedly", version)
            self.steps.restore(pointer)
            self._finish(attempt, "failed", f"internal error: {exc!r}", transient=True)
            return
        window = self.config.update.probation_s
        if window > 0:
            attempt.probation_until = time.time() + window
            self._probation_end = time.monotonic() + window
            self._supersede = False
            self._start_probation(attempt)
            self._phase(attempt, "probation", window)
        else:
            self._finish(attempt, "succeeded", "")

    def _check_superseded(self, attempt: Attempt) -> None:
        """Raise Failed when a newer desired state for another release arrived while
        this update was under way: it is not activated (a download cannot be cut short,
        but a release nobody wants any more is neither activated nor put on probation)."""
        self._serve_queue(0, busy=True)
        winner = self.desired.winner()
        if winner is not None and policy.supersedes(winner, attempt):
            raise Failed(
                f"superseded before activation by a newer desired state (v{winner.version})"
            )

    def _start_probation(self, attempt: Attempt) -> None:
        self._probation = attempt
        self._judge = None  # the baseline is taken when the watch begins

    def _watch_probation(self) -> None:
        """One look at the release on probation; roll back when it misbehaves."""
        attempt = self._probation
        assert attempt is not None
        cfg = self.config.update
        stats = self.serving.stats()
        counters = (stats.errors, stats.results) if stats else None
        if self._judge is None:
            self._judge = Probation(
                self._probation_end,
                min_errors=cfg.probation_min_errors,
                max_error_rate=cfg.probation_max_error_rate,
                baseline=counters or (0, 0),
            )
        judgement = self._judge.judge(counters, time.monotonic())
        if judgement.verdict == "failed":
            self._probation = None
            self._roll_back(attempt, judgement.reason)
        elif self._supersede:
            self._supersede = False
            self._probation = None
            self._finish(
                attempt,
                "succeeded",
                f"superseded by a newer target during probation ({judgement.reason})",
            )
        elif judgement.verdict == "passed":
            self._probation = None
            self._finish(attempt, "succeeded", judgement.reason)

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
        try:
            self.steps.roll_back(release, from_version=attempt.version, serve=serve)
        except EdgeAgentError as exc:
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

    # -- journal and reports ----------------------------------------------------------

    def _save(self) -> None:
        self.journal.save()
        self._refresh()

    def _refresh(self) -> None:
        """Publish a copy of what other threads read."""
        doc = self.doc
        self._view = View(
            attempt=replace(doc.attempt) if doc.attempt else None,
            applied=doc.applied,
            bad=tuple(doc.bad),
            last_error=self._last_error,
            winner=self.desired.winner(),
            phase_started=self._phase_started,
        )

    def _phase(self, attempt: Attempt, phase: Phase, deadline_s: float | None = None) -> None:
        if deadline_s is None and phase in ("downloading", "verifying"):
            deadline_s = self.config.registry.deadline_s
        if self._stop.is_set() and phase != "probation":
            raise Failed(f"stopped before phase {phase}", transient=True)
        attempt.phase, attempt.phase_at, attempt.deadline_s = phase, time.time(), deadline_s
        self._phase_started = time.monotonic()
        self._save()
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
        outcome: Outcome,
        reason: str,
        *,
        transient: bool = False,
        bad: bool = False,
    ) -> None:
        attempt.outcome, attempt.reason, attempt.transient = outcome, reason, transient
        self.outcomes[outcome] += 1
        attempt.deadline_s = None
        key = (attempt.model, attempt.version)
        if bad:
            self.doc.mark_bad(attempt.model, attempt.version, reason, time.time())
        elif outcome == "succeeded":
            self.doc.unmark(attempt.model, attempt.version)
        if outcome == "succeeded":
            self.doc.crashes.pop(f"{attempt.model}@{attempt.version}", None)
        cap = self.config.update.retry_max_s
        retry = policy.retry_after(
            outcome,
            transient=transient,
            from_desired=attempt.issued_at is not None,
            tries=self._retry_at.get(key, (0.0, 0))[1],
            retry_max_s=cap,
            jitter=random.uniform(policy.RETRY_JITTER_LOW, 1.0),
        )
        plan = ""
        if retry is not None:
            self._retry_at[key] = (time.monotonic() + retry.delay_s, retry.tries)
            if transient:
                plan = (
                    f"; retrying in {retry.delay_s:.0f} s "
                    f"(backoff up to {cap:g} s, update.retry_max_s)"
                )
        else:
            self._retry_at.pop(key, None)
            if attempt.issued_at is not None:  # a desired state: done once, whatever came
                self.doc.applied = Applied(
                    attempt.model, attempt.version, attempt.issued_at, attempt.source
                )
        self._last_error = "" if outcome == "succeeded" else f"v{attempt.version}: {reason}"
        self._save()
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
            self.steps.clean_up()
        except (EdgeAgentError, OSError) as exc:
            log.warning("clean-up of old releases failed: %s", exc)


def _phase_name(phase: str) -> Phase:
    if phase not in ("downloading", "verifying"):
        raise ValueError(f"unknown phase {phase!r} from the updater")
    return "downloading" if phase == "downloading" else "verifying"


def _desired_dict(applied: Applied | None) -> AppliedDesiredDoc | None:
    if applied is None:
        return None
    return {
        "model": applied.model,
        "version": applied.version,
        "issued_at": applied.issued_at,
        "source": applied.source,
    }
