"""The command lines start light: ``--help``, ``--version``, every subcommand's ``--help``,
``edge-agent status`` and ``edge-agent check-config`` import none of the heavy modules
(OpenCV, numpy, cryptography, urllib3, paho, psutil, the server extra, the TFLite
runtime), and neither tool imports the other side's code.

Each invocation runs the real entry point (agent.entry, what the console scripts call)
in a fresh interpreter, and lists ``sys.modules`` as the process ends. The speed these
imports cost is measured by bench/startup.py, not here.

The light parser modules repeat a few names of the modules that own them (the default
config path, log levels, tasks, followed streams, index expiry): checked equal here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent import cli_parser, modelgen
from agent.fleet import cli_parser as fleet_parser
from tests.agentproc import MODEL, publish_models

HEAVY = (
    "cv2",
    "numpy",
    "cryptography",
    "urllib3",
    "paho",
    "psutil",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "uvicorn",
    "jinja2",
    "prometheus_client",
    "ai_edge_litert",
    "tflite_runtime",
)
FLEET_SIDE = ("agent.fleet", "agent.server")  # the operator's code, none of it on the device
DEVICE_SIDE = (
    "agent.config",
    "agent.store",
    "agent.service",
    "agent.pipeline",
    "agent.runtime",
    "agent.sources",
    "agent.telemetry",
    "agent.mqtt",
    "agent.update",
)
DOCUMENTS = ("pydantic", "msgspec", "yaml")  # the config models and their file format

# What may not be loaded, per kind of invocation.
HELP_FORBIDDEN = HEAVY + DOCUMENTS + ("agent.config", "agent.logs") + FLEET_SIDE
# The device's documents (config, manifest, control replies) are msgspec structs: pydantic
# (~100 ms, ~20 MB) is the server's alone.
DEVICE_COMMAND_FORBIDDEN = (*HEAVY, *FLEET_SIDE, "pydantic")
# The log ring is kept by an agent only (its `logs` command); `secrets` drew random and hmac
# in for file names; agent.verify (base64, JSON, keys) is for signatures, which status
# does not check (files are checked with agent.hashing).
ONE_SHOT_FORBIDDEN = (
    *DEVICE_COMMAND_FORBIDDEN,
    "agent.logring",
    "agent.redact",
    "secrets",
    "agent.verify",
    "shutil",  # and zlib, bz2, lzma: argparse sizes its help with it; the store removes
    "tempfile",  # the store writes
)
# msgspec is loaded without typing_extensions (inspect, dis, ast, tokenize: ~7 ms), whose
# get_type_hints is typing's from Python 3.11 (agent.cli._load_msgspec_alone).
MSGSPEC_ALONE = ("typing_extensions", "inspect") if sys.version_info >= (3, 11) else ()
# check-config reads a key only when one is set; its path holds no dataclass (~1 ms); it
# prints its findings and logs nothing, so logging is not set up (its settings are checked).
CHECK_CONFIG_FORBIDDEN = (
    *ONE_SHOT_FORBIDDEN,
    "hashlib",
    "agent.store",
    "dataclasses",
    "logging",
    "agent.logs",
    *MSGSPEC_ALONE,
)
# status seldom logs: logging and the agent's setup of it (~5 ms) are imported before a
# first line (agent.lazylog); its small records are structs, not dataclasses (~3 ms).
# OpenSSL's hashlib (~2.5 ms) is for files and downloads: a manifest is hashed with
# CPython's own SHA-256; socket (~2 ms) only when a control socket file is there to ask.
STATUS_FORBIDDEN = (
    *ONE_SHOT_FORBIDDEN,
    "logging",
    "agent.logs",
    "dataclasses",
    "hashlib",
    "_hashlib",
    "socket",
    "signal",
    *MSGSPEC_ALONE,
)
FLEET_HELP_FORBIDDEN = HEAVY + DOCUMENTS + DEVICE_SIDE + ("agent.fleet.cli_commands",)

# Runs the entry point, then writes the names of the loaded modules as JSON to a file.
WRAPPER = """
import json, sys
from agent import entry
tool, out = sys.argv.pop(1), sys.argv.pop(1)
try:
    code = getattr(entry, tool)()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


def _loaded(tmp_path: Path, tool: str, *argv: str) -> tuple[int, set[str], str]:
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, tool, str(out), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return result.returncode, set(json.loads(out.read_text())), result.stderr


def _forbidden_in(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


HELP_PAGES = [("edge_agent", [*c, "--help"]) for c in _commands(cli_parser.build())] + [
    ("edge_agent", ["--version"])
]
FLEET_PAGES = [("edge_fleet", [*c, "--help"]) for c in _commands(fleet_parser.build())] + [
    ("edge_fleet", ["--version"])
]


@pytest.mark.parametrize(("tool", "argv"), HELP_PAGES, ids=lambda v: " ".join(v) or "-")
def test_edge_agent_help_loads_no_heavy_module(tmp_path: Path, tool: str, argv: list[str]) -> None:
    code, modules, stderr = _loaded(tmp_path, tool, *argv)
    assert code == 0, stderr
    assert _forbidden_in(modules, HELP_FORBIDDEN) == []


@pytest.mark.parametrize(("tool", "argv"), FLEET_PAGES, ids=lambda v: " ".join(v) or "-")
def test_edge_fleet_help_loads_no_heavy_module(tmp_path: Path, tool: str, argv: list[str]) -> None:
    code, modules, stderr = _loaded(tmp_path, tool, *argv)
    assert code == 0, stderr
    assert _forbidden_in(modules, FLEET_HELP_FORBIDDEN) == []


def test_a_usage_error_loads_no_heavy_module(tmp_path: Path) -> None:
    code, modules, stderr = _loaded(tmp_path, "edge_agent", "models", "pull", "--wait", "-1")
    assert code == 2 and "must be a number greater than 0" in stderr
    assert _forbidden_in(modules, HELP_FORBIDDEN) == []
    code, modules, stderr = _loaded(tmp_path, "edge_fleet", "nosuch")
    assert code == 2 and "invalid choice" in stderr
    assert _forbidden_in(modules, FLEET_HELP_FORBIDDEN) == []


def _device_config(tmp_path: Path) -> Path:
    """A workable config (as test_preflight's): a folder registry, no signing key."""
    registry = tmp_path / "registry"
    (registry / "m").mkdir(parents=True)
    (registry / "m" / "index.json").write_text('{"schema": 1, "model": "m", "versions": []}')
    path = tmp_path / "config.yaml"
    settings = {
        "registry": {"url": registry.as_uri()},
        "model": {"name": "m"},
        "store": {"dir": str(tmp_path / "store")},
        "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
        "source": {"type": "synthetic"},
        "mqtt": {"url": "mqtt://127.0.0.1:9"},  # nothing listens: a warning, no client
    }
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["check-config"]])
def test_status_and_check_config_load_no_heavy_module(tmp_path: Path, command: list[str]) -> None:
    config = _device_config(tmp_path)
    code, modules, stderr = _loaded(tmp_path, "edge_agent", *command, "--config", str(config))
    assert code == 0, stderr
    assert "agent.config" in modules  # the command did run
    forbidden = CHECK_CONFIG_FORBIDDEN if command == ["check-config"] else STATUS_FORBIDDEN
    assert _forbidden_in(modules, forbidden) == []


def test_status_with_a_release_active_loads_no_openssl(tmp_path: Path) -> None:
    """The active manifest is hashed (and checked against the pointer) with CPython's
    own SHA-256: the same digest as hashlib's, and neither hashlib nor socket loaded."""
    import hashlib

    models = tmp_path / "models"
    models.mkdir()
    (models / "v1.tflite").write_bytes(modelgen.colour_classifier())
    (models / "colours.txt").write_text("red\ngreen\nblue\n")
    publish_models(tmp_path / "registry", models, (1,))
    config = _device_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["model"] = {"name": MODEL}
    settings["store"]["reserve_mb"] = 0
    config.write_text(yaml.safe_dump(settings))
    pull = subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", "pull", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert pull.returncode == 0, pull.stderr
    code, modules, stderr = _loaded(
        tmp_path, "edge_agent", "status", "--json", "--config", str(config)
    )
    assert code == 0, stderr
    assert _forbidden_in(modules, STATUS_FORBIDDEN) == []
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    active = json.loads(done.stdout)["active"]
    raw = (tmp_path / "store" / "releases" / MODEL / "1" / "manifest.json").read_bytes()
    assert active["version"] == 1
    assert active["manifest_sha256"] == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--log-format", "json"], '"logger": "agent.store"'),
        ([], "WARNING agent.store: store repaired: blobs/x: a link; removed"),
    ],
)
def test_status_sets_logging_up_before_its_first_line(
    tmp_path: Path, options: list[str], expected: str
) -> None:
    """status imports logging only to log, and then the line reads as the command's
    settings say (the format chosen, the level), as if logging had been set up at start."""
    config = _device_config(tmp_path)
    script = (
        "import sys\n"
        "from agent import entry\n"
        "sys.argv[0] = 'edge-agent'\n"
        "code = entry.edge_agent()\n"
        "assert 'logging' not in sys.modules\n"
        "from agent import store\n"
        "store.log.info('not at the default level')\n"
        "store.log.warning('store repaired: %s', 'blobs/x: a link; removed')\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-c", script, "status", *options, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stderr and "not at the default level" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_check_config_reads_a_signing_key_when_one_is_set(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "registry.pub"
    key.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = _device_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["registry"]["public_key"] = str(key)
    config.write_text(yaml.safe_dump(settings))
    code, modules, stderr = _loaded(tmp_path, "edge_agent", "check-config", "--config", str(config))
    assert code == 0, stderr
    assert "agent.verify" in modules  # the key was read (and found good)
    key.write_text("not a key\n")
    code, modules, stderr = _loaded(tmp_path, "edge_agent", "check-config", "--config", str(config))
    assert code == 78 and "registry.public_key" in stderr, stderr


# The daemon on a synthetic stream with an unsigned registry: no OpenCV (frames are
# resized by numpy), no cryptography (no signature to check), no fleet or server code,
# no Prometheus (metrics.listen unset).
DAEMON_FORBIDDEN = (
    "cv2",
    "cryptography",
    "prometheus_client",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
    "jinja2",
    "agent.fleet",
    "agent.server",
    "agent.metrics",
    "pydantic",
)

DAEMON = """
import json, sys
from agent import entry
out = sys.argv.pop(1)
code = entry.edge_agent()
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def test_the_daemon_on_a_synthetic_stream_loads_only_what_it_uses(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "v1.tflite").write_bytes(modelgen.colour_classifier())
    (models / "colours.txt").write_text("red\ngreen\nblue\n")
    publish_models(tmp_path / "registry", models, (1,))
    settings = {
        "device": {"id": "light"},
        "model": {"name": MODEL},
        "registry": {"url": (tmp_path / "registry").as_uri()},
        "store": {"dir": str(tmp_path / "store"), "reserve_mb": 0},
        "mqtt": {"url": "mqtt://127.0.0.1:9"},  # nothing listens: the outbox keeps it all
        "source": {"type": "synthetic", "width": 320, "height": 240, "fps": 10},
        "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
        "update": {"probation_s": 0},
        "runtime": {"accelerator": "cpu", "threads": 1, "warmup_runs": 1},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    out, log = tmp_path / "modules.json", tmp_path / "agent.log"
    with log.open("wb") as sink:
        agent = subprocess.Popen(
            [sys.executable, "-c", DAEMON, str(out), "run", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            deadline = time.monotonic() + 60
            while "update to v1 succeeded" not in log.read_text(errors="replace"):
                assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(1.0)  # frames resized and run, telemetry made
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0, log.read_text()[-3000:]
    modules = set(json.loads(out.read_text()))
    assert {"agent.pipeline", "agent.runtime.resize", "agent.sources.synthetic"} <= modules
    assert _forbidden_in(modules, DAEMON_FORBIDDEN) == []


def test_the_light_parsers_repeat_the_owners_names() -> None:
    from agent import config, logs, manifest, oneshot
    from agent.fleet import registry_index, view

    assert cli_parser.DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH
    assert tuple(logs.LEVELS) == cli_parser.LOG_LEVELS
    assert cli_parser.LOG_FORMATS == logs.FORMATS
    assert (cli_parser.LOG_LEVEL_ENV, cli_parser.LOG_FORMAT_ENV) == (
        logs.LEVEL_ENV,
        logs.FORMAT_ENV,
    )
    assert cli_parser.TASK_CHOICES == oneshot.TASK_CHOICES
    assert fleet_parser.TASKS == manifest.TASKS
    assert fleet_parser.DETECTION_FORMATS == manifest.DETECTION_FORMATS
    assert fleet_parser.FOLLOWED == view.FOLLOWED
    assert fleet_parser.DEFAULT_INDEX_EXPIRY_DAYS == registry_index.DEFAULT_INDEX_EXPIRY_DAYS


def test_what_a_command_writes_is_all_there_when_the_process_ends(tmp_path: Path) -> None:
    """The console script leaves the objects of a finished command to the exit
    (agent.entry: gc.freeze): its output, and a log line written through the handler's
    own stream, still arrive whole."""
    config = _device_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_LOG"] = "debug"  # deprecated: a warning through the log handler
    script = "import sys; from agent import entry; sys.exit(entry.edge_agent())"
    done = subprocess.run(
        [sys.executable, "-c", script, "check-config", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    assert "WARNING agent.logs: EDGE_AGENT_LOG is deprecated" in done.stderr


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("EDGE_AGENT_LOG_LEVEL", "loud", "edge-agent: EDGE_AGENT_LOG_LEVEL=loud: not a log level"),
        ("EDGE_AGENT_LOG_FORMAT", "xml", "edge-agent: EDGE_AGENT_LOG_FORMAT=xml: not a log format"),
    ],
)
def test_check_config_still_refuses_bad_log_settings(
    tmp_path: Path, variable: str, value: str, line: str
) -> None:
    """check-config does not set logging up, but its settings are checked as every
    command's: a bad value in the environment is a usage error (2), one line."""
    config = _device_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env[variable] = value
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2 and done.stderr.startswith(line), done.stderr
    assert done.stdout == ""
