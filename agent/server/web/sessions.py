"""The dashboard's login sessions, CSRF and form rules.

A browser logs in with an API token (:func:`agent.server.auth.lookup`); the server then
makes a session: a random secret goes into the cookie :data:`COOKIE`, only its SHA-256
is stored (``ui_sessions.id``), beside the token's id, a CSRF secret and the expiry.
Every request finds the session *and* its token in one query, so a revoked token ends
its sessions at once; logout deletes the row.

CSRF: every POST form carries the session's CSRF secret in the field :data:`CSRF_FIELD`
(compared in constant time); a request whose ``Origin`` names another site is refused
too (the cookie is ``SameSite=Strict`` already: two locks).

The rules (cookie attributes, form parsing, origin check) are pure and tested by tables;
the functions taking a connection do the SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from dataclasses import dataclass

import sqlalchemy as sa

from agent.server.auth import Caller, Role, lookup, token_hash
from agent.server.schema import tokens, ui_sessions

COOKIE = "edge_fleet_session"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf"
SESSION_S = 12 * 3600.0  # a working day; then log in again
MAX_FORM_BYTES = 16 * 1024  # the dashboard's forms are a few short fields
MAX_FIELDS = 20
MAX_SECRET = 128  # a cookie value longer than this is not one of ours


@dataclass(frozen=True)
class Session:
    """A logged-in browser: who (the token's name and role) and its CSRF secret."""

    id: str
    caller: Caller
    csrf: str
    expires: float


class FormError(ValueError):
    """A form the dashboard refuses: the message says what was wrong (400)."""


# -- pure rules ---------------------------------------------------------------------------


def session_id(secret: str) -> str:
    """The stored id of a session: the SHA-256 (hex) of the cookie's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def cookie_attributes(secure: bool, max_age: int) -> dict[str, object]:
    """Keyword arguments for Starlette's ``Response.set_cookie``: HttpOnly, SameSite=Strict,
    the path /ui, Secure when served over HTTPS."""
    return {
        "max_age": max_age,
        "path": COOKIE_PATH,
        "httponly": True,
        "samesite": "strict",
        "secure": secure,
    }


def csrf_ok(expected: str, given: str | None) -> bool:
    """Whether a form's CSRF field matches the session's secret (constant time)."""
    if not given or len(given) > MAX_SECRET:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` header is this server's own (``host`` from the
    ``Host`` header). A request without ``Origin`` passes (old browsers, curl); one with
    ``null`` or another host does not."""
    if origin is None:
        return True
    if not host:
        return False
    parsed = urllib.parse.urlsplit(origin)
    return parsed.scheme in ("http", "https") and parsed.netloc.lower() == host.lower()


def parse_form(body: bytes, content_type: str | None) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (the first value of each
    field). Raises FormError for another content type, a body over
    :data:`MAX_FORM_BYTES`, more than :data:`MAX_FIELDS` fields, or bytes that are not
    UTF-8."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise FormError(f"a form is sent as application/x-www-form-urlencoded, not {kind!r}")
    if len(body) > MAX_FORM_BYTES:
        raise FormError(f"the form is {len(body)} bytes; at most {MAX_FORM_BYTES}")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
            errors="strict",
        )
    except UnicodeDecodeError:
        raise FormError("the form is not UTF-8") from None
    except ValueError:
        raise FormError(f"the form has more than {MAX_FIELDS} fields") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


# -- the table ----------------------------------------------------------------------------


def create_session(conn: sa.Connection, token: str, now: float) -> tuple[str, Session] | None:
    """A new session for ``token`` (the API token typed in the login form): the cookie's
    secret and the session; None when the token is unknown, revoked or malformed.
    Expired sessions of every token are deleted on the way (logins bound the table)."""
    caller = lookup(conn, token)
    if caller is None:
        return None
    token_id = conn.execute(
        sa.select(tokens.c.id).where(tokens.c.hash == token_hash(token))
    ).scalar_one()
    conn.execute(ui_sessions.delete().where(ui_sessions.c.expires <= now))
    secret = secrets.token_urlsafe(32)
    session = Session(session_id(secret), caller, secrets.token_urlsafe(32), now + SESSION_S)
    conn.execute(
        ui_sessions.insert().values(
            id=session.id,
            token_id=token_id,
            csrf=session.csrf,
            created=now,
            expires=session.expires,
        )
    )
    return secret, session


def find_session(conn: sa.Connection, secret: str | None, now: float) -> Session | None:
    """The live session whose cookie holds ``secret``: not expired, its token not
    revoked; else None."""
    if not secret or len(secret) > MAX_SECRET:
        return None
    s = ui_sessions.c
    row = conn.execute(
        sa.select(s.id, s.csrf, s.expires, tokens.c.name, tokens.c.role)
        .join(tokens, tokens.c.id == s.token_id)
        .where(s.id == session_id(secret), s.expires > now, tokens.c.revoked.is_(None))
    ).first()
    if row is None:
        return None
    role: Role = "operator" if row.role == "operator" else "viewer"
    return Session(row.id, Caller(row.name, role), row.csrf, row.expires)


def end_session(conn: sa.Connection, session: Session) -> None:
    """Delete the session (logout)."""
    conn.execute(ui_sessions.delete().where(ui_sessions.c.id == session.id))
