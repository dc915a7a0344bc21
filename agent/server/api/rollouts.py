"""Routes: deploys and rollouts.

- ``POST /api/v1/deploy`` (operator): the desired state of a device or a group,
  signed with the server's deploy key, published retained now; a ``deploys`` row.
- ``POST /api/v1/rollouts`` (operator): a staged rollout to a group, driven by the
  server (:mod:`agent.server.driver`); 409 when the group has an unfinished rollout or
  no device reports the group, 422 for bad names, versions, percentages or timeouts.
- ``GET /api/v1/rollouts`` and ``GET /api/v1/rollouts/{id}`` (viewer): progress per
  step and device.
- ``POST /api/v1/rollouts/{id}/pause|resume|abort`` (operator), 409 when not
  applicable: pause issues no new step but keeps judging the current one (a failure
  still halts it); resume goes on; abort takes the current step's unfinished devices
  back, like a halt.

Every POST with a valid operator token writes an audit row (who, action, target,
outcome: ok, refused, invalid, failed); a request the body model rejects (a wrong
type) is a 422 before the route runs, and is not audited.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from agent.config import MODEL_NAME_PATTERN
from agent.desired import desired_topic
from agent.errors import ConfigError, EdgeAgentError
from agent.fleet.acl import check_device_id
from agent.fleet.deploy import desired_payload, issue_time
from agent.fleet.rollout import plan, step_name
from agent.server import rollstore
from agent.server.auth import Caller, operator, record_action, viewer
from agent.server.context import Server
from agent.server.releases import RegistryUnavailable, missing_release
from agent.server.rollouts import STATUSES, Member
from agent.server.schema import DEVICE, deploys, rollouts

router = APIRouter(prefix="/api/v1", tags=["rollouts"])

MAX_VERSION = 2**31 - 1
MAX_TIMEOUT_S = 7 * 86_400.0
MAX_LIST = 500


class DeployRequest(BaseModel):
    """A desired state for one device or one group (or clearing it)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(
        None, description="model name (with clear: its desired state; none: the legacy topic's)"
    )
    version: int | None = Field(None, description="release version (not with clear)")
    device: str | None = Field(None, description="a device id (or group)")
    group: str | None = Field(None, description="a group name (or device)")
    clear: bool = Field(False, description="remove the desired state instead")


class RolloutRequest(BaseModel):
    """The options of ``edge-fleet rollout``."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model name")
    version: int = Field(description="release version")
    group: str = Field(description="the group (devices name it in their status)")
    canary_pct: float = Field(10.0, description="share updated first, at least one device")
    step_pct: float = Field(25.0, description="share per later step")
    timeout_s: float = Field(900.0, description="silence allowed per device, in seconds")
    max_device_s: float | None = Field(
        None,
        description="longest a device may stay pending after its desired state is sent, "
        "however much it reports (default: the larger of timeout_s and 3555 s)",
    )


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def _check_release(model: str | None, version: int | None) -> list[str]:
    problems = []
    if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
        problems.append(f"model: {model[:80]!r} is not a model name")
    if version is not None and not 1 <= version <= MAX_VERSION:
        problems.append(f"version: {version} is not a positive integer")
    return problems


def _check_name(what: str, name: str) -> list[str]:
    if len(name) > DEVICE:  # the columns' size: checked before anything is published
        return [f"{what}: a {what} name is at most {DEVICE} characters"]
    problem = check_device_id(name)
    if problem is None:
        return []
    return [f"{what}: {problem.replace('device id', f'{what} name')}"]


def _not_released(server: Server, model: str, version: int) -> tuple[int, str] | None:
    """With ``--registry``: why ``model`` v``version`` cannot be deployed (422: not a
    release there; 503: the registry cannot be read), else None. Without a registry
    nothing is checked (the devices' registry may be one the server cannot see)."""
    if not server.options.registry:
        return None
    try:
        why = missing_release(server.options.registry, model, version)
    except RegistryUnavailable as exc:
        return 503, f"cannot check {model} v{version}: registry unavailable: {exc}"[:300]
    if why is None:
        return None
    return 422, f"{model} v{version} is not a release in the registry: {why}"[:300]


def _unprocessable(problems: list[str]) -> HTTPException:
    return HTTPException(422, "; ".join(problems))


def _audit(
    server: Server, caller: Caller, action: str, target: str | None, outcome: str, **detail: Any
) -> None:
    record_action(server.engine, server.clock, caller, action, target, outcome, **detail)


@router.post("/deploy", status_code=202)
def deploy(
    body: DeployRequest,
    request: Request,
    caller: Annotated[Caller, Depends(operator)],
) -> dict[str, Any]:
    """Publish the desired state of a device or a group now (202: the broker has it;
    the devices act on it in their own time)."""
    server = _server(request)
    problems: list[str] = []
    if (body.device is None) == (body.group is None):
        problems.append("give one of device or group")
    if body.clear and body.version is not None:
        problems.append("clear takes no version (a model: clear that model's desired state)")
    if not body.clear and (body.model is None or body.version is None):
        problems.append("model and version are required (or clear)")
    problems += _check_release(body.model, body.version)
    if body.device is not None:
        problems += _check_name("device", body.device)
    if body.group is not None:
        problems += _check_name("group", body.group)
    if problems:
        _audit(server, caller, "deploy", None, "invalid", problems=problems)
        raise _unprocessable(problems)
    kind, name = ("device", body.device) if body.device is not None else ("group", body.group)
    assert name is not None
    target = f"{kind}:{name}"
    action = "deploy.clear" if body.clear else "deploy"
    if body.model is not None and body.version is not None:
        refused = _not_released(server, body.model, body.version)
        if refused is not None:
            _audit(server, caller, action, target, "invalid", problems=[refused[1]])
            raise HTTPException(*refused)
    with server.engine.connect() as conn:
        if kind == "group":
            busy = rollstore.active_in(conn, name)
        else:  # a member's own desired state is the rollout's: a deploy would void its verdict
            busy = rollstore.active_for_device(conn, name)
    if busy is not None:
        _audit(server, caller, action, target, "refused", rollout=busy)
        raise HTTPException(409, f"{kind} {name} is in rollout {busy}, in progress; abort it first")
    # each model has its own topic; a clear without a model clears the one topic older
    # fleet tools used (docs/server.md)
    topic = desired_topic(server.prefix, target, body.model)
    issued_at = issue_time()
    try:
        if body.clear:
            payload = b""
        else:
            assert body.model is not None and body.version is not None
            payload = desired_payload(
                body.model, body.version, target, issued_at, server.options.sign_key
            )
        server.publisher.publish(topic, payload, retain=True)
    except (EdgeAgentError, ValueError) as exc:
        _audit(server, caller, action, target, "failed", error=str(exc)[:300])
        raise HTTPException(503, f"not published: {exc}"[:300]) from None
    result: dict[str, Any] = {"target": target, "topic": topic, "cleared": body.clear}
    if not body.clear:
        deploy_id = uuid.uuid4().hex[:16]
        with server.engine.begin() as conn:
            conn.execute(
                deploys.insert().values(
                    id=deploy_id,
                    created=server.clock(),
                    who=caller.name,
                    target_kind=kind,
                    target=name,
                    model=body.model,
                    version=body.version,
                    desired=rollstore.json_doc(payload),
                )
            )
        result |= {
            "id": deploy_id,
            "model": body.model,
            "version": body.version,
            "issued_at": issued_at,
            "signed": server.options.sign_key is not None,
        }
    _audit(server, caller, action, target, "ok", model=body.model, version=body.version)
    return result


@router.post("/rollouts", status_code=201)
def create_rollout(
    body: RolloutRequest,
    request: Request,
    caller: Annotated[Caller, Depends(operator)],
) -> dict[str, Any]:
    """Start a rollout (201 with its id and plan)."""
    server = _server(request)
    problems = _check_release(body.model, body.version) + _check_name("group", body.group)
    if not (math.isfinite(body.timeout_s) and 0 < body.timeout_s <= MAX_TIMEOUT_S):
        problems.append(f"timeout_s: {body.timeout_s:g} is not a number of seconds in (0, 604800]")
    elif body.max_device_s is not None and not (
        math.isfinite(body.max_device_s) and body.timeout_s <= body.max_device_s <= MAX_TIMEOUT_S
    ):
        problems.append(
            f"max_device_s: {body.max_device_s:g} is not a number of seconds in [timeout_s, 604800]"
        )
    try:
        plan([], body.group, body.canary_pct, body.step_pct)
    except ConfigError as exc:
        problems += [
            p.replace("--canary", "canary_pct").replace("--step", "step_pct") for p in exc.problems
        ]
    if problems:
        _audit(server, caller, "rollout.create", None, "invalid", problems=problems)
        raise _unprocessable(problems)
    refused = _not_released(server, body.model, body.version)
    if refused is not None:
        _audit(server, caller, "rollout.create", None, "invalid", problems=[refused[1]])
        raise HTTPException(*refused)
    key = server.options.sign_key
    if key is not None:
        try:  # a key that cannot sign would stall the rollout at its first step
            desired_payload(body.model, body.version, "group:x", issue_time(), key)
        except EdgeAgentError as exc:
            _audit(server, caller, "rollout.create", None, "failed", error=str(exc)[:300])
            raise HTTPException(503, f"the server's deploy key cannot sign: {exc}"[:300]) from None
    target = f"group:{body.group}"
    detail = body.model_dump()
    try:
        with server.engine.begin() as conn:
            members = rollstore.members_of(conn, body.group, body.model)
            if not members:
                raise HTTPException(
                    409,
                    f"no device reports group {body.group!r} and serves {body.model} (devices "
                    "name their groups in their status and their models in their state; is "
                    "device.groups set and the device connected once?)",
                )
            rollout_id = rollstore.create(
                conn,
                who=caller.name,
                group=body.group,
                model=body.model,
                version=body.version,
                canary_pct=body.canary_pct,
                step_pct=body.step_pct,
                timeout_s=body.timeout_s,
                members=members,
                now=server.clock(),
                max_device_s=body.max_device_s,
            )
    except (rollstore.GroupBusy, IntegrityError) as exc:
        busy = exc.args[0] if isinstance(exc, rollstore.GroupBusy) else "another"
        _audit(server, caller, "rollout.create", target, "refused", **detail)
        raise HTTPException(
            409, f"group {body.group} has rollout {busy} in progress (one at a time per group)"
        ) from None
    except HTTPException:
        _audit(server, caller, "rollout.create", target, "refused", **detail)
        raise
    _audit(server, caller, "rollout.create", target, "ok", rollout=rollout_id, **detail)
    return show(server, rollout_id)


@router.get("/rollouts")
def list_rollouts(
    request: Request,
    _: Annotated[Caller, Depends(viewer)],
    group: Annotated[str | None, Query(max_length=128)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
) -> dict[str, Any]:
    """Rollouts, newest first (filters: group, status)."""
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status: one of {', '.join(STATUSES)}")
    query = sa.select(rollouts).order_by(rollouts.c.created.desc()).limit(limit)
    if group is not None:
        query = query.where(rollouts.c.group_name == group)
    if status is not None:
        query = query.where(rollouts.c.status == status)
    with _server(request).engine.connect() as conn:
        rows = conn.execute(query).all()
    return {"rollouts": [rollout_summary(row) for row in rows]}


def rollout_summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "group": row.group_name,
        "model": row.model,
        "version": row.version,
        "status": row.status,
        "step": row.step,
        "options": row.options,
        "reason": row.reason,
        "who": row.who,
        "created": row.created,
        "updated": row.updated,
    }


def _device(m: Member) -> dict[str, Any]:
    return {
        "device": m.device,
        "status": m.outcome or "untouched",
        "detail": m.reason,
        "seconds": m.seconds,
        "issued_at": m.issued_at,
        "sent": m.sent,
        "last_heard": m.last_heard,
        "timed_out": m.timed_out,
        "take_back": m.take_back,
    }


def show(server: Server, rollout_id: str) -> dict[str, Any]:
    """A rollout with its steps and devices (raises HTTPException 404)."""
    with server.engine.connect() as conn:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).first()
        loaded = rollstore.load(conn, rollout_id) if row is not None else None
    if row is None or loaded is None:
        raise HTTPException(404, f"no rollout {rollout_id[:64]!r}")
    r, steps, members = loaded
    return {
        **rollout_summary(row),
        "steps": [
            {
                "step": s.step,
                "name": step_name(s.step, r.canary),
                "status": s.status,
                "started": s.started,
                "finished": s.finished,
                "devices": [_device(m) for m in members if m.step == s.step],
            }
            for s in steps
        ],
        "untouched": [m.device for m in members if m.outcome is None],
        "halted": r.reason if r.status in ("halting", "halted") else None,
    }


@router.get("/rollouts/{rollout_id}")
def get_rollout(
    rollout_id: str,
    request: Request,
    _: Annotated[Caller, Depends(viewer)],
) -> dict[str, Any]:
    """One rollout: progress per step and device."""
    return show(_server(request), rollout_id[:64])


MOVES: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "abort": (("running", "paused"), "aborting"),
}


def _move(
    request: Request, caller: Caller, rollout_id: str, action: Literal["pause", "resume", "abort"]
) -> dict[str, Any]:
    server = _server(request)
    rollout_id = rollout_id[:64]
    allowed, to = MOVES[action]
    values: dict[str, Any] = {"status": to, "updated": server.clock()}
    if action == "abort":
        values["reason"] = f"aborted by {caller.name}"
    with server.engine.begin() as conn:
        moved = conn.execute(
            rollouts.update()
            .where(rollouts.c.id == rollout_id, rollouts.c.status.in_(allowed))
            .values(**values)
        ).rowcount
        now = conn.execute(sa.select(rollouts.c.status).where(rollouts.c.id == rollout_id)).first()
    if now is None:
        raise HTTPException(404, f"no rollout {rollout_id!r}")
    target = f"rollout:{rollout_id}"
    if moved != 1:
        _audit(server, caller, f"rollout.{action}", target, "refused", status=now.status)
        raise HTTPException(409, f"rollout {rollout_id} is {now.status}: cannot {action} it")
    _audit(server, caller, f"rollout.{action}", target, "ok")
    return show(server, rollout_id)


@router.post("/rollouts/{rollout_id}/pause")
def pause(
    rollout_id: str, request: Request, caller: Annotated[Caller, Depends(operator)]
) -> dict[str, Any]:
    """Issue no new step; the current step's devices are still judged."""
    return _move(request, caller, rollout_id, "pause")


@router.post("/rollouts/{rollout_id}/resume")
def resume(
    rollout_id: str, request: Request, caller: Annotated[Caller, Depends(operator)]
) -> dict[str, Any]:
    """Go on with a paused rollout."""
    return _move(request, caller, rollout_id, "resume")


@router.post("/rollouts/{rollout_id}/abort")
def abort(
    rollout_id: str, request: Request, caller: Annotated[Caller, Depends(operator)]
) -> dict[str, Any]:
    """Stop for good: the current step's unfinished devices are taken back."""
    return _move(request, caller, rollout_id, "abort")
