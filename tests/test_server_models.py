"""Every served model counted by the fleet server (issue 20's leftovers): a device
serving two models (several pipelines or a cascade: its state's ``models``) counts
under each in the overview's "by model" and version bars, in ``/metrics``'
``edge_fleet_devices`` (checked by the real promtool) and in the known models; an
older agent (no ``models``) counts under its top-level model as before. Both databases,
through the ingest's own ``upsert_device``; migration 0006 fills the rows of devices
stored before it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from agent.server import queries, retention
from agent.server.db import alembic_config, open_database, parse_url
from agent.server.metrics import MAX_RELEASES, read_figures, render
from agent.server.schema import device_models, devices
from agent.server.store import upsert_device
from agent.server.web import overview, releases_page

PROMTOOL = shutil.which("promtool")
NOW = 1_700_000_000.0


def _part(version: int) -> dict[str, Any]:
    return {"model": None, "version": version, "phase": "idle", "bad": [], "runtime": None}


def _two_models(faces: int = 5) -> dict[str, Any]:
    """A state with two pipelines: people (the first one's, on top) and faces."""
    return {
        "schema": 1, "agent_version": "0.9.0", "model": "people", "version": 2,
        "models": {"people": _part(2), "faces": _part(faces)},
    }  # fmt: skip


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = open_database(db_url)
    with engine.begin() as conn:
        for device in ("two", "legacy", "silent"):
            upsert_device(conn, device, NOW, status={"state": "online", "groups": []})
        upsert_device(conn, "two", NOW, state=_two_models())
        upsert_device(conn, "legacy", NOW, state={"model": "colours", "version": 3})
    yield engine
    engine.dispose()


def _promtool(text: str) -> None:
    if PROMTOOL is not None:
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_count_a_device_under_every_model_it_serves(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        figures = read_figures(conn)
    assert figures.devices == [
        ("", "", True, 1),  # silent: no state yet
        ("colours", "3", True, 1),  # an older agent: its top-level model, as before
        ("faces", "5", True, 1),  # the second pipeline's model
        ("people", "2", True, 1),
    ]
    text = render(figures, None, "srv-a").decode()
    assert 'edge_fleet_devices{model="faces",online="true",version="5"} 1.0' in text
    assert 'edge_fleet_devices{model="people",online="true",version="2"} 1.0' in text
    _promtool(text)


def test_the_overview_and_the_known_models_count_every_model(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        figures = overview.overview(conn)
        known = queries.known_models(conn, 200)
    assert figures.total == 3  # devices, each once
    assert [(s.name, s.online, s.offline) for s in figures.models] == [
        ("(none)", 1, 0),
        ("colours", 1, 0),
        ("faces", 1, 0),
        ("people", 1, 0),
    ]
    bars = {bar.label: bar.count for bar in figures.bars}
    assert bars == {"colours v3": 1, "faces v5": 1, "people v2": 1, "no model yet": 1}
    assert known == ["colours", "faces", "people"]


def test_the_releases_page_lists_a_device_under_every_release_it_runs(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        run = releases_page.running(conn)
    assert {key: (r.count, r.devices) for key, r in run.items()} == {
        ("colours", 3): (1, ["legacy"]),
        ("faces", 5): (1, ["two"]),
        ("people", 2): (1, ["two"]),
    }


def test_a_new_state_rewrites_the_devices_models(engine: sa.Engine) -> None:
    with engine.begin() as conn:  # faces updated to v6, then the second pipeline removed
        upsert_device(conn, "two", NOW + 1, state=_two_models(faces=6))
        assert ("faces", "6", True, 1) in read_figures(conn).devices
        upsert_device(conn, "two", NOW + 2, state={"model": "people", "version": 2})
        assert queries.known_models(conn, 200) == ["colours", "people"]
        conn.execute(sa.delete(devices).where(devices.c.id == "two"))  # its rows go with it
        assert conn.execute(sa.select(device_models.c.model)).scalars().all() == ["colours"]


def test_series_stay_bounded_when_devices_invent_models_in_their_models_part(
    engine: sa.Engine,
) -> None:
    junk = {f"junk-{i}": _part(1) for i in range(200)}
    with engine.begin() as conn:
        for n in range(20):  # 20 devices × 32 kept models each, the names all different
            models = {f"{name}-{n}": part for name, part in junk.items()}
            upsert_device(conn, f"noisy-{n}", NOW, state={"model": None, "models": models})
        kept = conn.execute(sa.select(sa.func.count()).select_from(device_models)).scalar()
        figures = read_figures(conn)
    assert kept == 3 + 20 * retention.MAX_MODELS
    assert len(figures.devices) <= 2 * (MAX_RELEASES + 1)
    # every (device, model) counted, and the device serving none
    assert sum(count for *_, count in figures.devices) == 4 + 20 * retention.MAX_MODELS
    _promtool(render(figures, None, "srv-a").decode())


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"model": "colours", "version": 2}, {"colours": 2}),
        (_two_models(), {"people": 2, "faces": 5}),
        ({"model": "a", "version": 1, "models": {"a": _part(1), "bad name": _part(1)}}, {"a": 1}),
        ({"model": None, "models": {"b": {"version": True}, "c": "junk", "d": None}}, {"b": None}),
        ({"model": "x", "version": 2**40}, {"x": None}),  # not an INTEGER column's
        ({"model": "x", "version": 1, "models": ["x"]}, {"x": 1}),
        ({"models": {f"m{i}": _part(i) for i in range(50)}}, {f"m{i}": i for i in range(32)}),
    ],
)
def test_served_models(doc: dict[str, Any], expected: dict[str, int | None]) -> None:
    assert retention.served_models(doc) == expected


def test_migration_0006_gives_devices_stored_before_it_their_models(db_url: str) -> None:
    bare = sa.create_engine(parse_url(db_url))
    try:
        with bare.begin() as conn:  # a database at 0005, before the rows existed
            command.upgrade(alembic_config(conn), "0005")
            old = [
                ("two", True, "people", 2, _two_models()),
                ("old", False, "colours", 3, None),  # an older agent's: no models
                ("none", False, None, None, None),  # no state yet
            ]
            conn.execute(
                sa.insert(devices),
                [
                    {"id": device, "groups": [], "first_seen": 1.0, "last_seen": 2.0,
                     "online": online, "model": model, "version": version, "state": state}
                    for device, online, model, version, state in old
                ],
            )  # fmt: skip
    finally:
        bare.dispose()
    upgraded = open_database(db_url)
    try:
        with upgraded.connect() as conn:
            rows = conn.execute(
                sa.select(
                    device_models.c.device, device_models.c.model, device_models.c.version
                ).order_by(device_models.c.device, device_models.c.model)
            ).all()
    finally:
        upgraded.dispose()
    assert [tuple(r) for r in rows] == [
        ("old", "colours", 3),
        ("two", "faces", 5),
        ("two", "people", 2),
    ]
