"""Command-line start-up: each invocation against ``python -c pass``, in the same run.

Every invocation runs what the console scripts run (``agent.entry.edge_agent`` or
``edge_fleet``) in a fresh interpreter; the baseline is a fresh ``python -c pass`` with
the same environment. The two are run alternately, ``--rounds`` times each, and each
line prints the medians and their ratio (goal <= 3: on a Raspberry Pi 4, where
``python -c pass`` takes ~0.1 s, a command answers within ~0.3 s).

Measured: ``edge-agent --help``, ``--version``, ``status`` and ``check-config`` (a
workable config: a folder registry, no broker listening), every subcommand's
``--help`` of both tools, and ``edge-fleet --help`` and ``--version``. The modules'
bytecode is cached (``__pycache__``, as pip's install compiles it) by a first run of each.

    python bench/startup.py [--rounds 15] [--all-pages]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from agent import cli_parser  # noqa: E402
from agent.fleet import cli_parser as fleet_parser  # noqa: E402

ENTRY = "import sys; from agent.entry import {fn}; sys.argv[0] = {tool!r}; sys.exit({fn}())"
GOAL = 3.0


def _pages(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _pages(sub, (*path, name))
    return found


def _config(root: Path) -> Path:
    registry = root / "registry"
    (registry / "m").mkdir(parents=True)
    (registry / "m" / "index.json").write_text('{"schema": 1, "model": "m", "versions": []}')
    path = root / "config.yaml"
    settings = {
        "registry": {"url": registry.as_uri()},
        "model": {"name": "m"},
        "store": {"dir": str(root / "store")},
        "telemetry": {"outbox": str(root / "outbox.sqlite")},
        "source": {"type": "synthetic"},
        "mqtt": {"url": "mqtt://127.0.0.1:9"},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


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
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith(("EDGE_AGENT_", "EDGE_FLEET_"))}
    # pip compiles an installed package's bytecode; without it every run compiles the
    # agent's modules again (PYTHONDONTWRITEBYTECODE=1 in some shells: +30 ms on status).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory() as tmp:
        config = str(_config(Path(tmp)))
        agent = [sys.executable, "-c", ENTRY.format(fn="edge_agent", tool="edge-agent")]
        fleet = [sys.executable, "-c", ENTRY.format(fn="edge_fleet", tool="edge-fleet")]
        cases: list[tuple[str, list[str]]] = [
            ("edge-agent --help", [*agent, "--help"]),
            ("edge-agent --version", [*agent, "--version"]),
            ("edge-agent status", [*agent, "status", "--config", config]),
            ("edge-agent check-config", [*agent, "check-config", "--config", config]),
            ("edge-fleet --help", [*fleet, "--help"]),
            ("edge-fleet --version", [*fleet, "--version"]),
        ]
        agent_pages = _pages(cli_parser.build())[1:]
        fleet_pages = _pages(fleet_parser.build())[1:]
        if not args.all_pages:
            agent_pages = [p for p in agent_pages if p in (("run",), ("models", "pull"))]
            fleet_pages = [p for p in fleet_pages if p in (("deploy",), ("serve",))]
        cases += [(f"edge-agent {' '.join(p)} --help", [*agent, *p, "--help"]) for p in agent_pages]
        cases += [(f"edge-fleet {' '.join(p)} --help", [*fleet, *p, "--help"]) for p in fleet_pages]
        bare = [sys.executable, "-c", "pass"]
        for _, argv in cases:  # warm the page cache and the bytecode
            _timed(argv, env)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.rounds} rounds")
        worst = 0.0
        for name, argv in cases:
            runs, base = [], []
            for _ in range(args.rounds):
                base.append(_timed(bare, env))
                runs.append(_timed(argv, env))
            a, b = statistics.median(runs), statistics.median(base)
            worst = max(worst, a / b)
            print(
                f"{name:<34} {a * 1000:6.1f} ms  python -c pass {b * 1000:5.1f} ms  "
                f"ratio {a / b:4.2f}  (goal <= {GOAL:g})"
            )
        print(f"worst ratio {worst:.2f} (goal <= {GOAL:g})")


if __name__ == "__main__":
    main()
