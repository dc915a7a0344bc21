"""Publishing through the outbox, as a ratio to raw paho QoS 1 publishing; replay rate.

Figure (a): N result-sized messages recorded through ``Telemetry`` (numbered, committed
to the SQLite outbox, sent, acknowledged, deleted) against the same N published
straight with paho at QoS 1 (no outbox), both to one local mosquitto in the same
run, alternating rounds; the ratio of the medians (goal >= 0.5).

Figure (b): the broker is down for ``--outage-s`` seconds while results are recorded
at ``--rate`` per second (a camera at 30 fps, ``results.publish: every``), then comes
back; the replay rate is the backlog divided by the time until the outbox is empty.
It is also given as a ratio to (a)'s raw paho rate.

    python bench/outbox_throughput.py [--messages 20000] [--rounds 3] [--outage-s 60]
"""

from __future__ import annotations

import argparse
import json
import logging
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

from agent.config import MqttConfig, ResultsConfig  # noqa: E402
from agent.outbox import Outbox  # noqa: E402
from agent.telemetry import Telemetry  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402

RESULT = {
    "frame": 1234,
    "model": "person-detector",
    "version": 3,
    "backend": "cpu",
    "latency_ms": 12.5,
    "infer_ms": 9.1,
    "detections": [{"id": 1, "label": "person", "score": 0.91, "box": [12.0, 30.5, 88.0, 200.0]}],
}


def raw_paho(port: int, n: int) -> float:
    """Seconds to publish ``n`` QoS 1 messages with paho and get every PUBACK."""
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.on_publish = lambda *args: acked.release()
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.2)
    payload = json.dumps({"schema": 1, "seq": 1, "id": "0" * 24, "ts": 0.0, **RESULT}).encode()
    start = time.perf_counter()
    for _ in range(n):
        client.publish("bench/raw/results", payload, qos=1)
    for _ in range(n):
        acked.acquire()
    seconds = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return seconds


def _telemetry(folder: Path, url: str, results: ResultsConfig) -> Telemetry:
    return Telemetry(
        "bench-dev",
        Outbox(folder / "outbox.sqlite", 500 * 10**6).open(),
        MqttConfig(url=url, reconnect_max_s=1),
        results,
        interval_s=3600,
    )


def through_outbox(port: int, n: int) -> float:
    """Seconds to record ``n`` results through Telemetry until all are acknowledged."""
    with tempfile.TemporaryDirectory() as tmp:
        telemetry = _telemetry(Path(tmp), f"mqtt://127.0.0.1:{port}", ResultsConfig())
        telemetry.start()
        assert telemetry.link is not None and telemetry.link.connected.wait(10)
        time.sleep(0.2)
        base = telemetry.counters.acked
        start = time.perf_counter()
        for i in range(n):
            telemetry.record("results", {**RESULT, "frame": i})
        while telemetry.counters.acked - base < n:
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        telemetry.stop()
        return seconds


def replay(broker: Mosquitto, outage_s: float, rate: float) -> tuple[int, float]:
    """(backlog, seconds to drain it) after ``outage_s`` of recording at ``rate``/s."""
    with tempfile.TemporaryDirectory() as tmp:
        broker.stop()
        telemetry = _telemetry(Path(tmp), broker.url, ResultsConfig())
        telemetry.start()
        end = time.monotonic() + outage_s
        i = 0
        while time.monotonic() < end:
            telemetry.record("results", {**RESULT, "frame": i})
            i += 1
            time.sleep(max(0.0, (i / rate) - (time.monotonic() - (end - outage_s))))
        assert telemetry.flush(30)
        backlog = telemetry.depth()
        base = telemetry.counters.acked
        broker.start()
        assert telemetry.link is not None and telemetry.link.connected.wait(30)
        start = time.perf_counter()  # from the reconnect, not the broker's start
        while telemetry.counters.acked - base < backlog:  # acked (deletes are batched)
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        telemetry.stop()
        return backlog, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=30.0, help="results per second")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        raw, ours = [], []
        for _ in range(args.rounds):
            raw.append(raw_paho(broker.port, args.messages))
            ours.append(through_outbox(broker.port, args.messages))
        raw_rate = args.messages / statistics.median(raw)
        our_rate = args.messages / statistics.median(ours)
        print(
            f"(a) raw paho QoS 1:      {raw_rate:8.0f} msg/s   rounds {[round(s, 2) for s in raw]}"
        )
        print(
            f"    through the outbox:  {our_rate:8.0f} msg/s   rounds {[round(s, 2) for s in ours]}"
        )
        print(f"    ratio outbox / raw:  {our_rate / raw_rate:.2f}   (goal >= 0.5)")
        backlog, seconds = replay(broker, args.outage_s, args.rate)
        replay_rate = backlog / seconds
        print(
            f"(b) after a {args.outage_s:.0f} s outage at {args.rate:.0f} results/s: backlog "
            f"{backlog}, drained in {seconds:.2f} s = {replay_rate:.0f} msg/s "
            f"({replay_rate / raw_rate:.2f} of raw paho)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
