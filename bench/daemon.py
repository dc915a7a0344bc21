"""The daemon's footprint: start to READY, memory with a model loaded, CPU when idle.

Each figure is measured on ``edge-agent run`` as a subprocess (a generated colour
classifier already in the store, a synthetic stream, MQTT to a local mosquitto) and
set against the bare tool in the same run: a fresh Python process that imports the
TFLite runtime, loads the same model and runs it (no agent around it).

- start -> READY: from spawning the agent to READY=1 on a NOTIFY_SOCKET (goal <= 2 s);
  bare: spawning a process that loads the model and runs one inference.
- RSS: the agent's resident memory once serving (goal <= 80 MB); bare: the process
  above, after its inference.
- idle CPU: the agent's CPU share over ``--idle-s`` seconds with the stream at 1 fps and
  telemetry every 10 s (goal < 2 %); bare: a process running the model at 1 fps.

Memory by source (issue 19; goal: the agent <= the bare process + 40 MB): the agent
serving a synthetic stream, a video file (a generated MJPG .avi: OpenCV in both the agent
and the bare process, which reads and resizes the frames with it) and a UDP sensor (a
window regressor fed 100 samples/s), each against a bare process running the same model
at the same pace; alternating, ``--rounds`` each, medians and the difference in MB.
``--model`` picks the image model (``colours``, the generated classifier, or a zoo file
such as ``pose_landmark_full.tflite``). ``--breakdown`` also runs each agent once more
and prints where its memory is: /proc/PID/smaps_rollup, the largest mappings of
/proc/PID/smaps by file, and Python's own allocations by package (tracemalloc, in a run
of its own since tracing costs memory).

    python bench/daemon.py [--rounds 3] [--idle-s 20] [--sections ready,memory]
                           [--model colours] [--breakdown]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from agent import modelgen  # noqa: E402
from tests.agentproc import AgentProcess, NotifySocket, publish_models  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402

BARE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    print("ready", flush=True)
    period = float(sys.argv[2])
    while period > 0:
        time.sleep(period)
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
    """
)


def bare_start(model: Path, period: float = 0.0) -> tuple[float, subprocess.Popen[str]]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(model), str(period)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return time.perf_counter() - started, proc


def cpu_share(pid: int, seconds: float) -> float:
    """Percent of one core used by ``pid`` (and its threads) over ``seconds``."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / seconds


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


def ready_section(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "mosquitto") as broker:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        (models / "v1.tflite").write_bytes(modelgen.colour_classifier())
        (models / "colours.txt").write_text("red\ngreen\nblue\n")
        registry = root / "registry"
        publish_models(registry, models, (1,))
        settings = {
            "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url},
            "source": {"type": "synthetic", "width": 320, "height": 240, "fps": 1},
            "results": {"publish": "on_change"},
            "telemetry": {"interval_s": 10, "outbox": str(root / "outbox.sqlite")},
            "update": {"probation_s": 0},
            "runtime": {"accelerator": "cpu", "threads": 1, "warmup_runs": 1},
        }
        agent = AgentProcess(root / "device", "bench-device", settings)
        agent.start()  # the first start installs v1; the measured starts find it there
        deadline = time.monotonic() + 60
        while "update to v1 succeeded" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.terminate() == 0

        ready_s, bare_s, rss, bare_rss, idle, bare_idle = [], [], [], [], [], []
        for _ in range(args.rounds):
            notify = NotifySocket()
            try:
                started = time.monotonic()
                agent.start({"NOTIFY_SOCKET": str(notify.path)})
                while notify.first("READY=1") is None and time.monotonic() - started < 60:
                    time.sleep(0.005)
                ready_at = notify.first("READY=1")
                assert ready_at is not None, agent.log()[-2000:]
                ready_s.append(ready_at - started)
                assert agent.proc is not None
                time.sleep(3.0)  # settle: telemetry connected, first results published
                rss.append(rss_mb(agent.proc.pid))
                idle.append(cpu_share(agent.proc.pid, args.idle_s))
                agent.proc.send_signal(signal.SIGTERM)
                agent.proc.wait(30)
            finally:
                notify.close()
            seconds, proc = bare_start(models / "v1.tflite", period=1.0)
            bare_s.append(seconds)
            time.sleep(3.0)
            bare_rss.append(rss_mb(proc.pid))
            bare_idle.append(cpu_share(proc.pid, args.idle_s))
            proc.kill()
            proc.wait()

    show("start -> READY", ready_s, bare_s, "s", "<= 2 s")
    show("RSS serving", rss, bare_rss, "MB", "<= 80 MB")
    show("CPU idle (1 fps)", idle, bare_idle, "%", "< 2 %")


def show(name: str, agent_v: list[float], bare_v: list[float], unit: str, goal: str) -> None:
    a, b = statistics.median(agent_v), statistics.median(bare_v)
    ratio = a / b if b else float("inf")
    print(
        f"{name:<16} agent {a:7.2f} {unit:<3} bare {b:7.2f} {unit:<3} ratio {ratio:5.2f}  "
        f"(goal {goal}; runs: {', '.join(f'{v:.2f}' for v in agent_v)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--sections", default="ready,memory", help="ready, memory or both")
    parser.add_argument("--sources", default="synthetic,video,sensor")
    parser.add_argument("--model", default="colours", help="colours or a zoo .tflite name")
    parser.add_argument("--settle-s", type=float, default=4.0, help="serving before RSS")
    parser.add_argument("--breakdown", action="store_true", help="where the agent's RSS is")
    args = parser.parse_args()
    # An installed package has its bytecode compiled (pip does); compiling the agent's
    # modules from source at each start would add the compiler's garbage to the heap.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.rounds} rounds")
    sections = args.sections.split(",")
    if "ready" in sections:
        ready_section(args)
    if "memory" in sections:
        from bench.daemon_memory import memory_section

        memory_section(args)


if __name__ == "__main__":
    main()
