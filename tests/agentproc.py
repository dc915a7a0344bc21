"""``edge-agent run`` as a real subprocess, and a broker-side tap with a persistent session.

``AgentProcess`` writes a device config (a generated classifier published into a
``file://`` registry, a synthetic stream, MQTT to the test broker), starts the agent
and can SIGKILL or SIGTERM it. ``Tap`` is an observer that keeps its session on the
broker (clean_start=False with a session expiry), so what the broker queues for it
while it is away, or while the broker restarts with persistence, still reaches it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.publish import publish

MODEL = "colours"


def publish_models(registry: Path, models_root: Path, versions: tuple[int, ...] = (1,)) -> None:
    """Publish the generated colour classifiers v1.. into ``registry`` (channel stable)."""
    for version in versions:
        publish(
            [models_root / f"v{version}.tflite"],
            model=MODEL,
            version=version,
            registry=registry,
            task="classification",
            labels=models_root / "colours.txt",
            channels=("stable",),
        )


class AgentProcess:
    """One device: its folder, its config, and the agent process running on it."""

    def __init__(self, root: Path, device_id: str, settings: dict[str, Any]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.device_id = device_id
        self.config_path = root / "config.yaml"
        self.log_path = root / "agent.log"
        self.outbox_path = root / "outbox.sqlite"
        base: dict[str, Any] = {
            "device": {"id": device_id},
            "model": {"name": MODEL},
            "store": {"dir": str(root / "store"), "reserve_mb": 0},
            "runtime": {"accelerator": "cpu", "warmup_runs": 1},
            "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 20},
            "results": {"publish": "every", "min_score": 0.0, "top_k": 1},
            "telemetry": {"interval_s": 0.25, "outbox": str(self.outbox_path)},
            "update": {"probation_s": 1, "budget_runs": 5},
        }
        for section, values in settings.items():
            base.setdefault(section, {}).update(values)
        self.settings = base
        self.config_path.write_text(yaml.safe_dump(base))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env["EDGE_AGENT_LOG_LEVEL"] = "debug"
        env.update(extra_env or {})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the agent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.alive():
            self.kill()

    def rewrite(self, **sections: dict[str, Any]) -> None:
        """Change config sections (for SIGHUP, or the next start)."""
        for section, values in sections.items():
            self.settings.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def journal(self) -> dict[str, Any]:
        """The update journal the agent keeps in its store (``updates.json``)."""
        path = Path(self.settings["store"]["dir"]) / "updates.json"
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc


def wait_alive(
    condition: Callable[[], bool], timeout: float, what: str, agent: AgentProcess
) -> None:
    """Wait for ``condition`` while the agent lives; fail with the agent's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert agent.alive(), f"the agent died:\n{agent.log()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s\n--- agent log ---\n{agent.log()[-4000:]}")


class NotifySocket:
    """A systemd-style NOTIFY_SOCKET: a datagram socket that records what arrives."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="notify-"))  # short: sun_path is 108 bytes
        self.path = self.folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.datagrams: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams.append((time.monotonic(), data.decode(errors="replace")))

    def lines(self) -> list[str]:
        return [line for _, text in list(self.datagrams) for line in text.split("\n")]

    def first(self, line: str) -> float | None:
        """When a datagram holding ``line`` first arrived (monotonic), or None."""
        for at, text in list(self.datagrams):
            if line in text.split("\n"):
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Tap:
    """An MQTT 5 observer with a persistent session that records every JSON message."""

    def __init__(self, host: str, port: int, topics: list[str], client_id: str | None = None):
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topics = topics
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"tap-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(host, port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("tap: no SUBACK")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except (ValueError, RecursionError):  # a test may publish hostile documents
            doc = {"raw": msg.payload.decode(errors="replace")}
        with self._lock:
            self.messages.append((msg.topic, doc, bool(msg.retain)))

    def docs(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [doc for topic, doc, _ in self.messages if topic.endswith(suffix)]

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.02)
        raise TimeoutError(f"tap: {what} not seen within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def seq_gaps(docs: list[dict[str, Any]]) -> list[int]:
    """The seq numbers missing between the lowest and highest seen (duplicates allowed)."""
    seen = {doc["seq"] for doc in docs}
    if not seen:
        return []
    return sorted(set(range(min(seen), max(seen) + 1)) - seen)
