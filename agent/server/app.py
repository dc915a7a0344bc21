"""The HTTP API of ``edge-fleet serve``: one FastAPI app over a :class:`Server`.

Routes live in :mod:`agent.server.api` (``health``: /healthz and /metrics; ``read``:
devices, telemetry, events, releases; ``rollouts``: deploy and rollouts; ``audit``),
each an ``APIRouter``. Everything under /api/v1 and /metrics needs a token
(:mod:`agent.server.auth`); /healthz answers anyone. The OpenAPI document is at
/api/v1/openapi.json; there are no interactive docs pages (they load scripts from a CDN).

A database that cannot be reached answers 503 with the reason, for every route.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from agent import __version__
from agent.server.api import audit, health, read, rollouts
from agent.server.context import Server


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="edge-agent fleet server",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = server
    for module in (health, read, rollouts, audit):
        app.include_router(module.router)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(request: Request, exc: DBAPIError) -> JSONResponse:
        reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc) else ""
        return JSONResponse(
            {"detail": f"database unavailable: {reason}"[:300]},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One line, like every other error: where, and what was wrong.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        detail = f"{where}: {first.get('msg', 'invalid')}{more}"
        return JSONResponse({"detail": detail[:300]}, status_code=422)

    return app
