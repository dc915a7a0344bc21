"""Desired state from the fleet side: make it (signed or not), publish it retained, and
watch the devices it names until each reaches a terminal state or falls silent.

A device's verdict comes only from what it reports about *this* desired state: the
``update`` in its retained state carries the ``issued_at`` it acts on, and ``desired``
is the last desired state it applied (also for one it did not need to act on, because
it runs that release already or refused it earlier). Events name refusals (a bad
signature, a stale or already-refused release). Nothing else counts.

Waiting judges silence, not duration (:func:`news`, :func:`after_silence`): each
device has its own deadline, ``timeout`` after the desired state was sent, moved to
``timeout`` after each live report from that device about this desired state (a new
state of the update, an update event, download progress, or telemetry while the
update is on probation). A device that keeps reporting is never failed for taking
long (its own deadlines bound every phase); one that says nothing about it for
``timeout`` is failed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.desired import desired_topic, sign_desired
from agent.fleet.broker import FleetBroker
from agent.fleet.reports import clean
from agent.fleet.view import FleetView, Report
from agent.verify import load_private_key

_issued_lock = threading.Lock()
_last_issued = 0.0


# A document issued ahead of the fleet tool's own clock is refused before it is signed
# (devices refuse one further ahead of theirs than update.max_clock_skew_s). Not zero:
# issue_time() moves 1 ms per call, so a large step may run a little ahead.
MAX_AHEAD_S = 60.0


def issue_time() -> float:
    """Now, in ms, strictly later than any earlier call (two instructions never tie)."""
    global _last_issued
    with _issued_lock:
        _last_issued = max(round(time.time(), 3), round(_last_issued + 0.001, 3))
        return _last_issued


def desired_payload(
    model: str, version: int, target: str, issued_at: float, sign_key: Path | None = None
) -> bytes:
    """The desired-state document; signed with ``sign_key`` when given (raises
    VerificationError when the key cannot be loaded, ValueError for an ``issued_at``
    in the future: a future-dated instruction would make every later one look stale)."""
    if not issued_at <= time.time() + MAX_AHEAD_S:  # also refuses NaN
        raise ValueError(
            f"issued_at {issued_at!r} is in the future (this machine's clock says "
            f"{time.time():.3f}); a desired state is issued now"
        )
    doc: dict[str, Any] = {
        "schema": 1,
        "model": model,
        "version": version,
        "issued_at": issued_at,
        "target": target,
    }
    if sign_key is not None:
        doc = sign_desired(doc, load_private_key(sign_key))
    return json.dumps(doc).encode()


def same_instant(value: Any, issued_at: float) -> bool:
    """Whether a reported ``issued_at`` is this one (documents carry it in ms)."""
    return isinstance(value, int | float) and abs(float(value) - issued_at) < 0.0005


@dataclass
class Verdict:
    status: str  # pending, succeeded, failed
    detail: str


def model_state(state: Mapping[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The part of a device's ``state`` about ``model``: ``state.models[model]`` (checked
    like a state document: :func:`agent.fleet.reports.clean`) when the device reports its
    models (several pipelines, issue 20); ``{}`` when it reports them and ``model`` is
    not one; else the top-level state (an older agent: its one model). None: no state."""
    if not isinstance(state, Mapping):
        return None
    models = state.get("models")
    if isinstance(models, Mapping):
        part = models.get(model)
        return clean("state", dict(part))[0] if isinstance(part, Mapping) else {}
    return dict(state)


def serves(state: Mapping[str, Any] | None, model: str) -> bool:
    """Whether a device with this retained ``state`` takes a desired state of ``model``:
    not when its state lists the models it serves (``models``) without ``model`` (it
    does not follow that model's topic); an older agent (no ``models``) or one that has
    not reported yet may."""
    models = state.get("models") if isinstance(state, Mapping) else None
    return not isinstance(models, Mapping) or model in models


def running_of(part: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    """(model, version) a state (or a part of one, :func:`model_state`) says it runs."""
    part = part if isinstance(part, Mapping) else {}
    model, version = part.get("model"), part.get("version")
    return (
        model if isinstance(model, str) else None,
        version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


def judge(view: FleetView, device_id: str, model: str, version: int, issued_at: float) -> Verdict:
    """Where ``device_id`` stands on the desired state of ``model`` issued at
    ``issued_at`` (from its state about that model: :func:`model_state`)."""
    device = view.devices.get(device_id)
    if device is None:
        return verdict_of(None, None, (None, None), model, version, issued_at)
    if not serves(device.state, model):
        served = ", ".join(sorted((device.state or {}).get("models") or {}))[:200]
        return Verdict("failed", f"does not serve {model} (it serves: {served})")
    part = model_state(device.state, model)
    return verdict_of(part, device.online, running_of(part), model, version, issued_at)


def verdict_of(
    state: Mapping[str, Any] | None,
    online: bool | None,
    running: tuple[str | None, int | None],
    model: str,
    version: int,
    issued_at: float,
) -> Verdict:
    """Where a device stands on the desired state issued at ``issued_at``, from plain
    values: its latest retained ``state`` document (None: none yet), whether its status
    says online, and the release it runs (``running``: model and version from its
    state). The rules of :func:`judge`, shared with the fleet server."""
    state = state if isinstance(state, Mapping) else {}
    update = state.get("update")
    if (
        isinstance(update, Mapping)
        and same_instant(update.get("issued_at"), issued_at)
        and (update.get("model"), update.get("version")) == (model, version)
    ):
        outcome, reason = update.get("outcome"), update.get("reason") or ""
        if outcome == "succeeded":
            return Verdict("succeeded", reason or f"runs v{version}")
        if outcome == "rolled_back":
            return Verdict("failed", f"rolled back: {reason}")
        if outcome == "failed":
            if update.get("retry"):
                return Verdict("pending", f"retrying after: {reason}")
            return Verdict("failed", reason)
        return Verdict("pending", str(update.get("phase")))
    applied = state.get("desired")
    if isinstance(applied, Mapping) and same_instant(applied.get("issued_at"), issued_at):
        if running == (model, version):
            return Verdict("succeeded", f"runs v{version}")
        bad = state.get("bad")
        if isinstance(bad, list) and f"{model}@{version}" in bad:
            return Verdict("failed", f"refused: v{version} failed on this device before")
    if online is not True:
        return Verdict("pending", "offline")
    return Verdict("pending", "waiting for the device")


def refusal(doc: Mapping[str, Any] | None, topic: str, issued_at: float) -> str | None:
    """Why the event ``doc`` says the device refused the desired state issued at
    ``issued_at`` on ``topic``, or None (another event, another desired state)."""
    doc = doc if isinstance(doc, Mapping) else {}
    event = doc.get("event")
    if event == "desired_invalid" and doc.get("topic") == topic:
        return f"refused the desired state: {doc.get('error')}"
    if event == "desired_ignored" and same_instant(doc.get("issued_at"), issued_at):
        return f"ignored the desired state: {doc.get('reason')}"
    return None


def news(
    stream: str, doc: Mapping[str, Any] | None, state: Mapping[str, Any] | None, issued_at: float
) -> bool:
    """Whether a live report on ``stream`` (``doc``) is news from the device about the
    desired state issued at ``issued_at``; ``state`` is the device's latest retained
    state (after this report, when it is one).

    News: a state whose ``update`` or applied ``desired`` is this one; an event naming
    this ``issued_at`` (download progress, a refusal) or the update's id; telemetry
    while this update is on probation (the device is serving it: the probation goes
    on). Not news: anything about another desired state, an empty message, telemetry
    in any other phase (a stalled download sends telemetry too).
    """
    if not isinstance(doc, Mapping):
        return False
    update = state.get("update") if isinstance(state, Mapping) else None
    ours: Mapping[str, Any] = (
        update
        if isinstance(update, Mapping) and same_instant(update.get("issued_at"), issued_at)
        else {}
    )
    if stream == "state":
        applied = doc.get("desired")
        return bool(ours) or (
            isinstance(applied, Mapping) and same_instant(applied.get("issued_at"), issued_at)
        )
    if stream == "events":
        update_id = doc.get("update_id")
        return same_instant(doc.get("issued_at"), issued_at) or (
            isinstance(update_id, str) and update_id == ours.get("id")
        )
    if stream == "telemetry":
        return ours.get("phase") == "probation" and ours.get("outcome") is None
    return False


def after_silence(verdict: Verdict, heard_at: float, now: float, timeout_s: float) -> Verdict:
    """``verdict``, or failed when it is pending and the device has said nothing about
    the desired state since ``heard_at`` for ``timeout_s`` seconds."""
    if verdict.status != "pending" or now - heard_at < timeout_s:
        return verdict
    return Verdict("failed", f"said nothing about it for {timeout_s:g} s (last: {verdict.detail})")


@dataclass
class Watched:
    """One device being waited for."""

    device: str
    topic: str
    issued_at: float
    started: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)  # its last news about it
    verdict: Verdict = field(default_factory=lambda: Verdict("pending", "sent"))
    seconds: float | None = None
    timed_out: bool = False  # failed for saying nothing in time: it may still be updating

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "status": self.verdict.status,
            "detail": self.verdict.detail,
            "seconds": self.seconds,
        }


class Rules(Protocol):
    """What a wait follows: where a device stands, and which of its reports are news.
    :class:`DesiredRules` for a desired state; the shadow steps of a rollout have their
    own (:class:`agent.fleet.shadow_watch.ShadowRules`)."""

    def judge(self, view: FleetView, w: Watched) -> Verdict: ...

    def heard(self, view: FleetView, report: Report, w: Watched) -> bool:
        """Whether ``report`` (live, from ``w``'s device, already taken into ``view``)
        is news about what ``w`` waits for."""
        ...

    def refused(self, report: Report, w: Watched) -> str | None:
        """Why ``report`` says the device refused what ``w`` waits for, or None."""
        ...


@dataclass(frozen=True)
class DesiredRules:
    """Waiting for a desired state of ``model`` for ``version`` (the module docstring)."""

    model: str
    version: int

    def judge(self, view: FleetView, w: Watched) -> Verdict:
        return judge(view, w.device, self.model, self.version, w.issued_at)

    def heard(self, view: FleetView, report: Report, w: Watched) -> bool:
        device = view.devices.get(w.device)
        state = model_state(device.state if device is not None else None, self.model)
        doc = state if report.stream == "state" else report.doc  # the state about it
        return news(report.stream, doc, state, w.issued_at)

    def refused(self, report: Report, w: Watched) -> str | None:
        return refusal(report.doc, w.topic, w.issued_at) if report.stream == "events" else None


def watch(
    broker: FleetBroker,
    view: FleetView,
    watched: Sequence[Watched],
    model: str,
    version: int,
    timeout_s: float,
    say: Callable[[str], None],
    *,
    rules: Rules | None = None,
) -> None:
    """Wait until every device in ``watched`` succeeded or failed; a device that says
    nothing about the desired state for ``timeout_s`` fails (see the module docstring).
    ``rules``: what is waited for (default: the desired state of ``model`` for
    ``version``). Prints each change through ``say``. ``view`` must follow the devices'
    state, events and telemetry.

    Raises BrokerError when the connection is lost.
    """
    rules = rules if rules is not None else DesiredRules(model, version)
    by_device = {w.device: w for w in watched}

    def settle(w: Watched, verdict: Verdict) -> None:
        if verdict == w.verdict:
            return
        w.verdict = verdict
        if verdict.status != "pending":
            w.seconds = round(time.monotonic() - w.started, 1)
            say(f"  {w.device}: {verdict.status} ({verdict.detail}) after {w.seconds:g} s")
        else:
            say(f"  {w.device}: {verdict.detail}")

    while True:
        for w in watched:
            if w.verdict.status == "pending":
                settle(w, rules.judge(view, w))
        now = time.monotonic()
        for w in watched:
            verdict = after_silence(w.verdict, w.heard, now, timeout_s)
            if verdict is not w.verdict:
                w.timed_out = True
                settle(w, verdict)
        pending = [w for w in watched if w.verdict.status == "pending"]
        if not pending:
            break
        left = min(w.heard for w in pending) + timeout_s - time.monotonic()
        for message in broker.messages(timeout=min(0.5, max(left, 0.01))):
            report = view.take(message)
            if report is None or report.device not in by_device:
                continue
            w = by_device[report.device]
            if w.verdict.status != "pending":
                continue
            if not report.retained and rules.heard(view, report, w):
                w.heard = time.monotonic()
            why = rules.refused(report, w)
            if why is not None:
                settle(w, Verdict("failed", why))


def clear_desired(
    broker: FleetBroker, view: FleetView, target: str, model: str | None
) -> list[str]:
    """Clear ``target``'s desired state (``device:ID`` or ``group:NAME``) and return the
    topics cleared: of ``model``, its own topic and the legacy one too when what ``view``
    holds there names ``model`` (an older fleet tool put it there); without ``model``,
    the legacy topic only."""
    legacy = desired_topic(view.prefix, target)
    topics = [legacy]
    if model is not None:
        kind, _, name = target.partition(":")
        device = view.devices.get(name)
        if kind == "group":
            held = view.group_desired.get(name)
        else:
            held = device.desired if device is not None else None
        topics = [desired_topic(view.prefix, target, model)]
        if held is not None and held.get("model") == model:
            topics.append(legacy)
    for topic in topics:
        broker.publish(topic, b"")
    return topics
