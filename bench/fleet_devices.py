"""``edge-fleet devices`` on a large fleet, as a ratio to a bare paho client.

A local mosquitto holds the retained status, state and telemetry of ``--devices``
devices (realistic payloads, as the agent publishes them). Figure: the time of the
fleet tool's snapshot (connect, subscribe, wait for its sync marker, build the view,
render every row as JSON) against a bare paho client that subscribes to the same
topics (QoS 0, as the tool does) and only counts messages until it has all of them,
alternating rounds in the same run; the ratio of the medians (goal <= 2: the tool adds
little to reading the broker). The fleet tool's snapshot is checked to hold every
device: at QoS 1 mosquitto's max_queued_messages (1000) would drop most of them.

    python bench/fleet_devices.py [--devices 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.fleet.broker import BrokerOptions, FleetBroker  # noqa: E402
from agent.fleet.view import REPORTS, FleetView  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402

TOPICS = ["edge/+/status", "edge/+/state", "edge/+/telemetry"]


def _docs(device: str, now: float) -> dict[str, dict[str, object]]:
    return {
        "status": {"schema": 1, "ts": now, "state": "online", "groups": ["door", "canary"]},
        "state": {
            "schema": 1,
            "ts": now,
            "model": "person-detector",
            "version": 3,
            "sha256": "a" * 64,
            "backend": "edgetpu",
            "serving": 3,
            "previous": 2,
            "phase": "succeeded",
            "last_error": None,
            "update": {"id": "0" * 12, "model": "person-detector", "version": 3},
            "desired": None,
            "bad": [],
        },
        "telemetry": {
            "schema": 1,
            "ts": now,
            "cpu_pct": 31.5,
            "load": [0.5, 0.6, 0.7],
            "mem_pct": 40.1,
            "rss_mb": 98.2,
            "temp_c": 55.3,
            "disk_free_mb": 9000.0,
            "inference": {"fps": 29.8, "latency_ms_p95": 14.2, "backend": "edgetpu"},
            "outbox": {"depth": 0, "bytes": 8192, "dropped": 0},
            "mqtt": {"connected": True, "protocol": "5"},
        },
    }


def populate(port: int, devices: int) -> int:
    """Publish the retained reports of ``devices`` devices; returns the message count."""
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="populate", protocol=mqtt.MQTTv5)
    client.on_publish = lambda *args: acked.release()
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    count = 0
    now = time.time()
    for i in range(devices):
        device = f"pi-{i:05d}"
        for stream, doc in _docs(device, now).items():
            client.publish(f"edge/{device}/{stream}", json.dumps(doc), qos=1, retain=True)
            count += 1
    for _ in range(count):
        if not acked.acquire(timeout=30):
            raise RuntimeError("the broker did not acknowledge the population")
    client.disconnect()
    client.loop_stop()
    return count


def bare(port: int, expected: int) -> float:
    """Seconds for a bare paho client to receive ``expected`` retained messages."""
    got = threading.Semaphore(0)
    start = time.perf_counter()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda *args: got.release()
    client.on_connect = lambda c, *args: c.subscribe([(t, 0) for t in TOPICS])
    client.connect("127.0.0.1", port)
    client.loop_start()
    for _ in range(expected):
        if not got.acquire(timeout=60):
            raise RuntimeError("bare client: messages missing")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return elapsed


def fleet(port: int, devices: int) -> float:
    """Seconds for the fleet tool's ``devices --json`` work, output rendered."""
    start = time.perf_counter()
    view = FleetView("edge")
    with FleetBroker(BrokerOptions(url=f"mqtt://127.0.0.1:{port}", timeout_s=60)) as broker:
        broker.connect(view.subscriptions(REPORTS))
        for message in broker.messages():
            view.take(message)
    text = json.dumps([d.row() for d in view.reporting()])
    elapsed = time.perf_counter() - start
    if len(view.reporting()) != devices or not text:
        raise RuntimeError(f"the snapshot has {len(view.reporting())} devices, not {devices}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        expected = populate(broker.port, args.devices)
        bare_s, fleet_s = [], []
        for _ in range(args.rounds):
            bare_s.append(bare(broker.port, expected))
            fleet_s.append(fleet(broker.port, args.devices))
    b, f = statistics.median(bare_s), statistics.median(fleet_s)
    print(f"{args.devices} devices, {expected} retained messages, {args.rounds} rounds (medians)")
    print(f"  bare paho, receive all retained:   {b:.3f} s")
    print(f"  edge-fleet devices --json:         {f:.3f} s")
    print(f"  ratio (fleet tool / bare client):  {f / b:.2f}  (goal <= 2)")


if __name__ == "__main__":
    main()
