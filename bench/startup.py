"""Command-line start-up: each invocation against ``python -c pass``, in the same run.

Every invocation runs what the console scripts run (``agent.entry.edge_agent`` or
``edge_fleet``) in a fresh interpreter; the baseline is a fresh ``python -c pass`` with
the same environment. The two are run alternately, ``--rounds`` times each, and each
line prints the medians and their ratio (goal <= 3: on a Raspberry Pi 4, where
``python -c pass`` takes ~0.1 s, a command answers within ~0.3 s).

Measured: ``edge-agent --help``, ``--version``, ``check-config`` and ``status`` with a
device's config (device id, a folder registry holding one published release, model,
store, outbox, a camera, a broker that does not listen), ``status`` three ways (nothing
pulled yet; a release active, no agent; an agent running and answering on its control
socket), every subcommand's ``--help`` of both tools, and ``edge-fleet --help`` and
``--version``. The modules' bytecode is cached (``__pycache__``, as pip's install
compiles it) by a first run of each.

    python bench/startup.py [--rounds 15] [--all-pages]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from agent import cli_parser, modelgen  # noqa: E402
from agent.fleet import cli_parser as fleet_parser  # noqa: E402
from agent.fleet.publish import publish  # noqa: E402

ENTRY = "import sys; from agent.entry import {fn}; sys.argv[0] = {tool!r}; sys.exit({fn}())"
GOAL = 3.0


def _pages(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _pages(sub, (*path, name))
    return found


def _configs(root: Path) -> tuple[Path, Path]:
    """A device's config (a camera: the command lines' case) and the same device on a
    synthetic stream (the agent that runs here: there is no camera), one store."""
    models, registry = root / "models", root / "registry"
    models.mkdir()
    (models / "v1.tflite").write_bytes(modelgen.colour_classifier())
    (models / "colours.txt").write_text("red\ngreen\nblue\n")
    publish(
        [models / "v1.tflite"],
        model="colours",
        version=1,
        registry=registry,
        task="classification",
        labels=models / "colours.txt",
        channels=("stable",),
    )
    settings: dict[str, Any] = {
        "device": {"id": "pi-kitchen"},
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        "model": {"name": "colours"},
        "store": {"dir": str(root / "store"), "reserve_mb": 0},
        "telemetry": {"outbox": str(root / "outbox.sqlite")},
        "source": {"type": "camera", "device": "/dev/video0", "width": 640, "height": 480},
        "mqtt": {"url": "mqtt://127.0.0.1:9"},
    }
    device = root / "config.yaml"
    device.write_text(yaml.safe_dump(settings))
    settings["source"] = {"type": "synthetic", "width": 64, "height": 48, "fps": 5}
    settings["runtime"] = {"accelerator": "cpu", "threads": 1, "warmup_runs": 1}
    running = root / "agent.yaml"
    running.write_text(yaml.safe_dump(settings))
    return device, running


@contextmanager
def _agent_running(
    agent: list[str], config: Path, device: Path, env: dict[str, str], log: Path
) -> Iterator[None]:
    """``edge-agent run`` on ``config`` until it serves v1 and ``status`` (of ``device``,
    the same store) sees it running; stopped with SIGTERM after."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*agent, "run", "--config", str(config)], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            done = subprocess.run(
                [*agent, "status", "--json", "--config", str(device)],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            daemon = json.loads(done.stdout)["daemon"] if done.returncode == 0 else {}
            if (daemon.get("status") or {}).get("serving") == 1:
                break
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{argv[3:]}: exit {done.returncode}: {done.stderr!r}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--all-pages", action="store_true", help="every subcommand's --help (else a few)"
    )
    parser.add_argument(
        "--device-only", action="store_true", help="only check-config and status (no --help)"
    )
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith(("EDGE_AGENT_", "EDGE_FLEET_"))}
    # pip compiles an installed package's bytecode; without it every run compiles the
    # agent's modules again (PYTHONDONTWRITEBYTECODE=1 in some shells: +30 ms on status).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    bare = [sys.executable, "-c", "pass"]
    worst = 0.0

    def measure(cases: list[tuple[str, list[str]]]) -> None:
        nonlocal worst
        for _, argv in cases:  # warm the page cache and the bytecode
            _timed(argv, env)
        for name, argv in cases:
            runs, base = [], []
            for _ in range(args.rounds):
                base.append(_timed(bare, env))
                runs.append(_timed(argv, env))
            a, b = statistics.median(runs), statistics.median(base)
            worst = max(worst, a / b)
            print(
                f"{name:<44} {a * 1000:6.1f} ms  python -c pass {b * 1000:5.1f} ms  "
                f"ratio {a / b:4.2f}  (goal <= {GOAL:g})",
                flush=True,
            )

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        device, running = _configs(Path(tmp))
        config = ["--config", str(device)]
        agent = [sys.executable, "-c", ENTRY.format(fn="edge_agent", tool="edge-agent")]
        fleet = [sys.executable, "-c", ENTRY.format(fn="edge_fleet", tool="edge-fleet")]
        cases: list[tuple[str, list[str]]] = []
        if not args.device_only:
            cases += [
                ("edge-agent --help", [*agent, "--help"]),
                ("edge-agent --version", [*agent, "--version"]),
                ("edge-fleet --help", [*fleet, "--help"]),
                ("edge-fleet --version", [*fleet, "--version"]),
            ]
            agent_pages = _pages(cli_parser.build())[1:]
            fleet_pages = _pages(fleet_parser.build())[1:]
            if not args.all_pages:
                agent_pages = [p for p in agent_pages if p in (("run",), ("models", "pull"))]
                fleet_pages = [p for p in fleet_pages if p in (("deploy",), ("serve",))]
            cases += [
                (f"edge-agent {' '.join(p)} --help", [*agent, *p, "--help"]) for p in agent_pages
            ]
            cases += [
                (f"edge-fleet {' '.join(p)} --help", [*fleet, *p, "--help"]) for p in fleet_pages
            ]
        cases += [
            ("edge-agent check-config", [*agent, "check-config", *config]),
            ("edge-agent status (nothing pulled)", [*agent, "status", *config]),
        ]
        measure(cases)
        _timed([*agent, "models", "pull", *config], env)  # v1 into the store, activated
        measure([("edge-agent status (v1 active, no agent)", [*agent, "status", *config])])
        with _agent_running(agent, running, device, env, Path(tmp) / "agent.log"):
            measure([("edge-agent status (agent running)", [*agent, "status", *config])])
    print(f"worst ratio {worst:.2f} (goal <= {GOAL:g})")


if __name__ == "__main__":
    main()
