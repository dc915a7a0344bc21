"""The fleet server's control paths under attack (a second red-team pass): a device
that reports progress for ever, an operator's deploy into a running rollout, a
rollout of a release the registry does not have, the lease under clock skew, a flood
of bad tokens, and devices inventing model names for /metrics. Real mosquitto, both
databases, real uvicorn, as in tests/test_server_rollouts.py."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.broker import BrokerOptions
from agent.fleet.cli import main as fleet_main
from agent.server import lease, rollstore
from agent.server.app import create_app
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.driver import RolloutDriver
from agent.server.ingest import IngestOptions
from agent.server.metrics import MAX_RELEASES, fold_releases, read_figures, render
from agent.server.rollouts import DEFAULT_MAX_DEVICE_S, Member, Observed, Step, advance, due
from agent.server.schema import audit, device_models, devices, leases
from tests.broker import Mosquitto, wait_until
from tests.conftest import Fleet
from tests.serverhttp import call, running
from tests.test_server_rollouts import (
    T0,
    FakeDevice,
    Rig,
    _issuer,
    _rollout,
    _tokens,
    _update,
)

PROMTOOL = shutil.which("promtool")

# -- a device reporting progress for ever ------------------------------------------------


def test_the_default_bound_is_the_agents_own_deadlines_with_a_margin() -> None:
    # download 1800 + one retry wait 300 + validate 120 + activate 30 + probation 120
    assert DEFAULT_MAX_DEVICE_S == 1.5 * 2370


@pytest.mark.parametrize(
    ("now", "outcome", "take_back"),
    [
        (T0 + 99, "pending", None),  # news every few seconds, under the bound: waits
        (T0 + 100, "failed", "set_back"),  # at the bound: fails, set back like a silent one
    ],
)
def test_news_keeps_a_device_pending_only_until_max_device_s(
    now: float, outcome: str, take_back: str | None
) -> None:
    r = _rollout(timeout_s=10.0, max_device_s=100.0)
    steps = [Step(0, 1, "running", T0)]
    a = Member("a", 0, T0, T0, "pending", "downloading", now - 1, ("colours", 1),
               seen=[1.0, 0, None])  # fmt: skip
    fresh = Observed(_update(T0), True, ("colours", 1), [now, 0, None])  # news just now
    got = advance(r, steps, [a], {"a": fresh}, now, _issuer())
    assert got.members[0].outcome == outcome and got.members[0].take_back == take_back
    if outcome == "failed":
        assert got.members[0].timed_out
        assert got.members[0].reason == "not done 100 s after it was sent (last: downloading)"
        assert got.rollout.status == "halting"
        assert [(p.device, p.version) for p in due(got.rollout, got.members, "edge")] == [("a", 1)]


class Chatty(FakeDevice):
    """A device that, on a desired state, reports the download's progress for ever
    (a new state every 0.1 s, never an outcome): every report is news."""

    def __init__(self, url: str, device: str) -> None:
        self.stop = threading.Event()
        super().__init__(url, device, "ok")

    def _update(self, doc: dict[str, Any]) -> None:
        self.applied = {**{k: doc[k] for k in ("model", "version", "issued_at")},
                        "source": "device"}  # fmt: skip
        base = {"id": "u-chatty", "model": doc["model"], "version": doc["version"],
                "source": "device", "issued_at": doc["issued_at"], "outcome": None,
                "reason": None, "started_at": time.time(), "deadline_s": None,
                "retry": None}  # fmt: skip
        for i in range(600):  # bounded: a minute at most
            if self.stop.wait(0.1):
                return
            self.update = {**base, "phase": "downloading" if i % 2 else "verifying"}
            self.publish_state()

    def close(self) -> None:
        self.stop.set()
        super().close()


@pytest.fixture
def rig(broker: Mosquitto, db_url: str) -> Iterator[Rig]:
    made = Rig(broker, db_url)
    yield made
    made.close()


def test_a_device_reporting_progress_for_ever_fails_at_max_device_s(rig: Rig) -> None:
    rig.devices["d1"] = Chatty(rig.broker.url, "d1")
    rig.wait_members(1)
    with rig.engine.begin() as conn:
        rid = rollstore.create(
            conn, who="ops", group="door", model="colours", version=2, canary_pct=100,
            step_pct=100, timeout_s=1.0, max_device_s=3.0,
            members=["d1"], now=time.time(),
        )  # fmt: skip
    rig.driver()
    # silence is 1 s, yet the device keeps talking: only max_device_s ends it
    assert rig.wait_status(rid, "halted", "succeeded") == "halted"
    (d1,) = rig.rows(rid)[2]
    assert d1.outcome == "failed" and d1.timed_out and d1.take_back == "set_back"
    assert d1.reason is not None and d1.reason.startswith("not done 3 s after it was sent")
    assert d1.seconds is not None and 3.0 <= d1.seconds < 10.0
    device = rig.devices["d1"]
    assert wait_until(lambda: (device.got()[-1] or {}).get("version") == 1, 10.0)


# -- an operator's requests racing a rollout -----------------------------------------------


def _server_with(rig: Rig, registry: str | None = None) -> Server:
    server = rig.server()
    return replace(server, options=replace(server.options, registry=registry))


def test_a_deploy_into_a_running_rollout_is_refused_for_its_group_and_its_members(
    rig: Rig,
) -> None:
    for name in ("d1", "d2"):
        rig.add(name, "silent")
    rig.wait_members(2)
    ops, _ = _tokens(rig.engine)
    body = {"model": "colours", "version": 2, "group": "door", "canary_pct": 50, "step_pct": 50}
    with running(create_app(rig.server())) as url:
        api = f"{url}/api/v1"
        bad = call("POST", f"{api}/rollouts", token=ops, body={**body, "timeout_s": 60,
                                                               "max_device_s": 30})  # fmt: skip
        assert bad.status == 422 and bad.body["detail"].startswith("max_device_s: 30")
        made = call("POST", f"{api}/rollouts", token=ops, body=body)
        assert made.status == 201, made.body
        rid = made.body["id"]
        for target in ({"device": "d1"}, {"device": "d2"}, {"group": "door"}):
            for change in ({"model": "colours", "version": 3}, {"clear": True}):
                got = call("POST", f"{api}/deploy", token=ops, body={**target, **change})
                assert got.status == 409, (target, change, got.body)
                assert rid in got.body["detail"] and "abort it first" in got.body["detail"]
        other = call("POST", f"{api}/deploy", token=ops,
                     body={"device": "d9", "model": "colours", "version": 3})  # fmt: skip
        assert other.status == 202, other.body  # not a member: free
        # two aborts at once: exactly one takes it, the other is told why
        replies: list[int] = []

        def abort() -> None:
            replies.append(call("POST", f"{api}/rollouts/{rid}/abort", token=ops).status)

        threads = [threading.Thread(target=abort) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
        assert sorted(replies) == [200, 409]
        assert call("POST", f"{api}/rollouts/{rid}/resume", token=ops).status == 409
        rig.driver()
        assert rig.wait_status(rid, "aborted") == "aborted"
        # finished: the group and its devices are the operator's again
        again = call("POST", f"{api}/deploy", token=ops, body={"device": "d1", "clear": True})
        assert again.status == 202, again.body
    with rig.engine.connect() as conn:
        refused = conn.execute(
            sa.select(sa.func.count()).where(audit.c.outcome == "refused",
                                             audit.c.action.like("deploy%"))
        ).scalar()  # fmt: skip
    assert refused == 6


def test_a_rollout_or_deploy_of_a_release_the_registry_lacks_is_refused(
    rig: Rig, fleet: Fleet
) -> None:
    fleet.release(2, model="colours")
    rig.add("d1")
    rig.wait_members(1)
    ops, _ = _tokens(rig.engine)
    body = {"model": "colours", "version": 2, "group": "door"}
    with running(create_app(_server_with(rig, str(fleet.registry)))) as url:
        api = f"{url}/api/v1"
        nine = call("POST", f"{api}/rollouts", token=ops, body={**body, "version": 9})
        assert nine.status == 422
        assert nine.body["detail"] == (
            "colours v9 is not a release in the registry: "
            "colours/index.json lists no v9 (it lists v2)"
        )
        ghost = call("POST", f"{api}/deploy", token=ops,
                     body={"model": "ghost", "version": 1, "device": "d1"})  # fmt: skip
        assert ghost.status == 422 and "ghost/index.json: not found" in ghost.body["detail"]
        assert rig.devices["d1"].got() == []  # nothing was published
        made = call("POST", f"{api}/rollouts", token=ops, body=body)
        assert made.status == 201, made.body
    with running(create_app(_server_with(rig, "http://127.0.0.1:1/"))) as url:
        away = call("POST", f"{url}/api/v1/deploy", token=ops,
                    body={"model": "colours", "version": 2, "device": "d9"})  # fmt: skip
        assert away.status == 503 and "registry unavailable" in away.body["detail"]


# -- /metrics against a fleet inventing model names ------------------------------------


@pytest.mark.parametrize(
    ("rows", "keep", "expected"),
    [
        ([("a", "1", True, 5), ("b", "1", True, 1)], 2,
         [("a", "1", True, 5), ("b", "1", True, 1)]),
        ([("a", "1", True, 5), ("b", "1", False, 1), ("c", "2", True, 2), ("b", "1", True, 1)], 1,
         [("_other", "_other", False, 1), ("_other", "_other", True, 3), ("a", "1", True, 5)]),
        ([("z", "1", True, 2), ("y", "1", True, 2)], 1,  # a tie: by name
         [("_other", "_other", True, 2), ("y", "1", True, 2)]),
    ],
)  # fmt: skip
def test_fold_releases_keeps_the_biggest_pairs_and_sums_the_rest(
    rows: list[tuple[str, str, bool, int]], keep: int, expected: list[tuple[str, str, bool, int]]
) -> None:
    assert fold_releases(rows, keep) == expected


def test_metrics_series_stay_bounded_when_devices_invent_thousands_of_models(
    db_url: str,
) -> None:
    engine = open_database(db_url)
    try:
        rows = [
            {"id": f"dev-{i}", "groups": [], "model": f"junk-{i}", "version": i % 7,
             "first_seen": T0, "last_seen": T0, "online": i % 2 == 0}
            for i in range(3000)
        ] + [
            {"id": f"real-{i}", "groups": [], "model": "colours", "version": 2,
             "first_seen": T0, "last_seen": T0, "online": True}
            for i in range(10)
        ]  # fmt: skip
        served = [{"device": r["id"], "model": r["model"], "version": r["version"]} for r in rows]
        with engine.begin() as conn:
            conn.execute(devices.insert(), rows)
            conn.execute(device_models.insert(), served)  # what ingesting their states writes
        with engine.connect() as conn:
            text = render(read_figures(conn), None, "srv-a").decode()
    finally:
        engine.dispose()
    series = [line for line in text.splitlines() if line.startswith("edge_fleet_devices{")]
    assert len(series) <= 2 * (MAX_RELEASES + 1)
    assert 'edge_fleet_devices{model="colours",online="true",version="2"} 10.0' in series
    other = [s for s in series if 'model="_other"' in s]
    assert sum(float(s.rsplit(" ", 1)[1]) for s in series) == 3010  # every device counted
    assert len(other) == 2
    if PROMTOOL is not None:
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the lease under clock skew ----------------------------------------------------------


def test_an_instance_whose_clock_runs_30_s_ahead_does_not_take_a_held_lease(rig: Rig) -> None:
    rig.add("d1", "silent")
    rig.wait_members(1)
    rid = rig.create(timeout_s=600.0)
    holder = RolloutDriver(rig.server("srv-a"), tick_s=0.1, lease_s=15.0)
    holder.tick()
    ahead = rig.server("srv-b")
    ahead.clock = lambda: time.time() + 30.0
    skewed = RolloutDriver(ahead, tick_s=0.1, lease_s=15.0)
    skewed.tick()
    with rig.engine.connect() as conn:
        assert lease.holder_of(conn, f"rollout:{rid}") == "srv-a"
    holder.tick()  # and the holder still renews it
    with rig.engine.connect() as conn:
        assert lease.holder_of(conn, f"rollout:{rid}") == "srv-a"
        expires = conn.execute(sa.select(leases.c.expires)).scalar_one()
    assert abs(expires - (time.time() + 15.0)) < 5.0  # the database's clock, not srv-b's
    with rig.engine.begin() as conn:  # a lease row deleted by hand: taken again next tick
        conn.execute(leases.delete())
    holder.tick()
    with rig.engine.connect() as conn:
        assert lease.holder_of(conn, f"rollout:{rid}") == "srv-a"
    holder.stop(1.0)
    skewed.stop(1.0)


# -- tokens --------------------------------------------------------------------------------


def test_token_commands_on_both_databases_and_a_flood_of_bad_tokens_audits_nothing(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for odd in ("a b", "x\n", "é", "-rf", "a/b", "n" * 65, "'; DROP TABLE tokens; --"):
        assert fleet_main(["token", "create", f"--name={odd}", "--role", "viewer",
                           "--db", db_url]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is not a token name" in err, err
    made = ["token", "create", "--name", "ci@host.local-1", "--role", "operator", "--db", db_url]
    assert fleet_main(made) == 0
    ops = capsys.readouterr().out.strip()
    assert fleet_main(made) == 2  # a name is never reused (PostgreSQL: no aborted transaction)
    assert "exists" in capsys.readouterr().err
    engine = open_database(db_url)
    try:
        with engine.connect() as conn:
            audited = conn.execute(sa.select(sa.func.count()).select_from(audit)).scalar_one()
        options = ServeOptions(db_url, BrokerOptions("mqtt://127.0.0.1:1"), IngestOptions("t"))
        server = Server(options, engine, publisher=None)  # type: ignore[arg-type]
        with running(create_app(server)) as url:
            for i in range(200):
                bad = call("GET", f"{url}/api/v1/devices", token=f"eft_guess{i}")
                assert bad.status == 401
            assert call("GET", f"{url}/api/v1/devices", token=ops).status == 200
        with engine.connect() as conn:
            assert conn.execute(
                sa.select(sa.func.count()).select_from(audit)
            ).scalar_one() == audited  # fmt: skip
    finally:
        engine.dispose()
    # the last operator token may be revoked: the token command needs none
    assert fleet_main(["token", "revoke", "--name", "ci@host.local-1", "--db", db_url]) == 0
    capsys.readouterr()
