"""``edge-fleet``'s commands (keygen, publish, index, acl, deploy, rollout, devices,
telemetry, forget, status): :func:`run` once :mod:`agent.fleet.cli` has parsed the options.

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
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.atomic import write_atomic
from agent.config import MODEL_NAME_PATTERN
from agent.desired import SHADOW_FIELDS, desired_topic, parse_desired, shadow_topic
from agent.errors import ConfigError, VerificationError
from agent.fleet.acl import check_device_id, check_prefix, render_acl
from agent.fleet.broker import FleetBroker, options_from_args
from agent.fleet.cli_shadow import deploy_shadow, promote
from agent.fleet.deploy import (
    Watched,
    clear_desired,
    desired_payload,
    issue_time,
    serves,
    watch,
)
from agent.fleet.publish import publish
from agent.fleet.registry_index import index_info, renew_index, signing_key_ids
from agent.fleet.rollout import ShadowSteps, plan, rollout
from agent.fleet.server_client import ServerClient
from agent.fleet.server_client import follow as server_follow
from agent.fleet.server_client import summary as server_summary
from agent.fleet.shadow import (
    DEFAULT_MAX_CPU_PCT,
    DEFAULT_MIN_FRAMES,
    DEFAULT_SAMPLE_PCT,
    check_options,
)
from agent.fleet.status import model_status, status_text
from agent.fleet.view import (
    FOLLOWED,
    REPORTS,
    FleetView,
    describe,
    devices_table,
)
from agent.strictjson import dumps
from agent.verify import KeyRing, generate_keypair, key_id, load_private_key


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


def _own_desired_wins(view: FleetView, device: str, key: KeyRing | None, model: str) -> bool:
    """Whether ``device`` has its own desired state of ``model`` that it accepts (on the
    model's topic or the legacy one; so it wins over its groups'); one it refuses
    (unsigned, another target) does not count."""
    own = view.devices[device]
    docs = [own.desired_models.get(model), own.desired]
    for doc in docs:
        if doc is None or doc.get("model") != model:
            continue
        try:
            payload = dumps(doc).encode()
            target = f"device:{device}"
            if parse_desired(payload, "device", target=target, key=key, refuse=SHADOW_FIELDS):
                return True
        except ValueError:
            continue
    return False


# What deploy --wait and rollout follow: telemetry counts as progress during probation.
WATCHED = ("status", "state", "desired", "events", "telemetry")


def _deploy(args: argparse.Namespace) -> int:
    _check_names(args.device, args.group)
    shadow_only = ("--sample", "--max-cpu", "--promote-at", "--min-frames")
    given = (args.sample, args.max_cpu, args.promote_at, args.min_frames)
    if not args.shadow and any(v is not None for v in given):
        named = [o for o, v in zip(shadow_only, given, strict=True) if v is not None]
        raise ConfigError([f"{', '.join(named)}: only with --shadow"])
    if args.shadow:
        _release(args.model, args.version)
        _signing_key(args.sign_key)
        return deploy_shadow(args, _broker(args))
    if args.clear and (args.version is not None or args.sign_key or args.wait):
        raise ConfigError(["--clear: takes no --version, --sign-key or --wait"])
    if not args.clear and (not args.model or args.version is None):
        raise ConfigError(["--model and --version are required (or --clear)"])
    _release(args.model, args.version)
    _seconds("--wait", args.wait)
    public = _signing_key(args.sign_key)
    target = f"device:{args.device}" if args.device else f"group:{args.group}"
    view = FleetView(args.prefix)
    topic = desired_topic(args.prefix, target, args.model)
    quiet = _say if not args.json else (lambda line: None)
    with _broker(args) as broker:
        _load(broker, view, WATCHED)
        if args.clear:
            cleared = clear_desired(broker, view, target, args.model)
            quiet(f"cleared the desired state on {', '.join(cleared)}")
            if args.json:
                print(dumps({"topic": topic, "topics": cleared, "cleared": True}))
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
        if args.device in view.devices and not serves(view.devices[args.device].state, args.model):
            print(
                f"edge-fleet: warning: {args.device} does not serve {args.model} (its state "
                "lists its models); the desired state stays retained until it does",
                file=sys.stderr,
            )
        shadowed = []
        if args.group:
            members = [m for m in members if serves(view.devices[m].state, args.model)]
            shadowed = [m for m in members if _own_desired_wins(view, m, public, args.model)]
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


def _shadow_steps(args: argparse.Namespace) -> ShadowSteps | None:
    """``rollout --shadow``'s options (ConfigError naming any unusable one), or None
    without ``--shadow`` (then none of them may be given)."""
    options = (args.sample, args.max_cpu, args.min_frames, args.promote_at)
    if not args.shadow:
        if any(v is not None for v in options):
            raise ConfigError(
                ["--sample, --max-cpu, --min-frames, --promote-at: only with --shadow"]
            )
        return None
    steps = ShadowSteps(
        DEFAULT_SAMPLE_PCT if args.sample is None else args.sample,
        DEFAULT_MAX_CPU_PCT if args.max_cpu is None else args.max_cpu,
        DEFAULT_MIN_FRAMES if args.min_frames is None else args.min_frames,
        args.promote_at,
    )
    problems = check_options(
        steps.sample_pct, steps.max_cpu_pct, steps.promote_at, steps.min_frames, paired=False
    )
    if problems:
        raise ConfigError(problems)
    return steps


def _rollout(args: argparse.Namespace) -> int:
    shadow = _shadow_steps(args)
    if args.server:
        return _rollout_on_server(args, shadow)
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
            shadow=shadow,
        )
    say(outcome.summary())
    if args.json:
        print(dumps(outcome.to_dict(), indent=2))
    return 0 if outcome.succeeded else 1


def _rollout_on_server(args: argparse.Namespace, shadow: ShadowSteps | None) -> int:
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
    if shadow is not None:
        body["shadow"] = shadow.to_dict()
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
        _load(broker, view, ("status", "desired", "shadow"))
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
        for model in sorted(device.desired_models if device is not None else ()):
            broker.publish(desired_topic(args.prefix, f"device:{args.device}", model), b"")
        for model in sorted(device.shadows if device is not None else ()):
            broker.publish(shadow_topic(args.prefix, f"device:{args.device}", model), b"")
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
        _load(broker, view, (*REPORTS, "shadow"))
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


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; raises ConfigError (bad usage), EdgeAgentError,
    OSError (failed), as :func:`agent.fleet.cli.main` reports them."""
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
            detection_format=args.detection_format,
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
    elif args.command == "promote":
        _check_names(args.device, args.group)
        _release(args.model, args.version)
        _seconds("--wait", args.wait)
        _signing_key(args.sign_key)
        return promote(args, _broker(args), args.sign_key)
    return 0
