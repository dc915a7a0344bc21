"""The registry as the server shows it (``GET /api/v1/releases``): each model's
``index.json`` and its versions' manifests, read with the agent's own client and parsers.

The registry (``--registry``) is a folder, a ``file://`` URL or an ``http(s)://`` URL,
laid out as docs/protocol.md says (``<model>/index.json``, ``<model>/<version>/
manifest.json`` and their ``.sig``). Fetching is :class:`agent.registry.Registry`
(bounded sizes, per-read timeouts and an overall deadline, same-origin redirects only);
parsing is :func:`agent.manifest.parse_index` / :func:`~agent.manifest.parse_manifest`
and :func:`agent.verify.parse_signatures`.

Which models: a folder is listed (its sub-folders holding an ``index.json``); an HTTP
registry has no listing and the layout has no top-level index, so the models are those
the server knows from devices' state documents (``known`` — passed in by the caller).

Faults: a registry that cannot be reached at all (or a folder that does not exist)
raises :class:`RegistryUnavailable` (the API answers 503 with the reason); a model whose
index is missing or damaged, or a version whose manifest is, is listed with an
``error`` and the others are still answered. Key ids are those the signature files
name: the server does not verify them (devices do, with their trusted keys).

:class:`ReleaseCache` keeps an answer for a few seconds, so a dashboard polling does not
fetch the whole registry each time; one refresh runs at a time.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import MODEL_NAME_PATTERN
from agent.errors import EdgeAgentError
from agent.manifest import Manifest, parse_index, parse_manifest
from agent.registry import DeadlineError, NotFoundError, Registry, UnreachableError
from agent.verify import parse_signatures

MAX_DOC_BYTES = 1 << 20  # index.json and manifest.json (the agent's default max_manifest_kb)
MAX_SIG_BYTES = 4096  # a signature file (docs/protocol.md)
MAX_MODELS = 200
MAX_VERSIONS = 50  # manifests read per model: the newest ones and those channels name
TIMEOUT_S = 5.0  # per read
DEADLINE_S = 10.0  # per document
TOTAL_S = 30.0  # one whole listing
CACHE_S = 10.0
_MODEL = re.compile(MODEL_NAME_PATTERN)


class RegistryUnavailable(EdgeAgentError):
    """The registry cannot be read at all: not configured, no such folder, unreachable."""


@dataclass(frozen=True)
class FileInfo:
    name: str
    role: str
    variant: str | None
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionInfo:
    version: int
    channels: list[str] = field(default_factory=list)
    created: str | None = None
    task: str | None = None
    size: int | None = None  # all files, bytes
    files: list[FileInfo] = field(default_factory=list)
    signed_by: list[str] = field(default_factory=list)  # key ids of manifest.json.sig
    selftest: bool = False  # the manifest has an on-device self-test
    budget: bool = False  # the manifest has an on-device latency budget
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    channels: dict[str, int] = field(default_factory=dict)
    index_version: int | None = None
    expires: str | None = None
    index_signed_by: list[str] = field(default_factory=list)
    versions: list[VersionInfo] = field(default_factory=list)  # newest first
    error: str | None = None


@dataclass(frozen=True)
class Releases:
    registry: str
    models: list[ModelInfo]
    fetched_at: float


def registry_url(registry: str) -> str:
    """The client URL of ``--registry``: http(s):// and file:// as given, a path as file://."""
    if registry.startswith(("http://", "https://", "file://")):
        return registry
    return Path(registry).absolute().as_uri()


def folder_models(url: str) -> list[str] | None:
    """The models of a file:// registry (sub-folders with an index.json), sorted, at most
    :data:`MAX_MODELS`; None for an HTTP registry (no listing). Raises
    RegistryUnavailable when the folder cannot be read."""
    if not url.startswith("file://"):
        return None
    root = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    try:
        entries = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError as exc:
        raise RegistryUnavailable(f"registry folder {root}: {exc.strerror or exc}") from None
    found = [n for n in entries if _MODEL.fullmatch(n) and (root / n / "index.json").is_file()]
    return found[:MAX_MODELS]


def read_releases(
    registry: str, known: Iterable[str], *, clock: Callable[[], float] = time.time
) -> Releases:
    """Every model of ``registry`` (a folder's own, else ``known``) with its versions.

    Raises RegistryUnavailable when the registry cannot be reached or the whole listing
    takes longer than :data:`TOTAL_S`.
    """
    url = registry_url(registry)
    listed = folder_models(url)
    names = listed if listed is not None else sorted({m for m in known if _MODEL.fullmatch(m)})
    client = Registry(
        url, timeout_s=TIMEOUT_S, connect_timeout_s=3.0, deadline_s=DEADLINE_S, retries=1
    )
    deadline = time.monotonic() + TOTAL_S
    try:
        models = [_model(client, name, deadline) for name in names[:MAX_MODELS]]
    finally:
        client.close()
    return Releases(registry, models, clock())


def missing_release(registry: str, model: str, version: int) -> str | None:
    """Why ``model`` v``version`` is not a release ``registry`` can serve (its model's
    ``index.json`` is missing, damaged or does not list it, or its manifest is missing,
    damaged or names another release), or None when it is one. Reads two documents and
    their signature files; checks no signature (devices do). Raises RegistryUnavailable
    when the registry cannot be reached."""
    client = Registry(
        registry_url(registry), timeout_s=TIMEOUT_S, connect_timeout_s=3.0,
        deadline_s=DEADLINE_S, retries=1,
    )  # fmt: skip
    deadline = time.monotonic() + TOTAL_S
    try:
        info = _model(client, model, deadline, only=version)
    finally:
        client.close()
    if info.error is not None:
        return info.error
    found = next((v for v in info.versions if v.version == version), None)
    if found is None:
        listed = ", ".join(f"v{v.version}" for v in info.versions[:10]) or "none"
        return f"{model}/index.json lists no v{version} (it lists {listed})"
    return found.error


def _fetch(client: Registry, path: str, limit: int, deadline: float) -> bytes | None:
    """``path``'s bytes (None: not in the registry). Raises RegistryUnavailable when the
    registry cannot be reached or the listing's time is up; EdgeAgentError otherwise."""
    if time.monotonic() > deadline:
        raise RegistryUnavailable(f"reading the registry took longer than {TOTAL_S:g} s")
    try:
        return client.fetch_document(path, limit, optional=True)
    except (UnreachableError, DeadlineError) as exc:
        raise RegistryUnavailable(str(exc)) from None


def _signers(client: Registry, path: str, deadline: float) -> list[str]:
    raw = _fetch(client, path, MAX_SIG_BYTES, deadline)
    if raw is None:
        return []
    return [s.keyid or "(no key id)" for s in parse_signatures(raw, path)]


def _model(client: Registry, name: str, deadline: float, only: int | None = None) -> ModelInfo:
    """The model's listing; with ``only``, the manifest of that version alone is read."""
    path = f"{name}/index.json"
    try:
        raw = _fetch(client, path, MAX_DOC_BYTES, deadline)
        if raw is None:
            return ModelInfo(name, error=f"{path}: not found in the registry")
        index = parse_index(raw, path)
        if index.model != name:
            return ModelInfo(name, error=f"{path}: names model {index.model!r}")
        signed_by = _signers(client, f"{path}.sig", deadline)
    except RegistryUnavailable:
        raise
    except (EdgeAgentError, NotFoundError) as exc:
        return ModelInfo(name, error=str(exc))
    by_version: dict[int, list[str]] = {}
    for channel, version in sorted(index.channels.items()):
        by_version.setdefault(version, []).append(channel)
    newest = sorted(index.versions, reverse=True)
    read = set(newest[:MAX_VERSIONS]) | set(by_version) if only is None else {only}
    versions = [
        _version(client, name, v, by_version.get(v, []), deadline)
        if v in read
        else VersionInfo(v, error=f"not read: only the newest {MAX_VERSIONS} versions are")
        for v in newest
    ]
    return ModelInfo(
        name,
        channels=dict(sorted(index.channels.items())),
        index_version=index.version,
        expires=index.expires,
        index_signed_by=signed_by,
        versions=versions,
    )


def _version(
    client: Registry, name: str, version: int, channels: list[str], deadline: float
) -> VersionInfo:
    path = f"{name}/{version}/manifest.json"
    try:
        raw = _fetch(client, path, MAX_DOC_BYTES, deadline)
        if raw is None:
            return VersionInfo(version, channels, error=f"{path}: not found in the registry")
        manifest = parse_manifest(raw, path)
        if manifest.model != name or manifest.version != version:
            return VersionInfo(
                version,
                channels,
                error=f"{path}: is {manifest.model} v{manifest.version}, not {name} v{version}",
            )
        signed_by = _signers(client, f"{path}.sig", deadline)
    except RegistryUnavailable:
        raise
    except EdgeAgentError as exc:
        return VersionInfo(version, channels, error=str(exc))
    return _described(manifest, channels, signed_by)


def _described(manifest: Manifest, channels: list[str], signed_by: list[str]) -> VersionInfo:
    return VersionInfo(
        manifest.version,
        channels,
        created=manifest.created,
        task=manifest.task,
        size=manifest.total_size,
        files=[FileInfo(f.name, f.role, f.variant, f.size, f.sha256) for f in manifest.files],
        signed_by=signed_by,
        selftest=manifest.selftest is not None,
        budget=manifest.budget is not None,
    )


class ReleaseCache:
    """The last listing, kept :data:`CACHE_S` seconds; one refresh at a time (callers
    arriving meanwhile wait for it and share its answer). A failure is not cached."""

    def __init__(self, ttl_s: float = CACHE_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._kept: tuple[float, tuple[str, tuple[str, ...]], Releases] | None = None

    def get(self, registry: str, known: Callable[[], list[str]]) -> Releases:
        """The listing of ``registry``, fresh or at most ``ttl_s`` old. ``known`` gives
        the models the server knows (asked only for an HTTP registry)."""
        url = registry_url(registry)
        with self._lock:
            names: tuple[str, ...] = () if url.startswith("file://") else tuple(known())
            key = (registry, names)
            kept = self._kept
            if kept is not None and kept[1] == key and self.clock() - kept[0] < self.ttl_s:
                return kept[2]
            answer = read_releases(registry, names)
            self._kept = (self.clock(), key, answer)
            return answer
