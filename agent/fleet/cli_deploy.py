"""``edge-fleet deploy`` and ``rollout``: the commands that change what devices should run
(a retained desired state, a staged rollout here or in the fleet server, ``deploy --shadow``
handed to :mod:`agent.fleet.cli_shadow`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.desired import SHADOW_FIELDS, desired_topic, parse_desired
from agent.errors import ConfigError
from agent.fleet.cli_common import (
    check_names,
    check_release,
    check_seconds,
    check_signing_key,
    fleet_broker,
    load_reports,
    print_line,
)
from agent.fleet.cli_shadow import deploy_shadow
from agent.fleet.deploy import (
    Watched,
    clear_desired,
    desired_payload,
    issue_time,
    serves,
    watch,
)
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
from agent.fleet.view import FleetView
from agent.strictjson import dumps
from agent.verify import KeyRing


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


def run_deploy(args: argparse.Namespace) -> int:
    """``deploy``: retain a desired state (or ``--clear`` it, or ``--shadow``); with
    ``--wait``, 0 only when every targeted device runs it."""
    check_names(args.device, args.group)
    shadow_only = ("--sample", "--max-cpu", "--promote-at", "--min-frames")
    given = (args.sample, args.max_cpu, args.promote_at, args.min_frames)
    if not args.shadow and any(v is not None for v in given):
        named = [o for o, v in zip(shadow_only, given, strict=True) if v is not None]
        raise ConfigError([f"{', '.join(named)}: only with --shadow"])
    if args.shadow:
        check_release(args.model, args.version)
        check_signing_key(args.sign_key)
        return deploy_shadow(args, fleet_broker(args))
    if args.clear and (args.version is not None or args.sign_key or args.wait):
        raise ConfigError(["--clear: takes no --version, --sign-key or --wait"])
    if not args.clear and (not args.model or args.version is None):
        raise ConfigError(["--model and --version are required (or --clear)"])
    check_release(args.model, args.version)
    check_seconds("--wait", args.wait)
    public = check_signing_key(args.sign_key)
    target = f"device:{args.device}" if args.device else f"group:{args.group}"
    view = FleetView(args.prefix)
    topic = desired_topic(args.prefix, target, args.model)
    quiet = print_line if not args.json else (lambda line: None)
    with fleet_broker(args) as broker:
        load_reports(broker, view, WATCHED)
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


def run_rollout(args: argparse.Namespace) -> int:
    """``rollout``: a staged rollout to a group, here or ``--server``; 0 when it succeeded."""
    shadow = _shadow_steps(args)
    if args.server:
        return _rollout_on_server(args, shadow)
    check_names(group=args.group)
    check_release(args.model, args.version)
    check_seconds("--timeout", args.timeout)
    plan([], args.group, args.canary, args.step)  # checks the percentages before connecting
    check_signing_key(args.sign_key)
    view = FleetView(args.prefix)
    say = print_line if not args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    with fleet_broker(args) as broker:
        load_reports(broker, view, WATCHED)
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
    say = print_line if not args.json else (lambda line: print(line, file=sys.stderr, flush=True))
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
