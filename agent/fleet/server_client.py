"""``edge-fleet rollout --server URL``: submit a rollout to the fleet server and follow
it. A small JSON client over urllib (no dependency): bounded timeouts, a bounded
response size, and every failure as one line (:class:`ServerError`; a refused request
that is the operator's to fix, 422, as a ConfigError).

Following polls ``GET /api/v1/rollouts/{id}`` every ``poll_s`` and prints each change
as the standalone rollout does. Ctrl-C stops following, not the rollout: it goes on
in the server (``POST /api/v1/rollouts/{id}/abort`` stops it).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from agent.errors import ConfigError, EdgeAgentError

TIMEOUT_S = 10.0
MAX_BYTES = 4 * 1024 * 1024
POLL_S = 1.0
FINAL = ("succeeded", "halted", "aborted")


class ServerError(EdgeAgentError):
    """The server cannot be reached, refused the request, or answered nonsense."""


class ServerClient:
    """Requests to one server with one token."""

    def __init__(self, url: str, token: str | None, timeout_s: float = TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError([f"--server: {url!r} is not an http:// or https:// URL"])
        if not token:
            raise ConfigError(["--server needs a token: --token or EDGE_FLEET_TOKEN"])
        self.base = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The JSON object the server answers; raises ServerError (ConfigError on 422)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read(MAX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            detail = _detail(exc.read(64 * 1024)) or exc.reason
            if exc.code == 422:
                raise ConfigError([f"the server refused the request: {detail}"]) from None
            what = {401: "the token is not valid (401)", 403: "the token may not do this (403)"}
            raise ServerError(f"{what.get(exc.code, f'HTTP {exc.code}')}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            hint = (
                " (a certificate from a private CA: set SSL_CERT_FILE=ca.pem)"
                if isinstance(reason, ssl.SSLCertVerificationError)
                else ""
            )
            raise ServerError(f"cannot reach the server at {self.base}: {reason}{hint}") from None
        if len(raw) > MAX_BYTES:
            raise ServerError(f"the server's answer is over {MAX_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ServerError("the server's answer is not JSON") from None
        if not isinstance(doc, dict):
            raise ServerError("the server's answer is not a JSON object")
        return doc


def _detail(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    detail = doc.get("detail") if isinstance(doc, dict) else None
    text = detail if isinstance(detail, str) else json.dumps(detail)[:300]
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """The lines to print for what changed between two views of a rollout."""
    lines: list[str] = []
    old_steps = {s.get("step"): s for s in (before or {}).get("steps", [])}
    for step in after.get("steps", []):
        old = old_steps.get(step.get("step"), {})
        if step.get("status") != old.get("status") and step.get("status") != "waiting":
            names = ", ".join(str(d.get("device")) for d in step.get("devices", []))
            if step.get("status") == "running":
                lines.append(f"{step.get('name')}: {names}")
            else:
                lines.append(f"{step.get('name')}: {step.get('status')}")
        old_devices = {d.get("device"): d for d in old.get("devices", [])}
        for d in step.get("devices", []):
            was = old_devices.get(d.get("device"), {})
            lines += _trial_change(d, was)
            if (d.get("status"), d.get("detail")) == (was.get("status"), was.get("detail")):
                continue
            if d.get("status") in ("succeeded", "failed"):
                lines.append(
                    f"  {d.get('device')}: {d.get('status')} ({d.get('detail')}) "
                    f"after {d.get('seconds')} s"
                )
            elif d.get("status") == "pending":
                lines.append(f"  {d.get('device')}: {d.get('detail')}")
    if (before or {}).get("status") != after.get("status"):
        reason = f" ({after.get('reason')})" if after.get("reason") else ""
        lines.append(f"rollout {after.get('id')}: {after.get('status')}{reason}")
    return lines


def _trial(d: dict[str, Any]) -> dict[str, Any]:
    trial = d.get("trial")
    return trial if isinstance(trial, dict) else {}


def _trial_change(d: dict[str, Any], was: dict[str, Any]) -> list[str]:
    """A shadow rollout's line for a device whose trial (its shadow run) moved on."""
    now, before = _trial(d), _trial(was)
    if not now or (now.get("status"), now.get("detail")) == (
        before.get("status"),
        before.get("detail"),
    ):
        return []
    if now.get("status") in ("succeeded", "failed"):
        return [
            f"  {d.get('device')}: shadow {now.get('status')} ({now.get('detail')}) "
            f"after {now.get('seconds')} s"
        ]
    return [f"  {d.get('device')}: shadow: {now.get('detail')}"]


def follow(
    client: ServerClient,
    rollout: dict[str, Any],
    say: Callable[[str], None],
    *,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the rollout until it ends; print each change; the last view. Raises
    ServerError when the server stays unreachable for 10 polls in a row."""
    current = rollout
    for line in changes(None, current):
        say(line)
    failures = 0
    while current.get("status") not in FINAL:
        sleep(poll_s)
        try:
            latest = client.request("GET", f"/api/v1/rollouts/{current['id']}")
        except ServerError as exc:
            failures += 1
            if failures >= 10:
                raise
            say(f"(server: {exc}; trying again)")
            continue
        failures = 0
        for line in changes(current, latest):
            say(line)
        current = latest
    return current


def summary(view: dict[str, Any]) -> str:
    """The closing lines, as the standalone rollout prints them."""
    devices = [d for s in view.get("steps", []) for d in s.get("devices", [])]
    options = view.get("options")
    shadow = options.get("shadow") if isinstance(options, dict) else None
    shadow = shadow if isinstance(shadow, dict) else None
    trials_only = shadow is not None and shadow.get("promote_at") is None
    # a device's verdict: its desired state's, or its trial's when it had no desired
    # state (a shadow rollout without promote_at, or a trial that failed)
    verdicts = [
        (d["device"], _trial(d).get("status"), _trial(d).get("detail"))
        if _trial(d) and (trials_only or d.get("status") == "untouched")
        else (d["device"], d.get("status"), d.get("detail"))
        for d in devices
    ]
    ok = [device for device, status, _ in verdicts if status == "succeeded"]
    what = "rollout"
    if shadow is not None:
        what = "shadow rollout" if trials_only else "rollout (shadow first)"
    head = f"{what} of {view.get('model')} v{view.get('version')} to group {view.get('group')}"
    if view.get("status") == "succeeded":
        runs = f"run v{view.get('version')} in the shadow" if trials_only else "run it"
        lines = [f"{head}: succeeded, {len(ok)} device(s) {runs}"]
        lines += [f"  {d['device']}: shadow: {_trial(d).get('detail')}" for d in devices
                  if _trial(d)]  # fmt: skip
        return "\n".join(lines)
    lines = [f"{head}: {str(view.get('status')).upper()} ({view.get('reason')})"]
    lines.append(f"  succeeded: {', '.join(ok) or 'none'}")
    lines += [
        f"  failed: {device}: {detail}" for device, status, detail in verdicts if status == "failed"
    ]
    lines += [
        f"  unknown: {device}: {detail}"
        for device, status, detail in verdicts
        if status == "pending"
    ]
    lines.append(f"  untouched: {', '.join(view.get('untouched') or []) or 'none'}")
    return "\n".join(lines)
