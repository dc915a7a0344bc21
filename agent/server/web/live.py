"""Live pages (issue 17): ``GET /ui/live?view=…`` is a server-sent events stream telling
a page that what it shows has changed; ``static/app.js`` then fetches the page again and
swaps the parts marked ``data-live-part`` in place (no reload).

Every :attr:`LiveOptions.tick_s` the stream checks the session (a logout, a revoked
token or an expiry ends it with ``event: ended``) and computes a *fingerprint* of the
view: a hash over a few indexed queries (:func:`fingerprint`). When it differs from the
last one sent the stream sends ``event: changed`` with the fingerprint as its ``id``
(a reconnecting browser sends it back as ``Last-Event-ID``: a change made while it was
away is seen at once). A ``: ping`` comment keeps a quiet stream open every
:attr:`LiveOptions.ping_s`; a stream lives at most :attr:`LiveOptions.life_s` (the
browser reconnects by itself) and ends as soon as the server is asked to stop
(:func:`close_streams`, called by ``edge-fleet serve`` on SIGTERM). At most
:attr:`LiveOptions.max_streams` streams at once (503 beyond) and
:attr:`LiveOptions.per_session` per session (429).

The rules (views, admission, what a tick sends, the frames) are pure and tested by
tables; :func:`fingerprint` does the SQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from agent.fleet.acl import check_device_id
from agent.server import queries
from agent.server.context import Server
from agent.server.schema import (
    device_groups,
    device_models,
    devices,
    events,
    rollout_devices,
    rollout_steps,
)
from agent.server.schema import rollouts as rollouts_table
from agent.server.web import sessions
from agent.server.web.sessions import COOKIE

log = logging.getLogger(__name__)
router = APIRouter(prefix="/ui", include_in_schema=False)
Kind = Literal["overview", "device", "rollout", "rollouts", "releases"]
KINDS: tuple[Kind, ...] = ("overview", "device", "rollout", "rollouts", "releases")
MAX_KEY = 64  # a device or rollout id
MAX_EVENT_ID = 64  # Last-Event-ID: one of our fingerprints is 20 characters
TELEMETRY_S = 30  # live figures and charts refresh at most this often
MAX_ROWS = 500  # rows a fingerprint reads from a grouped query
Step = Literal["changed", "ping", "signed-out", "expired", "closing"]


@dataclass(frozen=True)
class LiveOptions:
    tick_s: float = 2.0  # how often a stream looks at the database
    ping_s: float = 15.0  # a comment on a quiet stream
    life_s: float = 600.0  # then the stream ends; EventSource reconnects by itself
    retry_ms: int = 5000  # the browser's wait before reconnecting
    max_streams: int = 64  # server-wide (uvicorn serves at most 256 connections)
    per_session: int = 4  # a few tabs


@dataclass(frozen=True)
class View:
    """What a page shows: a kind and, for a device or a rollout, its id."""

    kind: Kind
    key: str = ""


@dataclass
class Streams:
    """The open streams of one app, counted by session. Touched only from the event
    loop's thread (admission and release run there), so no lock."""

    options: LiveOptions = field(default_factory=LiveOptions)
    open: Counter[str] = field(default_factory=Counter)
    closing: bool = False  # set by close_streams: every stream ends at its next look

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def admit(self, session_id: str) -> tuple[int, str] | None:
        refused = admission(self.total, self.open[session_id], self.options, self.closing)
        if refused is None:
            self.open[session_id] += 1
        return refused

    def release(self, session_id: str) -> None:
        self.open[session_id] -= 1
        if self.open[session_id] <= 0:
            del self.open[session_id]


# -- pure rules ---------------------------------------------------------------------------


def parse_view(text: str) -> View:
    """The view a ``view`` query parameter names: ``overview``, ``rollouts``,
    ``releases``, ``device:<id>`` or ``rollout:<id>``. Raises ValueError saying what
    was wrong."""
    kind, _, key = text.partition(":")
    if kind in ("overview", "rollouts", "releases") and not key:
        return View(kind)  # type: ignore[arg-type]
    if kind == "device" and (problem := check_device_id(key)) is None:
        return View("device", key)
    if kind == "device":
        raise ValueError(f"view: {problem}")
    if kind == "rollout" and 0 < len(key) <= MAX_KEY and key.isprintable():
        return View("rollout", key)
    raise ValueError(
        f"view: {text[:40]!r} is not one of overview, rollouts, releases, device:<id>, rollout:<id>"
    )


def admission(total: int, mine: int, options: LiveOptions, closing: bool) -> tuple[int, str] | None:
    """None when one more stream may open; else its status and one line."""
    if closing:
        return 503, "the server is stopping"
    if total >= options.max_streams:
        return 503, f"{options.max_streams} live pages are open on this server; try again later"
    if mine >= options.per_session:
        return 429, f"{options.per_session} live pages are open in this session; close one"
    return None


def decide(
    *,
    age_s: float,
    quiet_s: float,
    signed_in: bool,
    closing: bool,
    sent: str | None,
    current: str | None,
    options: LiveOptions,
) -> Step | None:
    """What a stream sends after a look: ``age_s`` since it opened, ``quiet_s`` since it
    last wrote, ``sent`` the last fingerprint sent (or the browser's Last-Event-ID),
    ``current`` the one just computed (None: the database could not be read). The
    ends first (closing, signed out, too old), then a change, then a heartbeat."""
    if closing:
        return "closing"
    if not signed_in:
        return "signed-out"
    if age_s >= options.life_s:
        return "expired"
    if current is not None and current != sent:
        return "changed"
    if quiet_s >= options.ping_s:
        return "ping"
    return None


def frame(event: str | None = None, data: str = "", event_id: str | None = None) -> bytes:
    """One server-sent event (or, without ``event`` and ``data``, a ``: ping`` comment).
    Line breaks cannot reach a field: they would start another one."""
    if event is None and not data:
        return b": ping\n\n"
    lines = []
    if event_id is not None:
        lines.append(f"id: {_one_line(event_id)}")
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    lines.append(f"data: {_one_line(data)}")
    return ("\n".join(lines) + "\n\n").encode()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def digest(parts: Sequence[Any]) -> str:
    """A short stable hash of what a fingerprint's queries returned."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


# -- the queries --------------------------------------------------------------------------


def fingerprint(conn: sa.Connection, view: View) -> str:
    """A hash that changes when what ``view`` shows changes (a few indexed queries;
    live figures at most every :data:`TELEMETRY_S`)."""
    d = devices.c
    if view.kind == "device":
        row = conn.execute(
            sa.select(
                d.online, d.model, d.version, d.agent_version, d.groups, d.status, d.state,
                d.telemetry_ts,
            ).where(d.id == view.key)
        ).first()  # fmt: skip
        newest = conn.execute(
            sa.select(events.c.id)
            .where(events.c.device == view.key)
            .order_by(events.c.ts.desc(), events.c.id.desc())
            .limit(1)
        ).scalar()
        shown = None if row is None else (*row[:-1], _bucket(row.telemetry_ts))
        return digest([shown, newest])
    if view.kind == "rollout":
        r = rollouts_table.c
        m = rollout_devices.c
        head = conn.execute(
            sa.select(r.status, r.step, r.updated, r.reason).where(r.id == view.key)
        ).first()
        steps = conn.execute(
            sa.select(rollout_steps.c.step, rollout_steps.c.status, rollout_steps.c.finished)
            .where(rollout_steps.c.rollout_id == view.key)
            .order_by(rollout_steps.c.step)
            .limit(MAX_ROWS)
        ).all()
        members = conn.execute(
            sa.select(m.phase, m.outcome, m.timed_out, m.take_back, sa.func.count())
            .where(m.rollout_id == view.key)
            .group_by(m.phase, m.outcome, m.timed_out, m.take_back)
            .order_by(m.phase, m.outcome, m.timed_out, m.take_back)
            .limit(MAX_ROWS)
        ).all()
        latest = conn.execute(
            sa.select(sa.func.max(m.updated)).where(m.rollout_id == view.key)
        ).scalar()
        return digest([None if head is None else tuple(head), _rows(steps), _rows(members), latest])
    if view.kind == "rollouts":
        r = rollouts_table.c
        row = conn.execute(sa.select(sa.func.count(), sa.func.max(r.updated))).one()
        return digest([tuple(row)])
    versions = conn.execute(  # every model each device serves (device_models)
        queries.models_by_online(device_models.c.version).limit(MAX_ROWS)
    ).all()
    if view.kind == "releases":
        return digest([_rows(versions)])
    # the overview: counts, versions, groups, news (events), rollouts, live figures
    fleet = conn.execute(sa.select(sa.func.max(d.first_seen), sa.func.max(d.telemetry_ts))).one()
    memberships = conn.execute(sa.select(sa.func.count()).select_from(device_groups)).scalar()
    newest = conn.execute(sa.select(sa.func.max(events.c.id))).scalar()
    moves = conn.execute(sa.select(sa.func.count(), sa.func.max(rollouts_table.c.updated))).one()
    return digest([_rows(versions), fleet[0], _bucket(fleet[1]), memberships, newest, tuple(moves)])


def _rows(rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in rows]


def _bucket(ts: float | None) -> int | None:
    return None if ts is None else int(ts // TELEMETRY_S)


def look(server: Server, secret: str | None, view: View) -> tuple[bool, str | None]:
    """(whether the session is still live, the view's fingerprint); a database that
    cannot be read is (True, None): nothing changes until it answers again."""
    try:
        with server.engine.connect() as conn:
            if sessions.find_session(conn, secret, server.clock()) is None:
                return False, None
            return True, fingerprint(conn, view)
    except sa.exc.SQLAlchemyError as exc:
        log.warning("live page: the database cannot be read: %s", str(exc).splitlines()[0])
        return True, None


# -- the route ----------------------------------------------------------------------------


def install(app: FastAPI, options: LiveOptions | None = None) -> None:
    app.state.live = Streams(options or LiveOptions())
    app.include_router(router)


def close_streams(app: Any) -> None:
    """End every open stream at its next look and refuse new ones (server stopping).
    Safe from a signal handler: it sets one attribute."""
    streams = getattr(getattr(app, "state", None), "live", None)
    if isinstance(streams, Streams):
        streams.closing = True


class _Stream(StreamingResponse):
    """A stream that gives its place back however it ends (finished, client gone,
    cancelled on shutdown)."""

    def __init__(self, streams: Streams, session_id: str, content: AsyncIterator[bytes]) -> None:
        from agent.server.web.pages import SECURITY_HEADERS

        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}  # a proxy must not buffer
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._streams, self._session_id = streams, session_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams.release(self._session_id)


def _refuse(status: int, detail: str) -> Response:
    headers = {"Cache-Control": "no-store"}
    if status in (429, 503):
        headers["Retry-After"] = "30"
    return PlainTextResponse(detail + "\n", status_code=status, headers=headers)


@router.get("/live")
async def live(request: Request, view: Annotated[str, Query(max_length=80)]) -> Response:
    """The stream for one page (session cookie required: 401 without one)."""
    from agent.server.web.pages import server_of, session_of

    session = await run_in_threadpool(session_of, request)
    if session is None:
        return _refuse(401, "no live session: sign in at /ui/login")
    try:
        shown = parse_view(view)
    except ValueError as exc:
        return _refuse(422, str(exc))
    streams: Streams = request.app.state.live
    refused = streams.admit(session.id)
    if refused is not None:
        return _refuse(*refused)
    since = request.headers.get("last-event-id", "")[:MAX_EVENT_ID] or None
    events_ = _events(server_of(request), streams, request.cookies.get(COOKIE), shown, since)
    return _Stream(streams, session.id, events_)


async def _events(
    server: Server, streams: Streams, secret: str | None, view: View, since: str | None
) -> AsyncIterator[bytes]:
    options = streams.options
    loop = asyncio.get_running_loop()
    opened = wrote = loop.time()
    signed_in, sent = await run_in_threadpool(look, server, secret, view)
    if since is None:  # the page was drawn a moment ago: this is what it shows
        yield f"retry: {options.retry_ms}\n".encode() + frame("ready", "live", sent or "")
    else:  # a reconnect: what changed while it was away is sent below
        yield f"retry: {options.retry_ms}\n".encode() + frame("ready", "live")
        sent = since
    current = sent
    while True:
        now = loop.time()
        step = decide(
            age_s=now - opened,
            quiet_s=now - wrote,
            signed_in=signed_in,
            closing=streams.closing,
            sent=sent,
            current=current,
            options=options,
        )
        if step == "signed-out":
            yield frame("ended", "signed out")
            return
        if step in ("closing", "expired"):
            return
        if step == "changed" and current is not None:
            yield frame("changed", view.kind, current)
            sent, wrote = current, now
        elif step == "ping":
            yield frame()
            wrote = now
        deadline = now + options.tick_s
        while not streams.closing and loop.time() < deadline:  # wakes for a shutdown
            await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
        if streams.closing:
            return
        signed_in, current = await run_in_threadpool(look, server, secret, view)
