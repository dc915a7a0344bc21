"""Several models on the fleet server (issue 20): a device's ``models``, ``pipelines``,
``shadows`` and ``outputs`` as the read API and the dashboard show them
(agent/server/served.py), the ``?model=`` filter matching a model the state's ``models``
names (SQLite and PostgreSQL), and, end to end, documents published on a real mosquitto
as the contract shapes them, ingested by a real ``edge-fleet serve`` and read over its
API and in headless Chromium (hostile names escaped, 60 models shown as 32)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.server import queries, served
from agent.server.db import open_database
from agent.server.store import upsert_device
from tests.broker import Mosquitto, subscriber, wait_until
from tests.browser import browser, text_of, wait_for
from tests.test_dashboard import log_in
from tests.test_server_api import NOW, state
from tests.test_server_ingest import _envelope, dumps, state_doc, status
from tests.test_server_serve import START_S, new_token, serving

EVIL = "<img src=x onerror=alert(1)>"

# -- documents as the contract shapes them -----------------------------------------------


def part(model: str, version: int, phase: str = "idle", error: str | None = None) -> dict[str, Any]:
    """A state's ``models[MODEL]``."""
    return {
        "model": model, "version": version, "sha256": "ab" * 32, "backend": "cpu",
        "serving": version, "previous": None, "phase": phase, "last_error": error,
        "update": None, "desired": None, "bad": [], "runtime": None,
    }  # fmt: skip


def shadow(
    model: str, version: int, value: float | None, frames: int, phase: str = "running"
) -> dict[str, Any]:
    return {
        "model": model, "version": version, "issued_at": NOW, "phase": phase,
        "sample_pct": 10, "max_cpu_pct": 25, "frames": frames, "skipped": 3, "errors": 0,
        "error": None, "latency_ms_p50": 7.5, "active_latency_ms_p50": 5.0,
        "agreement": {"metric": "f1", "value": value, "frames": frames},
    }  # fmt: skip


def multi_state(extra_models: int = 0) -> dict[str, Any]:
    models = {"people": part("people", 4), "faces": part("faces", 2, error="gate: too slow")}
    for i in range(extra_models):
        models[f"m{i:02d}"] = part(f"m{i:02d}", 1)
    return {
        **_envelope(), "agent_version": "0.1.0", **{k: v for k, v in part("people", 4).items()
                                                     if k != "runtime"},
        "models": models,
        "pipelines": {"door": {"model": "people", "cascade": "faces", "source": "video"},
                      "yard": {"model": "people", "cascade": None, "source": "synthetic"}},
        "shadows": {"people": shadow("people", 5, None, 0, "loading")},
    }  # fmt: skip


def figures(fps: float, cascade: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "frames": 100, "results": 90, "dropped": 0, "errors": 2, "fps": fps,
        "latency_ms_p50": 8.0, "latency_ms_p95": 12.5, "latency_ms_p99": 20.0,
        "infer_ms_p50": 5.0, "backend": "cpu", "model": "people", "version": 4,
        "source_connected": True, "cascade": cascade,
    }  # fmt: skip


def outputs(version: int, classes: dict[str, int], scores: list[int], previous: Any) -> Any:
    doc = {"version": version, "frames": sum(scores), "scores": scores, "classes": classes}
    return {**doc, "previous": previous}


def multi_telemetry(ts: float) -> dict[str, Any]:
    was = {"version": 3, "frames": 100, "scores": [0] * 9 + [100], "classes": {"person": 100}}
    cascade = {"model": "faces", "version": 2, "crops": 40, "infer_ms_p50": 3.0, "errors": 1}
    return {
        **_envelope(), "ts": ts, "cpu_pct": 10.0, "temp_c": 50.0,
        "inference": {k: v for k, v in figures(9.5).items() if k != "cascade"},
        "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
        "mqtt": {"connected": True, "protocol": "5", "connects": 1, "inflight": 0,
                 "rejected": 0, "unsent_qos0": 0},
        "pipelines": {"door": figures(9.5, cascade), "yard": figures(4.25)},
        "shadows": {"people": shadow("people", 5, 0.875, 120)},
        "outputs": {
            # people: half its frames now find a car: the class mix moved by 0.5
            "people": outputs(4, {"person": 50, "car": 50}, [0] * 9 + [100], was),
            "faces": outputs(2, {"face": 10}, [0] * 9 + [10], None),  # nothing to compare
        },
    }  # fmt: skip


# -- the pure part -----------------------------------------------------------------------


def test_served_reads_models_pipelines_shadows_and_drift() -> None:
    doc, tel = multi_state(), multi_telemetry(NOW)
    models = served.served(doc)
    assert list(models) == ["people", "faces"]
    assert models["faces"].version == 2 and models["faces"].last_error == "gate: too slow"
    lines = served.pipelines(doc, tel)
    assert [(p.name, p.model, p.cascade_model, p.source, p.fps) for p in lines] == [
        ("door", "people", "faces", "video", 9.5),
        ("yard", "people", None, "synthetic", 4.25),
    ]
    assert lines[0].cascade is not None and lines[0].cascade.crops == 40
    # not live: what runs stays, the figures go
    assert [p.fps for p in served.pipelines(doc, {})] == [None, None]
    # the live telemetry's shadow run is fresher than the state's
    (run,) = served.shadows(doc, tel)
    assert (run.model, run.version, run.phase, run.metric, run.agreement) == (
        "people", 5, "running", "f1", 0.875,
    )  # fmt: skip
    assert served.shadows(doc, {})[0].phase == "loading"
    (moved,) = served.drifts(tel)  # faces has no previous version: no drift
    assert (moved.model, moved.previous_version, moved.version) == ("people", 3, 4)
    assert moved.classes == 0.5 and moved.scores == 0.0 and moved.flagged


def test_served_survives_hostile_documents() -> None:
    hostile: list[Any] = [None, 3, "x", [], {"models": [1]}, {"models": {"a": 5, "b": None}},
                          {"pipelines": {"p": {"fps": "fast", "cascade": 7}}},
                          {"shadows": {"m": {"agreement": 3, "version": True}}}]  # fmt: skip
    for doc in hostile:
        served.served(doc)
        served.pipelines(doc, doc if isinstance(doc, dict) else {})
        served.shadows(doc, {})
        served.drifts(doc)
    (p,) = served.pipelines(hostile[6], hostile[6])
    assert p.fps is None and p.cascade is None
    (s,) = served.shadows(hostile[7], {})
    assert s.version is None and s.agreement is None
    many = {"models": {f"{i:02d}" + "x" * 200: part("m", 1) for i in range(60)}}
    names = list(served.served(many))
    assert len(names) == served.MAX_SERVED and all(len(n) <= served.MAX_NAME for n in names)


# -- the ?model= filter on both engines --------------------------------------------------


def test_the_model_filter_matches_a_model_the_state_names(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        with engine.begin() as conn:
            upsert_device(conn, "multi", NOW, state=multi_state())
            upsert_device(conn, "single", NOW, state=state("colours", 3))
            upsert_device(conn, "silent", NOW)
        with engine.connect() as conn:

            def ids(model: str) -> list[str]:
                where = queries.DeviceFilter(model=model)
                total, rows = queries.device_rows(conn, where, 10, 0)
                assert total == len(rows)
                return [r["id"] for r in rows]

            assert ids("people") == ["multi"]  # the top-level one
            assert ids("faces") == ["multi"]  # named only in models
            assert ids("colours") == ["single"]
            assert ids("bad") == []  # a key of a model's part, not a model
            assert ids("absent") == []
            assert ids('a"b') == [] and ids("it's") == []  # not a model name: the column only
    finally:
        engine.dispose()


# -- end to end: mosquitto, edge-fleet serve, the API and Chromium ------------------------


def test_several_models_and_a_shadow_run_reach_the_api_and_the_device_page(
    tmp_path: Path, broker: Mosquitto
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    viewer = new_token(db, "vera", "viewer")
    hostile = multi_state(extra_models=58)  # 60 models
    hostile["models"] = {EVIL: part(EVIL, 1, error=EVIL), **hostile["models"]}  # shown first
    with serving(tmp_path, broker, db) as serve, browser(1280, 900) as chrome:
        serve.wait_health(200, START_S)
        device = subscriber(broker.url, [])
        try:
            device.publish("edge/cam-9/status", dumps(status()), retain=True)
            device.publish("edge/cam-9/state", dumps(multi_state()), retain=True)
            device.publish("edge/cam-9/telemetry", dumps(multi_telemetry(time.time())))
            device.publish("edge/cam-evil/status", dumps(status()), retain=True)
            device.publish("edge/cam-evil/state", dumps(hostile), retain=True)
        finally:
            device.close()
        assert wait_until(lambda: serve.health().body["ingest"]["stored"] >= 5, 20), (
            serve.health().body
        )

        got = serve.get("/api/v1/devices/cam-9", viewer)
        assert got.status == 200, got.body
        body = got.body
        assert body["models"]["faces"]["last_error"] == "gate: too slow"
        assert [(p["name"], p["fps"], p["cascade_model"]) for p in body["pipelines"]] == [
            ("door", 9.5, "faces"),
            ("yard", 4.25, None),
        ]
        assert body["pipelines"][0]["cascade"]["crops"] == 40
        assert [(s["model"], s["version"], s["agreement"]) for s in body["shadows"]] == [
            ("people", 5, 0.875)
        ]
        assert [(d["model"], d["classes"], d["flagged"]) for d in body["drift"]] == [
            ("people", 0.5, True)
        ]
        listed = serve.get("/api/v1/devices?model=faces", viewer).body
        assert [d["id"] for d in listed["devices"]] == ["cam-9", "cam-evil"]  # both serve faces
        assert serve.get("/api/v1/devices?model=m40", viewer).body["total"] == 1
        evil = serve.get("/api/v1/devices/cam-evil", viewer).body
        assert len(evil["models"]) == served.MAX_SERVED

        chrome.base = serve.url
        log_in(chrome, viewer)
        row = text_of(chrome.web, "css selector", "#devices tbody tr")
        assert "people v4" in row and "faces v2" in row, row
        chrome.open("/ui/devices/cam-9")
        models = text_of(chrome.web, "id", "models")
        assert "faces v2 idle cpu gate: too slow" in models, models
        lines = text_of(chrome.web, "id", "pipelines")
        assert "door people faces video 9.5 8.0 12.5 2 40" in lines, lines
        runs = text_of(chrome.web, "id", "shadows")
        assert "people v5 running f1 0.875 120 3 0" in runs, runs
        drift = text_of(chrome.web, "id", "drift")
        assert "people v3 → v4 0.50 0.00 100 / 100 drifted" in drift, drift
        chrome.web.save_screenshot(str(tmp_path / "models.png"))

        # one model: no models card, until the device's state names several (live)
        device = subscriber(broker.url, [])
        try:
            device.publish("edge/cam-1/status", dumps(status()), retain=True)
            device.publish("edge/cam-1/state", dumps(state_doc()), retain=True)
            assert wait_until(lambda: serve.get("/api/v1/devices/cam-1", viewer).status == 200)
            chrome.open("/ui/devices/cam-1")
            assert not chrome.web.find_element("id", "models-card").is_displayed()
            device.publish("edge/cam-1/state", dumps(multi_state()), retain=True)
            wait_for(
                chrome,
                lambda web: (
                    web.find_element("id", "models-card").is_displayed()
                    and "faces" in text_of(web, "id", "models")
                ),
                20,
                reload=False,
                what="the models card swapped in by the live page",
            )
        finally:
            device.close()

        chrome.open("/ui/devices/cam-evil")
        shown = chrome.web.find_elements("css selector", "#models tbody tr")
        assert len(shown) == served.MAX_SERVED
        assert not chrome.web.find_elements("css selector", "#models img")
        page = chrome.web.page_source
        assert "<img src=x" not in page
