"""Routes: ``GET /api/v1/audit`` (an operator's token): who did what, when, with which
outcome, newest first.

Filters: ``since`` and ``until`` (seconds since the epoch, inclusive), ``who`` (a
token's name, or ``cli:USER`` for the token commands), ``action`` (e.g.
``token.create``); ``limit`` entries, 100 by default, at most :data:`MAX_LIMIT`.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from agent.server import auth
from agent.server.context import Server
from agent.server.schema import NAME, audit

router = APIRouter()

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_TIME = 1e11  # seconds since the epoch: year 5138; keeps the parameters finite and sane

Time = Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)]


@router.get("/api/v1/audit", tags=["audit"])
def read_audit(
    request: Request,
    caller: Annotated[auth.Caller, Depends(auth.operator)],
    since: Time = None,
    until: Time = None,
    who: Annotated[str | None, Query(max_length=NAME)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The audit log, newest first: ``{"entries": [...], "limit": N}``."""
    if since is not None and until is not None and since > until:
        raise HTTPException(400, f"since ({since:g}) is after until ({until:g})")
    query = sa.select(audit).order_by(audit.c.ts.desc(), audit.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(audit.c.ts >= since)
    if until is not None:
        query = query.where(audit.c.ts <= until)
    if who is not None:
        query = query.where(audit.c.who == who)
    if action is not None:
        query = query.where(audit.c.action == action)
    server: Server = request.app.state.server
    with server.engine.connect() as conn:
        rows = conn.execute(query).all()
    entries = [
        {
            "id": row.id,
            "ts": row.ts,
            "who": row.who,
            "action": row.action,
            "target": row.target,
            "outcome": row.outcome,
            "detail": row.detail,
        }
        for row in rows
    ]
    return {"entries": entries, "limit": limit}
