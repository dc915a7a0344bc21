"""``edge-agent``: the device's command line.

Exit codes (DESIGN.md): 0 success; 1 the operation failed (download refused, …);
2 bad command-line usage; 78 (EX_CONFIG) invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from agent import logs
from agent.config import DEFAULT_CONFIG_PATH, Config, RuntimeConfig, load_config, preflight
from agent.errors import ConfigError, EdgeAgentError
from agent.manifest import FileEntry
from agent.oneshot import TASK_CHOICES
from agent.registry import Progress, Registry
from agent.store import Release, Store
from agent.updater import Updater

EX_CONFIG = 78


class _ProgressLine:
    """One self-overwriting line on a terminal for long downloads; silent elsewhere.

    Ten lines of our own rather than a progress-bar dependency on every device.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()

    def __call__(self, entry: FileEntry) -> Progress | None:
        if not self.enabled or entry.size < 1_000_000:
            return None
        start = last = time.monotonic()

        def show(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < 0.1 and done < total:
                return
            last = now
            rate = done / max(now - start, 1e-6) / 1e6
            end = "\n" if done >= total else ""
            self.stream.write(
                f"\r{entry.name}: {done / 1e6:7.1f} / {total / 1e6:.1f} MB  {rate:6.1f} MB/s{end}"
            )
            self.stream.flush()

        return show


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"config file (default: $EDGE_AGENT_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print data as JSON"
    )
    common.add_argument(
        "--log-level",
        choices=tuple(logs.LEVELS),
        type=str.lower,
        default=argparse.SUPPRESS,
        help=f"log level (default: ${logs.LEVEL_ENV}, else info for run, warning for others)",
    )
    common.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help=f"log lines as text or JSON (default: ${logs.FORMAT_ENV}, else text)",
    )
    return common


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="edge-agent", parents=[common], description="Edge deployment agent for TFLite models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="the agent: serve the model, report over MQTT")
    sub.add_parser("check-config", parents=[common], help="validate the config (exit 0 or 78)")
    sub.add_parser("status", parents=[common], help="the active release and the store")
    models = sub.add_parser("models", parents=[common], help="list, pull or roll back releases")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = msub.add_parser("list", parents=[common], help="releases in the store")
    listing.add_argument("--remote", action="store_true", help="also list the registry's index")
    pull = msub.add_parser("pull", parents=[common], help="fetch, verify and activate a release")
    pull.add_argument("--version", type=int, help="version to pull (default: the channel's)")
    rollback = msub.add_parser(
        "rollback", parents=[common], help="switch back to a stored release, no download"
    )
    rollback.add_argument("--to", type=int, help="version (default: the previous one)")
    model = argparse.ArgumentParser(add_help=False)
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
    model.add_argument("--threads", type=_positive(int), help="default: runtime.threads")
    model.add_argument("--top-k", type=_positive(int), default=5, help="classes/detections kept")
    model.add_argument("--min-score", type=float, default=0.0, help="lowest score shown")
    model.add_argument("--input-mean", type=float, help="input = (pixel - mean) / std")
    model.add_argument("--input-std", type=_positive(float), help="input = (pixel - mean) / std")
    infer = sub.add_parser(
        "infer",
        parents=[common, model],
        help="run a model on images or videos and print the results",
    )
    infer.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or video")
    bench = sub.add_parser(
        "bench", parents=[common, model], help="pipeline fps against the bare interpreter loop"
    )
    bench.add_argument(
        "--seconds", type=_positive(float), default=2.0, help="length of each measurement"
    )
    bench.add_argument(
        "--rounds", type=_positive(int), default=3, help="alternating rounds (medians)"
    )
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the whole agent locally: generated models, a local registry, a stream, a "
        "verified hot swap",
    )
    demo.add_argument(
        "--seconds", type=_positive(float), default=24.0, help="how long to run (default 24)"
    )
    demo.add_argument("--broker", help="also send everything to this broker (mqtt://host:port)")
    demo.add_argument("--keep", type=Path, help="work in this folder and keep it afterwards")
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    explicit: Path | None = getattr(args, "config", None)
    return explicit or Path(os.environ.get("EDGE_AGENT_CONFIG", str(DEFAULT_CONFIG_PATH)))


def _release_info(release: Release, store: Store) -> dict[str, Any]:
    manifest = release.manifest
    return {
        "model": release.model,
        "version": release.version,
        "task": manifest.task,
        "created": manifest.created,
        "manifest_sha256": release.manifest_sha256,
        "files": [
            {
                "name": f.name,
                "role": f.role,
                "variant": f.variant,
                "size": f.size,
                "sha256": f.sha256,
                "path": str(store.blobs / f.sha256),
            }
            for f in manifest.files
        ],
    }


def _emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


def cmd_run(config: Config, path: Path) -> int:
    """The daemon (agent.service.run): until SIGTERM or SIGINT; SIGHUP reloads."""
    from agent.service import run

    return run(config, path)


def cmd_check_config(config: Config, path: Path, as_json: bool) -> int:
    problems = preflight(config)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    _emit({"ok": True, "config": str(path)}, as_json, [f"{path}: configuration is valid"])
    return 0


def cmd_status(config: Config, as_json: bool) -> int:
    store = Store(config.store.dir, config.store.keep)
    pointer = store.pointer()
    active = store.active()
    data: dict[str, Any] = {
        "device": config.device.id,
        "model": config.model.name,
        "store": str(store.root),
        "active": _release_info(active, store) if active else None,
        "previous_version": pointer.previous if pointer else None,
        "activated_at": pointer.activated_at if pointer else None,
        "stored_versions": store.versions(pointer.model) if pointer else [],
    }
    lines = [f"device:   {config.device.id}", f"store:    {store.root}"]
    if active is None or pointer is None:
        lines.append("active:   none (no release pulled yet)")
    else:
        model_file = next(f for f in active.manifest.files if f.role == "model")
        lines += [
            f"active:   {active.model} v{active.version} (since {pointer.activated_at})",
            f"model:    {model_file.name} sha256 {model_file.sha256}",
            f"previous: {f'v{pointer.previous}' if pointer.previous else 'none'}",
            f"stored:   {', '.join(f'v{v}' for v in data['stored_versions'])}",
        ]
    _emit(data, as_json, lines)
    return 0


def cmd_models_list(config: Config, remote: bool, as_json: bool) -> int:
    store = Store(config.store.dir, config.store.keep)
    pointer = store.pointer()
    model = pointer.model if pointer else config.model.name
    rows = []
    if model is not None:
        for version in store.versions(model):
            release = store.release(model, version)
            if release is not None:
                info = _release_info(release, store)
                info["active"] = pointer is not None and pointer.version == version
                rows.append(info)
    data: dict[str, Any] = {"model": model, "stored": rows}
    lines = [f"{'':2}{'VERSION':>7}  {'TASK':<15} {'SIZE MB':>8}  CREATED"]
    for row in rows:
        size = sum(f["size"] for f in row["files"]) / 1e6
        mark = "*" if row["active"] else " "
        label = f"v{row['version']}"
        lines.append(f"{mark:2}{label:>7}  {row['task']:<15} {size:8.1f}  {row['created']}")
    if not rows:
        lines.append("  (no releases in the store)")
    if remote:
        registry = Registry.from_config(config.registry)
        try:
            index = Updater(config, store, registry).fetch_index()
        finally:
            registry.close()
        data["registry"] = {"versions": index.versions, "channels": index.channels}
        channels = ", ".join(f"{k}=v{v}" for k, v in sorted(index.channels.items())) or "none"
        versions = ", ".join(f"v{v}" for v in index.versions)
        lines.append(f"registry: versions {versions}; channels {channels}")
    _emit(data, as_json, lines)
    return 0


def cmd_models_pull(config: Config, version: int | None, as_json: bool) -> int:
    store = Store(config.store.dir, config.store.keep).open()
    registry = Registry.from_config(config.registry)
    try:
        updater = Updater(config, store, registry, progress=_ProgressLine(sys.stderr))
        started = time.monotonic()
        result = updater.pull(version)
        seconds = time.monotonic() - started
    finally:
        registry.close()
    release = result.release
    data = {
        "changed": result.changed,
        "note": result.note,
        "fetched_bytes": result.fetched_bytes,
        "seconds": round(seconds, 3),
        "active": _release_info(release, store),
    }
    if result.changed:
        line = (
            f"activated {release.model} v{release.version} "
            f"({result.fetched_bytes / 1e6:.1f} MB fetched in {seconds:.1f} s)"
        )
    else:
        line = f"unchanged: {result.note}"
    _emit(data, as_json, [line])
    return 0


def cmd_models_rollback(config: Config, to: int | None, as_json: bool) -> int:
    store = Store(config.store.dir, config.store.keep).open()
    with store.lock():
        before = store.pointer()
        release = store.rollback(to)
    data = {
        "active": _release_info(release, store),
        "from_version": before.version if before else None,
    }
    _emit(
        data,
        as_json,
        [f"rolled back {release.model} to v{release.version} (was v{data['from_version']})"],
    )
    return 0


def cmd_model_tool(args: argparse.Namespace, path: Path, as_json: bool) -> int:
    """infer and bench: the config is optional (its runtime section, when there is one)."""
    from agent import oneshot

    explicit = getattr(args, "config", None) is not None or "EDGE_AGENT_CONFIG" in os.environ
    runtime = load_config(path).runtime if explicit or path.exists() else RuntimeConfig()
    overrides = {"accelerator": args.accelerator, "threads": args.threads}
    runtime = runtime.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    model = oneshot.open_model(
        args.model,
        args.task,
        args.labels,
        runtime,
        args.top_k,
        args.min_score,
        args.input_mean,
        args.input_std,
    )
    try:
        if model.note:
            print(f"edge-agent: {model.note}", file=sys.stderr)
        if args.command == "infer":
            reload = oneshot.reloader(runtime, args.top_k, args.min_score)
            return oneshot.infer(model, args.inputs, as_json, runtime, reload)
        return oneshot.bench(model, args.seconds, args.rounds, as_json)
    finally:
        model.close()


def cmd_demo(args: argparse.Namespace, as_json: bool) -> int:
    """The demo needs no config: it makes its own (see agent.demo)."""
    from agent.demo import run_demo

    try:
        return run_demo(args.seconds, args.broker, sys.stdout, as_json, args.keep)
    except ConfigError as exc:  # a bad option (--keep on a used folder), not a config file
        print(f"edge-agent: demo: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.setup(
            getattr(args, "log_level", None),
            getattr(args, "log_format", None),
            sys.stderr,
            default="info" if args.command == "run" else "warning",
        )
    except logs.LogSettingError as exc:  # from the environment: the options are choices
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    as_json = bool(getattr(args, "json", False))
    path = _config_path(args)
    try:
        if args.command in ("infer", "bench"):
            return cmd_model_tool(args, path, as_json)
        if args.command == "demo":
            return cmd_demo(args, as_json)
        config = load_config(path)
        if args.command == "run":
            return cmd_run(config, path)
        if args.command == "check-config":
            return cmd_check_config(config, path, as_json)
        if args.command == "status":
            return cmd_status(config, as_json)
        if args.models_command == "list":
            return cmd_models_list(config, args.remote, as_json)
        if args.models_command == "pull":
            return cmd_models_pull(config, args.version, as_json)
        return cmd_models_rollback(config, args.to, as_json)
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except EdgeAgentError as exc:
        print(
            f"edge-agent: {type(exc).__name__.removesuffix('Error').lower() or 'error'}: {exc}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # permissions, a read-only or missing disk: say so in one line
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
