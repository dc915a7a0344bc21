"""Routes: what the server knows, read-only, for any valid token (``viewer``).

- ``GET /api/v1/devices`` and ``/api/v1/devices/{id}``: the devices, their live figures;
- ``GET /api/v1/devices/{id}/telemetry`` and ``…/metrics``: a metric's time series;
- ``GET /api/v1/events``: events, newest first, paginated by id;
- ``GET /api/v1/releases``: models and versions in the registry.

The SQL and the parameter rules are in :mod:`agent.server.queries`, the registry reading
in :mod:`agent.server.releases`; this module only checks the request, calls them and
shapes the answer. Errors are JSON ``{"detail": "…"}``: 404 for an unknown device, 422
for a parameter out of bounds, 503 when the registry cannot be read.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, Field

from agent.fleet.acl import check_device_id, check_group_name
from agent.fleet.view import live_telemetry
from agent.server import queries
from agent.server.auth import Caller, viewer
from agent.server.context import Server
from agent.server.queries import DeviceFilter, EventFilter, QueryError
from agent.server.releases import RegistryUnavailable, ReleaseCache, Releases
from agent.server.served import (
    Drift,
    PipelineFigures,
    ServedModel,
    ShadowRun,
    UpdateInfo,
    drifts,
    pipelines,
    served,
    shadows,
    update_info,
)

router = APIRouter(prefix="/api/v1", tags=["read"])
Viewer = Annotated[Caller, Depends(viewer)]
DeviceId = Annotated[str, Path(max_length=128, description="The device id (certificate CN).")]
MAX_DEVICES = 10_000
MAX_EVENTS = 1000


# -- answers ----------------------------------------------------------------------------


class DeviceSummary(BaseModel):
    """One device as ``edge-fleet devices`` shows it. fps, p95_ms and temp_c are null
    unless the device is online and its latest telemetry is at most 5 minutes old."""

    id: str
    groups: list[str]
    online: bool
    agent_version: str | None
    model: str | None = Field(description="The active release's model, from the state.")
    version: int | None
    first_seen: float = Field(description="Seconds since the epoch (server's clock).")
    last_seen: float
    backend: str | None
    fps: float | None
    p95_ms: float | None
    temp_c: float | None
    outbox: int | None = Field(description="Messages waiting in the device's outbox.")
    phase: str | None = Field(description="The state's phase (idle, downloading, …).")
    update: UpdateInfo | None
    last_error: str | None
    telemetry_ts: float | None = Field(description="Device time of the latest telemetry.")
    models: dict[str, ServedModel] = Field(
        default_factory=dict, description="Every model it serves (several pipelines, cascades)"
    )


class DeviceList(BaseModel):
    total: int = Field(description="Devices matching the filters (all pages).")
    limit: int
    offset: int
    devices: list[DeviceSummary]


class DeviceDetail(DeviceSummary):
    """A device with the last status, state and telemetry documents as it sent them."""

    status: dict[str, Any] | None
    state: dict[str, Any] | None
    telemetry: dict[str, Any] | None
    pipelines: list[PipelineFigures] = Field(
        default_factory=list,
        description="Every pipeline: its models, source and live figures (null unless live)",
    )
    shadows: list[ShadowRun] = Field(
        default_factory=list, description="Each shadow run of a candidate beside a model"
    )
    drift: list[Drift] = Field(
        default_factory=list,
        description="Per model with a previous version: drift of its outputs (0..1)",
    )


class Point(BaseModel):
    t: float = Field(description="Start of the step, seconds since the epoch.")
    min: float
    avg: float
    max: float
    count: int = Field(description="Samples in the step.")


class Series(BaseModel):
    device: str
    metric: str
    source: queries.Source = Field(description="raw samples, or 1-minute aggregates (agg)")
    since: float
    until: float
    step: int = Field(description="Seconds per point (steps without samples are left out).")
    points: list[Point]


class MetricList(BaseModel):
    device: str
    metrics: list[str]


class Event(BaseModel):
    id: int
    device: str
    ts: float
    event: str
    model: str | None
    version: int | None
    update_id: str | None
    fields: dict[str, Any] = Field(description="The event's other fields.")


class EventPage(BaseModel):
    events: list[Event]
    next_before_id: int | None = Field(
        description="Pass as before_id for the next (older) page; null on the last page."
    )


# -- helpers ------------------------------------------------------------------------------


def _json(answer: BaseModel) -> Response:
    """``answer`` as JSON, built once: FastAPI would validate a returned model again
    (a tenth of the time of a 1,000-device list). The route's ``response_model`` still
    describes it in the OpenAPI document."""
    return Response(answer.model_dump_json(), media_type="application/json")


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def _device_id(device: str) -> str:
    problem = check_device_id(device)
    if problem is not None:
        raise HTTPException(422, f"{problem}; not a device id")
    return device


def _unknown(device: str) -> HTTPException:
    return HTTPException(404, f"no device {device!r} has reported to this server")


def _summary(row: Any, now: float) -> dict[str, Any]:
    live = queries.live_figures(row, now)
    update = live["update"]
    return {
        "id": row["id"],
        "groups": [g for g in row["groups"] or [] if isinstance(g, str)],
        "online": bool(row["online"]),
        "agent_version": row["agent_version"],
        "model": row["model"],
        "version": row["version"],
        "first_seen": row["first_seen"],
        "last_seen": row["last_seen"],
        "backend": _text(live["backend"]),
        "fps": live["fps"],
        "p95_ms": live["p95_ms"],
        "temp_c": live["temp_c"],
        "outbox": int(live["outbox"]) if live["outbox"] is not None else None,
        "phase": _text(live["phase"]),
        "update": update_info(update) if update is not None else None,
        "last_error": _text(live["last_error"]),
        "telemetry_ts": row["telemetry_ts"],
        "models": served(row["state"]),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _figures(row: Any, now: float) -> dict[str, Any]:
    """A device's pipelines, shadow runs and drift (:mod:`agent.server.served`)."""
    live = live_telemetry(bool(row["online"]), row["telemetry"], now)
    return {
        "pipelines": pipelines(row["state"], live),
        "shadows": shadows(row["state"], live),
        "drift": drifts(row["telemetry"]),
    }


# -- routes -------------------------------------------------------------------------------


@router.get("/devices", response_model=DeviceList, summary="The devices, sorted by id")
def list_devices(
    request: Request,
    _caller: Viewer,
    group: Annotated[str | None, Query(max_length=128)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    online: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_DEVICES)] = 1000,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Response:
    if group is not None and (problem := check_group_name(group)) is not None:
        raise HTTPException(422, problem)
    server = _server(request)
    with server.engine.connect() as conn:
        total, rows = queries.device_rows(
            conn, DeviceFilter(group, model, version, online), limit, offset
        )
    now = server.clock()
    answer = DeviceList.model_validate(
        {
            "total": total,
            "limit": limit,
            "offset": offset,
            "devices": [_summary(row, now) for row in rows],
        }
    )
    return _json(answer)


@router.get("/devices/{device}", response_model=DeviceDetail, summary="One device")
def get_device(request: Request, _caller: Viewer, device: DeviceId) -> DeviceDetail:
    server = _server(request)
    with server.engine.connect() as conn:
        row = queries.device_row(conn, _device_id(device))
    if row is None:
        raise _unknown(device)
    return DeviceDetail.model_validate(
        {
            **_summary(row, server.clock()),
            "status": row["status"] if isinstance(row["status"], dict) else None,
            "state": row["state"] if isinstance(row["state"], dict) else None,
            "telemetry": row["telemetry"] if isinstance(row["telemetry"], dict) else None,
            **_figures(row, server.clock()),
        }
    )


@router.get("/devices/{device}/telemetry", response_model=Series, summary="A metric's time series")
def get_telemetry(
    request: Request,
    _caller: Viewer,
    device: DeviceId,
    metric: Annotated[str, Query(min_length=1, max_length=128)] = "inference.fps",
    since: Annotated[float | None, Query(description="Seconds since the epoch.")] = None,
    until: Annotated[float | None, Query(description="Default: now.")] = None,
    step: Annotated[int | None, Query(ge=1, le=366 * 86_400)] = None,
) -> Response:
    server = _server(request)
    try:
        plan = queries.plan_series(
            since=since,
            until=until,
            step=step,
            now=server.clock(),
            raw_days=server.options.raw_days,
        )
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from None
    with server.engine.connect() as conn:
        if queries.device_row(conn, _device_id(device)) is None:
            raise _unknown(device)
        points = queries.series(conn, device, metric, plan)
    answer = Series(
        device=device,
        metric=metric,
        source=plan.source,
        since=plan.since,
        until=plan.until,
        step=plan.step,
        points=[Point(t=p.t, min=p.min, avg=p.avg, max=p.max, count=p.count) for p in points],
    )
    return _json(answer)


@router.get("/devices/{device}/metrics", response_model=MetricList, summary="Metric names")
def get_metrics(request: Request, _caller: Viewer, device: DeviceId) -> MetricList:
    server = _server(request)
    with server.engine.connect() as conn:
        if queries.device_row(conn, _device_id(device)) is None:
            raise _unknown(device)
        names = queries.metrics(conn, device)
    return MetricList(device=device, metrics=names)


@router.get("/events", response_model=EventPage, summary="Events, newest first")
def list_events(
    request: Request,
    _caller: Viewer,
    device: Annotated[str | None, Query(max_length=128)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    event: Annotated[str | None, Query(max_length=64)] = None,
    since: float | None = None,
    until: float | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> EventPage:
    if device is not None:
        _device_id(device)
    try:
        queries.check_times(since, until)
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from None
    where = EventFilter(device, model, version, event, since, until, before_id)
    with _server(request).engine.connect() as conn:
        rows = queries.event_rows(conn, where, limit)
    page = [Event.model_validate(dict(row)) for row in rows]
    more = len(page) == limit
    return EventPage(events=page, next_before_id=page[-1].id if page and more else None)


_caches_lock = threading.Lock()


def release_cache(request: Request) -> ReleaseCache:
    state = request.app.state
    with _caches_lock:
        cache: ReleaseCache | None = getattr(state, "releases", None)
        if cache is None:
            cache = state.releases = ReleaseCache()
    return cache


@router.get("/releases", response_model=Releases, summary="Models and versions in the registry")
def list_releases(request: Request, _caller: Viewer) -> Releases:
    server = _server(request)
    registry = server.options.registry
    if not registry:
        raise HTTPException(
            503, "no registry configured: start edge-fleet serve with --registry DIR|URL"
        )

    def known() -> list[str]:
        with server.engine.connect() as conn:
            return queries.known_models(conn, 200)

    try:
        return release_cache(request).get(registry, known)
    except RegistryUnavailable as exc:
        raise HTTPException(503, f"registry unavailable: {exc}") from None
