"""``edge-fleet deploy --shadow`` and ``edge-fleet promote`` (:mod:`agent.fleet.shadow`).

``deploy --shadow --model M --version V (--device ID | --group G)`` publishes the shadow
instruction, retained, on M's shadow topic; with ``--clear`` it clears that topic (the
run stops). ``promote --model M (--device | --group) [--version V]`` publishes a normal
desired state of M for V (V: the retained shadow instruction's, unless given) on M's
desired topic, then clears the shadow topic; for a group, as a rollout does, it clears
the members' own desired states of M (they would win over the group's); ``--wait``
waits as ``deploy --wait``.
A staged shadow run over a group is ``rollout --shadow`` (:mod:`agent.fleet.rollout`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.desired import desired_topic, shadow_topic
from agent.errors import ConfigError
from agent.fleet.broker import FleetBroker
from agent.fleet.deploy import Watched, clear_desired, desired_payload, issue_time, watch
from agent.fleet.shadow import (
    DEFAULT_MAX_CPU_PCT,
    DEFAULT_SAMPLE_PCT,
    Promote,
    check_options,
    shadow_payload,
    shadow_version,
)
from agent.fleet.view import FleetView
from agent.strictjson import dumps

WATCHED = ("status", "state", "desired", "shadow", "events", "telemetry")


def _target(args: argparse.Namespace) -> str:
    return f"device:{args.device}" if args.device else f"group:{args.group}"


def _load(broker: FleetBroker, view: FleetView, streams: tuple[str, ...] = WATCHED) -> None:
    broker.connect(view.subscriptions(streams))
    for message in broker.messages():
        view.take(message)


def _quiet(args: argparse.Namespace) -> Callable[[str], None]:
    if args.json:
        return lambda line: None
    return lambda line: print(line, flush=True)


def deploy_shadow(args: argparse.Namespace, broker: FleetBroker) -> int:
    """``deploy --shadow``: publish (or with ``--clear`` clear) the shadow instruction.
    Raises ConfigError for options that do not go together, BrokerError."""
    if not args.model:
        raise ConfigError(["--shadow: needs --model (the model whose candidate runs beside it)"])
    if args.wait is not None:
        raise ConfigError(["--shadow: takes no --wait (a shadow run does not end by itself)"])
    target = _target(args)
    topic = shadow_topic(args.prefix, target, args.model)
    say = _quiet(args)
    if args.clear:
        extra = (args.version, args.promote_at, args.min_frames, args.sample, args.max_cpu)
        if args.sign_key or any(v is not None for v in extra):
            raise ConfigError(
                [
                    "--shadow --clear: takes only --model and --device or --group (a clear "
                    "is an empty retained message: nothing to sign, no options)"
                ]
            )
        with broker:
            broker.connect([])
            broker.publish(topic, b"")
        say(f"cleared the shadow run on {topic}")
        if args.json:
            print(dumps({"topic": topic, "cleared": True}))
        return 0
    if args.version is None:
        raise ConfigError(["--shadow: needs --version (the candidate)"])
    sample = DEFAULT_SAMPLE_PCT if args.sample is None else args.sample
    max_cpu = DEFAULT_MAX_CPU_PCT if args.max_cpu is None else args.max_cpu
    problems = check_options(sample, max_cpu, args.promote_at, args.min_frames)
    if problems:
        raise ConfigError(problems)
    promote = None
    if args.promote_at is not None and args.min_frames is not None:
        promote = Promote(args.promote_at, args.min_frames)
    issued_at = issue_time()
    payload = shadow_payload(
        args.model,
        args.version,
        target,
        issued_at,
        sample_pct=sample,
        max_cpu_pct=max_cpu,
        promote=promote,
        sign_key=args.sign_key,
    )
    view = FleetView(args.prefix)
    with broker:
        _load(broker, view, ("status", "state"))
        broker.publish(topic, payload)
    members = [args.device] if args.device else view.members(args.group)
    serving = [m for m in members if m in view.devices and view.devices[m].served().get(args.model)]
    if len(serving) < len(members) or not members:
        left = sorted(set(members) - set(serving))
        print(
            f"edge-fleet: warning: {len(serving)} of {len(members)} device(s) report serving "
            f"{args.model}{': not ' + ', '.join(left[:10]) if left else ''} (a device runs "
            "the candidate only beside a model it serves)",
            file=sys.stderr,
        )
    signed = ", signed" if args.sign_key else ""
    when = (
        f"; promoted at agreement >= {promote.min_agreement:g} over {promote.min_frames} frames"
        if promote
        else "; edge-fleet promote makes it the release"
    )
    say(
        f"shadow run of {args.model} v{args.version} on {target.replace(':', ' ')}: "
        f"{sample:g} % of frames, at most {max_cpu:g} % CPU (retained on "
        f"{topic}{signed}){when}"
    )
    if args.json:
        doc: dict[str, Any] = {"topic": topic, "target": target, "issued_at": issued_at}
        print(dumps(doc | {"document": json.loads(payload)}, indent=2))
    return 0


def promote(args: argparse.Namespace, broker: FleetBroker, sign_key: Path | None) -> int:
    """``edge-fleet promote``: the shadow's candidate becomes the desired release."""
    target = _target(args)
    desired = desired_topic(args.prefix, target, args.model)
    shadow = shadow_topic(args.prefix, target, args.model)
    say = _quiet(args)
    view = FleetView(args.prefix)
    with broker:
        _load(broker, view)
        kind, _, name = target.partition(":")
        if kind == "group":
            held = view.group_shadows.get(name, {}).get(args.model)
        else:
            device = view.devices.get(name)
            held = device.shadows.get(args.model) if device is not None else None
        version = args.version if args.version is not None else shadow_version(held, args.model)
        if version is None:
            print(
                f"edge-fleet: no shadow run of {args.model} on {target.replace(':', ' ')} "
                f"(nothing retained on {shadow}); name the release with --version",
                file=sys.stderr,
            )
            return 1
        issued_at = issue_time()
        payload = desired_payload(args.model, version, target, issued_at, sign_key)
        broker.publish(desired, payload)
        broker.publish(shadow, b"")
        say(
            f"promoted {args.model} v{version} on {target.replace(':', ' ')}: desired state "
            f"on {desired}, shadow run cleared on {shadow}"
        )
        members = [args.device] if args.device else view.members(args.group)
        if kind == "group":  # as a rollout does: a member's own state would win over it
            for member in members:
                held_by = view.devices.get(member)
                if held_by is not None and held_by.own_desired(args.model) is not None:
                    clear_desired(broker, view, f"device:{member}", args.model)
                    say(f"  {member}: its own desired state of {args.model} cleared")
        watched = [Watched(m, desired, issued_at) for m in members]
        result: dict[str, Any] = {
            "topic": desired,
            "shadow_topic": shadow,
            "target": target,
            "model": args.model,
            "version": version,
            "issued_at": issued_at,
            "signed": sign_key is not None,
        }
        ok = True
        if args.wait is not None:
            say(f"waiting up to {args.wait:g} s for {len(watched)} device(s)")
            watch(broker, view, watched, args.model, version, args.wait, say)
            result["devices"] = [w.to_dict() for w in watched]
            ok = all(w.verdict.status == "succeeded" for w in watched)
    if args.json:
        print(dumps(result, indent=2))
    return 0 if ok else 1
