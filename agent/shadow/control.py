"""``Shadows``: one model's shadow run, from the fleet's instruction to its end.

The MQTT thread hands in messages of the model's shadow topics (the device's and its
groups'; the device's own wins, else the groups' most recently issued); a thread of its
own does the slow part for the winning instruction: stage (download and verify into the
model's store, never activating: the update worker's ``Steps.stage``), load beside the
active model (the service's ``load``), attach a :class:`ShadowRun` to the pipeline. An
empty retained message (or another instruction) detaches and closes the run. A
candidate that cannot be fetched or loaded ends ``failed``; the active model serves on
whatever happens here. With ``promote`` met, the update worker is asked for a normal
update to the candidate (source ``shadow``: the gate and probation as any update) and
the run ends ``promoted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.desired import shadow_topic
from agent.shadow.instruction import ShadowInstruction, parse_shadow, winner
from agent.shadow.run import ShadowRun

if TYPE_CHECKING:
    from agent.contract import EventName, ShadowDoc, ShadowPhase
    from agent.frames import Observer
    from agent.mqtt import Incoming
    from agent.runtime.model import LoadedModel
    from agent.store import Release
    from agent.verify import KeyRing

log = logging.getLogger(__name__)

Stage = Callable[[str, int], "Release | None"]  # (model, version) -> release; None: active
Load = Callable[["Release"], "LoadedModel"]
Attach = Callable[["tuple[Observer, ...]"], None]  # the shadow observers of the pipeline
Promote = Callable[[str, int, float], None]  # ask the update worker for (model, version) now,
# as an instruction issued when the shadow run's was (issued_at)
Event = Callable[["EventName", "Mapping[str, Any]"], None]

STOP_WAIT_S = 15.0
STAGE_TRIES = 3  # a transient failure to stage the candidate is tried again, this often
STAGE_RETRY_S = 5.0


class Reader:
    """One model's shadow topics (the device's and its groups') and how a message on one
    is read: the key ring (loaded once, by the owner), the clock rule. The controller
    below and the service's refusal for a cascade model share it."""

    def __init__(
        self,
        model: str,
        *,
        prefix: str,
        device: str,
        groups: list[str],
        key: KeyRing | None = None,
        max_skew_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.device = device
        self.topics = {
            shadow_topic(prefix, f"device:{device}", model): "device",
            **{shadow_topic(prefix, f"group:{g}", model): f"group:{g}" for g in groups},
        }
        self._key, self._max_skew_s, self._clock = key, max_skew_s, clock

    def read(self, message: Incoming) -> tuple[str, ShadowInstruction | None] | None:
        """``(source, instruction)`` of a message on one of :attr:`topics` (instruction
        None: cleared); None for another topic. Raises ValueError naming the field."""
        source = self.topics.get(message.topic)
        if source is None:
            return None
        instruction = parse_shadow(
            message.payload,
            source,
            self.device,
            model=self.model,
            key=self._key,
            now=self._clock(),
            max_skew_s=self._max_skew_s,
        )
        return source, instruction


class Shadows:
    """The shadow run of ``model`` on this device (at most one at a time)."""

    def __init__(
        self,
        model: str,
        *,
        prefix: str,
        device: str,
        groups: list[str],
        stage: Stage,
        load: Load,
        attach: Attach,
        promote: Promote,
        event: Event,
        changed: Callable[[], None] = lambda: None,
        key: KeyRing | None = None,
        max_skew_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.device = device
        self.reader = Reader(
            model,
            prefix=prefix,
            device=device,
            groups=groups,
            key=key,
            max_skew_s=max_skew_s,
            clock=clock,
        )
        self.topics = self.reader.topics
        self._stage, self._load, self._attach = stage, load, attach
        self._promote, self._event, self._changed = promote, event, changed
        self._cond = threading.Condition()
        self._by_source: dict[str, ShadowInstruction] = {}
        self._wanted: ShadowInstruction | None = None  # what the fleet asks for now
        self._dirty = False  # _wanted changed since the thread last looked
        self._promote_run: ShadowRun | None = None  # a run that met its promote rule
        self._stopping = False
        self._thread: threading.Thread | None = None
        # the thread's own (read by doc() under the condition's lock)
        self._current: ShadowInstruction | None = None
        self._phase: ShadowPhase | None = None
        self._error: str | None = None
        self._run: ShadowRun | None = None  # attached to the pipeline
        self._shown: ShadowRun | None = None  # whose figures doc() shows (kept after it ended)

    # -- any thread ---------------------------------------------------------------------

    def on_message(self, message: Incoming) -> None:
        """A retained message on one of :attr:`topics` (paho's thread): parsed here,
        acted on by the controller's thread; a refused one changes nothing."""
        try:
            read = self.reader.read(message)
        except ValueError as exc:
            log.error("%s: ignored: %s", message.topic, exc)
            self._event("desired_invalid", {"topic": message.topic, "error": str(exc)})
            return
        if read is None:
            return
        source, instruction = read
        with self._cond:
            if instruction is None:
                self._by_source.pop(source, None)
            else:
                self._by_source[source] = instruction
            wanted = winner(self._by_source)
            if (wanted.key if wanted else None) != (self._wanted.key if self._wanted else None):
                self._wanted, self._dirty = wanted, True
                self._cond.notify_all()

    def doc(self) -> ShadowDoc | None:
        """The shadow run's document (state's and telemetry's ``shadows[MODEL]``)."""
        with self._cond:
            instruction, phase, error, run = self._current, self._phase, self._error, self._shown
        if instruction is None or phase is None:
            return None
        frames, skipped, errors, run_error, latency, active, agreement = (
            run.figures() if run is not None else (0, 0, 0, None, None, None, None)
        )
        return {
            "model": instruction.model,
            "version": instruction.version,
            "issued_at": instruction.issued_at,
            "phase": phase,
            "sample_pct": instruction.sample_pct,
            "max_cpu_pct": instruction.max_cpu_pct,
            "frames": frames,
            "skipped": skipped,
            "errors": errors,
            "error": error or run_error,
            "latency_ms_p50": latency,
            "active_latency_ms_p50": active,
            "agreement": agreement or {"metric": "top1", "value": None, "frames": 0},
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"shadow-{self.model}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """Detach and close the run; the thread ends after what it is doing (a download
        is bounded by the registry's deadline)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._end_run()

    # -- the controller's thread ----------------------------------------------------------

    def _promotable(self, run: ShadowRun) -> None:
        """From the inference thread: the run met its promote rule."""
        with self._cond:
            self._promote_run = run
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._dirty or self._promote_run is not None):
                    self._cond.wait(1.0)
                if self._stopping:
                    return
                promoted, self._promote_run = self._promote_run, None
                wanted, dirty, self._dirty = self._wanted, self._dirty, False
            try:
                if dirty:
                    self._follow(wanted)
                elif promoted is not None and promoted is self._run:
                    self._promote_now(promoted)
            except Exception as exc:  # a bug must not end shadow runs: report, go on
                log.exception("shadow run of %s failed", self.model)
                self._set("failed", f"internal error: {exc!r}")

    def _set(self, phase: ShadowPhase, error: str | None = None) -> None:
        with self._cond:
            self._phase, self._error = phase, error
        self._changed()

    def _end_run(self) -> ShadowRun | None:
        with self._cond:
            run, self._run = self._run, None
        if run is not None:
            self._attach(())
            run.close()
        return run

    def _follow(self, wanted: ShadowInstruction | None) -> None:
        current = self._current
        if self._end_run() is not None and current is not None:
            self._event("shadow_stopped", {"model": self.model, "version": current.version})
        if wanted is None:
            if current is not None:
                self._set("stopped")
            return
        with self._cond:
            self._current, self._shown = wanted, None
        version = wanted.version
        log.info("shadow run of %s v%d: downloading", self.model, version)
        self._set("downloading")
        try:
            release = self._stage_with_retries(version)
            if release is None:  # promoted before a restart, say: nothing to compare
                self._set("stopped", f"v{version} is the active version: nothing to compare")
                return
            if self._superseded():
                return
            self._set("loading")
            candidate = self._load(release)
        except Exception as exc:  # Failed, EdgeAgentError, MemoryError's kin: the run ends
            if self._superseded():  # another instruction came: it is followed next
                return
            reason = str(getattr(exc, "reason", "") or exc)
            log.error("shadow run of %s v%d failed: %s", self.model, version, reason)
            self._set("failed", reason)
            self._event("shadow_failed", {"model": self.model, "version": version, "error": reason})
            return
        if self._superseded():
            candidate.close()
            return
        run = ShadowRun(candidate, wanted, on_promotable=self._promotable)
        with self._cond:
            self._run = self._shown = run
        self._attach((run,))
        self._set("running")
        self._event(
            "shadow_started",
            {"model": self.model, "version": version, "sample_pct": wanted.sample_pct},
        )

    def _stage_with_retries(self, version: int) -> Release | None:
        """Stage ``version``; a transient failure (the registry unreachable, the store
        busy with an update) is tried again, STAGE_TRIES in all, STAGE_RETRY_S apart,
        unless another instruction or a stop comes first."""
        for attempt in range(1, STAGE_TRIES + 1):
            try:
                return self._stage(self.model, version)
            except Exception as exc:
                if not getattr(exc, "transient", False) or attempt == STAGE_TRIES:
                    raise
                reason = str(getattr(exc, "reason", "") or exc)
                log.warning("shadow run of %s v%d: %s; trying again", self.model, version, reason)
                self._set("downloading", reason)
                with self._cond:
                    self._cond.wait_for(lambda: self._dirty or self._stopping, STAGE_RETRY_S)
                if self._superseded():
                    raise
        raise AssertionError("unreachable")

    def _superseded(self) -> bool:
        with self._cond:
            return self._dirty or self._stopping

    def _promote_now(self, run: ShadowRun) -> None:
        version = run.instruction.version
        agreement = run.agreement.doc()
        self._end_run()
        self._set("promoted")
        log.info("shadow run of %s v%d: promoted (%s)", self.model, version, agreement)
        self._event(
            "shadow_promoted", {"model": self.model, "version": version, "agreement": agreement}
        )
        self._promote(self.model, version, run.instruction.issued_at)
