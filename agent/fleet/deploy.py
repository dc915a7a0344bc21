"""Desired state from the fleet side: make it (signed or not), publish it retained, and
watch the devices it names until each reaches a terminal state or the time is up.

A device's verdict comes only from what it reports about *this* desired state: the
``update`` in its retained state carries the ``issued_at`` it acts on, and ``desired``
is the last desired state it applied (also for one it did not need to act on, because
it runs that release already or refused it earlier). Events name refusals (a bad
signature, a stale or already-refused release). Nothing else counts: a device that
says nothing is pending until the deadline, then failed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.desired import sign_desired
from agent.fleet.broker import FleetBroker
from agent.fleet.view import FleetView, Report
from agent.verify import load_private_key

_issued_lock = threading.Lock()
_last_issued = 0.0


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
    VerificationError when the key cannot be loaded)."""
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


def _same(value: Any, issued_at: float) -> bool:
    return isinstance(value, int | float) and abs(float(value) - issued_at) < 0.0005


@dataclass
class Verdict:
    status: str  # pending, succeeded, failed
    detail: str


def judge(view: FleetView, device_id: str, model: str, version: int, issued_at: float) -> Verdict:
    """Where ``device_id`` stands on the desired state issued at ``issued_at``."""
    device = view.devices.get(device_id)
    state = (device.state if device else None) or {}
    update = state.get("update")
    if (
        isinstance(update, dict)
        and _same(update.get("issued_at"), issued_at)
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
    if isinstance(applied, dict) and _same(applied.get("issued_at"), issued_at):
        if device is not None and (device.model, device.version) == (model, version):
            return Verdict("succeeded", f"runs v{version}")
        if f"{model}@{version}" in (state.get("bad") or []):
            return Verdict("failed", f"refused: v{version} failed on this device before")
    if device is None or device.online is not True:
        return Verdict("pending", "offline")
    return Verdict("pending", "waiting for the device")


@dataclass
class Watched:
    """One device being waited for."""

    device: str
    topic: str
    issued_at: float
    started: float = field(default_factory=time.monotonic)
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


def _refusal(report: Report, watched: Watched) -> str | None:
    """Why the event in ``report`` says the device refused this desired state, or None."""
    doc = report.doc or {}
    event = doc.get("event")
    if event == "desired_invalid" and doc.get("topic") == watched.topic:
        return f"refused the desired state: {doc.get('error')}"
    if event == "desired_ignored" and _same(doc.get("issued_at"), watched.issued_at):
        return f"ignored the desired state: {doc.get('reason')}"
    return None


def watch(
    broker: FleetBroker,
    view: FleetView,
    watched: Sequence[Watched],
    model: str,
    version: int,
    timeout_s: float,
    say: Callable[[str], None],
) -> None:
    """Wait until every device in ``watched`` succeeded or failed, at most ``timeout_s``
    (pending ones then fail); prints each change through ``say``.

    Raises BrokerError when the connection is lost.
    """
    by_device = {w.device: w for w in watched}
    deadline = time.monotonic() + timeout_s

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
        pending = [w for w in watched if w.verdict.status == "pending"]
        for w in pending:
            settle(w, judge(view, w.device, model, version, w.issued_at))
        pending = [w for w in watched if w.verdict.status == "pending"]
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        for message in broker.messages(timeout=min(0.5, left)):
            report = view.take(message)
            if report is None or report.stream != "events" or report.device not in by_device:
                continue
            w = by_device[report.device]
            why = _refusal(report, w) if w.verdict.status == "pending" else None
            if why is not None:
                settle(w, Verdict("failed", why))
    for w in watched:
        if w.verdict.status == "pending":
            last = w.verdict.detail
            w.timed_out = True
            settle(w, Verdict("failed", f"no terminal state within {timeout_s:g} s (last: {last})"))
