"""bench/daemon.py's memory section: the agent's RSS by source against a bare process.

For each source (synthetic, video, sensor) one device folder gets the model installed
by a first start; then the agent and a bare process running the same model at the same
pace are started alternately, ``--rounds`` times, and their RSS read after
``--settle-s`` seconds of serving. See bench/daemon.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from agent import modelgen, zoo
from agent.fleet.publish import publish
from tests.agentproc import AgentProcess
from tests.broker import Mosquitto

GOAL_MB = 40.0
FPS = 10.0
SENSOR_HZ = 100.0
WINDOW, CHANNELS = 32, 3

# argv: model path, source kind (synthetic|video|sensor), video path, fps
BARE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    model, kind, video, fps = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    interpreter = Interpreter(model_path=model, num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    shape, dtype = detail["shape"], detail["dtype"]
    frames = None
    if kind == "video":
        import cv2
        capture = cv2.VideoCapture(video)
    def sample():
        if kind != "video":
            return np.zeros(shape, dtype)
        ok, frame = capture.read()
        if not ok:
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = capture.read()
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        frame = cv2.resize(frame, (int(shape[2]), int(shape[1])))
        return frame.reshape(shape).astype(dtype)
    interpreter.set_tensor(detail["index"], sample())
    interpreter.invoke()
    print("ready", flush=True)
    while True:
        time.sleep(1 / fps)
        interpreter.set_tensor(detail["index"], sample())
        interpreter.invoke()
    """
)

# Runs the agent with tracemalloc and writes Python's allocations by package after ``delay``.
TRACED = textwrap.dedent(
    """
    import json, os, sys, threading, time, tracemalloc
    out, delay = sys.argv.pop(1), float(sys.argv.pop(1))
    def dump():
        time.sleep(delay)
        stats = tracemalloc.take_snapshot().statistics("filename")
        by = {}
        for stat in stats:
            path = stat.traceback[0].filename
            if "site-packages/" in path:
                key = path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
            elif "/agent/" in path:
                key = "agent/" + path.split("/agent/")[-1].split("/")[0].removesuffix(".py")
            elif path.startswith("<"):
                key = "<frozen importlib and others>"
            else:
                key = "stdlib " + path.rsplit("/", 1)[-1].removesuffix(".py")
            by[key] = by.get(key, 0) + stat.size
        # Allocations made while unmarshalling modules' code are the frozen importlib's:
        # the size of each package's loaded .pyc files says whose code they are.
        pyc = {}
        for name, module in list(sys.modules.items()):
            cached = getattr(module, "__cached__", None)
            if cached and os.path.exists(cached):
                key = name.split(".")[0]
                pyc[key] = pyc.get(key, 0) + os.path.getsize(cached)
        with open(out, "w") as f:
            json.dump({"traced": by, "pyc": pyc}, f)
    threading.Thread(target=dump, daemon=True).start()
    from agent import entry
    sys.exit(entry.edge_agent())
    """
)


def write_video(path: Path, width: int = 640, height: int = 480, frames: int = 60) -> None:
    import cv2

    from agent.sources import pattern_frames

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (width, height))
    pattern = pattern_frames(width, height, 30)
    for index in range(frames):
        writer.write(cv2.cvtColor(pattern[index % 30], cv2.COLOR_RGB2BGR))
    writer.release()


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss / 1e6)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sensor:
    """Sends one JSON sample of CHANNELS numbers to 127.0.0.1:port SENSOR_HZ times a second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sensor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            n = 0
            while not self._stop.wait(1 / SENSOR_HZ):
                n += 1
                s.sendto(json.dumps([n % 7, n % 5, n % 3]).encode(), ("127.0.0.1", self.port))


def image_model(name: str, folder: Path) -> tuple[Path, str]:
    """The image model file and its task: the generated classifier or a zoo file."""
    if name == "colours":
        path = folder / "colours.tflite"
        path.write_bytes(modelgen.colour_classifier())
        return path, "raw"
    return zoo.fetch(name), "raw"


def device(
    root: Path, kind: str, model: Path, task: str, broker_url: str, video: Path
) -> tuple[AgentProcess, int | None]:
    """A device folder for ``kind`` with ``model`` installed (a first start); its UDP port."""
    registry = root / "registry"
    publish([model], model="m", version=1, registry=registry, task=task, channels=("stable",))
    port = free_udp_port() if kind == "sensor" else None
    sources: dict[str, dict[str, Any]] = {
        "synthetic": {"type": "synthetic", "width": 640, "height": 480, "fps": FPS},
        "video": {"type": "video", "path": str(video), "loop": True, "fps": FPS},
        "sensor": {
            "type": "udp",
            "port": port,
            "bind": "127.0.0.1",
            "window": WINDOW,
            "channels": CHANNELS,
        },
    }
    settings = {
        "model": {"name": "m"},
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        "mqtt": {"url": broker_url},
        "source": sources[kind],
        "results": {"publish": "on_change"},
        "telemetry": {"interval_s": 10, "outbox": str(root / "outbox.sqlite")},
        "update": {"probation_s": 0},
        "runtime": {"accelerator": "cpu", "threads": 1, "warmup_runs": 1},
    }
    agent = AgentProcess(root / "device", f"bench-{kind}", settings)
    agent.settings["source"] = sources[kind]  # replace, not merge, the default synthetic one
    agent.rewrite()
    with Sensor(port) if port else _nothing():
        agent.start()
        deadline = time.monotonic() + 60
        while "update to v1 succeeded" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "update to v1 succeeded" in agent.log(), agent.log()[-3000:]
        assert agent.terminate() == 0
    return agent, port


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def agent_rss(agent: AgentProcess, port: int | None, settle_s: float) -> float:
    """The agent's RSS after ``settle_s`` s of serving."""
    with Sensor(port) if port else _nothing():
        agent.start({"EDGE_AGENT_LOG_LEVEL": "info"})
        assert agent.proc is not None
        time.sleep(settle_s)
        assert agent.alive(), agent.log()[-3000:]
        rss = rss_mb(agent.proc.pid)
        agent.terminate()
    return rss


def bare_rss(model: Path, kind: str, video: Path, settle_s: float) -> float:
    pace = SENSOR_HZ / WINDOW if kind == "sensor" else FPS
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(model), kind, str(video), str(pace)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(settle_s)
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def smaps(pid: int) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """smaps_rollup's fields (kB) and the RSS (kB) of each mapped file or kind of mapping."""
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        rollup[name] = int(value.split()[0])
    by: dict[str, int] = defaultdict(int)
    current = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            path = head[5] if len(head) > 5 else "[anonymous]"
            current = path.rsplit("/", 1)[-1] if path.startswith("/") else path
        elif line.startswith("Rss:"):
            by[current] += int(head[1])
    return rollup, sorted(by.items(), key=lambda kv: -kv[1])


def breakdown(agent: AgentProcess, port: int | None, settle_s: float) -> None:
    with Sensor(port) if port else _nothing():
        agent.start({"EDGE_AGENT_LOG_LEVEL": "info"})
        assert agent.proc is not None
        time.sleep(settle_s)
        rollup, mappings = smaps(agent.proc.pid)
        agent.terminate()
    fields = ("Rss", "Anonymous", "Private_Dirty", "Private_Clean", "Shared_Clean")
    print("  smaps_rollup: " + ", ".join(f"{f} {rollup.get(f, 0) / 1000:.1f} MB" for f in fields))
    top = ", ".join(f"{name} {kb / 1000:.1f}" for name, kb in mappings[:14])
    print(f"  largest mappings (MB): {top}")
    with tempfile.TemporaryDirectory() as tmp, Sensor(port) if port else _nothing():
        out = Path(tmp) / "traced.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        with agent.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-X", "tracemalloc=1", "-c", TRACED, str(out), str(settle_s)]
                + ["run", "--config", str(agent.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            deadline = time.monotonic() + settle_s + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        doc = json.loads(out.read_text())
    for what, by in (
        ("python allocations (tracemalloc)", doc["traced"]),
        (".pyc loaded", doc["pyc"]),
    ):
        top = sorted(by.items(), key=lambda kv: -kv[1])[:14]
        print(
            f"  {what} {sum(by.values()) / 1e6:.1f} MB: "
            + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in top)
        )


def memory_section(args: argparse.Namespace) -> None:
    from bench.daemon import show

    kinds = args.sources.split(",")
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "mosquitto") as broker:
        root = Path(tmp)
        video = root / "clip.avi"
        write_video(video)
        image, task = image_model(args.model, root)
        sensor_model = root / "window.tflite"
        sensor_model.write_bytes(modelgen.window_regressor(WINDOW, CHANNELS))
        for kind in kinds:
            model, model_task = (sensor_model, "regression") if kind == "sensor" else (image, task)
            agent, port = device(root / kind, kind, model, model_task, broker.url, video)
            agent_v, bare_v = [], []
            for _ in range(args.rounds):
                agent_v.append(agent_rss(agent, port, args.settle_s))
                bare_v.append(bare_rss(model, kind, video, args.settle_s))
            a, b = statistics.median(agent_v), statistics.median(bare_v)
            show(f"RSS {kind}", agent_v, bare_v, "MB", f"<= bare + {GOAL_MB:g} MB")
            print(f"{'':16} difference {a - b:+.1f} MB (goal <= +{GOAL_MB:g} MB)")
            if args.breakdown:
                breakdown(agent, port, args.settle_s)
