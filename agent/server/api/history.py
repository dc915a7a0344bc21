"""Routes: ``GET /api/v1/deploys`` (any token): every desired state the server
published, by an operator's deploy or by a rollout's steps, newest first.

Filters: ``device`` or ``group`` (the target), ``model``, ``rollout`` (its id),
``since`` and ``until`` (seconds since the epoch, inclusive); ``limit`` rows, 100 by
default, at most :data:`MAX_LIMIT`. Each row: ``id``, ``created``, ``who`` (a token's
name: of the deploy, or of the rollout), ``target`` (``device:ID`` or ``group:NAME``), ``model``,
``version``, ``issued_at``, ``signed``, ``rollout_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from agent.server import auth
from agent.server.api.audit import MAX_TIME
from agent.server.context import Server
from agent.server.schema import DEVICE, NAME, deploys

router = APIRouter()

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

Time = Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)]


@router.get("/api/v1/deploys", tags=["deploys"])
def read_deploys(
    request: Request,
    caller: Annotated[auth.Caller, Depends(auth.viewer)],
    device: Annotated[str | None, Query(max_length=DEVICE)] = None,
    group: Annotated[str | None, Query(max_length=NAME)] = None,
    model: Annotated[str | None, Query(max_length=NAME)] = None,
    rollout: Annotated[str | None, Query(max_length=64)] = None,
    since: Time = None,
    until: Time = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The deploy history, newest first: ``{"deploys": [...], "limit": N}``."""
    if device is not None and group is not None:
        raise HTTPException(422, "device and group: give one of them (a deploy has one target)")
    if since is not None and until is not None and since > until:
        raise HTTPException(422, f"since ({since:g}) is after until ({until:g})")
    where = DeployFilter(
        device, (group,) if group is not None else (), model, rollout, since, until
    )
    server: Server = request.app.state.server
    with server.engine.connect() as conn:
        rows = deploy_rows(conn, where, limit)
    return {"deploys": rows, "limit": limit}


@dataclass(frozen=True)
class DeployFilter:
    """Which deploys: to ``device`` or to one of ``groups`` (either), of ``model``, of
    ``rollout``, created from ``since`` to ``until`` (inclusive); None: any."""

    device: str | None = None
    groups: tuple[str, ...] = ()
    model: str | None = None
    rollout: str | None = None
    since: float | None = None
    until: float | None = None


def deploy_rows(conn: sa.Connection, where: DeployFilter, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` deploys matching ``where``, newest first, as the API lists them."""
    c = deploys.c
    query = sa.select(deploys).order_by(c.created.desc(), c.id).limit(limit)
    targets: list[sa.ColumnElement[bool]] = []
    if where.device is not None:
        targets.append(sa.and_(c.target_kind == "device", c.target == where.device))
    if where.groups:
        targets.append(sa.and_(c.target_kind == "group", c.target.in_(where.groups)))
    if targets:
        query = query.where(sa.or_(*targets))
    if where.model is not None:
        query = query.where(c.model == where.model)
    if where.rollout is not None:
        query = query.where(c.rollout_id == where.rollout)
    if where.since is not None:
        query = query.where(c.created >= where.since)
    if where.until is not None:
        query = query.where(c.created <= where.until)
    return [_row(row) for row in conn.execute(query)]


def _row(row: Any) -> dict[str, Any]:
    desired = row.desired if isinstance(row.desired, dict) else {}
    return {
        "id": row.id,
        "created": row.created,
        "who": row.who,
        "target": f"{row.target_kind}:{row.target}",
        "model": row.model,
        "version": row.version,
        "issued_at": desired.get("issued_at"),
        "signed": "signature" in desired,
        "rollout_id": row.rollout_id,
    }
