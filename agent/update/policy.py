"""The update rules, as pure functions over plain values: no I/O, no clock, no threads.

Which target to apply (a desired state, the channel), when a failed update is tried
again, how a failure is classified (retry it? mark the release bad?), what a restart
does with the update the journal says was under way. The worker (``agent.update.worker``)
gathers the values (the store's pointer, the journal, the time) and acts on the answer;
the tables in ``tests/test_update_policy.py`` pin each rule down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, Protocol

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

RETRY_FIRST_S: Final = 5.0
RETRY_JITTER_LOW: Final = 0.5  # a retry waits between half and all of its backoff step

Step = Literal["stage", "load", "validate", "activate"]


class Failed(Exception):
    """An update ends here: ``reason``; ``transient`` retries it, ``bad`` marks the version."""

    def __init__(self, reason: str, *, transient: bool = False, bad: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.bad = bad


def classify(step: Step, exc: BaseException) -> Failed | None:
    """How a failure in ``step`` ends the update; None when it is not an expected one
    (a bug: the caller ends the update as an internal error).

    Transient (retried): the network, a busy or full store, the accelerator, a stream
    that would not take a model that passed its gate. Bad (the release's fault, never
    retried on this device): a model that does not load or fails its gate. Neither:
    refusals by the verification rules (retried only by a new instruction).
    """
    if step == "stage":
        if isinstance(exc, TransportError):
            return Failed(f"download failed: {exc}", transient=True)
        if isinstance(exc, StoreError):  # a full disk, a busy store: may clear up
            return Failed(f"store: {exc}", transient=True)
        if isinstance(exc, RefusedError):
            return Failed(f"refused: {exc}")
        if isinstance(exc, UpdateError):  # verification, the registry's refusals
            return Failed(f"{type(exc).__name__}: {exc}")
        return None
    if step == "load":
        if isinstance(exc, AcceleratorError):  # the TPU's fault, not the release's
            return Failed(f"cannot load on this device: {exc}", transient=True)
        if isinstance(exc, ModelError):
            return Failed(f"cannot load on this device: {exc}", bad=True)
        if isinstance(exc, MemoryError):
            return Failed("cannot load on this device: out of memory", bad=True)
        return None
    if step == "validate":
        if isinstance(exc, ValidationError):
            return Failed(f"validation: {exc}", bad=True)
        if isinstance(exc, MemoryError):
            return Failed("validation: out of memory", bad=True)
        if isinstance(exc, EdgeAgentError):  # the TPU failing, a store file unreadable
            return Failed(f"validation could not run: {exc}", transient=True)
        return None
    # activate: it passed the gate, so a stream that would not take it (a source down)
    # or a busy store is the device's state, not the release's fault.
    if isinstance(exc, ModelError | StoreError):
        return Failed(f"activation: {exc}", transient=True)
    return None


# -- retries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """When a release may be tried again: ``delay_s`` from now, after ``tries`` retries."""

    delay_s: float
    tries: int


def retry_after(
    outcome: str,
    *,
    transient: bool,
    from_desired: bool,
    tries: int,
    retry_max_s: float,
    jitter: float,
) -> Retry | None:
    """The retry schedule after an update ended; None: no retry is scheduled.

    A transient failure backs off from RETRY_FIRST_S, doubling up to ``retry_max_s``,
    times ``jitter`` (a random draw in [RETRY_JITTER_LOW, 1] made by the caller). A
    channel's release refused (not on the CDN yet, a bad signature) is looked at again
    only after ``retry_max_s``, never in a loop. A desired state is done once.
    """
    if transient:
        step = min(retry_max_s, RETRY_FIRST_S * 2.0 ** min(tries, 60))
        return Retry(step * jitter, tries + 1)
    if outcome == "failed" and not from_desired:
        return Retry(retry_max_s, 0)
    return None


# -- what to apply ------------------------------------------------------------------------


class Target(Protocol):
    """A desired state, as far as the rules need it."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def issued_at(self) -> float: ...


class Running(Protocol):
    """An update, as far as the rules need it."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def issued_at(self) -> float | None: ...


Verdict = Literal["apply", "skip", "ignore", "done"]


@dataclass(frozen=True)
class DesiredVerdict:
    """What to do with the desired state in force.

    ``apply`` it; ``skip`` it for now (done already, or waiting for a retry); ``ignore``
    it with ``reason`` (reported once; ``record`` also journals it as applied, so it is
    never looked at again); ``done``: the device runs it already (journal it applied).
    """

    verdict: Verdict
    reason: str = ""
    record: bool = False


def judge_desired(
    desired: Target,
    *,
    applied: tuple[str, int, float] | None,
    bad_at: float | None,
    bad_reason: str = "",
    active: tuple[str, int] | None,
    updating: bool,
    due: bool,
    now: float = math.inf,
    max_skew_s: float = 0.0,
) -> DesiredVerdict:
    """Whether to act on ``desired``.

    ``applied``: the key (model, version, issued_at) of the last desired state acted on;
    ``bad_at``: when this release was marked bad here (None: it is not); ``active``: the
    store's active release; ``updating``: an update has not ended; ``due``: no retry
    wait is pending for this release. An applied state issued more than ``max_skew_s``
    after ``now`` (accepted before future dates were refused) makes nothing stale: it
    would otherwise lock out every later instruction until the clock caught up.
    """
    key = (desired.model, desired.version, desired.issued_at)
    if applied is not None:
        if key == applied:
            return DesiredVerdict("skip")  # done (or refused) once: not redone
        if desired.issued_at < applied[2] <= now + max_skew_s:
            return DesiredVerdict(
                "ignore", "stale: issued before the desired state already applied"
            )
    if bad_at is not None and bad_at >= desired.issued_at:
        why = f"v{desired.version} failed on this device: {bad_reason}"
        return DesiredVerdict("ignore", why, record=True)
    if active == (desired.model, desired.version) and not updating:
        return DesiredVerdict("done")
    if not due:
        return DesiredVerdict("skip")
    return DesiredVerdict("apply")


def channel_wants(
    model: str, version: int, *, active: tuple[str, int] | None, bad: bool, held: bool
) -> bool:
    """Whether the channel's ``version`` is worth an update: not the active one, not
    marked bad here, not held (a version rolled back from, or a downgrade)."""
    return active != (model, version) and not bad and not held


def supersedes(winner: Target | None, attempt: Running) -> bool:
    """Whether the desired state ``winner`` replaces the update ``attempt``.

    Only an instruction for another release, issued after the one being applied (or
    any, when the update did not come from a desired state): a cleared device state
    that leaves an older group state in force does not cut an update short.
    """
    if winner is None or (winner.model, winner.version) == (attempt.model, attempt.version):
        return False
    return attempt.issued_at is None or winner.issued_at > attempt.issued_at


# -- after a restart ----------------------------------------------------------------------

RecoveryAction = Literal["gate", "probation", "roll_back", "fail"]


@dataclass(frozen=True)
class Recovery:
    """What a start does with the open update the journal names.

    ``gate``: validate the release (pulled while no agent ran) before serving it;
    ``probation``: go on watching it, ``probation_left_s`` more; ``roll_back`` to the
    previous release; ``fail`` the update (``bad`` marks the release, ``transient``
    retries it). ``crashes``/``starts``: the counters to journal.
    """

    action: RecoveryAction
    reason: str = ""
    bad: bool = False
    transient: bool = False
    crashes: int | None = None
    starts: int | None = None
    probation_left_s: float | None = None


def recover(
    *,
    phase: str,
    offline_pull: bool,
    on_target: bool,
    clean_stop: bool,
    crashes: int,
    starts: int,
    limit: int,
    probation_until: float | None,
    window_s: float,
    now: float,
) -> Recovery:
    """The rule for an update the agent stopped in (see ``Recovery``).

    ``on_target``: the store's active release is the update's; ``crashes``: unclean
    starts counted so far for this release; ``starts``: those during its probation;
    ``limit``: ``update.crash_loop_restarts``; ``now``: the wall clock, which may have
    stepped since (no RTC, NTP at boot): the probation left is clamped to the window.
    """
    unclean = 0 if clean_stop else 1
    if offline_pull and phase == "validating" and on_target:
        crashes += unclean
        if crashes >= limit:
            reason = f"the agent died {crashes} times validating this release at start"
            return Recovery("roll_back", reason, bad=True, crashes=crashes)
        return Recovery("gate", crashes=crashes)
    if phase in ("activating", "probation") and on_target:
        starts += unclean
        if starts >= limit:
            reason = f"crash loop: the agent restarted {starts} times in probation"
            return Recovery("roll_back", reason, bad=True, starts=starts)
        until = now + window_s if probation_until is None else probation_until
        left = min(max(until - now, 0.0), window_s)
        return Recovery("probation", starts=starts, probation_left_s=left)
    crashes += unclean
    if phase in ("validating", "activating") and crashes >= limit:
        # Loading or testing this release keeps killing the agent (a segfault in a
        # delegate, the OOM killer): stop trying it.
        reason = f"the agent died {crashes} times in phase {phase} of this release"
        return Recovery("fail", reason, bad=True, crashes=crashes)
    reason = f"interrupted in phase {phase}: the agent stopped or crashed"
    return Recovery("fail", reason, transient=True, crashes=crashes)
