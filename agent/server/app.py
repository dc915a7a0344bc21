"""The HTTP API of ``edge-fleet serve``: one FastAPI app over a :class:`Server`.

Routes live in :mod:`agent.server.api` (``health``: /healthz and /metrics; ``read``:
devices, telemetry, events, releases; ``rollouts``: deploy and rollouts; ``commands``:
a command to one device and its reply; ``audit``), each an ``APIRouter``. Everything
under /api/v1 and /metrics needs a token
(:mod:`agent.server.auth`); /healthz answers anyone. The OpenAPI document is at
/api/v1/openapi.json, for a token too; there are no interactive docs pages (they load
scripts from a CDN).

A database that cannot be reached answers 503 with the reason, for every route (an
HTML page under /ui). A
request body over 64 KiB is 413, one that takes over 10 s is 408
(:mod:`agent.server.limits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from agent import __version__
from agent.server.api import audit, commands, deploys, health, history, read, rollouts
from agent.server.auth import viewer
from agent.server.context import Server
from agent.server.limits import BodyLimit
from agent.server.web import pages


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="edge-agent fleet server",
        version=__version__,
        openapi_url=None,  # served below, behind a token
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = server
    app.add_middleware(BodyLimit)  # before FastAPI reads a body, and before any token check
    for module in (health, read, deploys, rollouts, commands, history, audit):
        app.include_router(module.router)
    pages.install(app)  # the dashboard under /ui (agent/server/web)

    @app.get("/api/v1/openapi.json", include_in_schema=False, dependencies=[Depends(viewer)])
    def _openapi() -> dict[str, Any]:
        return app.openapi()

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(request: Request, exc: DBAPIError) -> Response:
        reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc) else ""
        detail = f"database unavailable: {reason}"[:300]
        if request.url.path.startswith("/ui/"):  # a person at a browser: a page
            return pages.unavailable(request, detail)
        return JSONResponse(
            {"detail": detail},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    return app


def validation_detail(errors: Sequence[Any]) -> str:
    """FastAPI's list of validation errors as one line: where, what is wrong."""
    lines = []
    for error in errors[:3]:
        loc = [str(part) for part in error.get("loc", ())]
        if error.get("type") == "json_invalid":  # loc: ("body", the character's position)
            why = (error.get("ctx") or {}).get("error", "JSON decode error")
            at = f" at character {loc[1]}" if len(loc) > 1 else ""
            lines.append(f"body: not valid JSON ({why}{at})")
            continue
        where = {"query": "query parameter", "path": "path parameter", "body": "body"}.get(
            loc[0] if loc else "", "request"
        )
        name = ".".join(loc[1:])
        lines.append(f"{where} {name}: {error.get('msg', 'invalid')}".replace("  ", " "))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(lines)[:500] + more
