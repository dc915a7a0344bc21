"""``edge-fleet``: the operator's commands (keygen, publish, acl).

Exit codes as DESIGN.md: 0 success, 1 the operation failed, 2 bad usage (including
device ids, group or admin names that cannot be used in topics, and publish options
that do not go together).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.atomic import write_atomic
from agent.errors import ConfigError, EdgeAgentError
from agent.fleet.acl import render_acl
from agent.fleet.publish import publish
from agent.manifest import TASKS
from agent.verify import generate_keypair


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing releases")
    keygen.add_argument("--out", type=Path, required=True, help="folder for NAME.key and NAME.pub")
    keygen.add_argument("--name", default="registry", help="file name stem (default: registry)")
    keygen.add_argument("--force", action="store_true", help="replace existing keys")

    pub = sub.add_parser("publish", help="publish a release into a registry folder")
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
    pub.add_argument("--sign-key", type=Path, help="Ed25519 private key (from keygen)")
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

    acl = sub.add_parser("acl", help="write the broker's ACL file (mosquitto acl_file)")
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
    acl.add_argument("--out", type=Path, help="write this file atomically (default: stdout)")
    return parser


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
    text = render_acl(devices, prefix=args.prefix, admins=admins)
    if args.out is None:
        sys.stdout.write(text)
        return
    write_atomic(args.out, text.encode(), mode=0o644)  # mosquitto reads it after setuid
    print(f"wrote {args.out}: {len(devices)} device(s), admins: {', '.join(admins)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = generate_keypair(args.out, args.name, args.force)
            print(f"wrote {private} (keep it secret) and {public} (copy to devices)")
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
                selftest_inputs=args.selftest_inputs,
                selftest_random=args.selftest_random,
                selftest_expect=args.selftest_expect,
                atol=args.atol,
                budget_p95_ms=args.budget_p95_ms,
            )
            if args.json:
                print(json.dumps(result.manifest, indent=2))
            else:
                verb = "published" if result.created else "already published (unchanged)"
                channels = f", channels: {', '.join(args.channel)}" if args.channel else ""
                print(f"{verb}: {args.model} v{args.version} at {result.folder}{channels}")
        elif args.command == "acl":
            _acl(args)
    except ConfigError as exc:  # bad usage (unusable names, clashing options): nothing written
        print(f"edge-fleet: {exc}".replace("\n", "\nedge-fleet: "), file=sys.stderr)
        return 2
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
