"""``edge-fleet``: the operator's commands (keygen, publish, index, acl, deploy, rollout,
devices, telemetry, status; serve and token from :mod:`agent.server.cli`).

Exit codes (docs/protocol.md): 0 success, 1 the operation failed (the broker unreachable, a
rollout halted, a device that did not take its desired state), 2 bad usage (including
device ids, group or admin names that cannot be used in topics, and options that do
not go together). The broker options default to ``EDGE_FLEET_BROKER``,
``EDGE_FLEET_CA``, ``EDGE_FLEET_CERT``, ``EDGE_FLEET_KEY`` and ``EDGE_FLEET_USERNAME``
(password: ``--password-file`` or ``EDGE_FLEET_PASSWORD``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.atomic import write_atomic
from agent.clihelp import command, exit_codes, internal_error, output_closed, tool
from agent.config import MODEL_NAME_PATTERN
from agent.desired import desired_topic, parse_desired
from agent.errors import ConfigError, EdgeAgentError, VerificationError
from agent.fleet.acl import check_device_id, check_prefix, render_acl
from agent.fleet.broker import FleetBroker, options_from_args
from agent.fleet.deploy import Watched, desired_payload, issue_time, watch
from agent.fleet.publish import (
    DEFAULT_INDEX_EXPIRY_DAYS,
    index_info,
    publish,
    renew_index,
    signing_key_ids,
)
from agent.fleet.rollout import plan, rollout
from agent.fleet.server_client import ServerClient
from agent.fleet.server_client import follow as server_follow
from agent.fleet.server_client import summary as server_summary
from agent.fleet.view import (
    FOLLOWED,
    REPORTS,
    FleetView,
    describe,
    devices_table,
    model_status,
    status_text,
)
from agent.manifest import TASKS
from agent.server import cli as server_cli  # imports nothing of the server extra
from agent.strictjson import dumps
from agent.verify import KeyRing, generate_keypair, key_id, load_private_key

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
        "edge-fleet deploy --group door --clear",
    ),
    "rollout": (
        "Roll a release out to a group in steps: a canary share first, then --step shares, each "
        "step waiting for its devices; the first failure halts the rollout and devices not yet "
        "reached are left untouched. --timeout judges silence, not duration: a device fails "
        "when it says nothing about the release for that long, not for a long probation or "
        "download it keeps reporting on.",
        "edge-fleet rollout --model person-detector --version 3 --group door \\\n"
        "    --canary 10 --step 25 --timeout 900 --sign-key keys/deploy.key",
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


def _parser() -> argparse.ArgumentParser:
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
    _broker_options(deploy)
    deploy.add_argument("--model", help="model name")
    deploy.add_argument("--version", type=int, help="release version (a lower one rolls back)")
    where = deploy.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="one device id")
    where.add_argument("--group", help="every device of a group without its own desired state")
    deploy.add_argument("--sign-key", type=Path, help="Ed25519 private key (from keygen)")
    deploy.add_argument(
        "--clear", action="store_true", help="remove the desired state instead (no --model)"
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

    roll = _sub(sub, "rollout", "roll a release out to a group in steps")
    _broker_options(roll)
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
    _broker_options(devices)
    devices.add_argument("--group", help="only the devices of this group")
    devices.add_argument("--json", action="store_true", help="print JSON")

    follow = _sub(sub, "telemetry", "follow telemetry, results and events live")
    _broker_options(follow)
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
    _broker_options(forget)
    forget.add_argument("--device", required=True, help="the device id")
    forget.add_argument("--force", action="store_true", help="even if it says it is online")

    status = _sub(sub, "status", "which versions of a model run where")
    _broker_options(status)
    status.add_argument("--model", required=True, help="model name")
    status.add_argument("--json", action="store_true", help="print JSON")
    server_cli.add_commands(sub, _broker_options, EXIT_CODES)  # serve, token
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


def _index(args: argparse.Namespace) -> None:
    if args.renew:
        info = renew_index(args.registry, args.model, args.sign_key or [], args.index_expiry_days)
    else:
        if args.sign_key:
            raise ConfigError(["--sign-key: only with --renew"])
        info = index_info(args.registry, args.model)
    if args.json:
        doc = {
            "path": str(info.path),
            "version": info.version,
            "expires": info.expires,
            "channels": info.channels,
            "versions": info.versions,
            "signed_by": info.keyids,
        }
        print(dumps(doc, indent=2))
        return
    verb = "renewed" if args.renew else "index"
    channels = ", ".join(f"{k}=v{v}" for k, v in sorted(info.channels.items())) or "none"
    signed = ", ".join(info.keyids) or "nobody (unsigned)"
    print(
        f"{verb}: {info.path}: version {info.version}, expires {info.expires}; "
        f"channels {channels}; signed by {signed}"
    )


def _broker_options(command_parser: argparse.ArgumentParser) -> None:
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


def _devices(specs: list[str]) -> dict[str, list[str]]:
    """``ID[=GROUP,GROUP]`` arguments as id -> groups; a repeated id adds groups."""
    devices: dict[str, list[str]] = {}
    for spec in specs:
        device, sep, groups = spec.partition("=")
        listed = devices.setdefault(device, [])
        if sep:
            listed += groups.split(",")  # "dev=" gives [""], reported as an empty name
    return devices


def _acl(args: argparse.Namespace) -> None:
    """Render the ACL to stdout or, atomically, to ``--out``; raises ConfigError, OSError."""
    devices = _devices(args.device)
    admins = args.admin or ["fleet"]
    text = render_acl(devices, prefix=args.prefix, admins=admins, ha_prefix=args.ha_prefix)
    if args.out is None:
        sys.stdout.write(text)
        return
    write_atomic(args.out, text.encode(), mode=0o644)  # mosquitto reads it after setuid
    print(f"wrote {args.out}: {len(devices)} device(s), admins: {', '.join(admins)}")


def _broker(args: argparse.Namespace) -> FleetBroker:
    """The connection the options describe (not connected); ConfigError names the option."""
    if not args.broker:
        raise ConfigError(["--broker: required (or set EDGE_FLEET_BROKER)"])
    problem = check_prefix(args.prefix)
    if problem:
        raise ConfigError([f"--prefix: {problem}"])
    _seconds("--connect-timeout", args.connect_timeout)
    return FleetBroker(options_from_args(args))


def _check_names(device: str | None = None, group: str | None = None) -> None:
    problems = []
    if device is not None and (problem := check_device_id(device)):
        problems.append(f"--device: {problem}")
    if group is not None and (problem := check_device_id(group)):
        problems.append(f"--group: {problem.replace('device id', 'group name')}")
    if problems:
        raise ConfigError(problems)


def _say(line: str) -> None:
    print(line, flush=True)


def _seconds(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError([f"{option}: {value:g} is not a positive number of seconds"])


def _release(model: str | None, version: int | None) -> None:
    if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise ConfigError([f"--model: {model!r} is not a model name"])
    if version is not None and version < 1:
        raise ConfigError([f"--version: {version} is not a positive integer"])


def _signing_key(path: Path | None) -> KeyRing | None:
    """Check ``--sign-key`` before anything is sent; its public half, or None."""
    if path is None:
        return None
    try:
        return KeyRing.of([load_private_key(path).public_key()], "--sign-key")
    except VerificationError as exc:
        raise ConfigError([f"--sign-key: {exc}"]) from exc


def _own_desired_wins(view: FleetView, device: str, key: KeyRing | None) -> bool:
    """Whether ``device`` has its own desired state that it accepts (so it wins over
    its groups'); one it refuses (unsigned, another target) does not count."""
    doc = view.devices[device].desired
    if doc is None:
        return False
    try:
        payload = dumps(doc).encode()
        return parse_desired(payload, "device", target=f"device:{device}", key=key) is not None
    except ValueError:
        return False


# What deploy --wait and rollout follow: telemetry counts as progress during probation.
WATCHED = ("status", "state", "desired", "events", "telemetry")


def _deploy(args: argparse.Namespace) -> int:
    _check_names(args.device, args.group)
    if args.clear and (args.model or args.version is not None or args.sign_key or args.wait):
        raise ConfigError(["--clear: takes no --model, --version, --sign-key or --wait"])
    if not args.clear and (not args.model or args.version is None):
        raise ConfigError(["--model and --version are required (or --clear)"])
    _release(args.model, args.version)
    _seconds("--wait", args.wait)
    public = _signing_key(args.sign_key)
    target = f"device:{args.device}" if args.device else f"group:{args.group}"
    view = FleetView(args.prefix)
    topic = desired_topic(args.prefix, target)
    quiet = _say if not args.json else (lambda line: None)
    with _broker(args) as broker:
        _load(broker, view, WATCHED)
        if args.clear:
            broker.publish(topic, b"")
            quiet(f"cleared the desired state on {topic}")
            if args.json:
                print(dumps({"topic": topic, "cleared": True}))
            return 0
        issued_at = issue_time()
        broker.publish(
            topic, desired_payload(args.model, args.version, target, issued_at, args.sign_key)
        )
        signed = ", signed" if args.sign_key else ""
        quiet(
            f"deployed {args.model} v{args.version} to {target.replace(':', ' ')} "
            f"(retained on {topic}{signed})"
        )
        members = [args.device] if args.device else view.members(args.group)
        shadowed = []
        if args.group:
            shadowed = [m for m in members if _own_desired_wins(view, m, public)]
            if shadowed:
                print(
                    f"edge-fleet: warning: {len(shadowed)} device(s) of group {args.group} have "
                    f"their own desired state, which wins: {', '.join(shadowed)} (remove it "
                    "with deploy --device ID --clear)",
                    file=sys.stderr,
                )
            if not members:
                print(
                    f"edge-fleet: warning: no device reports group {args.group} yet",
                    file=sys.stderr,
                )
        watched = [Watched(m, topic, issued_at) for m in members if m not in shadowed]
        result: dict[str, Any] = {
            "topic": topic,
            "target": target,
            "model": args.model,
            "version": args.version,
            "issued_at": issued_at,
            "signed": bool(args.sign_key),
            "shadowed": shadowed,
        }
        ok = True
        if args.wait is not None:
            quiet(f"waiting up to {args.wait:g} s for {len(watched)} device(s)")
            watch(broker, view, watched, args.model, args.version, args.wait, quiet)
            result["devices"] = [w.to_dict() for w in watched]
            ok = all(w.verdict.status == "succeeded" for w in watched) and not shadowed
            done = sum(w.verdict.status == "succeeded" for w in watched)
            quiet(f"{done} of {len(watched) + len(shadowed)} device(s) run v{args.version}")
        if args.json:
            print(dumps(result, indent=2))
        return 0 if ok else 1


def _rollout(args: argparse.Namespace) -> int:
    if args.server:
        return _rollout_on_server(args)
    _check_names(group=args.group)
    _release(args.model, args.version)
    _seconds("--timeout", args.timeout)
    plan([], args.group, args.canary, args.step)  # checks the percentages before connecting
    _signing_key(args.sign_key)
    view = FleetView(args.prefix)
    say = _say if not args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    with _broker(args) as broker:
        _load(broker, view, WATCHED)
        outcome = rollout(
            broker,
            view,
            model=args.model,
            version=args.version,
            group=args.group,
            canary_pct=args.canary,
            step_pct=args.step,
            timeout_s=args.timeout,
            sign_key=args.sign_key,
            say=say,
        )
    say(outcome.summary())
    if args.json:
        print(dumps(outcome.to_dict(), indent=2))
    return 0 if outcome.succeeded else 1


def _rollout_on_server(args: argparse.Namespace) -> int:
    """``rollout --server``: the server plans, signs, drives and persists it."""
    if args.sign_key:
        raise ConfigError(["--sign-key: with --server the server signs (serve --sign-key)"])
    client = ServerClient(args.server, args.token)
    body = {
        "model": args.model,
        "version": args.version,
        "group": args.group,
        "canary_pct": args.canary,
        "step_pct": args.step,
        "timeout_s": args.timeout,
    }
    say = _say if not args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    made = client.request("POST", "/api/v1/rollouts", body)
    say(f"rollout {made.get('id')} submitted to {args.server}")
    try:
        final = server_follow(client, made, say)
    except KeyboardInterrupt:
        say(f"stopped following; rollout {made.get('id')} goes on in the server")
        return 130
    say(server_summary(final))
    if args.json:
        print(dumps(final, indent=2))
    return 0 if final.get("status") == "succeeded" else 1


def _forget(args: argparse.Namespace) -> int:
    _check_names(args.device)
    view = FleetView(args.prefix)
    with _broker(args) as broker:
        _load(broker, view, ("status", "desired"))
        device = view.devices.get(args.device)
        if device is not None and device.online and not args.force:
            print(
                f"edge-fleet: {args.device} says it is online; stop it first (or --force: "
                "it will report again when it reconnects)",
                file=sys.stderr,
            )
            return 1
        for stream in REPORTS:
            broker.publish(f"{args.prefix}/{args.device}/{stream}", b"")
    print(f"forgot {args.device}: its retained {', '.join(REPORTS)} are removed")
    return 0


def _load(broker: FleetBroker, view: FleetView, streams: tuple[str, ...] = REPORTS) -> None:
    """Connect and take the retained reports of the fleet into ``view``."""
    broker.connect(view.subscriptions(streams))
    for message in broker.messages():
        view.take(message)


def _snapshot(args: argparse.Namespace) -> FleetView:
    view = FleetView(args.prefix)
    with _broker(args) as broker:
        _load(broker, view)
    return view


def _devices_cmd(args: argparse.Namespace) -> int:
    if args.group:
        _check_names(group=args.group)
    view = _snapshot(args)
    if args.group:
        keep = set(view.members(args.group))
        view.devices = {k: v for k, v in view.devices.items() if k in keep}
    if args.json:
        print(dumps([d.row() for d in view.reporting()], indent=2))
    else:
        print(devices_table(view))
    return 0


def _status_cmd(args: argparse.Namespace) -> int:
    view = _snapshot(args)
    status = model_status(view, args.model)
    print(dumps(status, indent=2) if args.json else status_text(status))
    return 0


def _follow(args: argparse.Namespace) -> int:
    if args.device:
        _check_names(args.device)
    view = FleetView(args.prefix)
    streams = tuple(args.stream or FOLLOWED)
    topics = view.subscriptions(streams, device=args.device or "+")
    _seconds("--seconds", args.seconds)
    if args.count is not None and args.count < 1:
        raise ConfigError([f"--count: {args.count} is not a positive number"])
    deadline = time.monotonic() + args.seconds if args.seconds is not None else None
    seen = 0
    with _broker(args) as broker:
        broker.connect(topics)
        while args.count is None or seen < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            for message in broker.messages(timeout=min(0.5, left) if left else 0.5):
                report = view.take(message)
                if report is None or report.retained or report.device is None:
                    continue  # retained telemetry is the last known, not live news
                if args.json:
                    line = {"device": report.device, "stream": report.stream, "doc": report.doc}
                    print(dumps(line), flush=True)
                else:
                    print(describe(report), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = generate_keypair(args.out, args.name, args.force)
            print(
                f"wrote {private} (keep it secret) and {public} (copy to devices); "
                f"key id {key_id(load_private_key(private))}"
            )
        elif args.command == "publish":
            result = publish(
                args.files,
                model=args.model,
                version=args.version,
                registry=args.registry,
                task=args.task,
                labels=args.labels,
                input_norm=tuple(args.input_norm) if args.input_norm else None,
                sign_key=args.sign_key,
                channels=tuple(args.channel),
                index_expiry_days=args.index_expiry_days,
                selftest_inputs=args.selftest_inputs,
                selftest_random=args.selftest_random,
                selftest_expect=args.selftest_expect,
                atol=args.atol,
                budget_p95_ms=args.budget_p95_ms,
            )
            if args.json:
                print(dumps(result.manifest, indent=2))
            else:
                verb = "published" if result.created else "already published (unchanged)"
                ids = ", ".join(signing_key_ids(args.sign_key))
                signed = f"signed by {ids}" if ids else "unsigned"
                moved = (
                    f"channels: {', '.join(args.channel)}"
                    if args.channel
                    else "no channel moved: devices stay where they are (--channel NAME deploys it)"
                )
                print(f"{verb}: {args.model} v{args.version} at {result.folder}, {signed}; {moved}")
        elif args.command == "index":
            _index(args)
        elif args.command == "acl":
            _acl(args)
        elif args.command == "deploy":
            return _deploy(args)
        elif args.command == "rollout":
            return _rollout(args)
        elif args.command == "devices":
            return _devices_cmd(args)
        elif args.command == "status":
            return _status_cmd(args)
        elif args.command == "telemetry":
            return _follow(args)
        elif args.command == "forget":
            return _forget(args)
        elif args.command in server_cli.COMMANDS:
            return server_cli.main(args)
    except KeyboardInterrupt:
        print("edge-fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return output_closed()
    except ConfigError as exc:  # bad usage (unusable names, clashing options): nothing written
        print(f"edge-fleet: {exc}".replace("\n", "\nedge-fleet: "), file=sys.stderr)
        return 2
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, and the traceback when debugging
        return internal_error("edge-fleet", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
