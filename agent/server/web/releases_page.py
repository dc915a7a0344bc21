"""The releases page, ``GET /ui/releases`` (issue 17): the registry's models and
versions as ``GET /api/v1/releases`` reads them (the same :class:`ReleaseCache`), each
version with its task, files and sizes, signers, self-test and budget, and the devices
that run it (every model a device serves, ``device_models``: a count and the first few
ids).

Without ``--registry``, or with a registry that cannot be read, the page says why
(503) and still lists the versions the devices run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response

from agent.server import queries
from agent.server.api.read import release_cache
from agent.server.releases import RegistryUnavailable, Releases
from agent.server.schema import device_models
from agent.server.web import pages

router = APIRouter(prefix="/ui", include_in_schema=False)
SHOWN_DEVICES = 10  # device ids listed per version (the count says how many in all)
MAX_RUNNING = 2000  # (model, version) pairs read from device_models


@dataclass
class Running:
    """The devices that run one release: how many, and the first ids (sorted)."""

    count: int = 0
    devices: list[str] = field(default_factory=list)


Key = tuple[str, int]


def running(conn: sa.Connection) -> dict[Key, Running]:
    """Per (model, version) the devices running it (every model a device serves,
    ``device_models``: a device serving two is listed under each): two grouped queries
    whatever the fleet's size (a window function keeps the first :data:`SHOWN_DEVICES`
    ids)."""
    m = device_models.c
    out: dict[Key, Running] = {}
    counts = conn.execute(
        sa.select(m.model, m.version, sa.func.count())
        .where(m.version.is_not(None))
        .group_by(m.model, m.version)
        .order_by(m.model, m.version)
        .limit(MAX_RUNNING)
    )
    for model, version, n in counts:
        out[(model, version)] = Running(int(n))
    rank = sa.func.row_number().over(partition_by=(m.model, m.version), order_by=m.device)
    ranked = (
        sa.select(m.model, m.version, m.device, rank.label("rank"))
        .where(m.version.is_not(None))
        .subquery()
    )
    first = conn.execute(
        sa.select(ranked.c.model, ranked.c.version, ranked.c.device)
        .where(ranked.c.rank <= SHOWN_DEVICES)
        .order_by(ranked.c.model, ranked.c.version, ranked.c.device)
    )
    for model, version, device in first:
        if (model, version) in out:
            out[(model, version)].devices.append(device)
    return out


def unlisted(releases: Releases | None, run: dict[Key, Running]) -> list[tuple[Key, Running]]:
    """The releases devices run that the registry listing does not show (all of them
    without a listing), sorted by model then version."""
    listed: set[Key] = set()
    if releases is not None:
        listed = {(m.model, v.version) for m in releases.models for v in m.versions}
    return sorted((k, r) for k, r in run.items() if k not in listed)


@router.get("/releases")
def releases_page(request: Request) -> Response:
    session = pages.signed_in(request)
    server = pages.server_of(request)
    with server.engine.connect() as conn:
        run = running(conn)
    releases: Releases | None = None
    problem: str | None = None
    registry = server.options.registry
    if not registry:
        problem = "No registry configured: start edge-fleet serve with --registry DIR|URL."
    else:

        def known() -> list[str]:
            with server.engine.connect() as conn:
                return queries.known_models(conn, 200)

        try:
            releases = release_cache(request).get(registry, known)
        except RegistryUnavailable as exc:
            problem = f"The registry cannot be read: {exc}"[:300]
    context = {
        "session": session,
        "releases": releases,
        "problem": problem,
        "running": run,
        "unlisted": unlisted(releases, run),
    }
    return pages.render(request, "releases.html", context, 503 if problem else 200)
