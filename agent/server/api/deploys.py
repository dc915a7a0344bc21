"""Routes: deploys.

- ``POST /api/v1/deploy`` (operator): the desired state of a device or a group,
  signed with the server's deploy key, published retained now; a ``deploys`` row.

Also the checks and helpers the rollout routes share (:mod:`agent.server.api.rollouts`).
Every POST with a valid operator token writes an audit row (who, action, target,
outcome: ok, refused, invalid, failed).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from agent.config import MODEL_NAME_PATTERN
from agent.desired import desired_topic
from agent.errors import EdgeAgentError
from agent.fleet.acl import check_device_id
from agent.fleet.deploy import desired_payload, issue_time
from agent.server import rollstore
from agent.server.auth import Caller, operator, record_action
from agent.server.context import Server
from agent.server.releases import RegistryUnavailable, missing_release
from agent.server.schema import DEVICE, deploys

router = APIRouter(prefix="/api/v1", tags=["rollouts"])

MAX_VERSION = 2**31 - 1


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


def server_of(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def check_release(model: str | None, version: int | None) -> list[str]:
    problems = []
    if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
        problems.append(f"model: {model[:80]!r} is not a model name")
    if version is not None and not 1 <= version <= MAX_VERSION:
        problems.append(f"version: {version} is not a positive integer")
    return problems


def check_name(what: str, name: str) -> list[str]:
    if len(name) > DEVICE:  # the columns' size: checked before anything is published
        return [f"{what}: a {what} name is at most {DEVICE} characters"]
    problem = check_device_id(name)
    if problem is None:
        return []
    return [f"{what}: {problem.replace('device id', f'{what} name')}"]


def not_released(server: Server, model: str, version: int) -> tuple[int, str] | None:
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


def unprocessable(problems: list[str]) -> HTTPException:
    return HTTPException(422, "; ".join(problems))


def audit_action(
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
    server = server_of(request)
    problems: list[str] = []
    if (body.device is None) == (body.group is None):
        problems.append("give one of device or group")
    if body.clear and body.version is not None:
        problems.append("clear takes no version (a model: clear that model's desired state)")
    if not body.clear and (body.model is None or body.version is None):
        problems.append("model and version are required (or clear)")
    problems += check_release(body.model, body.version)
    if body.device is not None:
        problems += check_name("device", body.device)
    if body.group is not None:
        problems += check_name("group", body.group)
    if problems:
        audit_action(server, caller, "deploy", None, "invalid", problems=problems)
        raise unprocessable(problems)
    kind, name = ("device", body.device) if body.device is not None else ("group", body.group)
    assert name is not None
    target = f"{kind}:{name}"
    action = "deploy.clear" if body.clear else "deploy"
    if body.model is not None and body.version is not None:
        refused = not_released(server, body.model, body.version)
        if refused is not None:
            audit_action(server, caller, action, target, "invalid", problems=[refused[1]])
            raise HTTPException(*refused)
    with server.engine.connect() as conn:
        if kind == "group":
            busy = rollstore.active_in(conn, name)
        else:  # a member's own desired state is the rollout's: a deploy would void its verdict
            busy = rollstore.active_for_device(conn, name)
    if busy is not None:
        audit_action(server, caller, action, target, "refused", rollout=busy)
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
        audit_action(server, caller, action, target, "failed", error=str(exc)[:300])
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
    audit_action(server, caller, action, target, "ok", model=body.model, version=body.version)
    return result
