"""Real agents converge on a server-side rollout: time to converge against the standalone CLI.

One run, real processes only: a mosquitto on loopback, an HTTP registry
(tests/registry_server.py) that the real ``publish`` filled with the generated classifier
v1 (channel ``stable``) and v2 (no channel), ``edge-fleet serve`` on SQLite signing with a
deploy key, and ``--agents`` real agents (``edge-agent run``, tests/agentproc.py) in
group ``bench`` that trust that key and start on v1 from the channel. The agents are kept
light so that 20 fit on 2 shared cores: a synthetic 64x48 source at ``--fps`` (4),
results not published, telemetry every 2 s, probation 1 s and a latency budget of 5
runs (the probation settings are what a step waits for; they dominate both sides).

Then rollouts of the same group with the same options (``--canary`` 10 %, ``--step``
25 %, ``--timeout`` 120 s of device silence), alternately:

- server: ``POST /api/v1/rollouts`` (an operator token), then ``GET
  /api/v1/rollouts/{id}`` and ``GET /api/v1/devices?group=bench`` every 0.2 s;
- standalone (the baseline): ``edge-fleet rollout --broker … --sign-key …`` as a
  process, the way an operator runs it without a server (its start-up included), then
  the same device list.

Time to converge: from the request (the POST, or starting the CLI) until the rollout
has succeeded (status ``succeeded``, or the CLI exited 0) and every agent is listed
online on the new version. Round 1 rolls v2 out with the server and takes the group back
to v1 standalone; round 2 swaps both (v2 standalone, back to v1 by the server), so each
side does one update and one downgrade. Per step: the server's ``started``/``finished``;
the CLI's from when it prints each step's name. The figure: server / standalone (mean
time to converge; goal about 1, the server adds nothing noticeable).

CPU and memory of the agents, ``serve`` and mosquitto (psutil) are printed for an idle
stretch on v1 and for each rollout.

    python bench/server_rollout.py [--agents 20] [--rounds 2] [--fps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from agent import modelgen  # noqa: E402
from agent.fleet.publish import publish  # noqa: E402
from agent.fleet.rollout import plan, step_name  # noqa: E402
from agent.verify import generate_keypair  # noqa: E402
from tests.agentproc import MODEL, AgentProcess, publish_models  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.registry_server import RegistryServer  # noqa: E402
from tests.serverhttp import call  # noqa: E402
from tests.test_server_serve import Serve, new_token  # noqa: E402

GROUP = "bench"
POLL_S = 0.2
START_WAIT_S = 240.0  # every agent online on v1
IDLE_S = 10.0  # the idle stretch whose footprint is printed


class BenchError(Exception):
    """The bench cannot go on (a process died, a wait ran out); one line for the user."""


# -- pure rules: what the API says, read ------------------------------------------------


def converged(devices: Sequence[dict[str, Any]], names: Sequence[str], version: int) -> bool:
    """Every one of ``names`` is listed online and running ``version``."""
    seen = {d.get("id"): d for d in devices}
    return all(
        (d := seen.get(name)) is not None
        and d.get("online") is True
        and d.get("version") == version
        for name in names
    )


def server_steps(view: dict[str, Any]) -> list[float]:
    """Seconds per step of a finished rollout view (``finished - started``)."""
    return [
        float(s["finished"]) - float(s["started"])
        for s in view.get("steps", [])
        if s.get("started") is not None and s.get("finished") is not None
    ]


def cli_steps(marks: Sequence[tuple[float, str]], names: Sequence[str], end: float) -> list[float]:
    """Seconds per step of the CLI, from the (time, line) of its stderr: a step starts at
    the line ``<name>: …`` and ends where the next starts (the last one at ``end``)."""
    starts: list[float] = []
    for name in names:
        at = next((t for t, line in marks if line.startswith(f"{name}: ")), None)
        if at is None:
            return []
        starts.append(at)
    bounds = [*starts, end]
    return [bounds[k + 1] - bounds[k] for k in range(len(starts))]


def schedule(rounds: int) -> list[tuple[str, int]]:
    """(side, version) of every rollout: each round one update to v2 and one back to v1,
    the side that updates alternating."""
    order: list[tuple[str, int]] = []
    for r in range(rounds):
        first, second = ("server", "standalone") if r % 2 == 0 else ("standalone", "server")
        order += [(first, 2), (second, 1)]
    return order


# -- footprint --------------------------------------------------------------------------


@dataclass
class Footprint:
    """CPU seconds and RSS of groups of processes over a stretch of time."""

    groups: dict[str, list[int]]
    started: float = 0.0
    cpu0: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    @staticmethod
    def _rss(pid: int) -> float:
        try:
            return float(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0.0

    def begin(self) -> None:
        self.started = time.monotonic()
        self.cpu0 = {pid: self._cpu(pid) for pids in self.groups.values() for pid in pids}

    def end(self) -> str:
        """One line: per group, CPU as % of one core and RSS (total, and per process)."""
        span = max(time.monotonic() - self.started, 1e-6)
        parts = []
        for name, pids in self.groups.items():
            cpu = sum(self._cpu(pid) - self.cpu0.get(pid, 0.0) for pid in pids) / span * 100
            rss = sum(self._rss(pid) for pid in pids) / 1e6
            each = (
                f" ({rss / len(pids):.0f} MB, {cpu / len(pids):.1f} % each)"
                if len(pids) > 1
                else ""
            )
            parts.append(f"{name} {cpu:.0f} % CPU, {rss:.0f} MB{each}")
        load = os.getloadavg()[0]
        return f"{span:.0f} s: " + "; ".join(parts) + f"; load {load:.1f}"


def pids_running(argument: str) -> list[int]:
    """The processes whose command line holds ``argument`` (the broker's config path)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if argument in (proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


# -- the run ----------------------------------------------------------------------------


@dataclass
class Result:
    side: str
    version: int
    ok: bool
    done_s: float  # the rollout succeeded (server status; CLI exit)
    converged_s: float  # ... and every agent listed online on the version
    steps: list[float]
    detail: str = ""


class Bench:
    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.names = [f"roll-{n:02d}" for n in range(1, args.agents + 1)]
        self.agents: list[AgentProcess] = []
        self.key, self.pub = generate_keypair(tmp / "keys", "deploy")

    # the fleet

    def registry(self) -> Path:
        models = self.tmp / "models"
        models.mkdir()
        for v in (1, 2):
            (models / f"v{v}.tflite").write_bytes(modelgen.colour_classifier(offset=1000 * v))
        (models / "colours.txt").write_text("\n".join(modelgen.COLOUR_LABELS) + "\n")
        registry = self.tmp / "registry"
        publish_models(registry, models, (1,))
        publish(
            [models / "v2.tflite"], model=MODEL, version=2, registry=registry,
            task="classification", labels=models / "colours.txt",
        )  # fmt: skip
        return registry

    def start_agents(self, broker: Mosquitto, registry_url: str) -> None:
        settings = {
            "device": {"groups": [GROUP]},
            "registry": {"url": registry_url, "poll_interval_s": 3600},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 10},
            "source": {"type": "synthetic", "width": 64, "height": 48, "fps": self.args.fps},
            "results": {"publish": "off"},
            "telemetry": {"interval_s": 2},
            "update": {"probation_s": 1, "budget_runs": 5, "desired_public_key": str(self.pub)},
        }
        for name in self.names:
            device = {**settings, "device": {"id": name, "groups": [GROUP]}}
            agent = AgentProcess(self.tmp / "agents" / name, name, device)
            agent.start(extra_env={"EDGE_AGENT_LOG_LEVEL": "info"})
            self.agents.append(agent)
            time.sleep(0.3)  # a start costs most of a core for a moment: spread them

    def check_agents(self) -> None:
        for agent in self.agents:
            if not agent.alive():
                tail = agent.log()[-600:].replace("\n", " | ")
                raise BenchError(f"agent {agent.device_id} died: {tail}")

    def stop_agents(self) -> None:
        for agent in self.agents:
            if agent.alive():
                try:
                    agent.terminate(10)
                except subprocess.TimeoutExpired:
                    agent.kill()

    # reading the server

    def devices(self, serve: Serve, token: str) -> list[dict[str, Any]]:
        reply = serve.get(f"/api/v1/devices?group={GROUP}", token)
        if reply.status != 200:
            return []
        listed: list[dict[str, Any]] = reply.body.get("devices", [])
        return listed

    def wait(self, what: str, condition: Callable[[], bool], timeout: float) -> float:
        """Poll ``condition`` every POLL_S while every agent lives; the monotonic time it
        held. Raises BenchError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return time.monotonic()
            self.check_agents()
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not within {timeout:.0f} s")
            time.sleep(POLL_S)

    # the two sides

    def on_server(self, serve: Serve, ops: str, version: int) -> Result:
        body = {
            "model": MODEL, "version": version, "group": GROUP,
            "canary_pct": self.args.canary, "step_pct": self.args.step,
            "timeout_s": self.args.timeout,
        }  # fmt: skip
        t0 = time.monotonic()
        made = call("POST", f"{serve.url}/api/v1/rollouts", token=ops, body=body)
        if made.status != 201:
            raise BenchError(f"POST /api/v1/rollouts: {made.status} {made.text[:300]}")
        rollout_id = made.body["id"]
        view: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal view
            reply = serve.get(f"/api/v1/rollouts/{rollout_id}", ops)
            view = reply.body if reply.status == 200 else view
            return view.get("status") in ("succeeded", "halted", "aborted")

        done = self.wait("the server's rollout", finished, self.args.deadline)
        if view["status"] != "succeeded":
            return Result("server", version, False, done - t0, 0.0, [], str(view.get("halted")))
        conv = self.wait(
            f"every agent on v{version}",
            lambda: converged(self.devices(serve, ops), self.names, version),
            self.args.deadline,
        )
        return Result("server", version, True, done - t0, conv - t0, server_steps(view))

    def standalone(self, serve: Serve, ops: str, broker: Mosquitto, version: int) -> Result:
        argv = [
            sys.executable, "-m", "agent.fleet.cli", "rollout", "--broker", broker.url,
            "--model", MODEL, "--version", str(version), "--group", GROUP,
            "--canary", f"{self.args.canary:g}", "--step", f"{self.args.step:g}",
            "--timeout", f"{self.args.timeout:g}", "--sign-key", str(self.key), "--json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        marks: list[tuple[float, str]] = []
        out_path = self.tmp / f"rollout-v{version}-{time.monotonic_ns()}.json"
        t0 = time.monotonic()
        with out_path.open("wb") as out_file:
            proc = subprocess.Popen(
                argv, stdout=out_file, stderr=subprocess.PIPE, text=True, env=env
            )

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                marks.append((time.monotonic(), line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=self.args.deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise BenchError(
                f"edge-fleet rollout: not done within {self.args.deadline:.0f} s"
            ) from None
        done = time.monotonic()
        reader.join(5)
        if proc.returncode != 0:
            last = " | ".join(line for _, line in marks[-6:])
            return Result("standalone", version, False, done - t0, 0.0, [], last[:400])
        outcome = json.loads(out_path.read_text())
        names = [step_name(k, self.args.canary > 0) for k in range(len(outcome["steps"]))]
        group_set = next((t for t, line in marks if line.startswith(f"group {GROUP} ")), done)
        conv = self.wait(
            f"every agent on v{version}",
            lambda: converged(self.devices(serve, ops), self.names, version),
            self.args.deadline,
        )
        return Result(
            "standalone", version, True, done - t0, conv - t0, cli_steps(marks, names, group_set)
        )

    # the whole run

    def run(self) -> list[Result]:
        args = self.args
        steps = plan(self.names, GROUP, args.canary, args.step)
        print(
            f"{args.agents} agents (synthetic 64x48 at {args.fps:g} fps, results off, telemetry "
            f"every 2 s; probation 1 s, budget 5 runs); canary {args.canary:g} %, step "
            f"{args.step:g} %, timeout {args.timeout:g} s: {len(steps)} steps of "
            f"{', '.join(str(len(s)) for s in steps)} devices",
            flush=True,
        )
        registry = self.registry()
        db = f"sqlite:///{self.tmp / 'fleet.db'}"
        ops = new_token(db, "bench", "operator")
        results: list[Result] = []
        with Mosquitto(self.tmp / "broker") as broker, RegistryServer(registry) as reg:
            serve = Serve(self.tmp, broker, db, "--sign-key", str(self.key), "--registry", reg.url)
            try:
                serve.wait_health(200, 60)
                t0 = time.monotonic()
                self.start_agents(broker, reg.url)
                ready = self.wait(
                    f"{args.agents} agents online on v1",
                    lambda: converged(self.devices(serve, ops), self.names, 1),
                    START_WAIT_S,
                )
                print(f"agents started and online on v1 after {ready - t0:.1f} s", flush=True)
                mosquitto = pids_running(str(broker.conf_path))
                groups = {
                    "agents": [a.proc.pid for a in self.agents if a.proc is not None],
                    "serve": [serve.proc.pid],
                    "mosquitto": mosquitto,
                }
                meter = Footprint({k: v for k, v in groups.items() if v})
                meter.begin()
                time.sleep(IDLE_S)
                self.check_agents()
                print(f"idle on v1, {meter.end()}", flush=True)
                for side, version in schedule(args.rounds):
                    meter.begin()
                    if side == "server":
                        result = self.on_server(serve, ops, version)
                    else:
                        result = self.standalone(serve, ops, broker, version)
                    results.append(result)
                    print(report(result), flush=True)
                    print(f"    {meter.end()}", flush=True)
                    if not result.ok:
                        break
                    time.sleep(2)  # let the last telemetry settle before the next one
                if "Traceback" in serve.log():
                    print("serve logged a traceback:\n" + serve.log()[-2000:])
            finally:
                self.stop_agents()
                if serve.proc.poll() is None:
                    serve.stop()
        return results


def report(r: Result) -> str:
    what = f"{r.side:10} v{3 - r.version}->v{r.version}"
    if not r.ok:
        return f"  {what}: FAILED after {r.done_s:.1f} s: {r.detail}"
    per = " / ".join(f"{s:.1f}" for s in r.steps)
    return (
        f"  {what}: steps {per} s; succeeded after {r.done_s:.1f} s, "
        f"converged after {r.converged_s:.1f} s"
    )


def summary(results: Sequence[Result]) -> str:
    by = {side: [r.converged_s for r in results if r.side == side and r.ok]
          for side in ("server", "standalone")}  # fmt: skip
    if not by["server"] or not by["standalone"] or any(not r.ok for r in results):
        return "no ratio: a rollout did not succeed"
    server, alone = statistics.mean(by["server"]), statistics.mean(by["standalone"])
    step_s = {side: statistics.mean(s for r in results if r.side == side for s in r.steps)
              for side in by}  # fmt: skip
    return (
        f"time to converge, mean: server {server:.1f} s, standalone {alone:.1f} s; "
        f"seconds per step: {step_s['server']:.2f} / {step_s['standalone']:.2f}; "
        f"ratio server / standalone {server / alone:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fps", type=float, default=4.0, help="the agents' synthetic source")
    parser.add_argument("--canary", type=float, default=10.0, help="percent")
    parser.add_argument("--step", type=float, default=25.0, help="percent")
    parser.add_argument("--timeout", type=float, default=120.0, help="device silence, seconds")
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="longest wait for one rollout, seconds"
    )
    args = parser.parse_args()
    if not 1 <= args.agents <= 100 or not 1 <= args.rounds <= 10:
        parser.error("--agents must be 1..100 and --rounds 1..10")
    if (
        not 0.5 <= args.fps <= 30
        or not 1 <= args.timeout <= 3600
        or not 10 <= args.deadline <= 3600
    ):
        parser.error("--fps must be 0.5..30, --timeout 1..3600 and --deadline 10..3600")
    if not 0 <= args.canary <= 100 or not 0 < args.step <= 100:
        parser.error("--canary must be 0..100 and --step above 0, at most 100")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        try:
            results = Bench(Path(tmp), args).run()
        except BenchError as exc:
            print(f"server_rollout: {exc}", file=sys.stderr)
            return 1
    print(summary(results))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
