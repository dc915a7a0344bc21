"""Routes: ``GET /healthz`` (no token) and ``GET /metrics`` (a viewer's token).

``/healthz`` answers 200 with ``"status": "ok"`` when the database answers a real
``SELECT 1`` within :data:`CHECK_TIMEOUT_S` and the ingester is connected to the broker,
else 503 with ``"status": "degraded"`` and ``problems`` naming which. ``/metrics`` is
the Prometheus text format (:mod:`agent.server.metrics`).

While the database is down no token can be looked up; a token that read ``/metrics``
in the last :data:`REMEMBER_S` seconds is still let in then, so the scrape that says
``edge_fleet_database_up 0`` gets through. Any other request then is a 503.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from agent import __version__
from agent.server import auth
from agent.server.context import Server
from agent.server.metrics import FleetFigures, read_figures, render

router = APIRouter()

CHECK_TIMEOUT_S = 2.0
REMEMBER_S = 600.0
MAX_REMEMBERED = 64
T = TypeVar("T")
# Database checks run here, so a database that hangs costs a bounded wait, and at most
# two threads, however many requests come.
_checks = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="db-check")


def _bounded(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` on a check thread; TimeoutError when it has not answered in ``timeout``."""
    return _checks.submit(fn).result(timeout)


def database_problem(engine: sa.Engine, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """None when ``SELECT 1`` answers within ``timeout``; else why not, in one line."""

    def select_one() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        _bounded(select_one, timeout)
    except concurrent.futures.TimeoutError:
        return f"no answer within {timeout:g} s"
    except SQLAlchemyError as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


@router.get("/healthz", tags=["health"])
def healthz(request: Request) -> JSONResponse:
    """Database and broker state; 200 when both are fine, 503 naming what is not."""
    server: Server = request.app.state.server
    db_error = database_problem(server.engine)
    stats = server.ingest_stats()
    connected = stats is not None and stats.broker_connected
    problems = []
    if db_error is not None:
        problems.append(f"database: {db_error}")
    if not connected:
        problems.append("broker: not connected" if stats is not None else "broker: not ingesting")
    ingest: dict[str, Any] | None = None
    if stats is not None:
        ingest = {
            "received": stats.received,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "malformed": stats.malformed,
            "queue_depth": stats.queue_depth,
            "lag_s": stats.lag_s,
            "connects": stats.connects,
            "database_error": stats.database_error,
        }
    body = {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "database": {"ok": db_error is None, "error": db_error},
        "broker": {"connected": connected},
        "ingest": ingest,
        "instance": server.options.instance,
        "version": __version__,
    }
    return JSONResponse(body, status_code=503 if problems else 200)


class _Remembered:
    """Token hashes that read /metrics lately (bounded), for scrapes while the database
    is down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, auth.Caller]] = {}

    def add(self, digest: str, caller: auth.Caller, now: float) -> None:
        with self._lock:
            self._seen.pop(digest, None)
            self._seen[digest] = (now, caller)
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.pop(next(iter(self._seen)))

    def get(self, digest: str, now: float) -> auth.Caller | None:
        with self._lock:
            seen = self._seen.get(digest)
        return seen[1] if seen is not None and now - seen[0] <= REMEMBER_S else None


def _remembered(request: Request) -> _Remembered:
    state = request.app.state
    if not hasattr(state, "metrics_tokens"):
        state.metrics_tokens = _Remembered()
    found: _Remembered = state.metrics_tokens
    return found


def metrics_reader(request: Request) -> auth.Caller:
    """A viewer's token, or one that read /metrics lately when the database is down."""
    _, _, token = request.headers.get("authorization", "").partition(" ")
    digest = auth.token_hash(token.strip())
    now = time.monotonic()
    try:
        caller = auth.viewer(request)
    except (OperationalError, InterfaceError):
        remembered = _remembered(request).get(digest, now)
        if remembered is None:
            raise
        return remembered
    _remembered(request).add(digest, caller, now)
    return caller


@router.get("/metrics", tags=["health"], response_class=Response)
def metrics(request: Request, caller: Annotated[auth.Caller, Depends(metrics_reader)]) -> Response:
    """The Prometheus text format (see docs/server.md for every metric)."""
    server: Server = request.app.state.server

    def figures() -> FleetFigures:
        with server.engine.connect() as conn:
            return read_figures(conn)

    read: FleetFigures | None
    try:
        read = _bounded(figures, CHECK_TIMEOUT_S)
    except (concurrent.futures.TimeoutError, SQLAlchemyError):
        read = None
    body = render(read, server.ingest_stats(), server.options.instance)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
