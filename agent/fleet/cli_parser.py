"""``edge-fleet``'s options and help pages: argparse and texts only.

Light on purpose (tests/test_startup.py): ``edge-fleet --help`` and a usage error load
neither cryptography, the MQTT client, numpy nor the server extra. The few names shared
with the commands' modules (the model tasks and detection formats, the followed streams,
the index expiry) are repeated here; tests/test_startup.py checks they agree with the
modules that own them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent import __version__
from agent.clihelp import command, exit_codes, tool
from agent.server import cli_parser as server_cli

DEFAULT_INDEX_EXPIRY_DAYS = 30.0  # agent.fleet.registry_index's
TASKS = ("classification", "detection", "regression", "raw")  # agent.manifest's
DETECTION_FORMATS = ("ssd", "yolov5", "yolov8")  # agent.manifest's
FOLLOWED = ("telemetry", "results", "events")  # agent.fleet.view's

# command -> (description, examples) for its --help
PAGES = {
    "keygen": (
        "Make an Ed25519 key pair: NAME.key signs releases (publish) or desired states "
        "(deploy, rollout) and stays with the operator (written 0600, also over an existing "
        "file); NAME.pub goes to the devices (registry.public_key(s) or "
        "update.desired_public_key(s)). Prints the key id signatures name it by.",
        "edge-fleet keygen --out keys\nedge-fleet keygen --out keys --name deploy",
    ),
    "publish": (
        "Publish a release into a registry folder: copy the files, write manifest.json (sizes, "
        "sha256, task, self-test, budget), sign it, and add the version to index.json (its "
        "version raised, a new expiry, signed). Devices following a channel move only when "
        "--channel names it. Publishing an existing release again with another --sign-key "
        "adds that key's signature (key rotation); the manifest never changes.",
        "edge-fleet publish model.tflite --labels labels.txt --model person-detector \\\n"
        "    --version 3 --task detection --registry /srv/registry \\\n"
        "    --sign-key keys/registry.key --selftest-random 8 --channel stable",
    ),
    "index": (
        "Show a model's index.json (version, expiry, channels, signing key ids), or with "
        "--renew re-sign it with a new expiry and the next version, nothing else changed: "
        "devices with registry.public_key refuse an expired index, so run this from cron "
        "well within --index-expiry-days.",
        "edge-fleet index --model person-detector --registry /srv/registry\n"
        "edge-fleet index --model person-detector --registry /srv/registry \\\n"
        "    --renew --sign-key keys/registry.key --index-expiry-days 30",
    ),
    "acl": (
        "Write mosquitto's ACL file: each device may publish under its own topics and read its "
        "own and its groups' desired state; admins may do everything.",
        "edge-fleet acl --device pi-door-01=door,canary --admin fleet --out /etc/mosquitto/acl",
    ),
    "deploy": (
        "Set the desired release of one device or of a group (retained on the broker, signed "
        "with --sign-key). A lower version than a device runs is a deliberate rollback.",
        "edge-fleet deploy --model person-detector --version 3 --device pi-door-01 \\\n"
        "    --sign-key keys/deploy.key --wait 300\n"
        "edge-fleet deploy --shadow --model person-detector --version 4 --group door \\\n"
        "    --sample 10 --max-cpu 25 --promote-at 0.95 --min-frames 500\n"
        "edge-fleet deploy --group door --model person-detector --clear",
    ),
    "promote": (
        "Make the candidate of a shadow run (deploy --shadow) the desired release: a normal "
        "desired state for it (through the device's gate and probation), and the shadow "
        "run cleared (for a group, its members' own desired states of the model too, as a "
        "rollout does). The version is the retained shadow instruction's unless --version.",
        "edge-fleet promote --model person-detector --group door --sign-key keys/deploy.key "
        "--wait 600",
    ),
    "rollout": (
        "Roll a release out to a group in steps: a canary share first, then --step shares, each "
        "step waiting for its devices; the first failure halts the rollout and devices not yet "
        "reached are left untouched. --timeout judges silence, not duration: a device fails "
        "when it says nothing about the release for that long, not for a long probation or "
        "download it keeps reporting on.",
        "edge-fleet rollout --model person-detector --version 3 --group door \\\n"
        "    --canary 10 --step 25 --timeout 900 --sign-key keys/deploy.key\n"
        "edge-fleet rollout --shadow --model person-detector --version 4 --group door \\\n"
        "    --min-frames 300 --promote-at 0.95 --sign-key keys/deploy.key",
    ),
    "devices": (
        "A table of every device: online, model@version, backend, fps, p95 latency, "
        "temperature, outbox depth, last seen and the update in progress.",
        "edge-fleet devices\nedge-fleet devices --group door --json",
    ),
    "telemetry": (
        "Follow telemetry, results and events live as they arrive (retained messages are "
        "not replayed as news).",
        "edge-fleet telemetry --device pi-door-01\n"
        "edge-fleet telemetry --stream events --json --seconds 60",
    ),
    "forget": (
        "Remove a decommissioned device's retained reports from the broker, so it is no "
        "longer listed or picked as a canary. Refused while the device says it is online.",
        "edge-fleet forget --device pi-old-07",
    ),
    "status": (
        "Which versions of a model run where: versions by device, updates in progress, bad "
        "marks, and the group and device desired states.",
        "edge-fleet status --model person-detector",
    ),
}
EXIT_CODES = exit_codes(
    "the operation failed (broker unreachable, a rollout halted, a device refused)",
    "bad usage (unusable names, options that do not go together)",
    config=False,
)


def _sub(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    description, examples = PAGES[name]
    return command(sub, name, summary, description, examples, EXIT_CODES)


def build() -> argparse.ArgumentParser:
    parser = tool(
        "edge-fleet",
        "The operator's side of edge-agent: sign and publish releases, deploy and roll them "
        "out over MQTT, and read the fleet.",
        "edge-fleet keygen --out keys\n"
        "edge-fleet publish model.tflite --model NAME --version 1 --registry DIR \\\n"
        "    --sign-key keys/registry.key --channel stable\n"
        "edge-fleet devices --broker mqtts://broker:8883 --ca ca.pem --cert me.pem --key me.key\n"
        "edge-fleet COMMAND --help",
        "broker options default to $EDGE_FLEET_BROKER, $EDGE_FLEET_CA, $EDGE_FLEET_CERT,\n"
        "$EDGE_FLEET_KEY, $EDGE_FLEET_USERNAME and $EDGE_FLEET_PASSWORD.",
        EXIT_CODES,
        __version__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = _sub(sub, "keygen", "make an Ed25519 key pair for signing releases")
    keygen.add_argument("--out", type=Path, required=True, help="folder for NAME.key and NAME.pub")
    keygen.add_argument("--name", default="registry", help="file name stem (default: registry)")
    keygen.add_argument("--force", action="store_true", help="replace existing keys")

    pub = _sub(sub, "publish", "publish a release into a registry folder")
    pub.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="MODEL_FILE",
        help="*.tflite files; *_edgetpu.tflite is the edgetpu variant",
    )
    pub.add_argument("--model", required=True, help="model name")
    pub.add_argument("--version", required=True, type=int, help="release version (1, 2, …)")
    pub.add_argument("--registry", required=True, type=Path, help="registry folder")
    pub.add_argument(
        "--sign-key",
        type=Path,
        action="append",
        help="Ed25519 private key (from keygen); repeat it to sign with old and new keys",
    )
    _expiry_option(pub)
    pub.add_argument("--labels", type=Path, help="labels file")
    pub.add_argument("--task", default="raw", choices=TASKS, help="what the outputs mean")
    pub.add_argument(
        "--detection-format",
        choices=DETECTION_FORMATS,
        help="how --task detection outputs are read: ssd (4 post-processed outputs), yolov5 "
        "or yolov8 (v8/v11 too; Ultralytics' raw head); default: by the outputs' shapes",
    )
    pub.add_argument(
        "--input-norm",
        nargs=2,
        type=float,
        metavar=("MEAN", "STD"),
        help="the model's input is (pixel - MEAN) / STD (e.g. 127.5 127.5 for [-1, 1])",
    )
    pub.add_argument(
        "--channel",
        action="append",
        default=[],
        help="point this index.json channel at the version (repeatable)",
    )
    given = pub.add_mutually_exclusive_group()
    given.add_argument(
        "--selftest-inputs",
        type=Path,
        metavar="FILE.npz",
        help="self-test inputs: input_0, input_1, … each [N, *input_shape] of the input's dtype",
    )
    given.add_argument(
        "--selftest-random",
        type=int,
        metavar="N",
        help="self-test on N seeded random inputs made for the cpu variant's input tensors",
    )
    pub.add_argument(
        "--selftest-expect",
        type=Path,
        metavar="FILE.npz",
        help="expected outputs output_0, … each [N, *output_shape] "
        "(default: computed by running the cpu variant here)",
    )
    pub.add_argument(
        "--atol",
        type=float,
        help="self-test tolerance on dequantised outputs (default: 0.02)",
    )
    pub.add_argument(
        "--budget-p95-ms",
        type=float,
        metavar="MS",
        help="refuse the release on a device whose p95 inference latency exceeds MS",
    )
    pub.add_argument("--json", action="store_true", help="print the manifest as JSON")

    index = _sub(sub, "index", "show or renew a model's signed index.json")
    index.add_argument("--model", required=True, help="model name")
    index.add_argument("--registry", required=True, type=Path, help="registry folder")
    index.add_argument(
        "--renew", action="store_true", help="re-sign with a new expiry and the next version"
    )
    index.add_argument(
        "--sign-key",
        type=Path,
        action="append",
        help="Ed25519 private key (repeatable); needed by --renew",
    )
    _expiry_option(index)
    index.add_argument("--json", action="store_true", help="print JSON")

    acl = _sub(sub, "acl", "write the broker's ACL file (mosquitto acl_file)")
    acl.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID[=GROUP,GROUP]",
        help="a device id (its certificate CN) and its groups (repeatable)",
    )
    acl.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="an operator certificate CN with full access (repeatable; default: fleet)",
    )
    acl.add_argument("--prefix", default="edge", help="topic prefix (default: edge)")
    acl.add_argument(
        "--ha-prefix",
        default="homeassistant",
        help="Home Assistant discovery prefix (homeassistant.prefix; default: homeassistant)",
    )
    acl.add_argument("--out", type=Path, help="write this file atomically (default: stdout)")

    deploy = _sub(sub, "deploy", "set the desired release of a device or a group")
    broker_options(deploy)
    deploy.add_argument("--model", help="model name")
    deploy.add_argument("--version", type=int, help="release version (a lower one rolls back)")
    where = deploy.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="one device id")
    where.add_argument("--group", help="every device of a group without its own desired state")
    deploy.add_argument("--sign-key", type=Path, help="Ed25519 private key (from keygen)")
    deploy.add_argument(
        "--clear",
        action="store_true",
        help="remove the desired state instead: of --model (its topic, and the legacy topic "
        "when that names it), or without --model the legacy topic older fleet tools used",
    )
    shadow = deploy.add_argument_group(
        "shadow run", "--shadow: run --version beside the active model, never publishing it"
    )
    shadow.add_argument(
        "--shadow",
        action="store_true",
        help="publish a shadow run of --model v--version instead (with --clear: stop it)",
    )
    shadow.add_argument(
        "--sample",
        type=int,
        metavar="PCT",
        help="whole percentage of frames the candidate runs on, 1..100 (default 10)",
    )
    shadow.add_argument(
        "--max-cpu",
        type=int,
        metavar="PCT",
        help="whole percentage of wall time the candidate may take, 1..100 (default 25)",
    )
    shadow.add_argument(
        "--promote-at",
        type=float,
        metavar="AGREEMENT",
        help="the device promotes the candidate by itself at this agreement (0..1]",
    )
    shadow.add_argument(
        "--min-frames",
        type=int,
        metavar="N",
        help="with --promote-at: only once the candidate ran on at least N frames",
    )
    deploy.add_argument(
        "--wait",
        type=float,
        metavar="S",
        help="wait for the devices' terminal states; a device that says nothing about this "
        "desired state for S seconds counts as failed, one that keeps reporting progress is "
        "waited for (exit 1 unless all succeed)",
    )
    deploy.add_argument("--json", action="store_true", help="print the outcome as JSON")

    prom = _sub(sub, "promote", "make a shadow run's candidate the desired release")
    broker_options(prom)
    prom.add_argument("--model", required=True, help="model name")
    prom.add_argument(
        "--version", type=int, help="release version (default: the shadow instruction's)"
    )
    where = prom.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="one device id")
    where.add_argument("--group", help="a group")
    prom.add_argument("--sign-key", type=Path, help="Ed25519 private key (from keygen)")
    prom.add_argument(
        "--wait",
        type=float,
        metavar="S",
        help="wait for the devices' terminal states, as deploy --wait",
    )
    prom.add_argument("--json", action="store_true", help="print the outcome as JSON")

    roll = _sub(sub, "rollout", "roll a release out to a group in steps")
    broker_options(roll)
    roll.add_argument("--model", required=True, help="model name")
    roll.add_argument("--version", required=True, type=int, help="release version")
    roll.add_argument("--group", required=True, help="the group (devices name it in their status)")
    roll.add_argument(
        "--canary",
        type=float,
        default=10.0,
        metavar="PCT",
        help="share of the group updated first, at least one device (default 10; 0: none)",
    )
    roll.add_argument(
        "--step", type=float, default=25.0, metavar="PCT", help="share per later step (default 25)"
    )
    roll.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="silence allowed per device: a device that says nothing about the release for S "
        "seconds counts as failed; each report of progress (a phase, download progress, "
        "telemetry while on probation) starts its S seconds again (default 900)",
    )
    roll.add_argument("--sign-key", type=Path, help="Ed25519 private key (from keygen)")
    roll.add_argument("--json", action="store_true", help="print the outcome as JSON at the end")
    trial = roll.add_argument_group(
        "shadow rollout",
        "--shadow: each step's devices first run --version in the shadow of the active model; "
        "the step passes once each compared --min-frames frames cleanly (and agreed at "
        "--promote-at); a failed, erring or disagreeing shadow run halts the rollout. With "
        "--promote-at a step's devices are then updated to it as in a rollout; without, the "
        "group runs it in the shadow at the end, for edge-fleet promote",
    )
    trial.add_argument("--shadow", action="store_true", help="a shadow rollout (above)")
    trial.add_argument(
        "--sample",
        type=int,
        metavar="PCT",
        help="whole percentage of frames the candidate runs on, 1..100 (default 10)",
    )
    trial.add_argument(
        "--max-cpu",
        type=int,
        metavar="PCT",
        help="whole percentage of wall time the candidate may take, 1..100 (default 25)",
    )
    trial.add_argument(
        "--min-frames",
        type=int,
        metavar="N",
        help="frames each device's candidate must be compared on before its step passes "
        "(default 100)",
    )
    trial.add_argument(
        "--promote-at",
        type=float,
        metavar="AGREEMENT",
        help="the agreement (0..1] each device must reach; its devices are then updated to "
        "the release (without: no agreement is required and nothing is promoted)",
    )
    roll.add_argument(
        "--server",
        metavar="URL",
        help="submit the rollout to a fleet server (edge-fleet serve) and follow it; it "
        "runs there, signed with the server's key: Ctrl-C stops following, not the rollout",
    )
    roll.add_argument(
        "--token",
        default=os.environ.get("EDGE_FLEET_TOKEN"),
        help="the server's API token, an operator's (default: EDGE_FLEET_TOKEN)",
    )

    devices = _sub(sub, "devices", "a table of every device and what it runs")
    broker_options(devices)
    devices.add_argument("--group", help="only the devices of this group")
    devices.add_argument("--json", action="store_true", help="print JSON")

    follow = _sub(sub, "telemetry", "follow telemetry, results and events live")
    broker_options(follow)
    follow.add_argument("--device", help="only this device")
    follow.add_argument(
        "--stream",
        action="append",
        choices=FOLLOWED,
        help="only these streams (repeatable; default: all three)",
    )
    follow.add_argument("--seconds", type=float, help="stop after S seconds (default: Ctrl-C)")
    follow.add_argument("--count", type=int, help="stop after N messages")
    follow.add_argument("--json", action="store_true", help="JSON lines")

    forget = _sub(
        sub, "forget", "remove a decommissioned device's retained reports from the broker"
    )
    broker_options(forget)
    forget.add_argument("--device", required=True, help="the device id")
    forget.add_argument("--force", action="store_true", help="even if it says it is online")

    status = _sub(sub, "status", "which versions of a model run where")
    broker_options(status)
    status.add_argument("--model", required=True, help="model name")
    status.add_argument("--json", action="store_true", help="print JSON")
    server_cli.add_commands(sub, broker_options, EXIT_CODES)  # serve, token
    return parser


def _expiry_option(command_parser: argparse.ArgumentParser) -> None:
    command_parser.add_argument(
        "--index-expiry-days",
        type=float,
        default=DEFAULT_INDEX_EXPIRY_DAYS,
        metavar="DAYS",
        help="index.json expires this many days from now (default: "
        f"{DEFAULT_INDEX_EXPIRY_DAYS:g}); renew it before with `index --renew`",
    )


def broker_options(command_parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser = command_parser.add_argument_group(
        "broker", "where the broker is and how to log in (defaults: $EDGE_FLEET_*)"
    )
    parser.add_argument(
        "--broker",
        default=env("EDGE_FLEET_BROKER"),
        metavar="URL",
        help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (default: $EDGE_FLEET_BROKER)",
    )
    parser.add_argument("--ca", type=Path, default=env("EDGE_FLEET_CA"), help="broker CA (PEM)")
    parser.add_argument(
        "--cert", type=Path, default=env("EDGE_FLEET_CERT"), help="operator certificate (mTLS)"
    )
    parser.add_argument("--key", type=Path, default=env("EDGE_FLEET_KEY"), help="its private key")
    parser.add_argument("--username", default=env("EDGE_FLEET_USERNAME"), help="broker user")
    parser.add_argument("--password-file", type=Path, help="file holding the password")
    parser.add_argument("--prefix", default="edge", help="topic prefix (default: edge)")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker's answers (default 10)",
    )
