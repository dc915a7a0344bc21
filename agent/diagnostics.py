"""Remote diagnostics over the command channel: ``logs``, ``diagnostics``, ``snapshot``.

The handlers take plain values from the parts the service lends them (the config, the
store, the telemetry figures, the pipeline's last frame, an event sink), so tests can
drive them without a broker. Every use, refused ones too, is a
``diagnostics_requested`` event naming the command. Replies stay bounded: ``logs``
at most :data:`LOGS_MAX_BYTES` of lines (cut from the oldest), ``diagnostics`` at most
:data:`MAX_RELEASES` releases and :data:`CONFIG_MAX_BYTES` of config, ``snapshot``
at most ``privacy.snapshot_max_kb`` of JPEG (base64 in the reply). docs/protocol.md
"Commands" is the contract.
"""

from __future__ import annotations

import base64
import logging
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.commands import CommandError, Handler
from agent.contract import EventName, Figures, InferenceDoc
from agent.errors import EdgeAgentError
from agent.logring import RING, LogRing
from agent.redact import redact_config
from agent.snapshot import encode_jpeg
from agent.strictjson import dumps

if TYPE_CHECKING:
    import numpy as np

    from agent.config import Config
    from agent.store import Store

log = logging.getLogger(__name__)

LOGS_DEFAULT = 100
LOGS_MAX = 500
LOGS_MAX_BYTES = 64 * 1024  # the lines' JSON; the reply is a little more
MAX_RELEASES = 20
CONFIG_MAX_BYTES = 128 * 1024  # a config of thousands of groups is not sent whole
MAX_FILES = 10  # per release listed
DPKG_STATUS = Path("/var/lib/dpkg/status")
EDGETPU_PACKAGES = ("libedgetpu1-std", "libedgetpu1-max")
RUNTIMES = ("ai-edge-litert", "tflite-runtime", "pycoral")


def lines_argument(args: Mapping[str, Any]) -> int:
    """``logs``' ``lines`` (default :data:`LOGS_DEFAULT`); CommandError for anything but
    an integer from 1 to :data:`LOGS_MAX`, or an argument it does not take."""
    unknown = sorted(set(args) - {"lines"})
    if unknown:
        raise CommandError(f"unknown argument {unknown[0]!r}; logs takes lines")
    value = args.get("lines", LOGS_DEFAULT)
    if type(value) is not int or not 1 <= value <= LOGS_MAX:
        raise CommandError(f"lines: must be an integer from 1 to {LOGS_MAX}")
    return value


def package_version(lines: Iterable[str], names: tuple[str, ...]) -> str | None:
    """The ``Version`` of the first installed package of ``names`` in dpkg's status
    file (its ``lines``), or None."""
    package: str | None = None
    for line in lines:
        if line.startswith("Package:"):
            package = line.split(":", 1)[1].strip()
        elif package in names and line.startswith("Version:"):
            return line.split(":", 1)[1].strip()[:64]
        elif not line.strip():
            package = None
    return None


def _distribution(name: str) -> str | None:
    import importlib.metadata  # email, zipfile, csv…: only when a diagnostics report is made

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(dpkg_status: Path = DPKG_STATUS) -> dict[str, str | None]:
    """The agent's, Python's, the runtimes', libedgetpu's (from dpkg, when installed
    as a package), the OS's and the kernel's versions; None for what is not there."""
    found: dict[str, str | None] = {"agent": __version__, "python": platform.python_version()}
    found.update({name: _distribution(name) for name in RUNTIMES})
    try:
        with dpkg_status.open(encoding="utf-8", errors="replace") as status:
            found["libedgetpu"] = package_version(status, EDGETPU_PACKAGES)
    except OSError:
        found["libedgetpu"] = None
    try:
        found["os"] = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        found["os"] = None
    uname = platform.uname()
    found["kernel"] = f"{uname.system} {uname.release}"
    found["machine"] = uname.machine
    return found


class Diagnostics:
    """The three commands' handlers, over the parts the service lends."""

    def __init__(
        self,
        config: Config,
        store: Store,
        figures: Callable[[], Figures],
        stats: Callable[[], InferenceDoc | None],
        frame: Callable[[], np.ndarray | None],
        event: Callable[[EventName, Mapping[str, Any]], None],
        ring: LogRing = RING,
    ) -> None:
        self.config = config
        self.store = store
        self.figures = figures
        self.stats = stats
        self.frame = frame
        self.event = event
        self.ring = ring

    def handlers(self) -> dict[str, Handler]:
        return {"logs": self.logs, "diagnostics": self.diagnostics, "snapshot": self.snapshot}

    def _requested(self, command: str, error: str | None = None) -> None:
        self.event(
            "diagnostics_requested", {"command": command, **({"error": error} if error else {})}
        )

    def logs(self, args: dict[str, Any]) -> dict[str, Any]:
        """The last ``lines`` log lines, redacted, oldest first, within LOGS_MAX_BYTES."""
        try:
            count = lines_argument(args)
        except CommandError as exc:
            self._requested("logs", str(exc))
            raise
        self._requested("logs")
        lines, cut = self.ring.tail(count, LOGS_MAX_BYTES)
        return {"lines": lines, "count": len(lines), "truncated": cut}

    def diagnostics(self, args: dict[str, Any]) -> dict[str, Any]:
        """Versions, the config (secrets redacted), the store, the stream and the link."""
        from agent.config import as_dict

        self._requested("diagnostics")
        figures = self.figures()
        config = redact_config(as_dict(self.config))
        size = len(dumps(config).encode())
        if size > CONFIG_MAX_BYTES:  # a reply over the broker's packet limit costs the link
            config = {"error": f"{size} bytes, over {CONFIG_MAX_BYTES}: not sent"}
        return {
            "versions": versions(),
            "config": config,
            "store": self._store(),
            "inference": self.stats(),
            "outbox": figures["outbox"],
            "mqtt": figures["mqtt"],
        }

    def _store(self) -> dict[str, Any]:
        try:
            pointer = self.store.pointer()
        except EdgeAgentError as exc:
            return {"error": str(exc)}
        model = pointer.model if pointer else self.config.model.name
        listing: dict[str, Any] = {
            "dir": str(self.store.root),
            "model": model,
            "active": pointer.version if pointer else None,
            "previous": pointer.previous if pointer else None,
            "releases": [],
        }
        if model is None:
            return listing
        for version in self.store.versions(model)[-MAX_RELEASES:]:
            try:
                release = self.store.release(model, version)
            except EdgeAgentError as exc:
                listing["releases"].append({"version": version, "error": str(exc)})
                continue
            if release is None:
                continue
            files = release.manifest.files
            listing["releases"].append(
                {
                    "version": version,
                    "task": release.manifest.task,
                    "created": release.manifest.created,
                    "bytes": sum(f.size for f in files),
                    "files": [
                        {"name": f.name, "role": f.role, "variant": f.variant, "size": f.size}
                        for f in files[:MAX_FILES]
                    ],
                    "active": pointer is not None and pointer.version == version,
                }
            )
        return listing

    def snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """One JPEG of the current frame, base64, when ``privacy.snapshots`` allows it."""
        privacy = self.config.privacy
        try:
            if not privacy.snapshots:
                raise CommandError(
                    "snapshots are off on this device; set privacy.snapshots: true in its "
                    "configuration to allow them"
                )
            frame = self.frame()
            if frame is None:
                raise CommandError("no frame yet: nothing serves, or the source gave none")
            jpeg = encode_jpeg(frame, privacy.snapshot_max_kb * 1024)
        except EdgeAgentError as exc:
            self._requested("snapshot", str(exc))
            raise
        self._requested("snapshot")
        height, width = frame.shape[:2]
        return {
            "format": "jpeg",
            "width": jpeg.width,
            "height": jpeg.height,
            "frame_width": width,
            "frame_height": height,
            "quality": jpeg.quality,
            "bytes": len(jpeg.data),
            "jpeg_base64": base64.b64encode(jpeg.data).decode("ascii"),
        }
