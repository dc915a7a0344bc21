"""Server-side rollouts: the pure rules (advance, due) by tables, then the driver with a
real mosquitto, the real Ingester and both databases, fake devices that act on their
desired state as agents do, restarts and a second instance taking over."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.broker import BrokerOptions, FleetBroker
from agent.fleet.cli import main as fleet_main
from agent.fleet.rollout import plan
from agent.server import lease, rollstore
from agent.server.app import create_app
from agent.server.auth import create_token
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.driver import RolloutDriver
from agent.server.ingest import Ingester, IngestOptions
from agent.server.rollouts import (
    Member,
    Observed,
    Publication,
    Rollout,
    Step,
    advance,
    due,
    fingerprint,
)
from agent.server.schema import audit, deploys, leases, rollouts
from tests.broker import Mosquitto, subscriber, wait_until
from tests.serverhttp import call, running

T0 = 1_800_000_000.0


def _issuer() -> Any:
    counter = itertools.count(1)
    return lambda: T0 + next(counter)


def _rollout(**kw: Any) -> Rollout:
    base = Rollout("r1", "door", "colours", 2, "running", 0, 2, 60.0, True)
    return replace(base, **kw)


def _update(
    issued_at: float, phase: str = "downloading", outcome: str | None = None
) -> dict[str, Any]:
    return {
        "model": "colours", "version": 2, "desired": None, "bad": [],
        "update": {"id": "u1", "model": "colours", "version": 2, "issued_at": issued_at,
                   "phase": phase, "outcome": outcome, "reason": None, "retry": None},
    }  # fmt: skip


def _seen(
    state: dict[str, Any] | None, at: float, issued_at: float, online: bool = True
) -> Observed:
    running = (state.get("model"), state.get("version")) if state else ("colours", 1)
    if state and (state["update"] or {}).get("outcome") != "succeeded":
        running = ("colours", 1)
    return Observed(state, online, running, fingerprint(state, at, [], None, issued_at))


def test_a_rollout_issues_each_step_judges_it_then_sets_the_group() -> None:
    issue = _issuer()
    r = _rollout()
    steps = [Step(0, 1), Step(1, 2)]
    members = [Member("a", 0), Member("b", 1), Member("c", 1)]
    before = {d: Observed(None, True, ("colours", 1)) for d in "abc"}
    got = advance(r, steps, members, before, T0, issue)
    assert got.steps[0].status == "running"
    a = got.members[0]
    assert (a.outcome, a.issued_at, a.prior) == ("pending", T0 + 1, ("colours", 1))
    assert [m.outcome for m in got.members[1:]] == [None, None]  # later steps untouched
    pubs = due(got.rollout, got.members, "edge")
    issued = Publication("edge/a/desired/colours", "device:a", "colours", 2, T0 + 1, "a", "issue")
    assert pubs == [issued]
    # sent: now judged; first look records the fingerprint, the device is pending
    members = [replace(got.members[0], sent=T0 + 2), *got.members[1:]]
    got = advance(got.rollout, got.steps, members, before, T0 + 3, issue)
    assert got.members[0].outcome == "pending"
    assert due(got.rollout, got.members, "edge") == []
    done = _seen(_update(T0 + 1, "probation", "succeeded"), T0 + 10, T0 + 1)
    got = advance(got.rollout, got.steps, got.members, {**before, "a": done}, T0 + 10, issue)
    assert got.members[0].outcome == "succeeded" and got.members[0].seconds == 8.0
    assert got.steps[0].status == "succeeded" and got.rollout.step == 1
    assert [m.outcome for m in got.members[1:]] == ["pending", "pending"]
    assert {p.device for p in due(got.rollout, got.members, "edge")} == {"b", "c"}
    members = [replace(m, sent=T0 + 11) if m.step == 1 else m for m in got.members]
    seen = {d: _seen(_update(m.issued_at or 0, "probation", "succeeded"), T0 + 12, m.issued_at or 0)
            for d, m in zip("bc", members[1:], strict=True)}  # fmt: skip
    got = advance(got.rollout, got.steps, members, {**before, **seen}, T0 + 12, issue)
    assert got.rollout.status == "finishing" and got.rollout.final_issued_at is not None
    pubs = due(got.rollout, got.members, "edge")
    assert pubs[0] == Publication(
        "edge/groups/door/desired/colours", "group:door", "colours", 2, got.rollout.final_issued_at,
        None, "final",
    )  # fmt: skip
    assert [(p.topic, p.model) for p in pubs[1:]] == [
        (f"edge/{d}/desired/colours", None) for d in "abc"
    ]


def _sent(
    state: dict[str, Any] | None = None, **kw: Any
) -> tuple[Rollout, list[Step], list[Member]]:
    r = _rollout(**kw)
    steps = [Step(0, 2, "running", T0), Step(1, 1)]
    members = [
        Member("a", 0, T0, T0, "pending", "sent", T0, ("colours", 1), seen=[None, 0, None]),
        Member("b", 0, T0 + 0.5, T0, "pending", "sent", T0, ("colours", 1), seen=[None, 0, None]),
        Member("c", 1),
    ]
    return r, steps, members


OK = Observed(_update(T0, "probation", "succeeded"), True, ("colours", 2), [T0 + 5, 0, None])


@pytest.mark.parametrize(
    ("a_seen", "now", "status", "a_outcome", "take_back"),
    [
        # the device rolled back: halted, its per-device desired state is cleared
        (Observed(_update(T0, "probation", "rolled_back"), True, ("colours", 1), [T0 + 5, 0, None]),
         T0 + 10, "halting", "failed", "clear"),
        # silent for timeout_s: failed, set back to what it ran
        (Observed(None, True, ("colours", 1), [None, 0, None]), T0 + 61, "halting", "failed",
         "set_back"),
        # silent for less: still pending, nothing decided
        (Observed(None, True, ("colours", 1), [None, 0, None]), T0 + 59, "running", "pending",
         None),
        # reported progress 30 s ago, 70 s after sending: not silent
        (Observed(_update(T0, "probation"), True, ("colours", 1), [T0 + 40, 0, None]), T0 + 70,
         "running", "pending", None),
        # refused the desired state by an event
        (Observed(None, True, ("colours", 1), [None, 0, None], "ignored the desired state: stale"),
         T0 + 1, "halting", "failed", "clear"),
    ],
)  # fmt: skip
def test_a_failure_in_a_step_halts_with_take_back(
    a_seen: Observed, now: float, status: str, a_outcome: str, take_back: str | None
) -> None:
    r, steps, members = _sent()
    b_ok = replace(OK, state=_update(T0 + 0.5, "probation", "succeeded"))
    heard = now - 30 if a_seen.state is not None and a_seen.state.get("update") else None
    if heard is not None:  # news 30 s ago: the fingerprint moved then
        members = [replace(members[0], last_heard=heard, seen=a_seen.fingerprint), *members[1:]]
    got = advance(r, steps, members, {"a": a_seen, "b": b_ok}, now, _issuer())
    a, b, c = got.members
    assert got.rollout.status == status
    assert (a.outcome, a.take_back, b.outcome, b.take_back) == (
        a_outcome,
        take_back,
        "succeeded",
        None,
    )
    assert c.outcome is None and c.issued_at is None  # never reached
    if status == "halting":
        assert got.rollout.reason == "canary failed on a"
        pubs = due(got.rollout, got.members, "edge")
        assert len(pubs) == 1 and pubs[0].topic == "edge/a/desired/colours"
        if take_back == "set_back":
            assert (pubs[0].model, pubs[0].version) == ("colours", 1)
            assert a.timed_out and a.take_back_at is not None
        else:
            assert pubs[0].model is None  # cleared
        sent = [replace(m, take_back_sent=now) if m.take_back else m for m in got.members]
        end = advance(got.rollout, got.steps, sent, {}, now + 1, _issuer())
        assert end.rollout.status == "halted" and due(end.rollout, end.members, "edge") == []


def test_pause_keeps_judging_but_issues_nothing_and_resume_goes_on() -> None:
    r, steps, members = _sent(status="paused")
    b_ok = replace(OK, state=_update(T0 + 0.5, "probation", "succeeded"))
    got = advance(r, steps, members, {"a": OK, "b": b_ok}, T0 + 10, _issuer())
    assert [m.outcome for m in got.members] == ["succeeded", "succeeded", None]
    assert got.steps[0].status == "succeeded" and got.rollout.step == 0
    assert due(got.rollout, got.members, "edge") == []
    resumed = advance(replace(got.rollout, status="running"), got.steps, got.members, {}, T0 + 11,
                      _issuer())  # fmt: skip
    assert resumed.rollout.step == 1 and resumed.members[2].outcome == "pending"


def test_abort_takes_back_the_pending_devices_of_the_current_step() -> None:
    r, steps, members = _sent(status="aborting", reason="aborted by ops")
    members[1] = replace(members[1], outcome="succeeded")
    got = advance(r, steps, members, {}, T0 + 5, _issuer())
    a, b, c = got.members
    assert (a.take_back, b.take_back, c.take_back) == ("set_back", None, None)
    assert got.rollout.status == "aborting"
    pubs = due(got.rollout, got.members, "edge")
    assert [(p.device, p.version) for p in pubs] == [("a", 1)]
    done = [replace(m, take_back_sent=T0 + 6) if m.take_back else m for m in got.members]
    assert advance(got.rollout, got.steps, done, {}, T0 + 7, _issuer()).rollout.status == "aborted"


def test_a_re_look_with_the_same_fingerprint_is_not_news() -> None:
    r, steps, members = _sent()
    quiet = Observed(None, True, ("colours", 1), [None, 0, None])
    got = advance(r, steps, members, {"a": quiet, "b": quiet}, T0 + 30, _issuer())
    assert [m.last_heard for m in got.members[:2]] == [T0, T0]
    moved = Observed(None, True, ("colours", 1), [None, 1, None])
    got = advance(r, steps, got.members, {"a": moved, "b": quiet}, T0 + 40, _issuer())
    assert [m.last_heard for m in got.members[:2]] == [T0 + 40, T0]


@pytest.mark.parametrize(
    ("state", "events", "telemetry_ts", "expected"),
    [
        (None, [], None, [None, 0, None]),
        (_update(T0), [], 99.0, [5.0, 0, None]),  # downloading: telemetry is no news
        (_update(T0, "probation"), [], 99.0, [5.0, 0, 99.0]),
        (_update(T0 - 9, "probation"), [], 99.0, [None, 0, None]),  # another desired state
        (_update(T0), [{"event": "update_progress", "issued_at": T0},
                       {"event": "update_phase", "update_id": "u1"},
                       {"event": "update_phase", "update_id": "u0"}], None, [5.0, 2, None]),
    ],
)  # fmt: skip
def test_fingerprint_moves_only_with_news_about_this_desired_state(
    state: dict[str, Any] | None, events: list[dict[str, Any]], telemetry_ts: float | None,
    expected: list[Any],
) -> None:  # fmt: skip
    assert fingerprint(state, 5.0, events, telemetry_ts, T0) == expected


# -- the driver, against a real mosquitto, the real ingester and both databases ----------

WAIT_S = 20.0


def _envelope() -> dict[str, Any]:
    return {"schema": 1, "seq": next(_seq), "id": f"m-{uuid.uuid4().hex[:12]}", "ts": time.time()}


_seq = itertools.count()


class FakeDevice:
    """A device on the broker that acts on its desired state as an agent does, reduced
    to its reports: retained status (group door) and state; on a desired state for a
    new release, the update's phases in its state, then the outcome ``behaviour`` says:
    ``ok`` (runs it), ``rollback`` (rolled back), ``silent`` (never answers)."""

    def __init__(self, url: str, device: str, behaviour: str = "ok", version: int = 1) -> None:
        self.device, self.behaviour, self.version = device, behaviour, version
        self.desired: list[dict[str, Any] | None] = []
        self.applied: dict[str, Any] | None = None
        self.update: dict[str, Any] | None = None
        self.lock = threading.Lock()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{device}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        status = {"schema": 1, "ts": time.time(), "state": "online", "groups": ["door"]}
        self._pub(f"edge/{device}/status", {**status, "agent_version": "0.1.0"})
        self.publish_state()
        self.client.subscribe(f"edge/{device}/desired/colours", qos=1)

    def _pub(self, topic: str, doc: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(doc).encode(), qos=1, retain=True)

    def publish_state(self) -> None:
        self._pub(f"edge/{self.device}/state", {
            **_envelope(), "agent_version": "0.1.0", "model": "colours", "version": self.version,
            "sha256": "ab" * 32, "backend": "cpu", "serving": self.version, "previous": None,
            "phase": self.update["phase"] if self.update else "idle", "last_error": None,
            "update": self.update, "desired": self.applied, "bad": [],
        })  # fmt: skip

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload) if msg.payload else None
        with self.lock:
            self.desired.append(doc)
        if doc is None or self.behaviour == "silent":
            return
        if (doc["model"], doc["version"]) == ("colours", self.version):
            self.applied = {**{k: doc[k] for k in ("model", "version", "issued_at")},
                            "source": "device"}  # fmt: skip
            self.publish_state()
            return
        threading.Thread(target=self._update, args=(doc,), daemon=True).start()

    def _update(self, doc: dict[str, Any]) -> None:
        self.applied = {**{k: doc[k] for k in ("model", "version", "issued_at")},
                        "source": "device"}  # fmt: skip
        base = {"id": f"u-{uuid.uuid4().hex[:8]}", "model": doc["model"], "version": doc["version"],
                "source": "device", "issued_at": doc["issued_at"], "outcome": None, "reason": None,
                "started_at": time.time(), "deadline_s": None, "retry": None}  # fmt: skip
        for phase in ("downloading", "probation"):
            self.update = {**base, "phase": phase}
            self.publish_state()
            time.sleep(0.1)
        if self.behaviour == "ok":
            self.version = doc["version"]
            self.update = {**base, "phase": "probation", "outcome": "succeeded"}
        else:
            self.update = {**base, "phase": "probation", "outcome": "rolled_back",
                           "reason": "fps below the floor"}  # fmt: skip
        self.publish_state()

    def got(self) -> list[dict[str, Any] | None]:
        with self.lock:
            return list(self.desired)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Rig:
    """A database, an ingester, a publisher, fake devices; servers and drivers on it."""

    def __init__(self, broker: Mosquitto, db_url: str) -> None:
        self.broker = broker
        self.engine = open_database(db_url)
        self.options = ServeOptions(
            db_url, BrokerOptions(broker.url), IngestOptions(client_id="srv-a", group="srv")
        )
        self.ingester = Ingester(self.engine, self.options.broker, self.options.ingest)
        self.ingester.start()
        assert self.ingester.wait_connected(WAIT_S)
        self.publisher = FleetBroker(BrokerOptions(broker.url))
        self.publisher.connect()
        self.devices: dict[str, FakeDevice] = {}
        self.drivers: list[RolloutDriver] = []

    def add(self, name: str, behaviour: str = "ok") -> FakeDevice:
        self.devices[name] = FakeDevice(self.broker.url, name, behaviour)
        return self.devices[name]

    def server(self, instance: str = "srv-a") -> Server:
        options = replace(self.options, ingest=IngestOptions(client_id=instance, group="srv"))
        return Server(options, self.engine, self.publisher)

    def driver(self, instance: str = "srv-a", lease_s: float = 15.0) -> RolloutDriver:
        driver = RolloutDriver(self.server(instance), tick_s=0.1, lease_s=lease_s)
        driver.start()
        self.drivers.append(driver)
        return driver

    def wait_members(self, n: int) -> None:
        def ready() -> bool:
            with self.engine.connect() as conn:
                return len(rollstore.members_of(conn, "door")) == n

        assert wait_until(ready, WAIT_S), "the devices' status did not reach the database"

    def create(self, timeout_s: float = 30.0, canary: float = 25.0, step: float = 50.0) -> str:
        with self.engine.begin() as conn:
            return rollstore.create(
                conn, who="ops", group="door", model="colours", version=2, canary_pct=canary,
                step_pct=step, timeout_s=timeout_s,
                members=rollstore.members_of(conn, "door"), now=time.time(),
            )  # fmt: skip

    def status(self, rollout_id: str) -> str:
        with self.engine.connect() as conn:
            loaded = rollstore.load(conn, rollout_id)
        assert loaded is not None
        return loaded[0].status

    def wait_status(self, rollout_id: str, *statuses: str) -> str:
        ok = wait_until(lambda: self.status(rollout_id) in statuses, WAIT_S)
        assert ok, f"rollout is {self.status(rollout_id)}, not {statuses}: {self.rows(rollout_id)}"
        return self.status(rollout_id)

    def rows(self, rollout_id: str) -> Any:
        with self.engine.connect() as conn:
            return rollstore.load(conn, rollout_id)

    def close(self) -> None:
        for driver in self.drivers:
            driver.stop(5.0)
        for device in self.devices.values():
            device.close()
        self.publisher.close()
        self.ingester.stop()
        self.engine.dispose()


@pytest.fixture
def rig(broker: Mosquitto, db_url: str) -> Iterator[Rig]:
    made = Rig(broker, db_url)
    yield made
    made.close()


def _retained(broker: Mosquitto, topic: str) -> bytes | None:
    """The retained message on ``topic`` now (None: none, b"": none either)."""
    with subscriber(broker.url, [topic]) as sub:
        time.sleep(0.3)
        got = sub.messages(topic)
    return got[-1].payload if got else None


def test_a_rollout_succeeds_sets_the_group_and_clears_each_device(rig: Rig) -> None:
    for name in ("d1", "d2", "d3", "d4"):
        rig.add(name)
    rig.wait_members(4)
    rollout_id = rig.create()
    rig.driver()
    assert rig.wait_status(rollout_id, "succeeded", "halted") == "succeeded", rig.rows(rollout_id)
    r, steps, members = rig.rows(rollout_id)
    assert [s.status for s in steps] == ["succeeded"] * len(steps) and len(steps) == 3
    assert {m.outcome for m in members} == {"succeeded"}
    assert all(d.version == 2 for d in rig.devices.values())
    group = json.loads(_retained(rig.broker, "edge/groups/door/desired/colours") or b"{}")
    assert (group["model"], group["version"], group["issued_at"]) == (
        "colours",
        2,
        r.final_issued_at,
    )
    assert all(d.got()[-1] is None for d in rig.devices.values())  # per-device cleared
    with rig.engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(deploys)).scalar()
        held = conn.execute(sa.select(sa.func.count()).select_from(leases)).scalar()
    assert kept == 5 and held == 0  # four devices and the group; the lease given up


def test_a_failure_halts_the_rollout_and_takes_the_device_back(rig: Rig) -> None:
    names = ["d1", "d2", "d3", "d4"]
    for name in names:
        rig.add(name)
    rig.wait_members(4)
    canary = plan(names, "door", 25.0, 50.0)[0][0]
    rig.devices[canary].behaviour = "rollback"
    rollout_id = rig.create()
    rig.driver()
    assert rig.wait_status(rollout_id, "halted", "succeeded") == "halted"
    r, steps, members = rig.rows(rollout_id)
    assert r.reason == f"canary failed on {canary}"
    assert [s.status for s in steps] == ["failed", "waiting", "waiting"]
    by = {m.device: m for m in members}
    assert by[canary].outcome == "failed" and "rolled back" in (by[canary].reason or "")
    assert by[canary].take_back == "clear" and by[canary].take_back_sent is not None
    assert rig.devices[canary].got()[-1] is None  # its per-device desired state cleared
    others = [d for d in names if d != canary]
    assert all(rig.devices[d].got() == [] for d in others)  # untouched
    assert _retained(rig.broker, "edge/groups/door/desired/colours") is None


def test_a_silent_device_fails_after_the_timeout_and_is_set_back(rig: Rig) -> None:
    names = ["d1", "d2"]
    for name in names:
        rig.add(name)
    rig.wait_members(2)
    canary = plan(names, "door", 50.0, 50.0)[0][0]
    rig.devices[canary].behaviour = "silent"
    rollout_id = rig.create(timeout_s=2.0, canary=50.0)
    rig.driver()
    assert rig.wait_status(rollout_id, "halted") == "halted"
    _, _, members = rig.rows(rollout_id)
    m = next(m for m in members if m.device == canary)
    assert m.timed_out and m.take_back == "set_back" and m.reason.startswith("said nothing")
    back = rig.devices[canary].got()[-1]
    assert back is not None and (back["version"], back["issued_at"]) == (1, m.take_back_at)


def test_devices_news_wakes_the_driver_so_a_step_ends_when_its_devices_report(
    rig: Rig,
) -> None:
    """With a tick of 30 s, the three steps (canary, two halves) finish within seconds:
    each state the ingester stores nudges the driver, which judges the step then."""
    for name in ("d1", "d2", "d3", "d4"):
        rig.add(name)
    rig.wait_members(4)
    rollout_id = rig.create()
    driver = RolloutDriver(rig.server(), tick_s=30.0)
    rig.ingester.on_news = driver.nudge
    started = time.monotonic()
    driver.start()
    rig.drivers.append(driver)
    assert rig.wait_status(rollout_id, "succeeded", "halted") == "succeeded", rig.rows(rollout_id)
    took = time.monotonic() - started
    assert took < 10.0, took  # without the nudges: two more ticks, 60 s
    assert all(d.version == 2 for d in rig.devices.values())


def test_a_restarted_driver_resumes_without_re_running_finished_steps(rig: Rig) -> None:
    names = ["d1", "d2", "d3", "d4"]
    for name in names:
        rig.add(name)
    rig.wait_members(4)
    steps = plan(names, "door", 25.0, 50.0)
    for name in steps[1]:  # the second step answers only after the restart
        rig.devices[name].behaviour = "silent"
    rollout_id = rig.create()
    first = rig.driver()
    assert wait_until(lambda: rig.rows(rollout_id)[0].step == 1 and all(
        m.sent is not None for m in rig.rows(rollout_id)[2] if m.step == 1), WAIT_S)  # fmt: skip
    first.stop(5.0)
    canary_got = len(rig.devices[steps[0][0]].got())
    for name in steps[1]:  # now it acts on what it was sent
        device = rig.devices[name]
        device.behaviour = "ok"
        last = device.got()[-1]
        assert last is not None
        device._update(last)
    rig.driver("srv-a")
    assert rig.wait_status(rollout_id, "succeeded", "halted") == "succeeded", rig.rows(rollout_id)
    # the canary got its desired state once, then the clear at the end: no re-run
    assert len(rig.devices[steps[0][0]].got()) == canary_got + 1


def test_another_instance_takes_over_when_the_holder_dies(rig: Rig) -> None:
    names = ["d1", "d2", "d3", "d4"]
    for name in names:
        rig.add(name)
    rig.wait_members(4)
    steps = plan(names, "door", 25.0, 50.0)
    for name in steps[1]:
        rig.devices[name].behaviour = "silent"
    rollout_id = rig.create()
    holder = rig.driver("srv-a", lease_s=2.0)
    assert wait_until(lambda: rig.rows(rollout_id)[0].step == 1, WAIT_S)
    holder.stop(5.0, release=False)  # dies: the lease stays until it expires
    rig.drivers.remove(holder)
    with rig.engine.connect() as conn:  # (before srv-b starts: it takes it once expired)
        assert lease.holder_of(conn, f"rollout:{rollout_id}") == "srv-a"
    other = rig.driver("srv-b", lease_s=2.0)
    for name in steps[1]:
        device = rig.devices[name]
        device.behaviour = "ok"
        last = device.got()[-1]
        assert last is not None
        device._update(last)
    assert rig.wait_status(rollout_id, "succeeded", "halted") == "succeeded", rig.rows(rollout_id)
    assert other.instance == "srv-b"
    with rig.engine.connect() as conn:
        assert lease.holder_of(conn, f"rollout:{rollout_id}") is None


def test_a_second_rollout_of_a_group_is_refused(rig: Rig) -> None:
    rig.add("d1")
    rig.wait_members(1)
    first = rig.create()
    with pytest.raises(rollstore.GroupBusy) as busy:
        rig.create()
    assert busy.value.args[0] == first
    with rig.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(rollouts.insert().values(
            id="x", created=0, updated=0, who="w", group_name="door", model="m", version=1,
            options={}, status="paused", step=0))  # fmt: skip


# -- the HTTP API ------------------------------------------------------------------------


def _tokens(engine: sa.Engine) -> tuple[str, str]:
    with engine.begin() as conn:
        return (
            create_token(conn, "ops", "operator", time.time()),
            create_token(conn, "eyes", "viewer", time.time()),
        )


def test_deploy_over_http_publishes_the_desired_state_and_is_audited(rig: Rig) -> None:
    device = rig.add("d1")
    rig.wait_members(1)
    ops, eyes = _tokens(rig.engine)
    body = {"model": "colours", "version": 2, "device": "d1"}
    with running(create_app(rig.server())) as url:
        assert call("POST", f"{url}/api/v1/deploy", body=body).status == 401
        assert call("POST", f"{url}/api/v1/deploy", token=eyes, body=body).status == 403
        bad = call("POST", f"{url}/api/v1/deploy", token=ops, body={**body, "group": "door"})
        assert (bad.status, bad.body["detail"]) == (422, "give one of device or group")
        bad = call("POST", f"{url}/api/v1/deploy", token=ops, body={**body, "version": "2; x"})
        assert bad.status == 422 and isinstance(bad.body["detail"], str)
        bad = call("POST", f"{url}/api/v1/deploy", token=ops, body={**body, "device": "../x"})
        assert bad.status == 422 and bad.body["detail"].startswith("device:")
        bad = call("POST", f"{url}/api/v1/deploy", token=ops, data=b"model=colours")
        assert (bad.status, bad.body["detail"]) == (
            422,
            "body: not valid JSON (Expecting value at character 0)",
        )
        got = call("POST", f"{url}/api/v1/deploy", token=ops, body=body)
        assert got.status == 202, got.body
        assert wait_until(lambda: device.version == 2, WAIT_S)
        assert device.got()[0] is not None and device.got()[0]["issued_at"] == got.body["issued_at"]
        cleared = call("POST", f"{url}/api/v1/deploy", token=ops,
                       body={"device": "d1", "model": "colours", "clear": True})  # fmt: skip
        assert cleared.body["topic"] == "edge/d1/desired/colours"
        assert cleared.status == 202 and wait_until(lambda: device.got()[-1] is None, WAIT_S)
    with rig.engine.connect() as conn:
        rows = conn.execute(
            sa.select(audit.c.who, audit.c.action, audit.c.outcome).order_by(audit.c.id)
        ).all()
        stored = conn.execute(sa.select(deploys.c.target, deploys.c.version)).all()
    assert [tuple(r) for r in rows] == [
        ("ops", "deploy", "invalid"),  # device and group
        ("ops", "deploy", "invalid"),  # ../x (a wrong type never reaches the route)
        ("ops", "deploy", "ok"),
        ("ops", "deploy.clear", "ok"),
    ]
    assert [tuple(r) for r in stored] == [("d1", 2)]


def test_rollouts_over_http_create_refuse_a_second_pause_resume_and_abort(rig: Rig) -> None:
    for name in ("d1", "d2"):
        rig.add(name, "silent")
    rig.wait_members(2)
    ops, eyes = _tokens(rig.engine)
    body = {"model": "colours", "version": 2, "group": "door", "canary_pct": 50, "step_pct": 50}
    with running(create_app(rig.server())) as url:
        api = f"{url}/api/v1/rollouts"
        wrongs = [({"canary_pct": 101}, "canary_pct"), ({"step_pct": 0}, "step_pct"),
                  ({"timeout_s": -1}, "timeout_s"), ({"group": "no/pe"}, "group")]  # fmt: skip
        for wrong, says in wrongs:
            bad = call("POST", api, token=ops, body={**body, **wrong})
            assert bad.status == 422 and says in bad.body["detail"], bad.body
        nobody = call("POST", api, token=ops, body={**body, "group": "yard"})
        assert nobody.status == 409 and "no device reports group" in nobody.body["detail"]
        assert call("POST", api, token=eyes, body=body).status == 403
        made = call("POST", api, token=ops, body=body)
        assert made.status == 201, made.body
        rid = made.body["id"]
        assert [len(s["devices"]) for s in made.body["steps"]] == [1, 1]
        assert made.body["untouched"] == ["d1", "d2"]
        again = call("POST", api, token=ops, body=body)
        assert again.status == 409 and rid in again.body["detail"]
        assert call("POST", f"{api}/{rid}/resume", token=ops).status == 409
        paused = call("POST", f"{api}/{rid}/pause", token=ops)
        assert paused.status == 200 and paused.body["status"] == "paused"
        assert call("POST", f"{api}/{rid}/pause", token=ops).status == 409
        assert call("POST", f"{api}/{rid}/resume", token=ops).body["status"] == "running"
        rig.driver()
        canary = made.body["steps"][0]["devices"][0]["device"]
        assert wait_until(lambda: rig.devices[canary].got() != [], WAIT_S)
        shown = call("GET", f"{api}/{rid}", token=eyes).body
        assert shown["steps"][0]["status"] == "running"
        assert shown["steps"][0]["devices"][0]["status"] == "pending"
        assert call("POST", f"{api}/{rid}/abort", token=ops).status == 200
        assert rig.wait_status(rid, "aborted") == "aborted"
        back = rig.devices[canary].got()[-1]
        assert back is not None and back["version"] == 1  # taken back to what it ran
        listed = call("GET", f"{api}?group=door&status=aborted", token=eyes)
        assert [r["id"] for r in listed.body["rollouts"]] == [rid]
        assert call("GET", f"{api}/nope", token=eyes).status == 404
        assert call("POST", f"{api}/{rid}/abort", token=ops).status == 409
        assert call("GET", f"{api}?status=bogus", token=eyes).status == 422
    with rig.engine.connect() as conn:
        actions = conn.execute(
            sa.select(audit.c.action, audit.c.outcome).order_by(audit.c.id)
        ).all()  # fmt: skip
    assert ("rollout.create", "ok") in actions and ("rollout.abort", "ok") in actions
    assert ("rollout.create", "refused") in actions and ("rollout.pause", "refused") in actions


def test_edge_fleet_rollout_with_server_submits_follows_and_exits_by_the_outcome(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("d1", "d2", "d3"):
        rig.add(name)
    rig.wait_members(3)
    ops, eyes = _tokens(rig.engine)
    rig.driver()
    args = ["rollout", "--model", "colours", "--version", "2", "--group", "door"]
    with running(create_app(rig.server())) as url:
        assert fleet_main([*args, "--server", url, "--token", "eft_nope"]) == 1
        assert "the token is not valid (401)" in capsys.readouterr().err
        assert fleet_main([*args, "--server", url, "--token", eyes]) == 1
        assert "(403)" in capsys.readouterr().err
        assert fleet_main([*args, "--canary", "200", "--server", url, "--token", ops]) == 2
        err = capsys.readouterr().err
        assert "canary_pct" in err and len(err.strip().splitlines()) == 1
        assert fleet_main([*args, "--server", url, "--token", ops, "--json"]) == 0
        out = capsys.readouterr()
        final = json.loads(out.out)
        assert final["status"] == "succeeded"
        assert "canary:" in out.err and "succeeded, 3 device(s) run it" in out.err
        assert fleet_main([*args, "--version", "1", "--group", "yard", "--server", url,
                           "--token", ops]) == 1  # fmt: skip
        assert "no device reports group 'yard'" in capsys.readouterr().err
    assert fleet_main([*args, "--server", "http://127.0.0.1:9", "--token", ops]) == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_the_driver_never_overwrites_a_pause_made_meanwhile(rig: Rig) -> None:
    rig.add("d1")
    rig.wait_members(1)
    rollout_id = rig.create()
    r, steps, members = rig.rows(rollout_id)
    moved = advance(r, steps, members, {}, time.time(), _issuer())
    assert moved.rollout.status == "running" and moved.steps[0].status == "running"
    with rig.engine.begin() as conn:  # an operator pauses it between the read and the write
        conn.execute(rollouts.update().where(rollouts.c.id == rollout_id).values(status="paused"))
    with pytest.raises(rollstore.Changed), rig.engine.begin() as conn:
        old = (r.status, members)
        rollstore.save(conn, moved.rollout, moved.steps, moved.members, old, time.time())
    r, steps, members = rig.rows(rollout_id)
    assert (r.status, steps[0].status, members[0].issued_at) == ("paused", "waiting", None)
