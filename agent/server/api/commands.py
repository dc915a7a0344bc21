"""Route: a command to one device, and its reply.

``POST /api/v1/devices/{device}/commands/{name}`` (operator), ``name`` one of ``ping``,
``rollback``, ``check-updates``, ``logs``, ``diagnostics`` (docs/protocol.md
"Commands"); the body is optional JSON: nothing or ``{}``, or for ``rollback``
``{"version": N}``, for ``logs`` ``{"lines": N}`` (1–500). Not ``snapshot``: its camera
image would stay in the events table, where every reply is kept, as history. The server publishes
``{"id": <a random request id>, ...args}`` on ``<prefix>/<device>/cmd/<name>`` (QoS 1,
not retained: a command is for now, not for whenever the device comes back), then
waits for the device's reply, which any instance's ingester stores as a ``reply`` event
with the request id, polling the events table (``?wait=`` 1..30 s, default 10).

- 200 ``{"device", "command", "request_id", "ok", "result" | "error"}``: the device
  answered (``ok`` false: it refused, ``error`` says why).
- 404 unknown device; 409 the device is offline (commands are not queued for it);
  422 unknown command or a body it does not take; 429 too many commands waiting for
  replies on this server (:data:`MAX_WAITING`); 503 the broker is away; 504 no reply
  within the wait (the command may still run).

Every call with an operator's token is audited as ``device.command`` (target
``device:<id>``, detail: name, args, request id; outcome ``ok``, ``refused`` — by the
device or by the server —, ``invalid``, ``timeout``, ``failed``); the detail keeps a
``logs`` or ``diagnostics`` result only in short (:func:`audit_result`): the reply
itself is in the device's events.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from agent.commands import CommandError
from agent.diagnostics import LOGS_MAX, lines_argument
from agent.errors import EdgeAgentError
from agent.fleet.acl import check_device_id
from agent.server.api.rollouts import MAX_VERSION
from agent.server.auth import Caller, operator, record_action
from agent.server.context import COMMANDS_WAITING, Server
from agent.server.schema import devices, events

router = APIRouter(prefix="/api/v1", tags=["commands"])

Command = Literal["ping", "rollback", "check-updates", "logs", "diagnostics"]
COMMANDS: tuple[Command, ...] = get_args(Command)
ARGS: dict[Command, frozenset[str]] = {
    "ping": frozenset(),
    "rollback": frozenset({"version"}),
    "check-updates": frozenset(),
    "logs": frozenset({"lines"}),
    "diagnostics": frozenset(),
}
DEFAULT_WAIT_S = 10
MAX_WAIT_S = 30
POLL_S = 0.2
MAX_WAITING = COMMANDS_WAITING  # commands waiting for their reply at once, per server
MAX_BODY = 1024
MAX_ROWS = 100  # new reply rows read per poll


class CommandProblem(ValueError):
    """A command name or body the server does not send: the message says what and why."""


@dataclass(frozen=True)
class CommandRequest:
    """A checked command: its name and its arguments (without the request id)."""

    name: Command
    args: dict[str, Any] = field(default_factory=dict)


# -- pure rules ---------------------------------------------------------------------------


def command_name(name: str) -> Command:
    """``name`` as a known command; raises CommandProblem naming the known ones."""
    for known in COMMANDS:
        if name == known:
            return known
    raise CommandProblem(f"unknown command {name[:40]!r}; known: {', '.join(COMMANDS)}")


def check_args(name: Command, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments ``name`` takes, checked; raises CommandProblem."""
    extra = sorted(set(args) - ARGS[name])
    if extra:
        takes = ", ".join(sorted(ARGS[name])) or "no arguments"
        raise CommandProblem(f"{name} takes {takes}; not {', '.join(extra)[:80]}")
    version = args.get("version")
    if "version" in args and (
        not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_VERSION
    ):
        raise CommandProblem(f"version: {str(version)[:20]!r} is not a positive integer")
    if "lines" in args:
        try:
            lines_argument(args)  # the agent's own rule: it would refuse the same
        except CommandError as exc:
            raise CommandProblem(str(exc)) from None
    return dict(args)


def parse_command(name: str, body: bytes) -> CommandRequest:
    """The command a route's name and raw body stand for (an empty body: no arguments).
    Raises CommandProblem with one line."""
    command = command_name(name)
    if len(body) > MAX_BODY:
        raise CommandProblem(f"body: {len(body)} bytes, over {MAX_BODY}")
    if not body.strip():
        return CommandRequest(command)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise CommandProblem(
            'body: not JSON; send {}, {"version": N} (rollback) or {"lines": N} (logs)'
        ) from None
    if not isinstance(doc, dict):
        raise CommandProblem("body: a JSON object is needed")
    return CommandRequest(command, check_args(command, doc))


def payload(request_id: str, command: CommandRequest) -> bytes:
    """What is published on the command topic."""
    return json.dumps({"id": request_id, **command.args}, separators=(",", ":")).encode()


def find_reply(rows: Iterable[Mapping[str, Any]], request_id: str) -> dict[str, Any] | None:
    """The first stored reply (an event's ``fields``) that answers ``request_id`` with a
    well-formed body, else None."""
    for fields in rows:
        if (
            isinstance(fields, Mapping)
            and fields.get("request_id") == request_id
            and isinstance(fields.get("ok"), bool)
        ):
            return dict(fields)
    return None


def answer(
    device: str, command: CommandRequest, request_id: str, reply: Mapping[str, Any]
) -> dict[str, Any]:
    """The route's 200 body from a device's reply."""
    out: dict[str, Any] = {
        "device": device,
        "command": command.name,
        "request_id": request_id,
        "ok": reply["ok"] is True,
    }
    if out["ok"]:
        result = reply.get("result")
        out["result"] = result if isinstance(result, dict) else {}
    else:
        error = reply.get("error")
        out["error"] = error if isinstance(error, str) else "refused (no reason given)"
    return out


def audit_result(name: Command, result: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit keeps of a device's result: all of it, but for ``logs`` (its
    ``count`` and ``truncated``) and ``diagnostics`` (the agent's version): who asked
    for them is the audit's business, the lines and the config are the events'."""
    if name == "logs":
        return {key: result.get(key) for key in ("count", "truncated")}
    if name == "diagnostics":
        versions = result.get("versions")
        agent = versions.get("agent") if isinstance(versions, Mapping) else None
        return {"agent": agent if isinstance(agent, str) else None}
    return dict(result)


# -- I/O ----------------------------------------------------------------------------------


def audit_command(server: Server, caller: Caller, device: str, outcome: str, **detail: Any) -> None:
    target = f"device:{device}"[:200]
    record_action(server.engine, server.clock, caller, "device.command", target, outcome, **detail)


def _wait_reply(
    server: Server, device: str, after: int, request_id: str, wait_s: float
) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    while True:
        with server.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.fields)
                .where(events.c.id > after, events.c.device == device, events.c.event == "reply")
                .order_by(events.c.id)
                .limit(MAX_ROWS)
            ).all()
        if rows:
            after = rows[-1].id
            reply = find_reply((row.fields for row in rows), request_id)
            if reply is not None:
                return reply
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(POLL_S, left))


def run_command(
    server: Server, caller: Caller, device: str, command: CommandRequest, wait_s: float
) -> dict[str, Any]:
    """Send ``command`` to ``device`` and wait (at most ``wait_s``) for its reply; the
    route's 200 body. Raises HTTPException 404, 409, 429, 503 or 504 (module
    docstring), each audited."""
    detail: dict[str, Any] = {"name": command.name, "args": command.args}
    if check_device_id(device) is not None:
        audit_command(server, caller, device[:80], "invalid", **detail, reason="not a device id")
        raise HTTPException(404, f"no device {device[:80]!r}: not a device id")
    with server.engine.connect() as conn:
        online = conn.execute(sa.select(devices.c.online).where(devices.c.id == device)).first()
    if online is None:
        audit_command(server, caller, device, "invalid", **detail, reason="unknown device")
        raise HTTPException(404, f"no device {device!r} has reported to this server")
    if not online.online:
        audit_command(server, caller, device, "refused", **detail, reason="offline")
        raise HTTPException(409, f"{device} is offline: commands are not queued for it")
    slots = server.command_slots
    if not slots.acquire(blocking=False):
        audit_command(server, caller, device, "refused", **detail, reason="busy")
        raise HTTPException(
            429, f"{MAX_WAITING} commands are already waiting for replies: try again shortly"
        )
    try:
        with server.engine.connect() as conn:
            after = conn.execute(sa.select(sa.func.max(events.c.id))).scalar() or 0
        request_id = secrets.token_hex(8)
        detail["request_id"] = request_id
        topic = f"{server.prefix}/{device}/cmd/{command.name}"
        try:
            server.publisher.publish(topic, payload(request_id, command), retain=False)
        except EdgeAgentError as exc:
            audit_command(server, caller, device, "failed", **detail, error=str(exc)[:300])
            raise HTTPException(503, f"not sent: {exc}"[:300]) from None
        reply = _wait_reply(server, device, int(after), request_id, wait_s)
    finally:
        slots.release()
    if reply is None:
        audit_command(server, caller, device, "timeout", **detail)
        raise HTTPException(
            504,
            f"no reply from {device} in {wait_s:g} s: the command may still run; its reply, "
            "if it comes, is in the device's events",
        )
    out = answer(device, command, request_id, reply)
    audit_command(
        server, caller, device, "ok" if out["ok"] else "refused", **detail,
        **({"result": audit_result(command.name, out["result"])} if out["ok"]
           else {"error": out["error"][:300]}),
    )  # fmt: skip
    return out


_BODY = {  # the OpenAPI document's view of the optional body the route reads itself
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "integer", "minimum": 1},
                        "lines": {"type": "integer", "minimum": 1, "maximum": LOGS_MAX},
                    },
                    "additionalProperties": False,
                    "description": "nothing or {}; rollback: {version} (default: previous); "
                    "logs: {lines} (default 100)",
                }
            }
        },
    }
}


@router.post("/devices/{device}/commands/{name}", openapi_extra=_BODY)
async def send_command(
    device: str,
    name: str,
    request: Request,
    caller: Annotated[Caller, Depends(operator)],
    wait: Annotated[int, Query(ge=1, le=MAX_WAIT_S, description="seconds to wait")] = (
        DEFAULT_WAIT_S
    ),
) -> dict[str, Any]:
    """Send a command to a device and return its reply (module docstring)."""
    server: Server = request.app.state.server
    body = await request.body()
    try:
        command = parse_command(name, body)
    except CommandProblem as exc:
        await run_in_threadpool(
            audit_command, server, caller, device[:80], "invalid", name=name[:40], problem=str(exc)
        )
        raise HTTPException(422, str(exc)) from None
    return await run_in_threadpool(run_command, server, caller, device, command, float(wait))
