"""bench/fleetsim.py against a real mosquitto: what its devices publish is what the
server accepts (agent.server.inbound.read and the contract's validators), a clean stop
says ``offline/stopped``, and a killed simulator's devices go offline through their
Last Will, as a crashed agent's would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.contract import validator
from agent.server.inbound import Inbound, read
from tests.broker import Collector, Mosquitto, Received, free_port, subscriber

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "bench" / "fleetsim.py"
DEVICES = 20
WAIT_S = 15.0


def simulator(broker: Mosquitto, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SIM), "--devices", str(DEVICES), "--broker", broker.url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def statuses(got: list[Received]) -> dict[str, dict[str, object]]:
    """The latest status document of each device."""
    latest: dict[str, dict[str, object]] = {}
    for m in got:
        if m.topic.endswith("/status"):
            latest[m.topic.split("/")[1]] = json.loads(m.payload)
    return latest


def all_offline(reason: str) -> Callable[[list[Received]], bool]:
    def check(got: list[Received]) -> bool:
        latest = statuses(got)
        return len(latest) == DEVICES and all(
            d["state"] == "offline" and d.get("reason") == reason for d in latest.values()
        )

    return check


@pytest.fixture
def watch(broker: Mosquitto) -> Iterator[Collector]:
    with subscriber(broker.url, ["edge/#"]) as collector:
        yield collector


def test_every_message_passes_the_servers_reader_and_the_contract(
    broker: Mosquitto, watch: Collector
) -> None:
    sim = simulator(broker, "--interval", "0.5", "--duration", "30", "--event-rate", "0.5")
    try:
        got = watch.wait_for(
            lambda ms: (
                len({m.topic for m in ms if m.topic.endswith("/telemetry")}) == DEVICES
                and sum(m.topic.endswith("/telemetry") for m in ms) >= 3 * DEVICES
            ),
            WAIT_S,
        )
    finally:
        sim.kill()
        sim.wait(10)
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    ids: set[str] = set()
    streams: set[str] = set()
    for m in got:
        inbound = read("edge", m.topic, m.payload)
        assert isinstance(inbound, Inbound), (m.topic, inbound, m.payload[:300])
        doc = json.loads(m.payload)
        validator(inbound.stream).validate_python(doc)  # strict: raises on any drift
        streams.add(inbound.stream)
        seen[(inbound.device, inbound.stream)].append(doc["seq"])
        assert doc["id"] not in ids
        ids.add(doc["id"])
    assert streams == {"status", "state", "telemetry", "events"}
    assert {device for device, _ in seen} == {f"sim-{n:04d}" for n in range(1, DEVICES + 1)}
    for key, seqs in seen.items():
        assert seqs == list(range(1, len(seqs) + 1)), key  # per device and stream, no gap


def test_a_killed_simulators_devices_go_offline_through_their_will(
    broker: Mosquitto, watch: Collector
) -> None:
    sim = simulator(broker, "--interval", "0.5", "--duration", "60")
    try:
        watch.wait_for(lambda ms: len(statuses(ms)) == DEVICES, WAIT_S)
        assert all(d["state"] == "online" for d in statuses(watch.messages()).values())
        sim.send_signal(signal.SIGKILL)
        sim.wait(10)
        got = watch.wait_for(all_offline("lost"), WAIT_S)
    finally:
        sim.kill()
        sim.wait(10)
    for m in got:
        if m.topic.endswith("/status") and b'"offline"' in m.payload:
            will = read("edge", m.topic, m.payload)
            assert isinstance(will, Inbound) and "seq" not in will.doc  # made by the broker


def test_a_clean_stop_says_stopped_and_every_message_was_acknowledged(
    broker: Mosquitto, watch: Collector
) -> None:
    sim = simulator(broker, "--interval", "0.5", "--duration", "2")
    out, err = sim.communicate(timeout=30)
    assert sim.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["published_total"] == stats["acked"] > 3 * DEVICES, stats
    watch.wait_for(all_offline("stopped"), WAIT_S)


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SIM), "--devices", "3", "--broker", f"mqtt://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetsim: cannot connect to"), done.stderr
