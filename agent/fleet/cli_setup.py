"""``edge-fleet``'s commands that work on files, with no broker: ``keygen`` (a signing key
pair), ``publish`` (a release into the registry), ``index`` (a model's index, ``--renew``)
and ``acl`` (the broker's access list)."""

from __future__ import annotations

import argparse
import sys

from agent.atomic import write_atomic
from agent.errors import ConfigError
from agent.fleet.acl import render_acl
from agent.fleet.publish import publish
from agent.fleet.registry_index import index_info, renew_index, signing_key_ids
from agent.strictjson import dumps
from agent.verify import generate_keypair, key_id, load_private_key


def run_keygen(args: argparse.Namespace) -> None:
    """``keygen``: write a signing key pair and say its key id."""
    private, public = generate_keypair(args.out, args.name, args.force)
    print(
        f"wrote {private} (keep it secret) and {public} (copy to devices); "
        f"key id {key_id(load_private_key(private))}"
    )


def run_publish(args: argparse.Namespace) -> None:
    """``publish``: put a release in the registry (its manifest with ``--json``)."""
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


def run_index(args: argparse.Namespace) -> None:
    """``index``: show a model's index, or ``--renew`` it (re-signed, a new expiry)."""
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


def run_acl(args: argparse.Namespace) -> None:
    """Render the ACL to stdout or, atomically, to ``--out``; raises ConfigError, OSError."""
    devices = _devices(args.device)
    admins = args.admin or ["fleet"]
    text = render_acl(devices, prefix=args.prefix, admins=admins, ha_prefix=args.ha_prefix)
    if args.out is None:
        sys.stdout.write(text)
        return
    write_atomic(args.out, text.encode(), mode=0o644)  # mosquitto reads it after setuid
    print(f"wrote {args.out}: {len(devices)} device(s), admins: {', '.join(admins)}")
