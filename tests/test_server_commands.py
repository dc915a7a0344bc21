"""``POST /api/v1/devices/{device}/commands/{name}``: a real agent (``edge-agent run``) on
a real mosquitto answers ping, check-updates, rollback, logs and diagnostics through the
real ingester and the app on a real uvicorn; a device's 64 KiB logs reply and a
diagnostics reply with a large config are stored and found whole; refusals (offline 409
with nothing published, viewer 403, unknown name or snapshot 422, logs lines out of
range 422, unknown device 404, a device that never answers 504 within the bound, too
many waiting 429, broker away 503) and the audit rows; tables for the pure rules."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent import __version__
from agent.diagnostics import LOGS_MAX_BYTES
from agent.fleet.broker import BrokerOptions, FleetBroker
from agent.fleet.reports import MAX_BYTES
from agent.logring import LINE_MAX_CHARS, LogRing
from agent.server.api import commands
from agent.server.api.commands import CommandProblem, CommandRequest
from agent.server.app import create_app
from agent.server.auth import create_token
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.inbound import Inbound, Malformed, read
from agent.server.ingest import Ingester, IngestOptions
from agent.server.schema import audit, devices, events
from agent.server.store import upsert_device
from tests.agentproc import AgentProcess, Tap, publish_models
from tests.broker import Mosquitto, wait_until
from tests.conftest import Models
from tests.serverhttp import Reply, call, running

WAIT_S = 30.0


# -- the pure rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("ping", b"", CommandRequest("ping")),
        ("ping", b"  {} ", CommandRequest("ping")),
        ("check-updates", b"{}", CommandRequest("check-updates")),
        ("rollback", b"", CommandRequest("rollback")),
        ("rollback", b'{"version": 3}', CommandRequest("rollback", {"version": 3})),
        ("logs", b"", CommandRequest("logs")),
        ("logs", b'{"lines": 1}', CommandRequest("logs", {"lines": 1})),
        ("logs", b'{"lines": 500}', CommandRequest("logs", {"lines": 500})),
        ("diagnostics", b"{}", CommandRequest("diagnostics")),
        ("reboot", b"", "unknown command 'reboot'; known: ping, rollback, check-updates, logs, "
         "diagnostics"),
        ("snapshot", b"", "unknown command 'snapshot'"),  # deliberately not sent: docs
        ("logs", b'{"lines": 0}', "lines: must be an integer from 1 to 500"),
        ("logs", b'{"lines": 501}', "lines: must be an integer from 1 to 500"),
        ("logs", b'{"lines": "5"}', "lines: must be an integer from 1 to 500"),
        ("logs", b'{"lines": true}', "lines: must be an integer from 1 to 500"),
        ("logs", b'{"lines": 5.0}', "lines: must be an integer from 1 to 500"),
        ("logs", b'{"version": 1}', "logs takes lines; not version"),
        ("diagnostics", b'{"lines": 5}', "diagnostics takes no arguments; not lines"),
        ("rollback", b'{"lines": 5}', "rollback takes version; not lines"),
        ("ping", b'{"version": 3}', "ping takes no arguments; not version"),
        ("rollback", b'{"version": 0}', "version: '0' is not a positive integer"),
        ("rollback", b'{"version": true}', "version: 'True' is not a positive integer"),
        ("rollback", b'{"version": "2"}', "version: '2' is not a positive integer"),
        ("rollback", b'{"version": 2147483648}', "is not a positive integer"),
        ("rollback", b'{"to": 2}', "rollback takes version; not to"),
        ("ping", b"[1]", "body: a JSON object is needed"),
        ("ping", b"{", "body: not JSON"),
        ("ping", b"[" * 5000, "bytes, over 1024"),
    ],
)  # fmt: skip
def test_parse_command(name: str, body: bytes, expected: CommandRequest | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(CommandProblem, match=None) as caught:
            commands.parse_command(name, body)
        assert expected in str(caught.value)
        assert "\n" not in str(caught.value)
    else:
        assert commands.parse_command(name, body) == expected


@pytest.mark.parametrize(
    ("rows", "found"),
    [
        ([], None),
        ([{"request_id": "x", "ok": True}], None),  # another request's
        ([{"request_id": "r1", "ok": "yes"}], None),  # not a reply's shape
        ([{"request_id": "r1"}], None),
        ([{"request_id": "x", "ok": True}, {"request_id": "r1", "ok": False, "error": "no"}], 1),
        ([{"request_id": "r1", "ok": True}, {"request_id": "r1", "ok": False}], 0),  # the first
    ],
)
def test_find_reply(rows: list[dict[str, Any]], found: int | None) -> None:
    expected = rows[found] if found is not None else None
    assert commands.find_reply(rows, "r1") == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"ok": True, "result": {"pong": True}}, {"ok": True, "result": {"pong": True}}),
        ({"ok": True, "result": "odd"}, {"ok": True, "result": {}}),
        ({"ok": False, "error": "busy"}, {"ok": False, "error": "busy"}),
        ({"ok": False, "error": 3}, {"ok": False, "error": "refused (no reason given)"}),
    ],
)
def test_answer(reply: dict[str, Any], expected: dict[str, Any]) -> None:
    out = commands.answer("dev-a", CommandRequest("ping"), "r1", reply)
    assert out == {"device": "dev-a", "command": "ping", "request_id": "r1", **expected}


@pytest.mark.parametrize(
    ("name", "result", "kept"),
    [
        ("ping", {"pong": True, "version": 2}, {"pong": True, "version": 2}),
        ("logs", {"lines": ["a", "b"], "count": 2, "truncated": False},
         {"count": 2, "truncated": False}),
        ("logs", {}, {"count": None, "truncated": None}),
        ("diagnostics", {"versions": {"agent": "1.2.0"}, "config": {"mqtt": {}}},
         {"agent": "1.2.0"}),
        ("diagnostics", {"versions": "odd"}, {"agent": None}),
        ("diagnostics", {"versions": {"agent": 7}}, {"agent": None}),
    ],
)  # fmt: skip
def test_the_audit_keeps_logs_and_diagnostics_results_short(
    name: commands.Command, result: dict[str, Any], kept: dict[str, Any]
) -> None:
    assert commands.audit_result(name, result) == kept


def full_ring(count: int, chars: int) -> LogRing:
    """A log ring holding ``count`` lines of ``chars`` characters (the agent's ring cuts
    each at LINE_MAX_CHARS), the last one with an escape sequence."""
    ring = LogRing()
    for n in range(count):
        text = f"line {n} " + "x" * chars + ("\x1b[2J" if n == count - 1 else "")
        ring.emit(logging.makeLogRecord({"msg": text, "levelname": "INFO"}))
    return ring


def logs_reply(request_id: str, ring: LogRing) -> dict[str, Any]:
    """The reply the agent's ``logs`` sends for 500 lines of ``ring``."""
    lines, cut = ring.tail(500, LOGS_MAX_BYTES)
    result = {"lines": lines, "count": len(lines), "truncated": cut}
    return {"command": "logs", "ok": True, "request_id": request_id, "result": result}


def diagnostics_reply(request_id: str) -> dict[str, Any]:
    """A diagnostics reply whose config is near the agent's 128 KiB bound."""
    config = {"groups": {f"g{n}": {"note": f"{n} " + "y" * 900} for n in range(130)}}
    result = {
        "versions": {"agent": "9.9.9", "python": "3.11.2", "libedgetpu": None},
        "config": config,
        "store": {"model": "colours", "active": 1, "releases": [{"version": 1}]},
        "outbox": {"depth": 0},
        "mqtt": {"connected": True},
    }
    return {"command": "diagnostics", "ok": True, "request_id": request_id, "result": result}


def test_a_64_kib_logs_reply_and_a_large_diagnostics_reply_are_read_whole() -> None:
    ring = full_ring(500, 5000)
    logs = json.dumps(logs_reply("r1", ring)).encode()
    assert LOGS_MAX_BYTES - 5000 < len(logs) < LOGS_MAX_BYTES + 1024
    got = read("edge", "edge/cam-1/reply", logs)
    assert isinstance(got, Inbound) and got.stream == "reply"
    lines = got.doc["result"]["lines"]
    assert len(lines) == 15 and got.doc["result"]["truncated"] is True
    assert all(len(line) == LINE_MAX_CHARS + len(" …(cut)") for line in lines)
    assert lines == logs_reply("r1", ring)["result"]["lines"]  # not cut to 1,000 characters

    diagnostics = json.dumps(diagnostics_reply("r2")).encode()
    assert 100 * 1024 < len(diagnostics) < MAX_BYTES
    got = read("edge", "edge/cam-1/reply", diagnostics)
    assert isinstance(got, Inbound)
    assert got.doc["result"] == diagnostics_reply("r2")["result"]

    hostile = read(
        "edge", "edge/cam-1/reply", b'{"command":"logs","ok":true,"x":"' + b"z" * MAX_BYTES + b'"}'
    )
    assert isinstance(hostile, Malformed) and hostile.reason == "too_large"
    escaped = read(
        "edge", "edge/cam-1/reply", json.dumps({**logs_reply("r3", full_ring(2, 10))}).encode()
    )
    assert isinstance(escaped, Inbound)
    assert escaped.doc["result"]["lines"][-1].endswith("\\x1b[2J")  # printable, not ESC


def test_payload_carries_the_request_id_and_the_arguments() -> None:
    sent = commands.payload("r1", CommandRequest("rollback", {"version": 2}))
    assert json.loads(sent) == {"id": "r1", "version": 2}


# -- a fleet: ingester, publisher, the app -------------------------------------------------


@dataclass
class Fleet:
    url: str
    engine: sa.Engine
    operator: str
    viewer: str
    publisher: FleetBroker

    def post(self, device: str, name: str, body: Any = None, wait: int | None = None) -> Reply:
        query = f"?wait={wait}" if wait is not None else ""
        path = f"/api/v1/devices/{device}/commands/{name}{query}"
        return call("POST", self.url + path, token=self.operator, body=body, timeout=40)

    def audit(self) -> list[tuple[str, str | None, str, dict[str, Any]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit.c.action, audit.c.target, audit.c.outcome, audit.c.detail)
                .where(audit.c.action == "device.command")
                .order_by(audit.c.id)
            )
            return [(r.action, r.target, r.outcome, r.detail) for r in rows]

    def device(self, device: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(devices).where(devices.c.id == device)).first()


def seed(engine: sa.Engine, device: str, online: bool) -> None:
    """A device the database knows, online or not, with no agent behind it."""
    with engine.begin() as conn:
        state = "online" if online else "offline"
        upsert_device(conn, device, time.time(), status={"state": state, "groups": ["lab"]})


@contextmanager
def fleet(broker: Mosquitto, db_url: str) -> Iterator[Fleet]:
    engine = open_database(db_url)
    options = ServeOptions(db_url, BrokerOptions(broker.url), IngestOptions("srv-a"))
    ingester = Ingester(engine, options.broker, options.ingest)
    ingester.start()
    publisher = FleetBroker(BrokerOptions(broker.url))
    try:
        assert ingester.wait_connected(WAIT_S)
        publisher.connect()
        with engine.begin() as conn:
            operator = create_token(conn, "olga", "operator", time.time())
            viewer = create_token(conn, "alice", "viewer", time.time())
        with running(create_app(Server(options, engine, publisher))) as url:
            yield Fleet(url, engine, operator, viewer, publisher)
    finally:
        publisher.close()
        ingester.stop()
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def start_agent(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess], device: str
) -> AgentProcess:
    """A real agent on the colour classifier from a file registry (no polling of its own:
    only check-updates reads the channel)."""
    settings = {
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        "telemetry": {"interval_s": 0.5},
    }
    agent = AgentProcess(tmp_path / device, device, settings).start()
    agents.append(agent)
    return agent


def wait_version(site: Fleet, agent: AgentProcess, version: int) -> None:
    def reported() -> bool:
        row = site.device(agent.device_id)
        return row is not None and row.online and row.version == version

    deadline = time.monotonic() + 60
    while not reported():
        assert agent.alive(), agent.log()[-3000:]
        assert time.monotonic() < deadline, f"v{version} not reported\n{agent.log()[-3000:]}"
        time.sleep(0.1)


# -- a real agent -------------------------------------------------------------------------


def test_a_real_agent_answers_ping_check_updates_and_rollback(
    tmp_path: Path,
    broker: Mosquitto,
    registry: Path,
    models: Models,
    agents: list[AgentProcess],
    sqlite_url: str,
) -> None:
    with fleet(broker, sqlite_url) as site:
        agent = start_agent(tmp_path, broker, registry, agents, "dev-a")
        wait_version(site, agent, 1)
        pong = site.post("dev-a", "ping")
        assert pong.status == 200, pong.body
        assert pong.body["device"] == "dev-a" and pong.body["command"] == "ping"
        assert pong.body["ok"] is True and len(pong.body["request_id"]) == 16
        result = pong.body["result"]
        assert result["pong"] is True and result["model"] == "colours"
        assert result["version"] == 1 and result["phase"] in ("idle", "probation")

        publish_models(registry, models.root, (2,))
        checked = site.post("dev-a", "check-updates", {})
        assert checked.status == 200, checked.body
        assert checked.body["result"] == {"version": 2, "changed": True}
        wait_version(site, agent, 2)
        assert wait_until(lambda: _succeeded(site), WAIT_S), "v2 did not pass its probation"

        back = site.post("dev-a", "rollback", {"version": 1})
        assert back.status == 200, back.body
        assert back.body["ok"] is True and back.body["result"] == {"version": 1, "from": 2}
        wait_version(site, agent, 1)  # the agent reports v1 again

        refused = site.post("dev-a", "rollback", {"version": 9})
        assert refused.status == 200 and refused.body["ok"] is False
        assert refused.body["error"]  # the device's own words
        outcomes = [(a[2], a[3]["name"], a[3]["args"]) for a in site.audit()]
        assert outcomes == [
            ("ok", "ping", {}),
            ("ok", "check-updates", {}),
            ("ok", "rollback", {"version": 1}),
            ("refused", "rollback", {"version": 9}),
        ]
        assert all(a[1] == "device:dev-a" for a in site.audit())
        assert site.audit()[0][3]["request_id"] == pong.body["request_id"]


def test_a_real_agent_answers_logs_and_diagnostics(
    tmp_path: Path,
    broker: Mosquitto,
    registry: Path,
    agents: list[AgentProcess],
    sqlite_url: str,
) -> None:
    with fleet(broker, sqlite_url) as site:
        agent = start_agent(tmp_path, broker, registry, agents, "dev-a")
        wait_version(site, agent, 1)
        logs = site.post("dev-a", "logs", {"lines": 500})
        assert logs.status == 200, logs.body
        result = logs.body["result"]
        assert result["count"] == len(result["lines"]) > 0 and result["truncated"] is False
        assert any("ready: " in line for line in result["lines"]), result["lines"]
        few = site.post("dev-a", "logs", {"lines": 2})
        assert few.status == 200 and few.body["result"]["count"] == 2

        diagnostics = site.post("dev-a", "diagnostics")
        assert diagnostics.status == 200, diagnostics.body
        result = diagnostics.body["result"]
        assert result["versions"]["agent"] == __version__
        assert result["versions"]["python"].count(".") == 2
        store = result["store"]
        assert store["model"] == "colours" and store["active"] == 1
        assert [(r["version"], r["active"]) for r in store["releases"]] == [(1, True)]
        assert result["config"]["device"]["id"] == "dev-a"
        assert result["mqtt"]["connected"] is True and "depth" in result["outbox"]

        audited = [(a[2], a[3]["name"], a[3]["args"], a[3]["result"]) for a in site.audit()]
        assert audited == [
            ("ok", "logs", {"lines": 500}, {"count": len(logs.body["result"]["lines"]),
                                            "truncated": False}),
            ("ok", "logs", {"lines": 2}, {"count": 2, "truncated": False}),
            ("ok", "diagnostics", {}, {"agent": __version__}),
        ]  # fmt: skip


class Responder(Tap):
    """A fake device ``ghost``: answers ``logs`` with the 64 KiB a full ring gives and
    ``diagnostics`` with a config near the agent's bound, as the agent would."""

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(client, userdata, msg)
        request_id = json.loads(msg.payload)["id"]
        if msg.topic.endswith("/cmd/logs"):
            reply = logs_reply(request_id, full_ring(500, 5000))
        else:
            reply = diagnostics_reply(request_id)
        client.publish("edge/ghost/reply", json.dumps(reply), qos=1)


def test_a_64_kib_logs_reply_and_a_large_diagnostics_reply_are_stored_and_found(
    broker: Mosquitto, sqlite_url: str
) -> None:
    device = Responder("127.0.0.1", broker.port, ["edge/ghost/cmd/#"])
    try:
        with fleet(broker, sqlite_url) as site:
            seed(site.engine, "ghost", online=True)
            logs = site.post("ghost", "logs", {"lines": 500})
            assert logs.status == 200, logs.text[:300]
            expected = logs_reply("", full_ring(500, 5000))["result"]
            assert logs.body["result"] == expected and len(logs.text) > LOGS_MAX_BYTES - 5000
            diagnostics = site.post("ghost", "diagnostics")
            assert diagnostics.status == 200, diagnostics.text[:300]
            assert diagnostics.body["result"] == diagnostics_reply("")["result"]
            with site.engine.connect() as conn:
                stored = (
                    conn.execute(sa.select(events.c.fields).where(events.c.event == "reply"))
                    .scalars()
                    .all()
                )
            assert [f["command"] for f in stored] == ["logs", "diagnostics"]
    finally:
        device.close()


def _succeeded(site: Fleet) -> bool:
    with site.engine.connect() as conn:
        names = conn.execute(
            sa.select(events.c.event).where(events.c.device == "dev-a", events.c.version == 2)
        )
        return "update_succeeded" in set(names.scalars())


# -- refusals -----------------------------------------------------------------------------


def test_refusals_publish_nothing_and_a_silent_device_times_out_within_the_bound(
    broker: Mosquitto, db_url: str
) -> None:
    tap = Tap("127.0.0.1", broker.port, ["edge/+/cmd/#"])
    try:
        with fleet(broker, db_url) as site:
            seed(site.engine, "gone", online=False)
            seed(site.engine, "ghost", online=True)
            offline = site.post("gone", "ping")
            assert offline.status == 409
            assert offline.body["detail"] == "gone is offline: commands are not queued for it"
            viewer = call(
                "POST", site.url + "/api/v1/devices/ghost/commands/ping", token=site.viewer
            )
            assert viewer.status == 403
            nobody = call("POST", site.url + "/api/v1/devices/ghost/commands/ping")
            assert nobody.status == 401
            doc = call("GET", site.url + "/api/v1/openapi.json", token=site.viewer).body
            assert "/api/v1/devices/{device}/commands/{name}" in doc["paths"]
            unknown = site.post("ghost", "reboot")
            assert unknown.status == 422 and "known: ping, rollback, check-updates" in unknown.text
            assert site.post("ghost", "ping", {"version": 1}).status == 422
            assert site.post("nobody", "ping").status == 404
            assert site.post("ghost", "ping", wait=0).status == 422
            assert site.post("ghost", "ping", wait=31).status == 422
            for name, body in (("logs", {"lines": 0}), ("logs", {"lines": 501}),
                               ("logs", {"lines": "all"}), ("diagnostics", {"lines": 5}),
                               ("snapshot", {})):  # fmt: skip
                refused = site.post("ghost", name, body)
                assert refused.status == 422, (name, body, refused.body)
                if body.get("lines") in (0, 501, "all"):
                    assert refused.body["detail"] == "lines: must be an integer from 1 to 500"
            time.sleep(0.3)
            assert tap.messages == []  # nothing published for any of them

            started = time.monotonic()
            silent = site.post("ghost", "rollback", {"version": 2}, wait=1)
            took = time.monotonic() - started
            assert silent.status == 504 and "may still run" in silent.body["detail"]
            assert 1.0 <= took < 3.0
            tap.wait(lambda: len(tap.docs("/ghost/cmd/rollback")) == 1, 5, "the command")
            sent = tap.docs("/ghost/cmd/rollback")[0]
            assert sent["version"] == 2 and len(sent["id"]) == 16
            assert not any(retained for _, _, retained in tap.messages)

            rows = site.audit()
            assert [(r[1], r[2]) for r in rows] == [
                ("device:gone", "refused"),
                ("device:ghost", "invalid"),
                ("device:ghost", "invalid"),
                ("device:nobody", "invalid"),
                *[("device:ghost", "invalid")] * 5,
                ("device:ghost", "timeout"),
            ]
            assert rows[0][3]["reason"] == "offline"
            assert rows[-1][3]["request_id"] == sent["id"]
    finally:
        tap.close()


def test_too_many_waiting_commands_get_429_and_a_broker_away_503(
    broker: Mosquitto, sqlite_url: str
) -> None:
    with fleet(broker, sqlite_url) as site:
        seed(site.engine, "ghost", online=True)
        answers: list[int] = []
        lock = threading.Lock()

        def ask() -> None:
            status = site.post("ghost", "ping", wait=2).status
            with lock:
                answers.append(status)

        threads = [threading.Thread(target=ask) for _ in range(commands.MAX_WAITING + 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert sorted(answers) == [429, 429] + [504] * commands.MAX_WAITING
        assert site.post("ghost", "ping", wait=1).status == 504  # the places are free again

        broker.stop()
        assert wait_until(lambda: not site.publisher.client.is_connected(), 10)
        away = site.post("ghost", "ping", wait=1)
        assert away.status == 503 and away.body["detail"].startswith("not sent: ")
        outcomes = [r[2] for r in site.audit()]
        assert outcomes.count("refused") == 2 and outcomes[-1] == "failed"
