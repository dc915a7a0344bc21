"""The fleet server's acceptance, with real processes only: ``edge-fleet serve`` against a
real mosquitto, real agents (``edge-agent run``, a synthetic source) pulling from an
HTTP registry that the real ``publish`` filled with v1 and v2, desired states signed
with the server's ``--sign-key`` and checked by the agents' ``desired_public_key``.

- tokens of both roles from ``edge-fleet token``: the viewer reads everything and is
  refused (403) every action; the operator rolls v2 out over the API;
- the server is stopped with SIGTERM after the canary succeeded and started again
  with the same database and client id: the rollout resumes without re-running a
  finished step and succeeds, every agent runs v2; ``edge-fleet rollout --server``
  then takes the group back to v1;
- hostile device messages are counted as malformed in /healthz and /metrics, a later
  valid one is stored, and no request answers 500;
- two ``serve`` processes on one PostgreSQL in one share group: the one driving a
  rollout is killed with SIGKILL, the other takes its lease and finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.publish import publish
from agent.fleet.rollout import plan
from agent.server import lease
from agent.server.db import open_database
from agent.server.schema import deploys, rollouts
from agent.verify import generate_keypair
from tests.agentproc import MODEL, AgentProcess, publish_models
from tests.broker import Collector, Mosquitto, SecureBroker, subscriber, wait_until
from tests.conftest import Models
from tests.postgres import Postgres
from tests.registry_server import RegistryServer
from tests.serverhttp import Reply, call
from tests.test_server_ingest import DEEP, dumps, event
from tests.test_server_rollouts import FakeDevice
from tests.test_server_serve import PROMTOOL, Serve, new_token, serving

GROUP = "lab"
DEVICES = ("acc-1", "acc-2", "acc-3", "acc-4")
HUB = "hub"
START_S = 30.0


@pytest.fixture
def registry_server(tmp_path: Path, models: Models) -> Iterator[RegistryServer]:
    """v1 on the channel stable (what the agents start on), v2 on no channel (it reaches
    a device only through a desired state)."""
    registry = tmp_path / "registry"
    publish_models(registry, models.root, (1,))
    publish(
        [models.root / "v2.tflite"], model=MODEL, version=2, registry=registry,
        task="classification", labels=models.labels,
    )  # fmt: skip
    with RegistryServer(registry) as server:
        yield server


def _agent(root: Path, device: str, broker: Mosquitto, registry: str, pub: Path) -> AgentProcess:
    settings = {
        "device": {"id": device, "groups": [GROUP]},
        "registry": {"url": registry, "poll_interval_s": 3600},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 8},
        "telemetry": {"interval_s": 0.5},
        "update": {"probation_s": 1, "budget_runs": 5, "desired_public_key": str(pub)},
    }
    return AgentProcess(root / device, device, settings).start()


def _ok(reply: Reply, status: int = 200) -> Any:
    assert reply.status == status, (reply.status, reply.body)
    return reply.body


def _post(serve: Serve, path: str, token: str, body: Any) -> Reply:
    return call("POST", f"{serve.url}{path}", token=token, body=body)


def _versions(serve: Serve, token: str) -> dict[str, Any]:
    listed = _ok(serve.get(f"/api/v1/devices?group={GROUP}", token))
    return {d["id"]: (d["version"], d["online"]) for d in listed["devices"]}


def _wait_rollout(serve: Serve, token: str, rollout_id: str, done: Any, timeout: float) -> Any:
    """Poll the rollout over the API until ``done(view)``; fail with the last view."""
    view: Any = None

    def check() -> bool:
        nonlocal view
        reply = serve.get(f"/api/v1/rollouts/{rollout_id}", token)
        view = reply.body if reply.status == 200 else view
        return view is not None and bool(done(view))

    assert wait_until(check, timeout), f"{json.dumps(view)[:3000]}\n{serve.log()[-3000:]}"
    return view


def _rollout_deploys(db: str, rollout_id: str) -> list[tuple[str, str, float]]:
    """(kind, target, issued_at) of every desired state the rollout published."""
    engine = open_database(db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(deploys.c.target_kind, deploys.c.target, deploys.c.desired)
                .where(deploys.c.rollout_id == rollout_id)
                .order_by(deploys.c.created)
            ).all()
    finally:
        engine.dispose()
    return [(r.target_kind, r.target, r.desired["issued_at"]) for r in rows]


def _rollout_row(db: str, rollout_id: str) -> dict[str, Any]:
    engine = open_database(db)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).one()
    finally:
        engine.dispose()
    return dict(row._mapping)


def _promtool(text: str) -> None:
    if PROMTOOL is None:
        return
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


PROBE = "acceptance_probe"  # an event name this agent does not know: kept (forward compatible)


def _hostile(client: Collector, device: str, *more: tuple[str, bytes]) -> list[str]:
    """Publish hostile messages on ``device``'s topics, and ``more``, between two valid
    events (probe ``first`` and ``last``); one more reuses ``first``'s id (probe
    ``forged``). The broker's answers (PUBACK reasons), in order."""
    first, last = event(PROBE, probe="first"), event(PROBE, probe="last")
    forged = {**event(PROBE, probe="forged"), "id": first["id"]}
    bad: list[tuple[str, bytes]] = [
        (f"edge/{device}/events", dumps(first)),
        (f"edge/{device}/events", b"not json"),
        (f"edge/{device}/events", b"\xff\xfe\x00"),
        (f"edge/{device}/events", DEEP),
        (f"edge/{device}/events", b'{"x":"' + b"a" * 300_000 + b'"}'),
        (f"edge/{device}/events", dumps({**event(), "ts": "yesterday"})),
        (f"edge/{device}/state", dumps({"schema": 1, "version": "2; rm -rf /"})),
        (f"edge/{device}/telemetry", dumps({**event(), "\x1b[31m": 1})),
        (f"edge/{device}/events", dumps({**event(), "id": "x" * 65})),
        (f"edge/{device}/events", dumps(forged)),
        *more,
        (f"edge/{device}/events", dumps(last)),
    ]
    try:
        return [client.publish(topic, payload) for topic, payload in bad]
    finally:
        client.close()


def _assert_counted(serve: Serve, token: str) -> dict[str, int]:
    """Every hostile kind of :func:`_hostile` is counted in /healthz and /metrics (which
    promtool accepts); the instance stays healthy. The malformed counts."""
    health = _ok(serve.health())
    malformed: dict[str, int] = health["ingest"]["malformed"]
    assert malformed["not_json"] >= 2 and malformed["too_deep"] >= 1, health
    assert malformed["too_large"] >= 1 and malformed["contract"] >= 3, health
    assert malformed["key"] >= 1 and health["ingest"]["duplicates"] >= 1, health
    assert health["status"] == "ok", health
    scraped = _ok(serve.get("/metrics", token))
    _promtool(scraped)
    for result in ("not_json", "too_deep", "too_large", "contract", "key"):
        line = f'edge_fleet_ingest_messages_total{{result="malformed_{result}"}}'
        assert f"{line} 0.0" not in scraped and line in scraped, result
    return malformed


def _probes(serve: Serve, token: str, device: str) -> list[str]:
    reply = serve.get(f"/api/v1/events?device={device}&event={PROBE}", token)
    return sorted(e["fields"]["probe"] for e in _ok(reply)["events"])


def test_serve_with_real_agents_roles_a_restart_mid_rollout_and_hostile_messages(
    tmp_path: Path,
    broker: Mosquitto,
    registry_server: RegistryServer,
    agents: list[AgentProcess],
) -> None:
    key, pub = generate_keypair(tmp_path / "keys", "deploy")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    ops = new_token(db, "ops", "operator")
    eyes = new_token(db, "grafana", "viewer")
    extra = ("--client-id", HUB, "--sign-key", str(key), "--registry", registry_server.url)
    with serving(tmp_path, broker, db, *extra) as first:
        first.wait_health(200, START_S)
        for device in DEVICES:
            agents.append(_agent(tmp_path, device, broker, registry_server.url, pub))
        everyone = {d: (1, True) for d in DEVICES}
        assert wait_until(lambda: _versions(first, eyes) == everyone, 90), (
            _versions(first, eyes),
            agents[0].log()[-2000:],
        )

        # the viewer reads everything, and may do nothing
        one = _ok(first.get(f"/api/v1/devices/{DEVICES[0]}", eyes))
        assert one["groups"] == [GROUP] and one["state"]["version"] == 1
        assert wait_until(
            lambda: first.get(f"/api/v1/devices/{DEVICES[0]}/telemetry?step=10", eyes).body[
                "points"
            ],
            20,
        )
        assert _ok(first.get(f"/api/v1/events?device={DEVICES[0]}", eyes))["events"]
        releases = _ok(first.get("/api/v1/releases", eyes))["models"]
        assert [(m["model"], [v["version"] for v in m["versions"]]) for m in releases] == [
            (MODEL, [2, 1])
        ]
        assert _ok(first.get("/api/v1/rollouts", eyes)) == {"rollouts": []}
        wanted = {"model": MODEL, "version": 2, "group": GROUP}
        for path, body in (("/api/v1/deploy", wanted), ("/api/v1/rollouts", wanted)):
            refused = _post(first, path, eyes, body)
            assert refused.status == 403 and "viewer" in refused.body["detail"], refused.body
        assert first.get("/api/v1/audit", eyes).status == 403
        assert first.get("/api/v1/devices").status == 401

        # the operator rolls v2 out: a canary, then two steps of half the group
        made = _ok(
            _post(first, "/api/v1/rollouts", ops,
                  {**wanted, "canary_pct": 10, "step_pct": 50, "timeout_s": 60}),
            201,
        )  # fmt: skip
        rollout_id = made["id"]
        canary = plan(DEVICES, GROUP, 10, 50)[0]
        assert [d["device"] for d in made["steps"][0]["devices"]] == list(canary)
        again = _post(first, "/api/v1/rollouts", ops, wanted)
        assert again.status == 409 and rollout_id in again.body["detail"]
        busy = _post(first, "/api/v1/deploy", ops, wanted)
        assert busy.status == 409, busy.body
        view = _wait_rollout(
            first, eyes, rollout_id, lambda v: v["steps"][0]["status"] == "succeeded", 60
        )
        assert first.stop() == 0  # SIGTERM mid-rollout
        canary_before = view["steps"][0]
        deploys_before = _rollout_deploys(db, rollout_id)
        left = _rollout_row(db, rollout_id)
        assert left["status"] == "running", left  # stopped mid-way: the rest is the next one's
        assert "Traceback" not in first.log()

    with serving(tmp_path, broker, db, *extra) as second:
        second.wait_health(200, START_S)
        view = _wait_rollout(
            second, eyes, rollout_id, lambda v: v["status"] in ("succeeded", "halted"), 90
        )
        assert view["status"] == "succeeded", view
        assert [s["status"] for s in view["steps"]] == ["succeeded"] * 3
        assert view["steps"][0] == canary_before  # the finished canary was not run again
        for step in view["steps"]:
            for device in step["devices"]:
                assert device["status"] == "succeeded" and device["seconds"] is not None
        sent = _rollout_deploys(db, rollout_id)
        assert sent[: len(deploys_before)] == deploys_before
        per_device = [target for kind, target, _ in sent if kind == "device"]
        assert sorted(per_device) == sorted(DEVICES), sent  # each device's desired state once
        assert [(kind, target) for kind, target, _ in sent if kind == "group"] == [("group", GROUP)]
        everyone = {d: (2, True) for d in DEVICES}
        assert wait_until(lambda: _versions(second, eyes) == everyone, 20), _versions(second, eyes)

        # hostile messages on a device's topics: counted, skipped, ingestion goes on
        hostile = subscriber(broker.url, [], client_id=f"hostile-{DEVICES[0]}")
        _hostile(hostile, DEVICES[0], ("edge/" + "d" * 200 + "/events", dumps(event())))
        assert wait_until(lambda: _probes(second, eyes, DEVICES[0]) == ["first", "last"], 20), (
            f"{_probes(second, eyes, DEVICES[0])}: {json.dumps(second.health().body)}"
        )
        assert _assert_counted(second, eyes)["topic"] >= 1  # an id longer than the column
        scraped = _ok(second.get("/metrics", eyes))
        assert f'edge_fleet_devices{{model="{MODEL}",online="true",version="2"}} 4.0' in scraped
        assert 'edge_fleet_update_outcomes_total{outcome="succeeded"} 0.0' not in scraped
        for path in (
            "/api/v1/devices",
            f"/api/v1/devices/{DEVICES[0]}",
            f"/api/v1/devices/{DEVICES[0]}/telemetry",
            f"/api/v1/devices/{DEVICES[0]}/metrics",
            "/api/v1/events?limit=1000",
            f"/api/v1/rollouts/{rollout_id}",
        ):
            assert second.get(path, eyes).status == 200, path
        hostile_requests = [  # answered 4xx, one line of detail; never a 500
            ("GET", f"/api/v1/devices/{'x' * 5000}", None),
            ("GET", "/api/v1/devices/%00%ff", None),
            ("GET", f"/api/v1/devices/{DEVICES[0]}/telemetry?since=nan&step=0", None),
            ("GET", f"/api/v1/devices/{DEVICES[0]}/telemetry?since=0&until=1e11&step=10", None),
            ("GET", "/api/v1/events?since=-1e308&limit=99999999999999999999", None),
            ("GET", "/api/v1/rollouts/" + "r" * 10_000, None),
            ("POST", "/api/v1/rollouts", {"model": "../x", "version": -1, "group": "#"}),
            ("POST", "/api/v1/rollouts", {**wanted, "canary_pct": float("inf")}),
            ("POST", "/api/v1/deploy", {"device": "a" * 500, "model": MODEL, "version": 2}),
            ("POST", f"/api/v1/rollouts/{rollout_id}/resume", None),
        ]
        for method, path, body in hostile_requests:
            reply = call(method, f"{second.url}{path}", token=ops, body=body)
            assert 400 <= reply.status < 500, (path, reply.status, reply.body)
            assert isinstance(reply.body, dict) and "\n" not in str(reply.body["detail"]), reply

        # the operator's actions are in the audit log; the viewer's refusals did nothing
        entries = _ok(second.get("/api/v1/audit", ops))["entries"]
        acts = [(e["action"], e["target"], e["outcome"]) for e in reversed(entries)]
        assert [a[0] for a in acts[:2]] == ["token.create"] * 2
        assert acts[2:5] == [
            ("rollout.create", f"group:{GROUP}", "ok"),
            ("rollout.create", f"group:{GROUP}", "refused"),
            ("deploy", f"group:{GROUP}", "refused"),
        ], acts
        assert {a[2] for a in acts[5:]} <= {"invalid", "refused"}, acts  # the hostile POSTs
        assert all(e["who"] == "ops" for e in entries if e["action"] != "token.create")
        assert not [e for e in entries if e["who"] == "grafana"]

        # edge-fleet rollout --server follows a second one: the group back to v1
        back = subprocess.run(
            [sys.executable, "-m", "agent.fleet.cli", "rollout", "--server", second.url,
             "--token", ops, "--model", MODEL, "--version", "1", "--group", GROUP,
             "--canary", "25", "--step", "100", "--timeout", "60", "--json"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert back.returncode == 0, back.stderr + second.log()[-2000:]
        assert json.loads(back.stdout)["status"] == "succeeded"
        assert "succeeded, 4 device(s) run it" in back.stderr
        everyone = {d: (1, True) for d in DEVICES}
        assert wait_until(lambda: _versions(second, eyes) == everyone, 20)
        assert second.stop() == 0
        assert "Traceback" not in second.log() and " 500" not in second.log()


def test_two_serve_instances_on_postgresql_one_killed_mid_rollout_the_other_finishes(
    tmp_path: Path, broker: Mosquitto, postgres: Postgres
) -> None:
    db = postgres.new_database()
    ops = new_token(db, "ops", "operator")
    names = ["pg-1", "pg-2", "pg-3", "pg-4"]
    fakes = {name: FakeDevice(broker.url, name) for name in names}
    steps = plan(names, "door", 25.0, 50.0)
    for name in steps[1]:
        fakes[name].behaviour = "silent"  # step 1 waits for them: the kill lands mid-step
    engine = open_database(db)
    try:
        with (
            serving(tmp_path, broker, db, "--client-id", "hub-a") as a,
            serving(tmp_path, broker, db, "--client-id", "hub-b") as b,
        ):
            a.wait_health(200, START_S)
            b.wait_health(200, START_S)
            for serve in (a, b):
                assert wait_until(
                    lambda s=serve: s.get("/api/v1/devices?group=door", ops).body.get("total") == 4,
                    20,
                ), serve.log()[-2000:]
            body = {"model": "colours", "version": 2, "group": "door", "canary_pct": 25,
                    "step_pct": 50, "timeout_s": 60}  # fmt: skip
            rollout_id = _ok(_post(a, "/api/v1/rollouts", ops, body), 201)["id"]
            _wait_rollout(b, ops, rollout_id, lambda v: v["step"] == 1, 30)
            name = f"rollout:{rollout_id}"
            with engine.connect() as conn:
                holder = lease.holder_of(conn, name)
            driving, other = (a, b) if holder == "hub-a" else (b, a)
            assert holder in ("hub-a", "hub-b")
            driving.proc.kill()  # SIGKILL: no lease released, nothing cleaned up
            driving.proc.wait(10)
            survivor = "hub-b" if holder == "hub-a" else "hub-a"

            def taken() -> bool:
                with engine.connect() as conn:
                    return lease.holder_of(conn, name) == survivor

            assert wait_until(taken, 30), other.log()[-2000:]
            for device in steps[1]:
                fakes[device].behaviour = "ok"
                last = fakes[device].got()[-1]
                assert last is not None and last["version"] == 2
                fakes[device]._update(last)
            view = _wait_rollout(
                other, ops, rollout_id, lambda v: v["status"] in ("succeeded", "halted"), 30
            )
            assert view["status"] == "succeeded", view
            assert [s["status"] for s in view["steps"]] == ["succeeded"] * len(steps)
            assert {f.version for f in fakes.values()} == {2}
            per_device = [t for k, t, _ in _rollout_deploys(db, rollout_id) if k == "device"]
            assert sorted(per_device) == sorted(names)  # none issued twice by the survivor
            with engine.connect() as conn:
                assert lease.holder_of(conn, name) is None
            assert other.stop() == 0
            assert "Traceback" not in other.log()
    finally:
        for fake in fakes.values():
            fake.close()
        engine.dispose()


def test_hostile_messages_with_a_devices_certificate_are_counted_and_ingestion_goes_on(
    tmp_path: Path, secure_broker: SecureBroker
) -> None:
    """Behind the fleet's ACL: the hostile messages come with dev-a's certificate; what
    dev-a publishes on dev-b's topics the broker refuses, and the server never sees."""
    admin = secure_broker.client_cert("fleet")
    tls = (
        "--broker", secure_broker.broker.tls_url, "--ca", str(secure_broker.ca.cert_path),
        "--cert", str(admin.cert), "--key", str(admin.key),
    )  # fmt: skip
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    eyes = new_token(db, "grafana", "viewer")
    with serving(tmp_path, secure_broker.broker, db, *tls) as serve:
        serve.wait_health(200, START_S)
        impostor = ("edge/dev-b/events", dumps(event(PROBE, probe="impostor")))
        acks = _hostile(secure_broker.client("dev-a", client_id="dev-a"), "dev-a", impostor)
        assert acks.count("Not authorized") == 1, acks  # dev-b's topic, and only that
        assert wait_until(lambda: _probes(serve, eyes, "dev-a") == ["first", "last"], 20), (
            f"{_probes(serve, eyes, 'dev-a')}: {json.dumps(serve.health().body)}"
        )
        _assert_counted(serve, eyes)
        assert _probes(serve, eyes, "dev-b") == []
        assert serve.get("/api/v1/devices/dev-b", eyes).status == 404
        assert serve.stop() == 0
        assert "Traceback" not in serve.log()
