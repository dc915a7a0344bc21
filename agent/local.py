"""The command line and the running agent agree: ``status``, ``models pull`` and
``models rollback`` go through the agent's control socket when it runs.

``reach(config)`` asks the agent at ``Config.control_socket`` for its status:

- it answers: what it serves is shown, and pull/rollback are requests to it, so they
  go through the same gate, probation, journal and telemetry as a pushed update;
- nothing listens and no agent holds ``<store.dir>/agent.lock``: the agent is stopped,
  and the command works on the store itself (an offline pull is journaled, so the next
  start runs the gate and probation before it serves the release);
- otherwise (permission denied, an agent whose socket does not answer): status shows
  the store with a line saying why, and pull/rollback are refused (exit 1); the store
  is never modified under a running agent.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from agent.commands import CommandError
from agent.config import Config
from agent.control import AgentLock, ControlError, ask
from agent.errors import UpdateError
from agent.store import Store
from agent.structs import dotted, locate

POLL_S = 0.2


# What the command line reads of the agent's replies. They are checked, then used as
# they came (``--json`` shows them whole): something else listening on the socket, or
# an agent of another version, is a one-line error, never a KeyError. Keys these do not
# name are allowed (a newer agent may say more).
class _Reply(msgspec.Struct, frozen=True):
    pass


class _Stats(_Reply, frozen=True):
    model: str
    version: int
    backend: str
    fps: float
    latency_ms_p95: float
    source_connected: bool


class _Update(_Reply, frozen=True):
    version: int
    source: str
    phase: str
    outcome: str | None
    reason: str | None = None


class _Broker(_Reply, frozen=True):
    url: str | None
    connected: bool
    queued: int


class _Runtime(_Reply, frozen=True):
    interpreters: int
    threads: int
    chosen_by: str
    note: str | None = None


class _Status(_Reply, frozen=True):
    pid: int
    uptime_s: float
    stats: _Stats | None
    update: _Update | None
    broker: _Broker
    last_error: str | None = None
    runtime: _Runtime | None = None  # older agents do not say


class _Queued(_Reply, frozen=True):
    version: int


class _RolledBack(_Reply, frozen=True):
    version: int
    from_: int | None = msgspec.field(name="from")


def _ask(
    path: Path, command: str, reply: type[_Reply], args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``ask``, with the reply checked against ``reply``. Raises ControlError when it
    does not fit (besides what ``ask`` raises)."""
    result = ask(path, command, args)
    try:  # strict: "2" for a number is another program's answer, not ours
        msgspec.convert(result, reply)
    except msgspec.ValidationError as exc:
        where, what = locate(exc)
        raise ControlError(
            f"the agent at {path} answered something unreadable: {command}: "
            + (f"{dotted(where)}: {what}" if where else what)
        ) from None
    return result


class Reach(msgspec.Struct, frozen=True):
    """What asking the agent gave: its status, or why it could not be asked."""

    path: Path
    status: dict[str, Any] | None  # the agent answered
    problem: str | None  # it runs (or may run) but could not be asked: one line

    @property
    def stopped(self) -> bool:
        return self.status is None and self.problem is None


def reach(config: Config) -> Reach:
    """Ask the agent for its status; never raises for an unreachable agent."""
    path = config.control_socket
    try:
        return Reach(path, _ask(path, "status", _Status), None)
    except PermissionError:
        return Reach(
            path,
            None,
            f"cannot reach the agent at {path}: permission denied (add yourself to group "
            "edge-agent, or use sudo)",
        )
    except (ControlError, CommandError) as exc:
        absent = isinstance(exc, ControlError) and exc.absent
        try:
            pid = AgentLock(config.store.dir).holder_pid()
        except PermissionError:
            pid = None
        if pid is not None:
            return Reach(
                path,
                None,
                f"the agent is running (pid {pid}) but its control socket {path} does not "
                f"answer: {exc}",
            )
        return Reach(path, None, None if absent else str(exc))


def daemon_lines(found: Reach) -> list[str]:
    """The status lines about the agent (``daemon:``, ``serving:``, ``update:``, ``broker:``)."""
    if found.problem is not None:
        return [f"daemon:   {found.problem}"]
    status = found.status
    if status is None:
        return ["daemon:   not running"]
    version = status.get("agent_version", "?")
    lines = [
        f"daemon:   running (pid {status['pid']}, up {status['uptime_s']:.0f} s, "
        f"edge-agent {version})"
    ]
    stats = status.get("stats")
    if stats:
        lines.append(
            f"serving:  {stats['model']} v{stats['version']} on {stats['backend']}: "
            f"{stats['fps']:.1f} fps, p95 {stats['latency_ms_p95']:.1f} ms"
            + ("" if stats["source_connected"] else ", source reconnecting")
            + _runtime_text(status.get("runtime"))
        )
    else:
        error = status.get("last_error")
        lines.append("serving:  nothing" + (f" ({error})" if error else ""))
    for name, figures in (status.get("pipelines_stats") or {}).items():
        if figures:
            lines.append(
                f"pipeline: {name}: {figures['model']} v{figures['version']} on "
                f"{figures['backend']}: {figures['fps']:.1f} fps, p95 "
                f"{figures['latency_ms_p95']:.1f} ms"
            )
        else:
            lines.append(f"pipeline: {name}: nothing serving")
    update = status.get("update")
    if update:
        end = update["outcome"] or f"in phase {update['phase']}"
        why = f": {update['reason']}" if update.get("reason") else ""
        lines.append(f"update:   v{update['version']} from {update['source']}: {end}{why}")
    broker = status["broker"]
    if broker["url"] is None:
        lines.append(f"broker:   none configured ({broker['queued']} queued in the outbox)")
    else:
        link = "connected" if broker["connected"] else "unreachable"
        lines.append(f"broker:   {link} ({broker['queued']} queued)")
    return lines


def _runtime_text(runtime: dict[str, Any] | None) -> str:
    """``; 2 interpreters x 1 thread (calibration)``: how the model runs."""
    if not runtime:
        return ""
    n, threads = runtime["interpreters"], runtime["threads"]
    text = (
        f"; {n} interpreter{'s' if n > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        f" ({runtime['chosen_by']})"
    )
    return text + (f": {runtime['note']}" if runtime.get("note") else "")


def require_reachable(found: Reach, action: str) -> None:
    """Refuse ``action`` on the store when an agent may be running but cannot be asked."""
    if found.problem is not None:
        raise ControlError(
            f"{found.problem}; not doing `{action}` on the store behind its back "
            "(try again, or stop the agent: systemctl stop edge-agent)"
        )


@contextlib.contextmanager
def agent_stopped(config: Config) -> Iterator[None]:
    """Hold the agent lock while the command line changes the store (an agent starting
    meanwhile waits for it)."""
    lock = AgentLock(Store(config.store.dir).open().root, role="cli")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def pull_through_agent(
    found: Reach,
    version: int | None,
    wait_s: float | None,
    say: Callable[[str], None],
    model: str | None = None,
) -> dict[str, Any]:
    """Ask the agent to pull ``version`` (of ``model``, a served one; None: the first
    pipeline's); wait (up to ``wait_s``; None: not at all) for the
    update's outcome, telling ``say`` each phase seen.

    Returns the update's summary (``outcome`` None when not waited or not ended).
    Raises CommandError when the agent refused, ControlError when it stopped answering.
    """
    assert found.status is not None
    before = (_model_part(found.status, model).get("update") or {}).get("id")
    args: dict[str, Any] = {"version": version}
    if model is not None:
        args["model"] = model
    queued = _ask(found.path, "pull", _Queued, args)
    target = queued["version"]
    summary: dict[str, Any] = {"version": target, "outcome": None, "phase": "queued"}
    if wait_s is None:
        return summary
    deadline = time.monotonic() + wait_s
    said = ""
    while time.monotonic() < deadline:
        update = _model_part(_ask(found.path, "status", _Status), model).get("update") or {}
        if update.get("id") != before and update.get("version") == target:
            summary = update
            if update["phase"] != said and update["outcome"] is None:
                said = update["phase"]
                say(f"v{target}: {said}")
            if update["outcome"] is not None:
                return summary
        time.sleep(POLL_S)
    raise UpdateError(
        f"v{target} still {summary.get('phase')} after {wait_s:g} s; the agent goes on "
        "(see `edge-agent status`)"
    )


def _model_part(status: dict[str, Any], model: str | None) -> dict[str, Any]:
    """The status's part about ``model`` (``models[model]``; None: the top level)."""
    if model is None:
        return status
    part = (status.get("models") or {}).get(model)
    return part if isinstance(part, dict) else {}


def rollback_through_agent(
    found: Reach, to: int | None, model: str | None = None
) -> dict[str, Any]:
    """The agent's own rollback (the MQTT ``rollback`` command's): what serves changes."""
    args: dict[str, Any] = {"version": to}
    if model is not None:
        args["model"] = model
    return _ask(found.path, "rollback", _RolledBack, args)
