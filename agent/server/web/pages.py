"""The dashboard's pages under ``/ui`` (issue 17): server-rendered with Jinja2, our own
CSS and a little JavaScript, every asset served from the package (``/ui/static``).

- ``GET /ui/login``, ``POST /ui/login``: an API token typed once makes a session
  (:mod:`agent.server.web.sessions`); ``POST /ui/logout`` ends it. Both are audited.
- ``GET /ui/``: the fleet overview (counts, versions as bars, updates in progress, a
  paginated device table).
- ``GET /ui/devices/{id}``: one device (identity, groups, model, version, backend, every
  model it serves, its pipelines' figures, shadow runs and drift, the last events);
  ``POST /ui/devices/{id}/deploy`` (operators): the same code as ``POST /api/v1/deploy``;
  the command buttons are :mod:`.commands_page`'s.
- ``GET /ui/live``: the server-sent events that keep a page live
  (:mod:`agent.server.web.live`, installed here).

A page without a live session redirects to the login page (303). Every POST checks the
session's CSRF field and the ``Origin`` header (403 otherwise); a viewer's POST to an
operator's action is 403. Errors are HTML pages with the status and one line saying what
was wrong; the JSON API is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from agent import __version__
from agent.fleet.acl import check_device_id
from agent.server import queries, served
from agent.server.api.deploys import DeployRequest, deploy
from agent.server.auth import record
from agent.server.context import Server
from agent.server.web import alerts, charts, formats, overview, sessions
from agent.server.web.sessions import COOKIE, CSRF_FIELD, FormError, Session

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html
templates.env.filters.update(
    when=formats.when,
    ago=formats.ago,
    figure=formats.figure,
    size=formats.size,
    preview=formats.preview,
)
EVENTS_SHOWN = 50
SECURITY_HEADERS = {
    # Only our own files; no inline script or style, no framing, forms post only here.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
DONE = {"deploy": "Desired state published: the device updates in its own time."}


class LoginNeeded(Exception):
    """No live session: the handler sends the browser to the login page."""


def install(app: FastAPI) -> None:
    """Add the pages, their static files and the login redirect to ``app``."""
    from agent.server.web import commands_page, live, releases_page, rollouts_page

    app.include_router(router)
    app.include_router(commands_page.router)
    live.install(app)  # GET /ui/live: the pages' server-sent events
    app.include_router(releases_page.router)
    app.include_router(rollouts_page.router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    async def _to_login(request: Request, exc: Exception) -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path=sessions.COOKIE_PATH)
        return response

    app.add_exception_handler(LoginNeeded, _to_login)


# -- helpers ------------------------------------------------------------------------------


def server_of(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def session_of(request: Request) -> Session | None:
    server = server_of(request)
    with server.engine.connect() as conn:
        return sessions.find_session(conn, request.cookies.get(COOKIE), server.clock())


def signed_in(request: Request) -> Session:
    session = session_of(request)
    if session is None:
        raise LoginNeeded()
    return session


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    server = server_of(request)
    response = templates.TemplateResponse(
        request,
        name,
        {"now": server.clock(), "version": __version__, "csrf_field": CSRF_FIELD, **context},
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, session: Session | None, status: int, detail: str) -> HTMLResponse:
    return render(request, "error.html", {"session": session, "detail": detail}, status)


def unavailable(request: Request, detail: str) -> HTMLResponse:
    """The page for a database that cannot be reached (503; the session cannot be read)."""
    response = error_page(request, None, 503, detail)
    response.headers["Retry-After"] = "5"
    return response


async def _form(request: Request) -> dict[str, str]:
    return sessions.parse_form(await request.body(), request.headers.get("content-type"))


def _foreign(request: Request) -> bool:
    return not sessions.same_origin(request.headers.get("origin"), request.headers.get("host"))


async def checked_post(request: Request) -> tuple[Session, dict[str, str]]:
    """The session and form of a POST whose CSRF field and origin are right; raises
    LoginNeeded without a session, HTTPException 403/400 otherwise."""
    session = await run_in_threadpool(signed_in, request)
    if _foreign(request):
        raise HTTPException(403, "this form was sent from another site")
    try:
        form = await _form(request)
    except FormError as exc:
        raise HTTPException(400, str(exc)) from None
    if not sessions.csrf_ok(session.csrf, form.get(CSRF_FIELD)):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
    return session, form


async def operator_post(request: Request, doing: str) -> tuple[Session, dict[str, str]] | Response:
    """:func:`checked_post` for an operator's action: the session and form, or the error
    page to send (403 for a viewer: "Only an operator's token can ``doing``.")."""
    try:
        session, form = await checked_post(request)
    except HTTPException as exc:
        return error_page(request, None, exc.status_code, str(exc.detail))
    if session.caller.role != "operator":
        return error_page(request, session, 403, f"Only an operator's token can {doing}.")
    return session, form


def _audit(server: Server, who: str, action: str, outcome: str) -> None:
    with server.engine.begin() as conn:
        record(conn, now=server.clock(), who=who, action=action, target=None, outcome=outcome)


# -- login and logout ---------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request) -> Response:
    if session_of(request) is not None:
        return RedirectResponse("/ui/", status_code=303)
    return render(request, "login.html", {"session": None, "error": None})


@router.post("/login")
async def login(request: Request) -> Response:
    def refuse(status: int, error: str) -> Response:
        return render(request, "login.html", {"session": None, "error": error}, status)

    if _foreign(request):
        return refuse(403, "This form was sent from another site.")
    try:
        form = await _form(request)
    except FormError as exc:
        return refuse(400, f"The form could not be read: {exc}.")
    token = form.get("token", "").strip()
    server = server_of(request)

    def start() -> tuple[str, Session] | None:
        with server.engine.begin() as conn:
            made = sessions.create_session(conn, token, server.clock())
            if made is not None:
                record(
                    conn,
                    now=server.clock(),
                    who=made[1].caller.name,
                    action="ui.login",
                    target=None,
                    outcome="ok",
                )
            return made

    made = await run_in_threadpool(start) if token else None
    if made is None:
        log.warning("dashboard login refused from %s", request.client)
        return refuse(
            401,
            "That token is not valid (unknown, revoked or mistyped). Paste a token made "
            "with `edge-fleet token create --name NAME --role viewer|operator`.",
        )
    secret, _session_made = made
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        **sessions.cookie_attributes(  # type: ignore[arg-type]
            request.url.scheme == "https", int(sessions.SESSION_S)
        ),
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    try:
        session, _ = await checked_post(request)
    except HTTPException as exc:
        return error_page(request, None, exc.status_code, str(exc.detail))
    server = server_of(request)

    def end() -> None:
        with server.engine.begin() as conn:
            sessions.end_session(conn, session)
            record(
                conn,
                now=server.clock(),
                who=session.caller.name,
                action="ui.logout",
                target=None,
                outcome="ok",
            )

    await run_in_threadpool(end)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=sessions.COOKIE_PATH)
    return response


# -- pages --------------------------------------------------------------------------------


@router.get("/")
def overview_page(
    request: Request, page: Annotated[int, Query(ge=1, le=overview.MAX_PAGE)] = 1
) -> Response:
    session = signed_in(request)
    server = server_of(request)
    with server.engine.connect() as conn:
        figures = overview.overview(conn)
        where, rows = overview.device_page(conn, figures.total, page, server.clock())
        flagged = alerts.fleet_alerts(conn, server.clock(), server.options.alerts)
    return render(
        request,
        "overview.html",
        {"session": session, "o": figures, "where": where, "rows": rows, "alerts": flagged},
    )


def device_context(
    request: Request, session: Session, device: str, span: charts.Span = charts.DEFAULT_SPAN
) -> dict[str, Any] | None:
    server = server_of(request)
    now = server.clock()
    with server.engine.connect() as conn:
        row = queries.device_row(conn, device)
        if row is None:
            return None
        events = queries.event_rows(conn, queries.EventFilter(device=device), EVENTS_SHOWN)
        d = overview.table_row(row, now)
        live = alerts.fresh_telemetry(dict(row), now)
        d["health"] = overview.health(live)
        drawn = charts.charts(conn, device, span, now, server.options.raw_days)
        deploys, updates = charts.history(conn, device, d["groups"])
    return {
        "session": session,
        "d": d,
        "events": events,
        "error": None,
        "done": None,
        "span": span,
        "spans": list(charts.SPANS),
        "charts": drawn,
        "deploys": deploys,
        "updates": updates,
        "pipelines": served.pipelines(row["state"], live),
        "shadows": served.shadows(row["state"], live),
        "drift": served.drifts(row["telemetry"]),
    }


@router.get("/devices/{device}")
def device_page(
    request: Request,
    device: str,
    done: str | None = None,
    span: str | None = None,  # 1h, 24h or 7d; anything else: the default
) -> Response:
    session = signed_in(request)
    if (problem := check_device_id(device)) is not None:
        return error_page(request, session, 404, f"{problem}; not a device id")
    context = device_context(request, session, device, charts.span(span))
    if context is None:
        return error_page(
            request, session, 404, f"No device {device!r} has reported to this server."
        )
    context["done"] = DONE.get(done or "")
    return render(request, "device.html", context)


@router.post("/devices/{device}/deploy")
async def deploy_form(request: Request, device: str) -> Response:
    """Deploy a version to this device: the form's fields go through the API's deploy."""
    checked = await operator_post(request, "deploy")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    if check_device_id(device) is not None:
        return error_page(request, session, 404, "not a device id")
    model = form.get("model", "").strip()
    version = form.get("version", "").strip()
    try:
        if not version.isdigit() or len(version) > 10:
            raise HTTPException(422, f"version: {version[:20]!r} is not a positive integer")
        body = DeployRequest(model=model, version=int(version), device=device)
        await run_in_threadpool(deploy, body, request, session.caller)
    except HTTPException as exc:
        context = await run_in_threadpool(device_context, request, session, device)
        if context is None:
            return error_page(request, session, exc.status_code, str(exc.detail))
        context["error"] = str(exc.detail)
        return render(request, "device.html", context, exc.status_code)
    return RedirectResponse(f"/ui/devices/{device}?done=deploy", status_code=303)
