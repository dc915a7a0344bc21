"""Routes: rollouts.

- ``POST /api/v1/deploy``: :mod:`agent.server.api.deploys`.
- ``POST /api/v1/rollouts`` (operator): a staged rollout to a group, driven by the
  server (:mod:`agent.server.driver`), optionally shadow first (``shadow``:
  :mod:`agent.server.rollshadow`); 409 when the group has an unfinished rollout or
  no device reports the group, 422 for bad names, versions, percentages, timeouts or
  shadow options.
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
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from agent.errors import ConfigError, EdgeAgentError
from agent.fleet.deploy import desired_payload, issue_time
from agent.fleet.rollout import plan, step_name
from agent.fleet.shadow import (
    DEFAULT_MAX_CPU_PCT,
    DEFAULT_MIN_FRAMES,
    DEFAULT_SAMPLE_PCT,
    check_options,
    shadow_payload,
)
from agent.server import rollstore
from agent.server.api.deploys import MAX_VERSION as MAX_VERSION
from agent.server.api.deploys import (
    audit_action,
    check_name,
    check_release,
    not_released,
    server_of,
    unprocessable,
)
from agent.server.auth import Caller, operator, viewer
from agent.server.context import Server
from agent.server.rollouts import STATUSES, Member
from agent.server.rollshadow import Shadow
from agent.server.schema import rollouts

router = APIRouter(prefix="/api/v1", tags=["rollouts"])

MAX_TIMEOUT_S = 7 * 86_400.0
MAX_LIST = 500


class ShadowRequest(BaseModel):
    """A shadow rollout: each step's devices run the candidate in the shadow first."""

    model_config = ConfigDict(extra="forbid")
    sample_pct: int = Field(DEFAULT_SAMPLE_PCT, description="percent of frames, 1..100")
    max_cpu_pct: int = Field(DEFAULT_MAX_CPU_PCT, description="share of wall time, 1..100")
    min_frames: int = Field(DEFAULT_MIN_FRAMES, description="frames compared per device")
    promote_at: float | None = Field(
        None,
        description="agreement a device's run must reach; then its desired state is "
        "issued (none: the rollout ends with the group's shadow run)",
    )


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
    shadow: ShadowRequest | None = Field(None, description="shadow first (docs/server.md)")


SHADOW_FIELDS = {
    "--sample": "shadow.sample_pct",
    "--max-cpu": "shadow.max_cpu_pct",
    "--min-frames": "shadow.min_frames",
    "--promote-at": "shadow.promote_at",
}


def _check_shadow(shadow: ShadowRequest) -> list[str]:
    """The shadow options' problems, naming the body's fields."""
    problems = check_options(
        shadow.sample_pct, shadow.max_cpu_pct, shadow.promote_at, shadow.min_frames, paired=False
    )
    out = []
    for problem in problems:
        for flag, name in SHADOW_FIELDS.items():
            problem = problem.replace(flag, name)
        out.append(problem)
    return out


@router.post("/rollouts", status_code=201)
def create_rollout(
    body: RolloutRequest,
    request: Request,
    caller: Annotated[Caller, Depends(operator)],
) -> dict[str, Any]:
    """Start a rollout (201 with its id and plan)."""
    server = server_of(request)
    problems = check_release(body.model, body.version) + check_name("group", body.group)
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
    if body.shadow is not None:
        problems += _check_shadow(body.shadow)
    if problems:
        audit_action(server, caller, "rollout.create", None, "invalid", problems=problems)
        raise unprocessable(problems)
    refused = not_released(server, body.model, body.version)
    if refused is not None:
        audit_action(server, caller, "rollout.create", None, "invalid", problems=[refused[1]])
        raise HTTPException(*refused)
    key = server.options.sign_key
    if key is not None:
        try:  # a key that cannot sign would stall the rollout at its first step
            desired_payload(body.model, body.version, "group:x", issue_time(), key)
            if body.shadow is not None:
                shadow_payload(body.model, body.version, "group:x", issue_time(), sign_key=key)
        except EdgeAgentError as exc:
            audit_action(server, caller, "rollout.create", None, "failed", error=str(exc)[:300])
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
                shadow=_shadow(body.shadow),
            )
    except (rollstore.GroupBusy, IntegrityError) as exc:
        busy = exc.args[0] if isinstance(exc, rollstore.GroupBusy) else "another"
        audit_action(server, caller, "rollout.create", target, "refused", **detail)
        raise HTTPException(
            409, f"group {body.group} has rollout {busy} in progress (one at a time per group)"
        ) from None
    except HTTPException:
        audit_action(server, caller, "rollout.create", target, "refused", **detail)
        raise
    audit_action(server, caller, "rollout.create", target, "ok", rollout=rollout_id, **detail)
    return show(server, rollout_id)


def _shadow(body: ShadowRequest | None) -> Shadow | None:
    """The stored options: one ``issued_at`` for every instruction of the rollout,
    chosen now and committed with it (before any is published)."""
    if body is None:
        return None
    return Shadow(
        issued_at=issue_time(),
        sample_pct=body.sample_pct,
        max_cpu_pct=body.max_cpu_pct,
        min_frames=body.min_frames,
        promote_at=body.promote_at,
    )


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
    with server_of(request).engine.connect() as conn:
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
        "trial": None
        if m.trial is None
        else {
            "status": m.trial,
            "detail": m.trial_reason,
            "seconds": m.trial_seconds,
            "sent": m.trial_sent,
            "cleared": m.trial_cleared,
        },
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
        "untouched": [m.device for m in members if m.outcome is None and m.trial is None],
        "halted": r.reason if r.status in ("halting", "halted") else None,
    }


@router.get("/rollouts/{rollout_id}")
def get_rollout(
    rollout_id: str,
    request: Request,
    _: Annotated[Caller, Depends(viewer)],
) -> dict[str, Any]:
    """One rollout: progress per step and device."""
    return show(server_of(request), rollout_id[:64])


MOVES: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "abort": (("running", "paused"), "aborting"),
}


def _move(
    request: Request, caller: Caller, rollout_id: str, action: Literal["pause", "resume", "abort"]
) -> dict[str, Any]:
    server = server_of(request)
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
        audit_action(server, caller, f"rollout.{action}", target, "refused", status=now.status)
        raise HTTPException(409, f"rollout {rollout_id} is {now.status}: cannot {action} it")
    audit_action(server, caller, f"rollout.{action}", target, "ok")
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
