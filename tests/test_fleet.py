"""The fleet side end to end: ``edge-fleet deploy``, ``rollout``, ``devices``,
``telemetry`` and ``status`` against real agents.

Three agents run as subprocesses (their own device id, store and synthetic stream, all
in group ``lab``), with a real mosquitto and a registry served over HTTP. Desired
state is Ed25519-signed and the agents are configured to refuse anything else. What
is asserted is what an operator sees: exit codes, the rollout's summary, the
``devices`` rows, and the retained reports of every device.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.desired import sign_desired
from agent.fleet.cli import main as fleet
from agent.fleet.deploy import desired_payload
from agent.fleet.publish import publish
from agent.fleet.rollout import plan
from agent.validate import npz_bytes
from agent.verify import generate_keypair, load_private_key
from tests.agentproc import MODEL, AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto, subscriber
from tests.conftest import Models
from tests.registry_server import RegistryServer

GROUP = "lab"
DEVICES = ("dev-a", "dev-b", "dev-c")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_fleet(*args: str) -> Run:
    """``edge-fleet ARGS`` in this process, its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fleet(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return Run(code, out.getvalue(), err.getvalue())


@dataclass
class Lab:
    """A registry, a deploy key pair, a broker, agents, and a tap on everything."""

    root: Path
    models: Models
    broker: Mosquitto
    registry: Path
    server: RegistryServer
    key: Path
    pub: Path
    agents: dict[str, AgentProcess]
    tap: Tap

    def publish(self, version: int, **options: Any) -> None:
        publish(
            [self.models.root / f"v{version}.tflite"],
            model=MODEL,
            version=version,
            registry=self.registry,
            task="classification",
            labels=self.models.labels,
            **({"selftest_random": 2} | options),
        )

    def agent(self, device: str, **sections: dict[str, Any]) -> AgentProcess:
        settings: dict[str, Any] = {
            "device": {"id": device, "groups": [GROUP]},
            "registry": {"url": self.server.url, "poll_interval_s": 3600},
            "mqtt": {"url": self.broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
            "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 8},
            "telemetry": {"interval_s": 0.5},
            "update": {"probation_s": 1, "budget_runs": 5, "desired_public_key": str(self.pub)},
        }
        for name, values in sections.items():
            settings.setdefault(name, {}).update(values)
        agent = AgentProcess(self.root / device, device, settings)
        self.agents[device] = agent
        return agent

    def fleet(self, command: str, *args: str) -> Run:
        return run_fleet(command, "--broker", self.broker.url, *args)

    def start(self, devices: tuple[str, ...], timeout: float = 60) -> None:
        """Start an agent for each of ``devices`` and wait until the fleet sees each one
        online."""
        for device in devices:
            self.agent(device).start()
        self.wait(
            lambda: {d for d, r in self.devices().items() if r["online"]} == set(devices),
            timeout,
            f"{', '.join(devices)} online",
        )

    def rollout(self, version: int, *args: str) -> Run:
        return self.fleet(
            "rollout",
            *("--model", MODEL, "--version", str(version), "--group", GROUP),
            *("--sign-key", str(self.key), "--canary", "10", "--step", "50"),
            *args,
        )

    def devices(self) -> dict[str, dict[str, Any]]:
        run = self.fleet("devices", "--json")
        assert run.code == 0, run.err
        return {row["device"]: row for row in run.json()}

    def states(self) -> dict[str, dict[str, Any]]:
        """The latest retained state of each device, as the tap saw it."""
        latest: dict[str, dict[str, Any]] = {}
        with self.tap._lock:
            for topic, doc, _ in self.tap.messages:
                if topic.endswith("/state"):
                    latest[topic.split("/")[1]] = doc
        return latest

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        logs = "\n".join(f"--- {d} ---\n{a.log()[-2500:]}" for d, a in self.agents.items())
        raise AssertionError(f"{what} within {timeout} s\n{logs}")


@pytest.fixture
def lab(tmp_path: Path, models: Models, broker: Mosquitto) -> Iterator[Lab]:
    registry = tmp_path / "registry"
    registry.mkdir()
    key, pub = generate_keypair(tmp_path / "keys", "deploy")
    tap = Tap("127.0.0.1", broker.port, ["edge/#"])
    with RegistryServer(registry) as server:
        lab = Lab(tmp_path, models, broker, registry, server, key, pub, {}, tap)
        try:
            yield lab
        finally:
            tap.close()
            for agent in lab.agents.values():
                agent.close()


def _failing_selftest(lab: Lab, version: int) -> None:
    """Publish ``version`` with expected outputs no model here produces."""
    inputs, expect = lab.root / "in.npz", lab.root / "expect.npz"
    samples = np.random.default_rng(1).random((2, 1, 32, 32, 3), dtype=np.float32)
    inputs.write_bytes(npz_bytes({"input_0": samples}))
    expect.write_bytes(npz_bytes({"output_0": samples.mean(axis=(2, 3)) + 9000.0}))
    lab.publish(version, selftest_random=None, selftest_inputs=inputs, selftest_expect=expect)


def _all_run(lab: Lab, version: int) -> bool:
    states = lab.states()
    return all(states.get(d, {}).get("version") == version for d in lab.agents)


def test_rollouts_halt_on_a_failing_canary_and_on_a_silent_device_then_converge(
    lab: Lab,
) -> None:
    lab.publish(1)
    lab.start(DEVICES)
    rows = lab.devices()
    assert all(r["groups"] == [GROUP] and r["version"] is None for r in rows.values()), rows
    assert {r["agent_version"] for r in rows.values()} == {__version__}  # from the status
    canary, first, second = (d for step in plan(DEVICES, GROUP, 10, 50) for d in step)

    # v1 to the whole group: canary, then one step of two; then the group's state.
    run = lab.rollout(1, "--timeout", "60")
    assert run.code == 0, run.out + run.err
    assert f"canary: {canary}" in run.out and f"step 1: {first}, {second}" in run.out
    assert "succeeded, 3 device(s) run it" in run.out
    lab.wait(lambda: _all_run(lab, 1), 10, "all on v1")
    rows = lab.devices()
    for row in rows.values():
        assert (row["online"], row["model"], row["version"], row["backend"]) == (
            True,
            MODEL,
            1,
            "cpu",
        )
        assert row["desired"] is None  # per-device states cleared: the group's governs
        assert row["last_seen"] > time.time() - 30
    lab.wait(
        lambda: all((r["fps"] or 0) > 0 and r["p95_ms"] for r in lab.devices().values()),
        15,
        "fps and p95 in the devices table",
    )
    table = lab.fleet("devices")
    assert table.code == 0
    assert table.out.splitlines()[0].split()[:4] == ["DEVICE", "ONLINE", "MODEL@VERSION", "BACKEND"]
    assert sum(f"{MODEL}@1" in line for line in table.out.splitlines()) == 3

    # v2 fails its self-test on the canary: the rollout halts, the others never hear of it.
    _failing_selftest(lab, 2)
    run = lab.rollout(2, "--timeout", "60", "--json")
    assert run.code == 1, run.out + run.err
    outcome = run.json()
    assert outcome["outcome"] == "halted" and outcome["untouched"] == [first, second]
    ((result,),) = outcome["steps"]
    assert result["device"] == canary and result["status"] == "failed"
    assert "selftest failed" in result["detail"], result
    assert "HALTED" in run.err
    rows = lab.devices()
    assert {d: r["version"] for d, r in rows.items()} == dict.fromkeys(DEVICES, 1)
    assert rows[canary]["phase"] == "failed" and rows[canary]["update"]["version"] == 2
    assert rows[canary]["desired"] is None  # it refused v2: its own state is cleared
    for device in (first, second):
        assert rows[device]["desired"] is None
        assert (rows[device]["update"] or {}).get("version") == 1  # never started v2

    # v3 is good, but a device of step 1 stops during the rollout: after the timeout it
    # counts as failed and the rollout halts rather than wait for it.
    lab.publish(3)
    stopped = threading.Event()

    def stop_when_canary_is_in_probation() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            update = lab.states().get(canary, {}).get("update") or {}
            if update.get("version") == 3:
                lab.agents[first].kill()
                stopped.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=stop_when_canary_is_in_probation, daemon=True)
    killer.start()
    begun = time.monotonic()
    run = lab.rollout(3, "--timeout", "15")
    killer.join(5)
    assert stopped.is_set()
    assert run.code == 1, run.out + run.err
    assert f"{first}: failed (said nothing about it for 15 s" in run.out, run.out
    assert time.monotonic() - begun < 60
    rows = lab.devices()
    assert rows[first]["online"] is False and rows[first]["version"] == 1
    # Silent, it may still be updating: its own desired state names v1 again.
    assert rows[first]["desired"]["version"] == 1 and rows[second]["desired"]["version"] == 3
    assert rows[canary]["version"] == 3 and rows[second]["version"] == 3

    # Back up, the same rollout again: all converge on v3.
    lab.agents[first].start()
    run = lab.rollout(3, "--timeout", "60")
    assert run.code == 0, run.out + run.err
    lab.wait(lambda: _all_run(lab, 3), 10, "all on v3")
    rows = lab.devices()
    assert {d: (r["online"], r["version"]) for d, r in rows.items()} == dict.fromkeys(
        DEVICES, (True, 3)
    )
    status = lab.fleet("status", "--model", MODEL, "--json").json()
    assert status["versions"] == {"3": sorted(DEVICES)}
    assert status["bad"] == {"2": [canary]}
    assert status["desired"]["groups"][GROUP]["version"] == 3
    assert status["desired"]["devices"] == {}
    text = lab.fleet("status", "--model", MODEL).out
    assert "v3       3 devices" in text, text


def test_deploy_signed_reaches_the_device_and_unsigned_foreign_or_stale_is_refused(
    lab: Lab,
) -> None:
    lab.publish(1)
    lab.publish(2)
    agent = lab.agent("dev-s").start()
    topic = f"edge/dev-s/desired/{MODEL}"
    deploy = ("deploy", "--model", MODEL, "--device", "dev-s", "--wait", "30")

    run = lab.fleet(*deploy, "--version", "1")  # unsigned
    assert run.code == 1
    assert "refused the desired state: signature: missing" in run.out, run.out

    other, _ = generate_keypair(lab.root / "keys", "other")
    run = lab.fleet(*deploy, "--version", "1", "--sign-key", str(other))
    assert run.code == 1 and "signature: bad" in run.out, run.out

    early = desired_payload(MODEL, 2, "device:dev-s", time.time(), lab.key)  # kept for later
    run = lab.fleet(*deploy, "--version", "1", "--sign-key", str(lab.key), "--json")
    assert run.code == 0, run.out + run.err
    (device,) = run.json()["devices"]
    assert device["status"] == "succeeded" and run.json()["signed"] is True
    wait_alive(lambda: lab.states().get("dev-s", {}).get("version") == 1, 10, "v1", agent)

    operator = subscriber(lab.broker.url, [])
    try:
        # A signed instruction for another device, replayed onto this one's topic.
        foreign = sign_desired(
            {"model": MODEL, "version": 2, "issued_at": time.time(), "target": "device:dev-x"},
            load_private_key(lab.key),
        )
        operator.publish(topic, json.dumps(foreign), retain=True)
        # A genuine, older instruction replayed: stale.
        operator.publish(topic, early, retain=True)
        events = lambda name: [  # noqa: E731
            d for d in lab.tap.docs("/events") if d.get("event") == name
        ]
        wait_alive(lambda: events("desired_ignored"), 10, "the stale one ignored", agent)
        errors = [e["error"] for e in events("desired_invalid")]
        assert len(errors) == 3, errors  # unsigned, another key, another target
        assert "target: 'device:dev-x'" in errors[-1]
        assert "stale" in events("desired_ignored")[0]["reason"]
    finally:
        operator.close()
    time.sleep(1.0)
    state = lab.states()["dev-s"]
    assert state["version"] == 1 and state["update"]["version"] == 1
    assert agent.terminate() == 0


def test_a_future_dated_signed_desired_state_is_refused_and_later_deploys_still_apply(
    lab: Lab,
) -> None:
    lab.publish(1)
    lab.publish(2)
    agent = lab.agent("dev-f").start()
    deploy = ("deploy", "--model", MODEL, "--device", "dev-f", "--sign-key", str(lab.key))
    run = lab.fleet(*deploy, "--version", "1", "--wait", "30")
    assert run.code == 0, run.out + run.err
    wait_alive(lambda: lab.states().get("dev-f", {}).get("version") == 1, 10, "v1", agent)

    # Genuinely signed by the deploy key, but issued a day ahead (a fleet host whose clock
    # was wrong). Applied, every later instruction would be "stale" until that day.
    ahead = time.time() + 86_400
    future = desired_payload(MODEL, 2, "device:dev-f", time.time(), lab.key)
    doc = json.loads(future) | {"issued_at": ahead}
    future = json.dumps(sign_desired(doc, load_private_key(lab.key))).encode()
    operator = subscriber(lab.broker.url, [])
    try:
        operator.publish("edge/dev-f/desired", future, retain=True)
    finally:
        operator.close()
    invalid = lambda: [  # noqa: E731
        d for d in lab.tap.docs("/events") if d.get("event") == "desired_invalid"
    ]
    wait_alive(invalid, 10, "the future-dated desired state refused", agent)
    (event,) = invalid()
    assert event["topic"] == "edge/dev-f/desired"
    assert event["error"].startswith(f"issued_at: {round(ahead, 3):.15g} ("), event
    assert "ahead of this device's clock" in event["error"]
    assert "update.max_clock_skew_s (300 s)" in event["error"]
    time.sleep(0.5)
    assert lab.states()["dev-f"]["version"] == 1  # still serving what it ran

    # The operator clears it and deploys normally: applied.
    assert lab.fleet("deploy", "--device", "dev-f", "--clear").code == 0
    run = lab.fleet(*deploy, "--version", "2", "--wait", "30", "--json")
    assert run.code == 0, run.out + run.err
    assert [d["status"] for d in run.json()["devices"]] == ["succeeded"]
    wait_alive(lambda: lab.states().get("dev-f", {}).get("version") == 2, 10, "v2", agent)
    assert agent.terminate() == 0


def test_a_rollout_waits_out_a_probation_longer_than_its_timeout_while_the_device_reports(
    lab: Lab,
) -> None:
    lab.publish(1)
    agent = lab.agent("dev-p", update={"probation_s": 8}).start()
    lab.wait(lambda: lab.devices().get("dev-p", {}).get("online"), 30, "dev-p online")
    begun = time.monotonic()
    run = lab.rollout(1, "--timeout", "4", "--json")
    took = time.monotonic() - begun
    assert run.code == 0, run.out + run.err
    ((device,),) = run.json()["steps"]
    assert device["status"] == "succeeded" and "probation passed" in device["detail"], device
    assert device["seconds"] >= 8 and took >= 8  # twice the timeout: silence, not duration
    assert "probation" in run.err  # the phases were followed
    wait_alive(lambda: lab.states().get("dev-p", {}).get("version") == 1, 5, "v1", agent)
    assert agent.terminate() == 0


def test_telemetry_follows_live_reports_and_devices_show_an_offline_device(lab: Lab) -> None:
    lab.publish(1, channels=("stable",))
    agent = lab.agent("dev-t", update={"desired_public_key": None}).start()
    wait_alive(lambda: lab.states().get("dev-t", {}).get("version") == 1, 30, "v1", agent)
    run = lab.fleet("telemetry", "--device", "dev-t", "--json", "--count", "12", "--seconds", "20")
    assert run.code == 0, run.err
    lines = [json.loads(line) for line in run.out.splitlines()]
    assert len(lines) == 12
    streams = {line["stream"] for line in lines}
    assert {"telemetry", "results"} <= streams, streams
    assert all(line["device"] == "dev-t" for line in lines)
    now = time.time()
    assert all(line["doc"]["ts"] > now - 10 for line in lines)  # live, not retained ones
    result = next(line["doc"] for line in lines if line["stream"] == "results")
    assert result["version"] == 1 and result["classes"]
    text = lab.fleet("telemetry", "--count", "3", "--seconds", "20")
    assert text.code == 0 and len(text.out.splitlines()) == 3
    assert all(" dev-t " in line for line in text.out.splitlines())

    assert agent.terminate() == 0
    # Its last telemetry is retained on the broker, and is not followed as news.
    assert lab.devices()["dev-t"]["outbox"] is not None
    quiet = lab.fleet("telemetry", "--device", "dev-t", "--seconds", "1.5")
    assert quiet.code == 0 and quiet.out == ""
    row = lab.devices()["dev-t"]
    assert row["online"] is False and row["version"] == 1
    assert row["fps"] is None and row["temp_c"] is None  # not live figures of a device that is off
    assert row["outbox"] is not None and row["last_seen"] > now - 30


# -- the parts, without agents --------------------------------------------------------------


def test_rollout_plan_is_deterministic_starts_with_a_canary_and_covers_every_device() -> None:
    members = [f"d{i:02d}" for i in range(10)]
    steps = plan(members, "yard", 10, 30)
    assert [len(s) for s in steps] == [1, 3, 3, 3]
    assert sorted(d for s in steps for d in s) == members
    assert plan(list(reversed(members)), "yard", 10, 30) == steps  # order of discovery
    assert plan(members, "door", 10, 30) != steps  # another group, other canaries
    # A new member leaves the others' order alone.
    grown = [d for s in plan([*members, "d99"], "yard", 0, 100) for d in s]
    assert [d for d in grown if d != "d99"] == [d for s in steps for d in s]
    assert plan(members, "yard", 0, 100) == [[d for s in steps for d in s]]
    assert plan(["x"], "g", 10, 25) == [["x"]]


def test_a_device_still_updating_when_its_step_times_out_is_sent_back_to_its_release(
    lab: Lab,
) -> None:
    lab.publish(1, channels=("stable",))
    lab.publish(2)
    agent = lab.agent("dev-slow").start()
    wait_alive(lambda: lab.states().get("dev-slow", {}).get("version") == 1, 30, "v1", agent)
    # The v2 model stalls for 6 s after its first kilobyte, then the device resumes it.
    lab.server.fault(f"{MODEL}/2/v2.tflite", "stall", at=1000, max_seconds=6)
    run = lab.rollout(2, "--timeout", "3")
    assert run.code == 1
    # A stalled download is silence (no download progress), although telemetry goes on.
    assert "dev-slow: failed (said nothing about it for 3 s (last: downloading" in run.out, run.out
    assert "dev-slow: desired state set back to colours v1" in run.out
    # The download cannot be cut short, but v2 is not activated: the device stays on v1.
    updates = lambda: [  # noqa: E731
        (d["version"], d["event"], d.get("reason") or "")
        for d in lab.tap.docs("/events")
        if d.get("event") in ("update_succeeded", "update_failed")
    ]
    wait_alive(lambda: updates()[-1][:2] == (2, "update_failed"), 60, "v2 given up", agent)
    assert "superseded before activation" in updates()[-1][2], updates()
    swapped = [d for d in lab.tap.docs("/events") if d.get("event") == "model_swapped"]
    assert all(d.get("version") != 2 for d in swapped), swapped
    back = lambda: lab.states()["dev-slow"]  # noqa: E731
    sent_back = lambda: (back()["version"], (back()["desired"] or {}).get("version"))  # noqa: E731
    wait_alive(lambda: sent_back() == (1, 1), 5, "v1 active and applied again", agent)
    assert lab.devices()["dev-slow"]["desired"]["version"] == 1


def test_forget_removes_a_decommissioned_device_but_not_one_that_is_online(
    broker: Mosquitto,
) -> None:
    operator = subscriber(broker.url, [])
    try:
        for device, state in (("old-1", "offline"), ("live-1", "online")):
            doc = {"schema": 1, "ts": time.time(), "state": state, "groups": ["yard"]}
            sent = operator.publish(f"edge/{device}/status", json.dumps(doc), retain=True)
            assert sent in ("Success", "No matching subscribers")
    finally:
        operator.close()
    assert sorted(
        r["device"] for r in run_fleet("devices", "--broker", broker.url, "--json").json()
    ) == [
        "live-1",
        "old-1",
    ]
    run = run_fleet("forget", "--broker", broker.url, "--device", "live-1")
    assert run.code == 1 and "online" in run.err
    run = run_fleet("forget", "--broker", broker.url, "--device", "old-1")
    assert run.code == 0, run.err
    rows = run_fleet("devices", "--broker", broker.url, "--json").json()
    assert [r["device"] for r in rows] == ["live-1"]


def test_fleet_commands_fail_clearly_without_a_broker_or_with_bad_options(
    tmp_path: Path,
) -> None:
    from tests.broker import free_port

    run = run_fleet("devices", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert run.code == 1 and "cannot reach the broker" in run.err
    run = run_fleet("devices", "--broker", "http://127.0.0.1:1883")
    assert run.code == 2 and "--broker" in run.err
    run = run_fleet("deploy", "--broker", "mqtt://127.0.0.1:1", "--device", "a/b", "--version", "1")
    assert run.code == 2 and "--device" in run.err
    run = run_fleet("deploy", "--broker", "mqtt://127.0.0.1:1", "--group", "g", "--model", "m")
    assert run.code == 2 and "--version" in run.err
    run = run_fleet(
        "rollout",
        *("--broker", "mqtt://127.0.0.1:1", "--model", "m", "--version", "1", "--group", "g"),
        *("--canary", "150"),
    )
    assert run.code == 2 and "--canary" in run.err
    base = ("--broker", "mqtt://127.0.0.1:1", "--model", "m", "--version", "1", "--group", "g")
    for option, value in (("--timeout", "nan"), ("--timeout", "inf"), ("--connect-timeout", "-1")):
        run = run_fleet("rollout", *base, option, value)
        assert run.code == 2 and option in run.err, (option, value, run.err)
    run = run_fleet("deploy", *base, "--wait", "nan")
    assert run.code == 2 and "--wait" in run.err
    run = run_fleet(
        "deploy", "--broker", "mqtt://127.0.0.1:1", "--group", "g", "--clear", "--wait", "5"
    )
    assert run.code == 2 and "--clear" in run.err
    run = run_fleet("deploy", *base[:2], "--model", "bad name", "--version", "1", "--group", "g")
    assert run.code == 2 and "--model" in run.err
    (tmp_path / "bad.key").write_text("not a key")
    run = run_fleet("rollout", *base, "--sign-key", str(tmp_path / "bad.key"))
    assert run.code == 2 and "--sign-key" in run.err


def test_fleet_tools_work_over_mutual_tls_and_a_device_certificate_cannot_deploy(
    tmp_path: Path, secure_broker: Any
) -> None:
    ca = str(secure_broker.ca.cert_path)
    url = secure_broker.broker.tls_url

    def as_cn(cn: str, *args: str) -> Run:
        issued = secure_broker.client_cert(cn)
        tls = ("--ca", ca, "--cert", str(issued.cert), "--key", str(issued.key))
        return run_fleet(args[0], "--broker", url, *tls, *args[1:])

    dev = secure_broker.client("dev-a")
    try:
        status = {"schema": 1, "ts": time.time(), "state": "online", "groups": ["door"]}
        sent = dev.publish("edge/dev-a/status", json.dumps(status), retain=True)
        assert sent in ("Success", "No matching subscribers")
    finally:
        dev.close()
    run = as_cn("fleet", "devices", "--json")
    assert run.code == 0, run.err
    assert [(r["device"], r["online"], r["groups"]) for r in run.json()] == [
        ("dev-a", True, ["door"])
    ]
    run = as_cn("fleet", "deploy", "--model", "m", "--version", "2", "--group", "door", "--json")
    assert run.code == 0, run.err
    assert run.json()["topic"] == "edge/groups/door/desired/m"
    # A device's certificate may not give instructions, not even to itself.
    run = as_cn("dev-a", "deploy", "--model", "m", "--version", "3", "--device", "dev-a")
    assert run.code == 1 and "Not authorized" in run.err, run.err
    run = run_fleet("devices", "--broker", url, "--ca", ca)  # no client certificate
    assert run.code == 1 and "broker" in run.err, run.err


def test_devices_lists_every_device_of_a_fleet_larger_than_the_brokers_queue(
    broker: Mosquitto,
) -> None:
    # 1500 retained messages: at QoS 1 mosquitto (max_queued_messages 1000) would hand a
    # new subscriber about 1020 of them and drop the rest without a word.
    operator = subscriber(broker.url, [])
    try:
        for i in range(500):
            device = f"pi-{i:03d}"
            status = {"schema": 1, "ts": time.time(), "state": "online", "groups": ["yard"]}
            state = {"schema": 1, "ts": time.time(), "model": MODEL, "version": 1 + i % 2}
            telemetry = {"schema": 1, "ts": time.time(), "temp_c": 40.0 + i % 7}
            for stream, doc in (("status", status), ("state", state), ("telemetry", telemetry)):
                operator.client.publish(f"edge/{device}/{stream}", json.dumps(doc), 1, True)
        assert operator.publish("edge/pi-done/status", "{}", retain=True) in (
            "Success",
            "No matching subscribers",
        )  # acknowledged after every earlier one
    finally:
        operator.close()
    rows = run_fleet("devices", "--broker", broker.url, "--group", "yard", "--json").json()
    assert len(rows) == 500
    assert all(r["temp_c"] == 40.0 + int(r["device"][3:]) % 7 for r in rows)
    status = run_fleet("status", "--broker", broker.url, "--model", MODEL, "--json").json()
    assert {v: len(d) for v, d in status["versions"].items()} == {"1": 250, "2": 250}
