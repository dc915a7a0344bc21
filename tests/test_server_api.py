"""The read API (devices, telemetry, events, releases) on a real uvicorn, against SQLite
and a real PostgreSQL: the database is filled through the ingester's own writes
(agent/server/store.py), the registry by the real publish, served as a folder and
over HTTP (tests/registry_server.py)."""

from __future__ import annotations

import itertools
import math
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.server import rollstore
from agent.server.app import validation_detail
from agent.server.auth import create_token
from agent.server.context import Server
from agent.server.queries import MAX_POINTS, QueryError, SeriesPlan, default_step, plan_series
from agent.server.retention import numeric_samples
from agent.server.store import insert_event, insert_telemetry, prune, upsert_device
from tests.conftest import MODEL, Fleet
from tests.registry_server import RegistryServer
from tests.serverhttp import Reply, app_over, call

NOW = 1_800_000_000.0  # the server's clock in these tests (a minute boundary)
DAY = 86_400.0
_tokens = itertools.count()


@dataclass
class Api:
    url: str
    token: str
    engine: sa.Engine
    server: Server

    def get(self, path: str, token: str | None = "", **params: Any) -> Reply:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        return call("GET", url, token=self.token if token == "" else token)


@contextmanager
def serving(db_url: str, registry: str | None = None) -> Iterator[Api]:
    tokens: list[str] = []

    def prepare(engine: sa.Engine) -> None:
        with engine.begin() as conn:
            tokens.append(create_token(conn, f"reader-{next(_tokens)}", "viewer", NOW))

    with app_over(db_url, now=NOW, prepare=prepare, registry=registry) as (url, engine, server):
        yield Api(url, tokens[0], engine, server)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For what does not depend on the database engine (request checks, the registry)."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    with serving(db_url) as it:
        yield it


# -- documents as devices send them ----------------------------------------------------


def status(state: str, *groups: str) -> dict[str, Any]:
    return {"schema": 1, "ts": NOW, "state": state, "groups": list(groups), "agent_version": "0.9"}


def state(
    model: str, version: int, phase: str = "idle", update: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "schema": 1, "seq": 1, "id": f"s-{model}-{version}", "ts": NOW, "agent_version": "0.9",
        "model": model, "version": version, "sha256": "ab" * 32, "backend": "cpu",
        "serving": version, "previous": None, "phase": phase, "last_error": None,
        "update": update, "desired": None, "bad": [],
    }  # fmt: skip


def telemetry(ts: float, fps: float, temp: float = 50.0) -> dict[str, Any]:
    return {
        "schema": 1, "seq": 2, "id": f"t-{ts}", "ts": ts, "cpu_pct": 10.0, "temp_c": temp,
        "inference": {"frames": 10, "results": 10, "dropped": 0, "errors": 0, "fps": fps,
                      "latency_ms_p50": 8.0, "latency_ms_p95": 12.5, "latency_ms_p99": 20.0,
                      "infer_ms_p50": 5.0, "backend": "edgetpu", "model": "colours",
                      "version": 3, "source_connected": True},
        "outbox": {"depth": 4, "bytes": 100, "dropped": 0, "overflow": 0},
        "mqtt": {"connected": True, "protocol": "5", "connects": 1, "inflight": 0,
                 "rejected": 0, "unsent_qos0": 0},
    }  # fmt: skip


def report(conn: sa.Connection, device: str, doc: dict[str, Any]) -> None:
    """Store a telemetry document as the ingester does."""
    insert_telemetry(conn, device, doc["ts"], numeric_samples(doc), doc=doc)


def fill_fleet(engine: sa.Engine) -> None:
    """dev-a: door, online, colours v3, fresh telemetry; dev-b: yard, offline, v2, fresh
    telemetry; dev-c: door and yard, online, v3 updating, telemetry 10 minutes old."""
    with engine.begin() as conn:
        upsert_device(conn, "dev-a", NOW - 50, status=status("online", "door"))
        upsert_device(conn, "dev-a", NOW - 40, state=state("colours", 3))
        report(conn, "dev-a", telemetry(NOW - 30, 9.5))
        report(conn, "dev-a", telemetry(NOW - 3600, 1.0))  # a replayed old one: not shown
        upsert_device(conn, "dev-b", NOW - 50, status=status("offline", "yard"))
        upsert_device(conn, "dev-b", NOW - 40, state=state("colours", 2))
        report(conn, "dev-b", telemetry(NOW - 20, 8.0))
        upsert_device(conn, "dev-c", NOW - 50, status=status("online", "door", "yard"))
        upsert_device(
            conn,
            "dev-c",
            NOW - 40,
            state=state("colours", 3, "downloading", {"id": "u1", "model": "colours",
                        "version": 4, "phase": "downloading", "outcome": None, "reason": None}),
        )  # fmt: skip
        report(conn, "dev-c", telemetry(NOW - 600, 7.0))


# -- pure rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until", "step", "expected"),
    [
        (None, None, None, SeriesPlan("raw", NOW - 3600, NOW, 15)),  # the last hour
        (NOW - 600, None, None, SeriesPlan("raw", NOW - 600, NOW, 10)),
        (NOW - 3600, NOW, 30, SeriesPlan("raw", NOW - 3600, NOW, 30)),
        (NOW - 3600, NOW, 60, SeriesPlan("agg", NOW - 3600, NOW, 60)),  # a minute: aggregates
        (NOW - 7 * DAY, NOW, None, SeriesPlan("agg", NOW - 7 * DAY, NOW, 3600)),
        (
            NOW - 8 * DAY,
            NOW - 8 * DAY + 600,
            10,
            SeriesPlan("agg", NOW - 8 * DAY, NOW - 8 * DAY + 600, 60),
        ),  # past raw retention
        (NOW - 3600, NOW, 90, SeriesPlan("agg", NOW - 3600, NOW, 120)),  # whole minutes
        (NOW - 86_400, NOW, 10, SeriesPlan("raw", NOW - 86_400, NOW, 10)),  # 8640 points
    ],
)
def test_the_series_plan_chooses_the_table_and_the_step(
    since: float | None, until: float | None, step: int | None, expected: SeriesPlan
) -> None:
    assert plan_series(since=since, until=until, step=step, now=NOW, raw_days=7) == expected


@pytest.mark.parametrize(
    ("since", "until", "step", "says"),
    [
        (NOW, NOW - 10, None, "must be after since"),
        (NOW, NOW, None, "must be after since"),
        (math.nan, None, None, "since: nan is not a time"),
        (None, math.inf, None, "until: inf is not a time"),
        (-5.0, None, None, "since: -5.0 is not a time"),
        (NOW - 3600, NOW, 5, "too fine; at least 10 s"),
        (NOW - 2 * DAY, NOW, 10, "at most 10000: ask for a step of at least 18 s"),
        (0.0, NOW, 60, "at most 10000"),
    ],
)
def test_the_series_plan_refuses_what_is_out_of_bounds(
    since: float | None, until: float | None, step: int | None, says: str
) -> None:
    with pytest.raises(QueryError, match=says):
        plan_series(since=since, until=until, step=step, now=NOW, raw_days=7)


@pytest.mark.parametrize(
    ("range_s", "step"),
    [(60, 10), (3000, 10), (3600, 15), (6 * 3600, 120), (7 * DAY, 3600), (90 * DAY, 43200),
     (400 * DAY, 2 * 86400)],
)  # fmt: skip
def test_the_default_step_aims_at_a_few_hundred_points(range_s: float, step: int) -> None:
    assert default_step(range_s) == step
    assert range_s / step <= 300 <= MAX_POINTS


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        ({"loc": ("query", "limit"), "msg": "Input should be less than or equal to 10"},
         "query parameter limit: Input should be less than or equal to 10"),
        ({"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
          "ctx": {"error": "Expecting value"}},
         "body: not valid JSON (Expecting value at character 0)"),
    ],
)  # fmt: skip
def test_a_validation_error_is_one_line(error: dict[str, Any], detail: str) -> None:
    assert validation_detail([error]) == detail


# -- devices -------------------------------------------------------------------------------


def ids(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [d["id"] for d in reply.body["devices"]]


def test_the_device_list_filters_and_shows_live_figures_only_when_fresh(api: Api) -> None:
    fill_fleet(api.engine)
    every = api.get("/api/v1/devices")
    assert ids(every) == ["dev-a", "dev-b", "dev-c"]
    assert every.body["total"] == 3
    a, b, c = every.body["devices"]
    assert a["online"] is True and a["groups"] == ["door"]
    assert (a["model"], a["version"], a["agent_version"]) == ("colours", 3, "0.9")
    assert (a["fps"], a["p95_ms"], a["temp_c"], a["backend"]) == (9.5, 12.5, 50.0, "edgetpu")
    assert a["outbox"] == 4 and a["telemetry_ts"] == NOW - 30  # the replayed one lost
    assert (a["first_seen"], a["last_seen"], a["phase"]) == (NOW - 50, NOW - 40, "idle")
    assert (b["online"], b["fps"], b["temp_c"]) == (False, None, None)  # offline: no live
    assert (c["fps"], c["temp_c"]) == (None, None)  # telemetry 10 minutes old
    assert c["phase"] == "downloading"
    assert c["update"] == {
        "id": "u1", "model": "colours", "version": 4, "phase": "downloading",
        "outcome": None, "reason": None,
    }  # fmt: skip
    assert ids(api.get("/api/v1/devices", group="door")) == ["dev-a", "dev-c"]
    assert ids(api.get("/api/v1/devices", group="yard", online="true")) == ["dev-c"]
    assert ids(api.get("/api/v1/devices", model="colours", version=3)) == ["dev-a", "dev-c"]
    assert ids(api.get("/api/v1/devices", online="false")) == ["dev-b"]
    assert ids(api.get("/api/v1/devices", model="other")) == []
    page = api.get("/api/v1/devices", limit=1, offset=1)
    assert ids(page) == ["dev-b"] and page.body["total"] == 3


def test_the_device_list_shows_every_model_a_device_serves(api: Api) -> None:
    fill_fleet(api.engine)
    faces = {**state("faces", 2), "update": {"model": "faces", "version": 3, "phase": "probation"}}
    several = {**state("people", 5), "models": {"people": state("people", 5), "faces": faces}}
    with api.engine.begin() as conn:
        upsert_device(conn, "dev-d", NOW - 50, status=status("online", "door"))
        upsert_device(conn, "dev-d", NOW - 40, state=several)
    rows = {d["id"]: d for d in api.get("/api/v1/devices").body["devices"]}
    assert set(rows["dev-d"]["models"]) == {"people", "faces"}
    served = rows["dev-d"]["models"]["faces"]
    assert (served["version"], served["phase"]) == (2, "idle")
    assert served["update"]["phase"] == "probation"
    assert (rows["dev-d"]["model"], rows["dev-d"]["version"]) == ("people", 5)  # as before
    assert set(rows["dev-a"]["models"]) == {"colours"}  # one model: the top-level fields
    assert rows["dev-a"]["models"]["colours"]["version"] == 3
    # a rollout of a model takes the members that may take it: not dev-d for cars
    with api.engine.connect() as conn:
        assert rollstore.members_of(conn, "door") == ["dev-a", "dev-c", "dev-d"]
        assert rollstore.members_of(conn, "door", "faces") == ["dev-a", "dev-c", "dev-d"]
        assert rollstore.members_of(conn, "door", "cars") == ["dev-a", "dev-c"]  # older agents


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"limit": 0}, "query parameter limit: Input should be greater than or equal to 1"),
        ({"limit": 10_001}, "query parameter limit: Input should be less than or equal to 10000"),
        ({"offset": -1}, "query parameter offset"),
        ({"online": "maybe"}, "query parameter online"),
        ({"group": "a/b"}, "group name"),
    ],
)
def test_device_list_parameters_out_of_bounds_are_422_with_one_line(
    sqlite_url: str, params: dict[str, Any], says: str
) -> None:
    with serving(sqlite_url) as api:
        reply = api.get("/api/v1/devices", **params)
    assert reply.status == 422
    assert isinstance(reply.body["detail"], str) and says in reply.body["detail"]


def test_one_device_has_its_documents_and_unknown_or_invalid_ids_are_refused(api: Api) -> None:
    fill_fleet(api.engine)
    one = api.get("/api/v1/devices/dev-c")
    assert one.status == 200, one.body
    assert one.body["id"] == "dev-c" and one.body["groups"] == ["door", "yard"]
    assert one.body["status"]["state"] == "online"
    assert one.body["state"]["update"]["id"] == "u1"
    assert one.body["telemetry"]["inference"]["fps"] == 7.0
    missing = api.get("/api/v1/devices/dev-z")
    assert missing.status == 404
    assert missing.body == {"detail": "no device 'dev-z' has reported to this server"}
    for bad in ("groups", "dev%2Bx", "a" * 200):
        reply = api.get(f"/api/v1/devices/{bad}")
        assert reply.status == 422, (bad, reply.body)
        assert isinstance(reply.body["detail"], str)
    assert api.get("/api/v1/devices/dev-z/telemetry").status == 404
    assert api.get("/api/v1/devices/dev-z/metrics").status == 404


# -- telemetry -------------------------------------------------------------------------


def test_a_series_from_raw_samples_has_their_min_avg_max(api: Api) -> None:
    with api.engine.begin() as conn:
        upsert_device(conn, "dev-a", NOW, status=status("online"))
        # Two 30 s steps: [NOW-60, NOW-30) holds 2, 4, 9; [NOW-30, NOW) holds 5.
        for ts, fps in ((NOW - 60, 2.0), (NOW - 50, 4.0), (NOW - 40, 9.0), (NOW - 20, 5.0)):
            report(conn, "dev-a", telemetry(ts, fps, temp=fps * 10))
    reply = api.get("/api/v1/devices/dev-a/telemetry", since=NOW - 60, until=NOW, step=30)
    assert reply.status == 200, reply.body
    assert (reply.body["source"], reply.body["step"]) == ("raw", 30)
    assert reply.body["points"] == [
        {"t": NOW - 60, "min": 2.0, "avg": 5.0, "max": 9.0, "count": 3},
        {"t": NOW - 30, "min": 5.0, "avg": 5.0, "max": 5.0, "count": 1},
    ]
    temps = api.get(
        "/api/v1/devices/dev-a/telemetry", metric="temp_c", since=NOW - 60, until=NOW, step=60
    )
    assert temps.body["source"] == "agg"  # a step of a minute: the aggregates
    assert temps.body["points"] == [{"t": NOW - 60, "min": 20.0, "avg": 50.0, "max": 90.0,
                                     "count": 4}]  # fmt: skip
    default = api.get("/api/v1/devices/dev-a/telemetry")  # inference.fps, the last hour
    assert (default.body["metric"], default.body["source"], default.body["step"]) == (
        "inference.fps", "raw", 15,
    )  # fmt: skip
    assert sum(p["count"] for p in default.body["points"]) == 4
    metrics = api.get("/api/v1/devices/dev-a/metrics")
    assert metrics.status == 200
    assert {"cpu_pct", "inference.fps", "inference.latency_ms_p95", "outbox.depth",
            "temp_c"} <= set(metrics.body["metrics"])  # fmt: skip
    assert metrics.body["metrics"] == sorted(metrics.body["metrics"])


def test_a_series_past_raw_retention_folds_the_minute_aggregates(api: Api) -> None:
    start = NOW - 10 * DAY  # raw samples are gone by then: only aggregates answer
    with api.engine.begin() as conn:
        upsert_device(conn, "dev-a", NOW, status=status("online"))
        samples = [(0, 1.0), (10, 3.0), (70, 10.0), (130, 6.0), (150, 2.0)]
        for offset, fps in samples:
            report(conn, "dev-a", telemetry(start + offset, fps))
        pruned = prune(conn, NOW, raw_days=7, agg_days=90)
    assert pruned.raw == 5 * len(numeric_samples(telemetry(0, 0)))
    reply = api.get("/api/v1/devices/dev-a/telemetry", since=start, until=start + 240, step=120)
    assert reply.status == 200, reply.body
    assert (reply.body["source"], reply.body["step"]) == ("agg", 120)
    # Minutes 0 and 1 fold into one step (1, 3, 10), minute 2 into the next (6, 2).
    assert reply.body["points"] == [
        {"t": start, "min": 1.0, "avg": 14 / 3, "max": 10.0, "count": 3},
        {"t": start + 120, "min": 2.0, "avg": 4.0, "max": 6.0, "count": 2},
    ]
    fine = api.get("/api/v1/devices/dev-a/telemetry", since=start, until=start + 240, step=10)
    assert (fine.body["source"], fine.body["step"]) == ("agg", 60)  # rounded up to a minute
    assert [p["count"] for p in fine.body["points"]] == [2, 1, 2]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"since": NOW, "until": NOW - 1}, "until (1.8e+09) must be after since"),
        ({"since": "nan"}, "since: nan is not a time"),
        ({"step": 5}, "too fine"),
        ({"since": NOW - 6 * DAY, "step": 10}, "at most 10000"),
        ({"since": "yesterday"}, "query parameter since"),
    ],
)
def test_series_bounds_are_422_with_a_clear_detail(
    sqlite_url: str, params: dict[str, Any], says: str
) -> None:
    with serving(sqlite_url) as api:
        with api.engine.begin() as conn:
            upsert_device(conn, "dev-a", NOW, status=status("online"))
        reply = api.get("/api/v1/devices/dev-a/telemetry", **params)
    assert reply.status == 422, reply.body
    assert says in reply.body["detail"]


# -- events --------------------------------------------------------------------------------


def test_events_are_filtered_and_paged_newest_first(api: Api) -> None:
    with api.engine.begin() as conn:
        for i in range(25):
            device = "dev-a" if i % 2 == 0 else "dev-b"
            name = "update_succeeded" if i % 5 == 0 else "agent_started"
            insert_event(
                conn,
                device,
                NOW - 1000 + i,
                {"schema": 1, "seq": i, "id": f"e{i}", "ts": NOW - 1000 + i, "event": name,
                 "model": "colours", "version": 3 if i < 20 else 4, "n": i},
            )  # fmt: skip
    first = api.get("/api/v1/events", limit=10)
    assert first.status == 200, first.body
    ns = [e["fields"]["n"] for e in first.body["events"]]
    assert ns == list(range(24, 14, -1))
    seen = list(ns)
    before = first.body["next_before_id"]
    for _ in range(5):  # bounded: three pages in all
        if before is None:
            break
        page = api.get("/api/v1/events", limit=10, before_id=before)
        seen += [e["fields"]["n"] for e in page.body["events"]]
        before = page.body["next_before_id"]
    assert seen == list(range(24, -1, -1)) and before is None
    e = first.body["events"][0]
    assert (e["device"], e["event"], e["model"], e["version"], e["ts"]) == (
        "dev-a", "agent_started", "colours", 4, NOW - 976,
    )  # fmt: skip

    def names(**params: Any) -> list[int]:
        reply = api.get("/api/v1/events", **params)
        assert reply.status == 200, reply.body
        return [e["fields"]["n"] for e in reply.body["events"]]

    assert names(device="dev-b", event="update_succeeded") == [15, 5]
    assert names(model="colours", version=4) == [24, 23, 22, 21, 20]
    assert names(since=NOW - 1000 + 3, until=NOW - 1000 + 6) == [5, 4, 3]
    assert names(device="dev-c") == []
    for params in ({"limit": 1001}, {"before_id": 0}, {"since": NOW, "until": NOW},
                   {"device": "a/b"}):  # fmt: skip
        reply = api.get("/api/v1/events", **params)
        assert reply.status == 422 and isinstance(reply.body["detail"], str), params


# -- auth and the OpenAPI document ---------------------------------------------------------


def test_every_read_route_needs_a_valid_token(sqlite_url: str) -> None:
    with serving(sqlite_url) as api:
        for path in ("/api/v1/devices", "/api/v1/devices/dev-a", "/api/v1/events",
                     "/api/v1/devices/dev-a/telemetry", "/api/v1/devices/dev-a/metrics",
                     "/api/v1/releases", "/api/v1/openapi.json"):  # fmt: skip
            for token in (None, "eft_not-a-real-one"):
                reply = api.get(path, token=token)
                assert reply.status == 401, (path, token, reply.body)
                assert reply.body == {"detail": "a valid API token is needed"}
        assert api.get("/api/v1/devices").status == 200


def test_the_openapi_document_lists_the_read_routes_with_their_schemas(sqlite_url: str) -> None:
    with serving(sqlite_url) as api:
        doc = api.get("/api/v1/openapi.json").body
    paths = doc["paths"]
    for path, schema in (
        ("/api/v1/devices", "DeviceList"),
        ("/api/v1/devices/{device}", "DeviceDetail"),
        ("/api/v1/devices/{device}/telemetry", "Series"),
        ("/api/v1/devices/{device}/metrics", "MetricList"),
        ("/api/v1/events", "EventPage"),
        ("/api/v1/releases", "Releases"),
    ):
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{schema}"}, path
    schemas = doc["components"]["schemas"]
    assert {"fps", "p95_ms", "temp_c", "outbox", "update"} <= set(
        schemas["DeviceSummary"]["properties"]
    )
    assert set(schemas["Point"]["properties"]) == {"t", "min", "avg", "max", "count"}
    params = {p["name"] for p in paths["/api/v1/devices"]["get"]["parameters"]}
    assert params == {"group", "model", "version", "online", "limit", "offset"}


# -- releases ------------------------------------------------------------------------------


def publish_two(fleet: Fleet) -> None:
    """person-detector v1 (stable) and v2 (beta), signed; beside it a model whose
    index.json is damaged and one whose v1 manifest is."""
    fleet.release(1, channels=("stable",))
    fleet.release(2, channels=("beta",))
    fleet.release(1, model="torn-model")
    fleet.path(1, "manifest.json", model="torn-model").write_text('{"schema": 1}')
    damaged = fleet.registry / "broken-model"
    damaged.mkdir()
    (damaged / "index.json").write_text('{"schema": 1, "model": "broken-model", "versions": [1],')


def check_listing(body: dict[str, Any], fleet: Fleet, models: list[str]) -> None:
    from agent.verify import key_id, load_private_key

    listed = {m["model"]: m for m in body["models"]}
    assert sorted(listed) == models
    broken = listed["broken-model"]
    assert broken["error"] and "index.json" in broken["error"] and broken["versions"] == []
    (torn,) = listed["torn-model"]["versions"]
    assert torn["version"] == 1 and torn["channels"] == ["stable"]
    assert "torn-model/1/manifest.json" in torn["error"] and torn["files"] == []
    person = listed[MODEL]
    assert person["error"] is None
    assert person["channels"] == {"beta": 2, "stable": 1}
    keyid = key_id(load_private_key(fleet.key))
    assert person["index_signed_by"] == [keyid] and person["index_version"] == 2
    v2, v1 = person["versions"]
    assert (v2["version"], v2["channels"], v1["version"], v1["channels"]) == (
        2, ["beta"], 1, ["stable"],
    )  # fmt: skip
    manifest = (fleet.registry / MODEL / "1" / "manifest.json").read_text()
    assert v1["created"] in manifest and v1["task"] == "detection"
    assert v1["signed_by"] == [keyid]
    assert (v1["selftest"], v1["budget"]) == (False, False)  # publish_two adds neither
    model_file = next(f for f in v1["files"] if f["role"] == "model")
    assert model_file["size"] == 200_000 and model_file["sha256"] in manifest
    assert v1["size"] == sum(f["size"] for f in v1["files"])


def test_releases_are_read_from_a_registry_folder(sqlite_url: str, fleet: Fleet) -> None:
    publish_two(fleet)
    with serving(sqlite_url, registry=str(fleet.registry)) as api:
        reply = api.get("/api/v1/releases")
        assert reply.status == 200, reply.body
        check_listing(reply.body, fleet, ["broken-model", MODEL, "torn-model"])


def test_releases_over_http_list_the_models_devices_run_and_are_cached(
    db_url: str, fleet: Fleet
) -> None:
    publish_two(fleet)
    with RegistryServer(fleet.registry) as registry, serving(db_url, registry.url) as api:
        with api.engine.begin() as conn:
            upsert_device(conn, "dev-a", NOW, state=state(MODEL, 1))
            upsert_device(conn, "dev-b", NOW, state=state("broken-model", 1))
            upsert_device(conn, "dev-c", NOW, state=state("torn-model", 1))
        reply = api.get("/api/v1/releases")
        assert reply.status == 200, reply.body
        check_listing(reply.body, fleet, ["broken-model", MODEL, "torn-model"])
        fetched = len(registry.log)
        assert fetched >= 6  # two indexes, their signatures, two manifests, …
        again = api.get("/api/v1/releases")
        assert again.body == reply.body and len(registry.log) == fetched  # cached


def test_releases_without_or_with_an_unreachable_registry_are_503(
    sqlite_url: str, tmp_path: Path
) -> None:
    with serving(sqlite_url) as api:
        reply = api.get("/api/v1/releases")
    assert reply.status == 503
    assert "no registry configured" in reply.body["detail"]
    with serving(sqlite_url, registry="http://127.0.0.1:1/") as api:
        with api.engine.begin() as conn:
            upsert_device(conn, "dev-a", NOW, state=state("colours", 1))
        reply = api.get("/api/v1/releases")
    assert reply.status == 503
    assert "registry unavailable" in reply.body["detail"]
    assert "connection refused" in reply.body["detail"]
    with serving(sqlite_url, registry=str(tmp_path / "nowhere")) as api:
        reply = api.get("/api/v1/releases")
    assert reply.status == 503 and "nowhere" in reply.body["detail"]


def test_the_deploy_history_is_filtered_newest_first(db_url: str) -> None:
    from agent.server.schema import deploys

    rows = [
        ("d1", 100.0, "ops", "device", "cam-1", "colours", 2, None),
        ("d2", 200.0, "ops", "group", "door", "colours", 3, None),
        ("r1:a", 300.0, "ops", "device", "cam-2", "colours", 3, "r1"),
        ("d3", 400.0, "ops", "device", "cam-1", "faces", 1, None),
    ]
    with serving(db_url) as api:
        with api.engine.begin() as conn:
            for id_, created, who, kind, target, model, version, rollout in rows:
                conn.execute(
                    deploys.insert().values(
                        id=id_, created=created, who=who, target_kind=kind, target=target,
                        model=model, version=version, rollout_id=rollout,
                        desired={"issued_at": created, "keyid": "k", "signature": "s"},
                    )
                )  # fmt: skip

        def ids(**params: Any) -> list[str]:
            reply = api.get("/api/v1/deploys", **params)
            assert reply.status == 200, reply.body
            return [d["id"] for d in reply.body["deploys"]]

        assert ids() == ["d3", "r1:a", "d2", "d1"]
        assert ids(device="cam-1") == ["d3", "d1"]
        assert ids(group="door") == ["d2"]
        assert ids(model="colours", limit=2) == ["r1:a", "d2"]
        assert ids(rollout="r1") == ["r1:a"]
        assert ids(since=200, until=300) == ["r1:a", "d2"]
        first = api.get("/api/v1/deploys", device="cam-2").body["deploys"][0]
        assert first == {
            "id": "r1:a", "created": 300.0, "who": "ops", "target": "device:cam-2",
            "model": "colours", "version": 3, "issued_at": 300.0, "signed": True,
            "rollout_id": "r1",
        }  # fmt: skip
        for bad in ({"device": "a", "group": "b"}, {"since": 5, "until": 1}, {"limit": 0}):
            reply = api.get("/api/v1/deploys", **bad)
            assert reply.status == 422 and isinstance(reply.body["detail"], str), (bad, reply)
        assert api.get("/api/v1/deploys", token=None).status == 401
