"""``edge-agent``'s options and help pages: argparse and texts only.

Kept apart from :mod:`agent.cli` and light on purpose (tests/test_startup.py): ``--help``,
``--version`` and a usage error answer without loading the config models, the runtime,
OpenCV or the MQTT client. The few names it shares with those (the default config path,
the log levels, the model tasks) are repeated here; tests/test_startup.py checks they
agree with the modules that own them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent import __version__
from agent.clihelp import (
    command,
    exit_codes,
    finite,
    options,
    positive,
    tool,
    words_looked_up_once,
)

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.yaml")  # agent.config's
LOG_LEVELS = ("debug", "info", "warning", "error")  # agent.logs.LEVELS
LOG_FORMATS = ("text", "json")  # agent.logs.FORMATS
LOG_LEVEL_ENV = "EDGE_AGENT_LOG_LEVEL"  # agent.logs.LEVEL_ENV
LOG_FORMAT_ENV = "EDGE_AGENT_LOG_FORMAT"  # agent.logs.FORMAT_ENV
TASK_CHOICES = ("auto", "classification", "detection", "regression", "raw")  # agent.oneshot's

EX_CONFIG = 78


EXIT_CODES = exit_codes(
    "the operation failed (download refused, registry or broker unreachable, …)",
    "bad command-line usage",
    config=True,
)


def _config_option() -> argparse.ArgumentParser:
    option = options()
    option.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"config file (default: $EDGE_AGENT_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    return option


def _json_option() -> argparse.ArgumentParser:
    option = options()
    option.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print data as JSON"
    )
    return option


def _log_options() -> argparse.ArgumentParser:
    option = options()
    option.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help=f"log level (default: ${LOG_LEVEL_ENV}, else info for run, warning for others)",
    )
    option.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help=f"log lines as text or JSON (default: ${LOG_FORMAT_ENV}, else text)",
    )
    return option


def _broker_url(text: str) -> str:
    from agent.config import check_url

    try:
        return check_url(text, ("mqtt", "mqtts"))
    except ValueError as exc:
        hint = f" (e.g. mqtt://{text})" if "://" not in text else ""
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}{hint}") from None


def build() -> argparse.ArgumentParser:
    with words_looked_up_once():
        return _build()


def _build() -> argparse.ArgumentParser:
    config, as_json, log = _config_option(), _json_option(), _log_options()
    parser = tool(
        "edge-agent",
        "The device side of edge-agent: pulls verified TFLite models from a registry, "
        "serves them on a camera or sensor stream (Edge TPU or CPU), swaps them without "
        "stopping, and reports over MQTT.",
        "edge-agent demo                      # everything local, nothing to set up\n"
        "edge-agent check-config --config /etc/edge-agent/config.yaml\n"
        "edge-agent status\n"
        "edge-agent COMMAND --help            # options of one command",
        "",
        EXIT_CODES,
        __version__,
        [config, as_json, log],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(
        sub,
        "run",
        "the agent: serve the model, apply updates, report over MQTT",
        "Run the agent until SIGTERM or SIGINT (systemd runs it as edge-agent.service). "
        "SIGHUP re-reads the config; a config that is not valid is refused and the running "
        "one kept.",
        "edge-agent run --config /etc/edge-agent/config.yaml",
        EXIT_CODES,
        [config, log],
    )
    command(
        sub,
        "check-config",
        "check the config and what it refers to (exit 0 or 78)",
        "Validate the config file and check it against this machine. Errors (a config "
        "that cannot work: no registry or model, an unwritable store, a missing library) "
        "exit 78; warnings (what may come right by itself: a camera not plugged in yet, a "
        "broker that is down) are printed and exit 0.",
        "edge-agent check-config --config /etc/edge-agent/config.yaml\n"
        "EDGE_AGENT_MQTT_URL=mqtt://10.0.0.5 edge-agent check-config --json",
        EXIT_CODES,
        [config, as_json, log],
    )
    command(
        sub,
        "status",
        "what the running agent serves, and the store",
        "Show what the running agent serves (asked through its control socket: version, "
        "backend, fps, update phase, broker), and the active release, the previous one and "
        "what the store holds. Without a running agent: the store alone.",
        "edge-agent status\nedge-agent status --json",
        EXIT_CODES,
        [config, as_json, log],
    )
    reload = command(
        sub,
        "reload",
        "make the running agent re-read its config, and wait for the outcome",
        "Check the config file, then ask the running agent (through its control socket) to "
        "re-read it, and wait until it has: exit 0 when the new config runs (or nothing "
        "changed), 78 when it is not valid (the agent goes on with the old one), 1 when it "
        "failed to start (the agent went back to the old one) or no answer came. This is "
        "the unit's ExecReload, so `systemctl reload edge-agent` fails on a rejected config.",
        "edge-agent reload --config /etc/edge-agent/config.yaml\nsystemctl reload edge-agent",
        EXIT_CODES,
        [config, as_json, log],
    )
    reload.add_argument(
        "--timeout",
        type=positive(float),
        default=150.0,
        metavar="S",
        help="wait at most S s for the agent's outcome (default 150; the unit's "
        "TimeoutStartSec, which bounds ExecReload, is 180)",
    )
    models = command(
        sub,
        "models",
        "list, pull or roll back releases",
        "Manage the releases in the local model store.",
        "edge-agent models list --remote\n"
        "edge-agent models pull\n"
        "edge-agent models rollback --to 3",
        EXIT_CODES,
        [config, as_json, log],
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = command(
        msub,
        "list",
        "releases in the store",
        "List the releases in the store (* marks the active one).",
        "edge-agent models list\nedge-agent models list --remote --json",
        EXIT_CODES,
        [config, as_json, log],
    )
    listing.add_argument("--remote", action="store_true", help="also list the registry's index")
    _model_option(listing)
    pull = command(
        msub,
        "pull",
        "fetch, verify and activate a release",
        "Download a release (resuming a partial download), verify its sizes, hashes and "
        "signature, and activate it. Without --version: the version the model's channel "
        "names. A lower version than the active one is refused (use models rollback). "
        "With the agent running, the request goes to it and runs as an update through the "
        "same gate, probation and journal as a pushed one; with the agent stopped, the "
        "release is gated when the agent next starts.",
        "edge-agent models pull\nedge-agent models pull --version 4",
        EXIT_CODES,
        [config, as_json, log],
    )
    pull.add_argument(
        "--version", type=positive(int), help="version to pull (default: the channel's)"
    )
    _model_option(pull)
    waiting = pull.add_mutually_exclusive_group()
    waiting.add_argument(
        "--wait",
        type=positive(float),
        default=300.0,
        metavar="S",
        help="with the agent running: wait up to S s for the update's outcome (default 300)",
    )
    waiting.add_argument(
        "--no-wait",
        action="store_true",
        help="with the agent running: return once it has taken the request",
    )
    rollback = command(
        msub,
        "rollback",
        "switch back to a stored release, no download",
        "Activate a release that is already in the store: the previous one, or --to N. "
        "With the agent running, it switches what the agent serves.",
        "edge-agent models rollback\nedge-agent models rollback --to 2",
        EXIT_CODES,
        [config, as_json, log],
    )
    rollback.add_argument("--to", type=positive(int), help="version (default: the previous one)")
    _model_option(rollback)
    model = options()
    model.add_argument("--model", type=Path, required=True, help="a .tflite file")
    model.add_argument("--labels", type=Path, help="labels file (N label, or one per line)")
    model.add_argument(
        "--task",
        choices=TASK_CHOICES,
        default="auto",
        help="what the outputs mean (auto: detection for SSD outputs, "
        "classification with --labels, else raw)",
    )
    model.add_argument(
        "--accelerator",
        choices=("auto", "edgetpu", "cpu"),
        help="default: runtime.accelerator of the config",
    )
    model.add_argument("--threads", type=positive(int), help="default: runtime.threads")
    model.add_argument("--top-k", type=positive(int), default=5, help="classes/detections kept")
    model.add_argument("--min-score", type=finite, default=0.0, help="lowest score shown")
    model.add_argument("--input-mean", type=finite, help="input = (pixel - mean) / std")
    model.add_argument("--input-std", type=positive(float), help="input = (pixel - mean) / std")
    infer = command(
        sub,
        "infer",
        "run a model on images or videos and print the results",
        "Run a .tflite model on images (one result each) or videos (every frame, through "
        "the pipeline). The config, when there is one, gives the runtime settings.",
        "edge-agent infer --model model.tflite --labels labels.txt photo.jpg\n"
        "edge-agent infer --json --model model.tflite clip.mp4 | head -5",
        EXIT_CODES,
        [config, as_json, model, log],
    )
    infer.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or video")
    bench = command(
        sub,
        "bench",
        "pipeline fps against the bare interpreter loop",
        "Measure the agent's pipeline against a bare interpreter loop on the same model, "
        "in alternating rounds, and print the ratio.",
        "edge-agent bench --model model.tflite --seconds 5",
        EXIT_CODES,
        [config, as_json, model, log],
    )
    bench.add_argument(
        "--seconds", type=positive(float), default=2.0, help="length of each measurement"
    )
    bench.add_argument(
        "--rounds", type=positive(int), default=3, help="alternating rounds (medians)"
    )
    demo = command(
        sub,
        "demo",
        "the whole agent locally: generated models, a local registry, a verified hot swap",
        "Run the real agent on this machine with nothing to set up: two generated models, "
        "a signed release in a local registry, a synthetic stream, and v2 published "
        "half-way through to show the verified hot swap. It makes its own configuration.",
        "edge-agent demo\n"
        "edge-agent demo --broker mqtt://127.0.0.1:1883   # watch: mosquitto_sub -v -t 'edge/#'\n"
        "edge-agent demo --json --keep ./demo-run",
        EXIT_CODES,
        [as_json, log],
    )
    demo.add_argument(
        "--seconds",
        type=positive(float),
        default=24.0,
        help="how long to run (default 24; at least 10 to see the swap)",
    )
    demo.add_argument(
        "--broker",
        type=_broker_url,
        metavar="URL",
        help="also send everything to this broker (mqtt://host:port)",
    )
    demo.add_argument(
        "--keep", type=Path, metavar="DIR", help="work in this folder and keep it afterwards"
    )
    return parser


# Options given before the command that the command does not use: refused, not ignored.
_NOT_FOR = {"demo": ("config",), "run": ("json",)}


def refuse_unused(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in _NOT_FOR.get(args.command, ()):
        if hasattr(args, name):
            parser.error(f"{args.command} does not take --{name}")


def _model_option(parser: argparse.ArgumentParser) -> None:
    """``--model NAME``: which served model (several pipelines); default the first's."""
    parser.add_argument(
        "--model",
        dest="model_name",
        metavar="NAME",
        help="the served model to act on (with pipelines:; default: the first pipeline's)",
    )
