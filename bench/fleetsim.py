"""A simulated fleet: N devices speaking the device protocol to an MQTT broker.

Each device is one paho-mqtt 2.x client (MQTT 5, its own TCP connection and client id
``sim-0001``, ``sim-0002``, …) that does what an agent does on the wire
(docs/protocol.md, the documents of :mod:`agent.contract`):

- a Last Will ``{"state": "offline", "reason": "lost", …}`` on its retained status, then
  on connect a retained online status, a retained state and an ``agent_started`` event;
- a retained telemetry document every ``--interval`` seconds (devices spread evenly
  over the interval), and now and then (``--event-rate`` per telemetry) a
  ``source_lost`` / ``source_recovered`` event;
- at the end of ``--duration`` (or on SIGINT/SIGTERM) a clean stop: a retained offline
  status with ``reason: stopped`` and a DISCONNECT. A killed simulator leaves the Wills
  to the broker, as a crashed agent would.

Every payload has the envelope (``schema``, ``seq`` per device and stream, ``id`` of 96
random bits, ``ts``) and validates with ``agent.contract.validator(stream)``.

Not one thread per device: ``--threads`` shards (default 2) each drive their devices'
clients with a selector and paho's manual loop (``loop_read`` / ``loop_write`` /
``loop_misc``), publishing from the same thread, so nothing in paho is shared between
threads. 1,000 devices at one telemetry a second take about a third of one core here
(the figure is printed at the end: CPU seconds over wall seconds).

    python bench/fleetsim.py [--devices 1000] [--interval 10] [--duration 60]
                             [--broker mqtt://127.0.0.1:1883] [--threads 2]

Progress goes to stderr; at the end one JSON line on stdout: the messages published
and acknowledged by stream, connect time, CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import random
import resource
import selectors
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402

AGENT_VERSION = "0.1.0-sim"
MODEL = "person-detector"
GROUPS = ("sim", "canary")
KEEPALIVE_S = 30
CONNECT_BATCH = 25  # connections opened per shard and loop turn (mosquitto's backlog)
MISC_EVERY_S = 1.0  # keepalive pings (a dropped device stays down: see "lost")
CONNECT_TIMEOUT_S = 60.0  # all devices connected, or the simulator gives up


def device_id(n: int) -> str:
    """``sim-0001`` for 1: the simulator's device ids, numbered from 1."""
    return f"sim-{n:04d}"


# -- the documents (pure: plain values in, a message dict out) ------------------------


@dataclass
class Device:
    """One simulated device's identity and counters (the envelope's ``seq`` per stream)."""

    id: str
    groups: list[str]
    version: int
    rng: random.Random
    seq: Counter[str] = field(default_factory=Counter)
    source_down_since: float | None = None
    started: float = field(default_factory=time.time)

    def envelope(self, stream: str, now: float) -> dict[str, Any]:
        self.seq[stream] += 1
        return {
            "schema": 1,
            "seq": self.seq[stream],
            "id": self.rng.getrandbits(96).to_bytes(12, "big").hex(),
            "ts": round(now, 3),
        }


def will(dev: Device, now: float) -> dict[str, Any]:
    """The Last Will (made by the broker for the device: no ``seq`` or ``id``)."""
    return {"schema": 1, "ts": round(now, 3), "state": "offline", "reason": "lost",
            "groups": dev.groups, "agent_version": AGENT_VERSION}  # fmt: skip


def status(dev: Device, now: float, state: str = "online") -> dict[str, Any]:
    doc = {**dev.envelope("status", now), "state": state}
    if state == "offline":
        doc["reason"] = "stopped"
    return {**doc, "groups": dev.groups, "agent_version": AGENT_VERSION}


def state(dev: Device, now: float) -> dict[str, Any]:
    v = dev.version
    return {
        **dev.envelope("state", now),
        "agent_version": AGENT_VERSION, "model": MODEL, "version": v,
        "sha256": f"{v:064x}", "backend": "edgetpu", "serving": v,
        "previous": v - 1 if v > 1 else None, "phase": "succeeded", "last_error": None,
        "update": {
            "id": f"{v:024x}", "model": MODEL, "version": v, "source": "group:sim",
            "issued_at": round(now - 3600, 3), "phase": "probation", "outcome": "succeeded",
            "reason": None, "started_at": round(now - 3590, 3), "deadline_s": None,
            "retry": None,
        },
        "desired": None,
        "bad": [],
    }  # fmt: skip


def telemetry(dev: Device, now: float) -> dict[str, Any]:
    r = dev.rng
    frames = int((now - dev.started) * 30)
    fps = round(r.uniform(28.0, 30.5), 2)
    return {
        **dev.envelope("telemetry", now),
        "agent_version": AGENT_VERSION,
        "cpu_pct": round(r.uniform(5, 60), 1), "load": [round(r.uniform(0, 2), 2)] * 3,
        "mem_pct": round(r.uniform(20, 60), 1), "mem_available_mb": round(r.uniform(500, 3000), 1),
        "rss_mb": round(r.uniform(90, 110), 1), "agent_cpu_pct": round(r.uniform(5, 40), 1),
        "disk_free_mb": round(r.uniform(5000, 9000), 1), "temp_c": round(r.uniform(45, 70), 1),
        "tpu_temp_c": None, "uptime_s": round(now - dev.started, 1),
        "boot_uptime_s": round(now - dev.started + 100, 1),
        "inference": {
            "frames": frames, "results": frames, "dropped": 0, "errors": 0, "fps": fps,
            "latency_ms_p50": round(r.uniform(8, 12), 2),
            "latency_ms_p95": round(r.uniform(12, 20), 2),
            "latency_ms_p99": round(r.uniform(20, 30), 2),
            "infer_ms_p50": round(r.uniform(5, 8), 2), "backend": "edgetpu", "model": MODEL,
            "version": dev.version, "source_connected": dev.source_down_since is None,
        },
        "outbox": {"depth": 0, "bytes": 8192, "dropped": 0, "overflow": 0},
        "mqtt": {"connected": True, "protocol": "5", "connects": 1, "inflight": 0,
                 "rejected": 0, "unsent_qos0": 0},
    }  # fmt: skip


def started_event(dev: Device, now: float) -> dict[str, Any]:
    return {**dev.envelope("events", now), "event": "agent_started", "pid": os.getpid()}


def source_event(dev: Device, now: float) -> dict[str, Any]:
    """``source_lost``, or ``source_recovered`` when the source is down (alternately)."""
    body: dict[str, Any]
    if dev.source_down_since is None:
        dev.source_down_since = now
        body = {"event": "source_lost", "source": "camera", "error": "no frame for 5 s"}
    else:
        down = round(now - dev.source_down_since, 3)
        dev.source_down_since = None
        body = {"event": "source_recovered", "source": "camera", "down_s": down}
    return {**dev.envelope("events", now), **body}


# -- the network: shards of clients on a selector ---------------------------------------


@dataclass
class Options:
    host: str
    port: int
    devices: int
    interval_s: float
    duration_s: float
    threads: int
    prefix: str = "edge"
    event_rate: float = 0.01  # events per telemetry
    seed: int = 1


class Shard(threading.Thread):
    """The devices ``numbers`` of the fleet, driven by one thread."""

    def __init__(self, opts: Options, numbers: list[int], stop: threading.Event) -> None:
        super().__init__(name=f"fleetsim-{numbers[0] if numbers else 0}", daemon=True)
        self.opts = opts
        self.stop_event = stop
        self.sel = selectors.DefaultSelector()
        self.devices = [
            Device(device_id(n), list(GROUPS), 1 + n % 3, random.Random(opts.seed * 1_000_003 + n))
            for n in numbers
        ]
        self.clients: list[mqtt.Client] = []
        self.connected: set[int] = set()
        self.published: Counter[str] = Counter()
        self.acked = 0
        self.error: str | None = None

    # paho callbacks run inside loop_read, in this thread
    def _on_connect(self, c: mqtt.Client, i: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.error = f"{self.devices[i].id}: the broker refused the connection: {rc}"
            return
        self.connected.add(i)
        now = time.time()
        self._publish(i, "status", status(self.devices[i], now))
        self._publish(i, "state", state(self.devices[i], now))
        self._publish(i, "events", started_event(self.devices[i], now))

    def _on_publish(self, c: mqtt.Client, i: Any, mid: int, rc: Any, props: Any) -> None:
        self.acked += 1

    def _publish(self, i: int, stream: str, doc: dict[str, Any]) -> None:
        topic = f"{self.opts.prefix}/{self.devices[i].id}/{stream}"
        retain = stream in ("status", "state", "telemetry")
        self.clients[i].publish(topic, json.dumps(doc, separators=(",", ":")), 1, retain)
        self.published[stream] += 1

    def _client(self, i: int) -> mqtt.Client:
        dev = self.devices[i]
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev.id, userdata=i,
                        protocol=mqtt.MQTTv5)  # fmt: skip
        c.will_set(
            f"{self.opts.prefix}/{dev.id}/status", json.dumps(will(dev, time.time())), 1, True
        )
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        return c

    def _connect(self, i: int) -> None:
        c = self.clients[i]
        c.connect(self.opts.host, self.opts.port, keepalive=KEEPALIVE_S)  # raises OSError
        sock = c.socket()
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, i)

    def _drop(self, i: int) -> None:
        sock = self.clients[i].socket()
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
        self.connected.discard(i)

    def _pump(self, i: int, rc: MQTTErrorCode) -> None:
        """After a read or a publish: write what is queued; a failure drops the client."""
        c = self.clients[i]
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and c.want_write():
            rc = c.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop(i)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the main thread as one line
            self.error = f"{type(exc).__name__}: {exc}"
            self.stop_event.set()

    def _run(self) -> None:
        opts, n = self.opts, len(self.devices)
        self.clients = [self._client(i) for i in range(n)]
        to_connect = list(range(n))
        start = time.time()
        total = max(1, opts.devices)
        # the first telemetry of each device, spread over one interval by its number
        due = [
            (start + opts.interval_s * (int(d.id[4:]) / total), i)
            for i, d in enumerate(self.devices)
        ]
        heapq.heapify(due)
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self.stop_event.is_set():
            for i in to_connect[:CONNECT_BATCH]:
                self._connect(i)
            del to_connect[:CONNECT_BATCH]
            now = time.time()
            timeout = min(0.05, max(0.0, due[0][0] - now)) if due else 0.05
            for key, _ in self.sel.select(0 if to_connect else timeout):
                i = key.data
                self._pump(i, self.clients[i].loop_read(max_packets=10))
            now = time.time()
            while due and due[0][0] <= now:
                _, i = heapq.heappop(due)
                heapq.heappush(due, (now + opts.interval_s, i))
                if i in self.connected:
                    dev = self.devices[i]
                    self._publish(i, "telemetry", telemetry(dev, now))
                    if dev.rng.random() < opts.event_rate:
                        self._publish(i, "events", source_event(dev, now))
                    self._pump(i, MQTTErrorCode.MQTT_ERR_SUCCESS)
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + MISC_EVERY_S
                for i in list(self.connected):
                    self._pump(i, self.clients[i].loop_misc())
        self._stop()

    def _stop(self) -> None:
        """A clean stop: offline (retained, reason stopped), then DISCONNECT."""
        now = time.time()
        for i in list(self.connected):
            self._publish(i, "status", status(self.devices[i], now, "offline"))
            self._pump(i, MQTTErrorCode.MQTT_ERR_SUCCESS)
        deadline = time.monotonic() + 5.0  # the offline statuses' PUBACKs, bounded
        expected = sum(self.published.values())
        while self.acked < expected and time.monotonic() < deadline and self.connected:
            for key, _ in self.sel.select(0.05):
                self._pump(key.data, self.clients[key.data].loop_read(max_packets=10))
        for i in list(self.connected):
            self.clients[i].disconnect()
            self._drop(i)
        self.sel.close()


# -- the whole fleet --------------------------------------------------------------------


class Fleet:
    """Build with :class:`Options`, :meth:`start`, :meth:`wait_connected`, :meth:`stop`."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stop_event = threading.Event()
        numbers = list(range(1, opts.devices + 1))
        k = max(1, min(opts.threads, opts.devices))
        self.shards = [Shard(opts, numbers[s::k], self.stop_event) for s in range(k)]

    def start(self) -> None:
        for shard in self.shards:
            shard.start()

    def connected(self) -> int:
        return sum(len(s.connected) for s in self.shards)

    def errors(self) -> list[str]:
        return [s.error for s in self.shards if s.error is not None]

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.connected() < self.opts.devices:
            if self.errors() or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self.stop_event.set()
        for shard in self.shards:
            shard.join(10.0)

    def stats(self) -> dict[str, Any]:
        published: Counter[str] = Counter()
        for s in self.shards:
            published.update(s.published)
        return {
            "devices": self.opts.devices,
            "published": dict(published),
            "published_total": sum(published.values()),
            "acked": sum(s.acked for s in self.shards),
        }


def parse_broker(url: str) -> tuple[str, int]:
    """(host, port) of ``mqtt://HOST[:PORT]``; ValueError names what is wrong."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ValueError(f"--broker {url!r}: use mqtt://HOST[:PORT] (no TLS in the simulator)")
    return parsed.hostname, parsed.port or 1883


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry period, s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds, then stop")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--event-rate", type=float, default=0.01)
    parser.add_argument("--prefix", default="edge")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 10_000:
        parser.error("--devices must be between 1 and 10000")
    if not 0.05 <= args.interval <= 3600 or not 0 < args.duration <= 7 * 86_400:
        parser.error("--interval must be 0.05..3600 s and --duration 0..604800 s")
    if not 1 <= args.threads <= 64 or not 0 <= args.event_rate <= 1:
        parser.error("--threads must be 1..64 and --event-rate 0..1")
    try:
        host, port = parse_broker(args.broker)
    except ValueError as exc:
        parser.error(str(exc))
    fleet = Fleet(Options(host, port, args.devices, args.interval, args.duration, args.threads,
                          prefix=args.prefix, event_rate=args.event_rate))  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: fleet.stop_event.set())
    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    fleet.start()
    ok = fleet.wait_connected(CONNECT_TIMEOUT_S)
    connect_s = time.monotonic() - t0
    if not ok:
        fleet.stop()
        problem = "; ".join(fleet.errors()) or f"{fleet.connected()} of {args.devices} connected"
        print(f"fleetsim: cannot connect to {args.broker}: {problem}", file=sys.stderr)
        return 1
    print(
        f"fleetsim: {args.devices} devices connected in {connect_s:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    fleet.stop_event.wait(max(0.0, args.duration - connect_s))
    fleet.stop()
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stats = {**fleet.stats(), "connect_s": round(connect_s, 3), "elapsed_s": round(elapsed, 3),
             "cpu_s": round(cpu_s, 3), "cpu_share": round(cpu_s / elapsed, 3),
             "errors": fleet.errors()}  # fmt: skip
    print(json.dumps(stats), flush=True)
    return 1 if fleet.errors() else 0


if __name__ == "__main__":
    sys.exit(main())
