"""The device page's command buttons (issue 17): ping, check updates, roll back, logs,
diagnostics.

``POST /ui/devices/{id}/commands/{name}`` (operator): ``name`` one of
:data:`agent.server.api.commands.COMMANDS`; form fields ``csrf`` and, for ``rollback``,
an optional ``version``, for ``logs`` an optional ``lines``. It runs the API's own
:func:`agent.server.api.commands.run_command` (same checks, same bounded wait, same
audit entry) and answers with the device page and the outcome in one line: the
device's reply (200; a ``logs`` or ``diagnostics`` reply also shown whole, by
:mod:`agent.server.web.replies`), or what went wrong with the API's status (409
offline, 422, 429, 503 broker away, 504 no reply in time). Nothing is redirected: a
reply is for now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from agent.diagnostics import LOGS_MAX
from agent.server.api import commands as api
from agent.server.web import formats, pages, replies

router = APIRouter(prefix="/ui", include_in_schema=False)
WAIT_S = float(api.DEFAULT_WAIT_S)


# -- pure rules ---------------------------------------------------------------------------


def form_command(name: str, form: Mapping[str, str]) -> api.CommandRequest:
    """The command a button's form stands for; an empty version (rollback) or lines
    (logs) field is none. Raises CommandProblem with one line."""
    command = api.command_name(name)
    if command == "logs":
        lines = form.get("lines", "").strip()
        if not lines:
            return api.CommandRequest(command)
        if not lines.isdigit() or len(lines) > 10:
            raise api.CommandProblem(
                f"lines: {lines[:20]!r} is not an integer from 1 to {LOGS_MAX}"
            )
        return api.CommandRequest(command, api.check_args(command, {"lines": int(lines)}))
    version = form.get("version", "").strip() if command == "rollback" else ""
    if not version:
        return api.CommandRequest(command)
    if not version.isdigit() or len(version) > 10:
        raise api.CommandProblem(f"version: {version[:20]!r} is not a positive integer")
    return api.CommandRequest(command, api.check_args(command, {"version": int(version)}))


def _release(result: Mapping[str, Any], key: str) -> str:
    version = result.get(key)
    return f"v{version}" if isinstance(version, int) and not isinstance(version, bool) else "?"


def summary(out: Mapping[str, Any]) -> str:
    """One line for the route's 200 body: what the device said."""
    name = str(out.get("command", "command"))
    if not out.get("ok"):
        return f"{name} refused: {out.get('error') or 'no reason given'}"
    result = out.get("result")
    result = result if isinstance(result, Mapping) else {}
    if name == "ping":
        uptime = result.get("uptime_s")
        up = formats.figure(uptime, 0) if isinstance(uptime, int | float) else "?"
        model = result.get("model")
        serving = f"{model} {_release(result, 'version')}" if model else "no model"
        return f"ping: pong — up {up} s, {serving}, {result.get('phase') or 'no phase'}"
    if name == "rollback":
        return f"rollback: now {_release(result, 'version')} (from {_release(result, 'from')})"
    if name == "logs":
        count = result.get("count")
        shown = count if isinstance(count, int) and not isinstance(count, bool) else "?"
        cut = " (older ones left out: 64 KiB at most)" if result.get("truncated") is True else ""
        return f"logs: the last {shown} lines{cut}"
    if name == "diagnostics":
        versions = result.get("versions")
        agent = versions.get("agent") if isinstance(versions, Mapping) else None
        return f"diagnostics: agent {agent if isinstance(agent, str) else '?'}"
    if "note" in result:
        return f"check-updates: {result['note']}"
    then = "an update starts" if result.get("changed") else "nothing to do"
    return f"check-updates: the channel names {_release(result, 'version')}; {then}"


# -- the route ----------------------------------------------------------------------------


@router.post("/devices/{device}/commands/{name}")
async def command_form(request: Request, device: str, name: str) -> Response:
    """A command button: the API's run_command, the outcome on the device page."""
    checked = await pages.operator_post(request, "send commands")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    server = pages.server_of(request)
    status, line, failed = 200, "", False
    shown: dict[str, Any] = {}
    try:
        command = form_command(name, form)
        out = await run_in_threadpool(
            api.run_command, server, session.caller, device, command, WAIT_S
        )
        line = summary(out)
        failed = not out["ok"]
        shown = dict(replies.shown(out))
    except api.CommandProblem as exc:
        status, line, failed = 422, str(exc), True
        await run_in_threadpool(
            api.audit_command, server, session.caller, device[:80], "invalid",
            name=name[:40], problem=line,
        )  # fmt: skip
    except HTTPException as exc:
        status, line, failed = exc.status_code, str(exc.detail), True
    context = await run_in_threadpool(pages.device_context, request, session, device)
    if context is None:
        return pages.error_page(request, session, status if status != 200 else 404, line)
    context["error" if failed else "done"] = line
    context.update(shown)
    return pages.render(request, "device.html", context, status)
