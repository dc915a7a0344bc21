"""API tokens and the audit log.

A token is ``eft_`` + 32 random bytes (URL-safe base64), shown once when created and
stored only as its SHA-256: with 256 bits of entropy a slow password hash adds nothing
(nobody can guess a token whose hash leaked), and a lookup stays one indexed query.
Roles: ``viewer`` reads, ``operator`` also deploys, rolls out and reads the audit log.

The FastAPI dependencies :func:`viewer` and :func:`operator` return the :class:`Caller`;
no or an unknown or revoked token is a plain 401 (``WWW-Authenticate: Bearer``), a
viewer's token on an operator's endpoint a 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import sqlalchemy as sa
from fastapi import HTTPException, Request

from agent.server.schema import audit, tokens

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)
_RANK = {"viewer": 0, "operator": 1}
PREFIX = "eft_"


@dataclass(frozen=True)
class Caller:
    """Who called: the token's name and role."""

    name: str
    role: Role


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(conn: sa.Connection, name: str, role: Role, now: float) -> str:
    """Store a new token named ``name``; returns the token (the only time it is seen).

    Raises sqlalchemy's IntegrityError when the name is taken (revoked ones included).
    """
    token = new_token()
    conn.execute(tokens.insert().values(hash=token_hash(token), role=role, name=name, created=now))
    return token


def revoke_token(conn: sa.Connection, name: str, now: float) -> bool:
    """Revoke the token named ``name``; False when there is no such live token."""
    result = conn.execute(
        tokens.update().where(tokens.c.name == name, tokens.c.revoked.is_(None)).values(revoked=now)
    )
    return result.rowcount == 1


def list_tokens(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every token (never its hash): name, role, created, revoked."""
    rows = conn.execute(
        sa.select(tokens.c.name, tokens.c.role, tokens.c.created, tokens.c.revoked).order_by(
            tokens.c.created, tokens.c.name
        )
    )
    return [dict(row._mapping) for row in rows]


def lookup(conn: sa.Connection, token: str) -> Caller | None:
    """The caller a presented token stands for, or None (unknown, revoked, malformed)."""
    if not token.startswith(PREFIX) or len(token) > 128:
        return None
    digest = token_hash(token)
    row = conn.execute(
        sa.select(tokens.c.hash, tokens.c.name, tokens.c.role).where(
            tokens.c.hash == digest, tokens.c.revoked.is_(None)
        )
    ).first()
    if row is None or not hmac.compare_digest(row.hash, digest):
        return None
    role: Role = "operator" if row.role == "operator" else "viewer"
    return Caller(row.name, role)


def record(
    conn: sa.Connection,
    *,
    now: float,
    who: str,
    action: str,
    target: str | None,
    outcome: str,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One line of the audit log: who did what to which target, and how it ended."""
    conn.execute(
        audit.insert().values(
            ts=now,
            who=who,
            action=action,
            target=target,
            outcome=outcome,
            detail=dict(detail) if detail is not None else None,
        )
    )


def record_action(
    engine: sa.Engine,
    clock: Callable[[], float],
    caller: Caller,
    action: str,
    target: str | None,
    outcome: str,
    **detail: Any,
) -> None:
    """:func:`record` in a transaction of its own: an API caller's action and outcome."""
    with engine.begin() as conn:
        record(
            conn,
            now=clock(),
            who=caller.name,
            action=action,
            target=target,
            outcome=outcome,
            detail=detail or None,
        )


def _unauthorized() -> HTTPException:
    return HTTPException(401, "a valid API token is needed", {"WWW-Authenticate": "Bearer"})


def _caller(request: Request, need: Role) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized()
    server = request.app.state.server
    with server.engine.connect() as conn:
        caller = lookup(conn, token.strip())
    if caller is None:
        raise _unauthorized()
    if _RANK[caller.role] < _RANK[need]:
        raise HTTPException(403, f"token {caller.name!r} is a {caller.role}; this needs {need}")
    return caller


def viewer(request: Request) -> Caller:
    """FastAPI dependency: any valid token."""
    return _caller(request, "viewer")


def operator(request: Request) -> Caller:
    """FastAPI dependency: an operator's token."""
    return _caller(request, "operator")
