"""``edge-agent status`` and ``models list|pull|rollback``: the model store, through the
running agent when one serves it.

With an agent running (it answers on its control socket, ``agent.local``) these ask it, so
the served model changes through its gate, probation and journal; with no agent they
work on the store directly, under the agent lock, and leave a journal entry the agent's
next start gates. Output is lines on a terminal or one JSON document (``--json``).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import Config
from agent.config_pipelines import served_models
from agent.errors import StoreError, TransportError
from agent.store import Release, Store
from agent.stores import store_dirs
from agent.strictjson import dumps

if TYPE_CHECKING:  # the registry, the puller and urllib3: imported by the commands using them
    from agent.local import Reach


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


def emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """Print ``data`` as JSON, or ``lines`` for a person."""
    if as_json:
        print(dumps(data, indent=2))
    else:
        print("\n".join(lines))


def cmd_status(config: Config, as_json: bool) -> int:
    """The agent's view (when it runs and answers) and the store's; exit 0 either way."""
    from agent import local

    found = local.reach(config)
    store = Store(config.store.dir, config.store.keep)
    daemon: dict[str, Any] = {
        "running": found.status is not None,
        "socket": str(found.path),
        "problem": found.problem,
        "status": found.status,
    }
    lines = [
        f"device:   {config.device.id} (edge-agent {__version__})",
        *local.daemon_lines(found),
    ]
    try:
        pointer = store.pointer()
        active = store.active()
    except OSError as exc:
        if found.status is None:  # nothing else to show: the error is the answer
            raise
        # A member of the agent's group may ask the agent but not read its store.
        lines.append(f"store:    {store.root}: cannot read: {exc.strerror or exc}")
        emit({"device": config.device.id, "daemon": daemon}, as_json, lines)
        return 0
    except StoreError as exc:  # a damaged pointer: the agent repairs it when it starts
        lines += [f"store:    {store.root}", f"active:   unknown: {exc}"]
        if found.status is None:
            lines.append("          (the agent sets it aside and repairs it when it starts)")
        doc = {"device": config.device.id, "daemon": daemon, "store_error": str(exc)}
        # the other models' stores are their own: listed as ever, the root's model (as
        # the agent takes it with an unreadable pointer: the first one) in one line
        lines += _several_models(config, None, found.status, doc)
        emit(doc, as_json, lines)
        return 0
    data: dict[str, Any] = {
        "device": config.device.id,
        "agent_version": __version__,
        # the first pipeline's model (with pipelines: config.model is unset), else the
        # one the store root holds
        "model": config.model.name
        or (config.pipelines[0].model.name if config.pipelines else None)
        or (pointer.model if pointer else None),
        "store": str(store.root),
        "active": _release_info(active, store) if active else None,
        "previous_version": pointer.previous if pointer else None,
        "activated_at": pointer.activated_at if pointer else None,
        "stored_versions": store.versions(pointer.model) if pointer else [],
        "daemon": daemon,
    }
    lines.append(f"store:    {store.root}")
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
    lines += _several_models(config, pointer.model if pointer else None, found.status, data)
    emit(data, as_json, lines)
    return 0


def _several_models(
    config: Config, held: str | None, status: dict[str, Any] | None, data: dict[str, Any]
) -> list[str]:
    """With several models: each one's store into ``data["models"]``, and its lines."""
    served = served_models(config.pipeline_list())
    if not (config.pipelines or len(served) > 1):
        return []
    agent_view = (status or {}).get("models") or {}
    data["models"], lines = _models_status(config, list(served), held, agent_view)
    return lines


def _models_status(
    config: Config, models: list[str], held: str | None, agent_view: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Each served model's store (the root's, or ``models/<name>/``): what is active in
    it, the version before and what is kept; a store that cannot be read says why. With
    the agent answering (``agent_view``: its state's ``models``), a model's update under
    way and its last error too."""
    data: dict[str, Any] = {}
    lines = ["models:"]
    for name, root in store_dirs(config.store.dir, held, models).items():
        store = Store(root, config.store.keep)
        part: dict[str, Any] = {"store": str(store.root)}
        try:
            pointer = store.pointer()
            active = store.active()
        except (OSError, StoreError) as exc:
            part["error"] = str(exc)
            data[name] = part
            lines.append(f"  {name}: {store.root}: cannot read: {exc}")
            continue
        stored = store.versions(name)
        part.update(
            active=_release_info(active, store) if active else None,
            previous_version=pointer.previous if pointer else None,
            activated_at=pointer.activated_at if pointer else None,
            stored_versions=stored,
        )
        data[name] = part
        if active is None or pointer is None:
            what = "none (no release pulled yet)"
        else:
            previous = f"v{pointer.previous}" if pointer.previous else "none"
            kept = ", ".join(f"v{v}" for v in stored)
            what = (
                f"v{active.version} (since {pointer.activated_at}); "
                f"previous {previous}; stored {kept}"
            )
        view = agent_view.get(name)
        if isinstance(view, dict):
            if view.get("phase") not in (None, "idle", "succeeded"):
                what += f"; update: {view['phase']}"
            if view.get("last_error"):
                what += f"; last error: {view['last_error']}"
        lines.append(f"  {name}: {what}")
        lines.append(f"  {'':{len(name)}}  {store.root}")
    return data, lines


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
        from agent.pull import Updater
        from agent.registry import Registry

        registry = Registry.from_config(config.registry)
        try:
            index = Updater(config, store, registry).fetch_index()
        finally:
            registry.close()
        data["registry"] = {"versions": index.versions, "channels": index.channels}
        channels = ", ".join(f"{k}=v{v}" for k, v in sorted(index.channels.items())) or "none"
        versions = ", ".join(f"v{v}" for v in index.versions)
        lines.append(f"registry: versions {versions}; channels {channels}")
    emit(data, as_json, lines)
    return 0


def cmd_models_pull(
    config: Config,
    version: int | None,
    wait_s: float | None,
    as_json: bool,
    model: str | None = None,
) -> int:
    """Through the running agent (its gate and probation), else on the store: the
    release is journaled so that the agent's next start gates it before serving it."""
    from agent import local
    from agent.progress import ProgressLine, interrupted_text
    from agent.pull import Updater
    from agent.registry import Registry
    from agent.update.journal import note_offline_pull

    found = local.reach(config)
    if found.status is not None:
        return _pull_through_agent(found, version, wait_s, as_json, model)
    local.require_reachable(found, "models pull")
    store = Store(config.store.dir, config.store.keep).open()
    registry = Registry.from_config(config.registry)
    progress = ProgressLine(sys.stderr, sys.stderr.isatty() and not as_json)
    try:
        with local.agent_stopped(config):
            before = store.pointer()
            updater = Updater(config, store, registry, progress=progress)
            started = time.monotonic()
            result = updater.pull(
                version, before_activate=lambda release: note_offline_pull(store, release, before)
            )
            seconds = time.monotonic() - started
    except KeyboardInterrupt:  # Ctrl-C: say what was kept, not a traceback
        progress.end()
        entry = progress.current
        kept = store.partial_bytes(entry) if entry else 0
        print(f"edge-agent: {interrupted_text(entry, kept)}", file=sys.stderr)
        return 130
    except TransportError as exc:
        progress.end()
        raise TransportError(
            f"{exc}; nothing was changed; a running agent tries again every "
            f"{config.registry.poll_interval_s:g} s (registry.poll_interval_s)"
        ) from exc
    finally:
        progress.end()
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
    emit(data, as_json, [line])
    return 0


def _pull_through_agent(
    found: Reach, version: int | None, wait_s: float | None, as_json: bool, model: str | None
) -> int:
    from agent import local

    def say(line: str) -> None:
        if not as_json:
            print(line, flush=True)

    update = local.pull_through_agent(found, version, wait_s, say, model)
    outcome = update.get("outcome")
    target = update["version"]
    if outcome is None:
        line = f"v{target} queued: the agent is pulling it (see `edge-agent status`)"
    elif outcome == "succeeded":
        line = f"v{target} succeeded" + (f": {update['reason']}" if update.get("reason") else "")
    else:
        line = f"v{target} {outcome}: {update.get('reason')}"
    emit({"through_agent": True, "update": update}, as_json, [line])
    return 0 if outcome in (None, "succeeded") else 1


def cmd_models_rollback(
    config: Config, to: int | None, as_json: bool, model: str | None = None
) -> int:
    """Through the running agent (what serves changes), else on the store."""
    from agent import local

    found = local.reach(config)
    if found.status is not None:
        done = local.rollback_through_agent(found, to, model)
        model = model or found.status.get("model")
        emit(
            {"through_agent": True, "from_version": done["from"], "version": done["version"]},
            as_json,
            [f"rolled back {model} to v{done['version']} (was v{done['from']})"],
        )
        return 0
    local.require_reachable(found, "models rollback")
    store = Store(config.store.dir, config.store.keep).open()
    with local.agent_stopped(config), store.lock():
        before = store.pointer()
        release = store.rollback(to)
    data = {
        "active": _release_info(release, store),
        "from_version": before.version if before else None,
    }
    emit(
        data,
        as_json,
        [f"rolled back {release.model} to v{release.version} (was v{data['from_version']})"],
    )
    return 0
