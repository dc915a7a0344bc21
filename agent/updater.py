"""Pulling a release: fetch, verify, store, activate.

The one path by which a model reaches the device. The order is fixed: manifest
(size-capped) -> signature -> manifest rules -> free space -> each file (length-capped,
deadline, resume) -> hash -> release folder -> atomic pointer switch -> clean-up.
Any failure before the switch leaves the active release exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Config
from agent.errors import RefusedError, StoreError, VerificationError
from agent.faults import crash_point
from agent.manifest import FileEntry, Index, Manifest, parse_index, parse_manifest
from agent.registry import Progress, Registry
from agent.store import Release, Store
from agent.verify import load_public_key, sha256_bytes, verify_signature

MB = 1_000_000
SIGNATURE_MAX_BYTES = 4096


@dataclass(frozen=True)
class PullResult:
    release: Release
    changed: bool  # False: it was already active, nothing was switched
    fetched_bytes: int  # bytes downloaded in this pull (resumed bytes not counted)
    note: str = ""


class Updater:
    """Pulls releases of the configured model from the registry into the store."""

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: Registry,
        progress: Callable[[FileEntry], Progress | None] | None = None,
    ) -> None:
        if config.model.name is None:
            raise RefusedError("model.name is not set in the configuration: nothing to pull")
        self.model = config.model.name
        self.config = config
        self.store = store
        self.registry = registry
        self.progress = progress
        self.public_key: Ed25519PublicKey | None = (
            load_public_key(config.registry.public_key) if config.registry.public_key else None
        )
        self.doc_max = int(config.registry.max_manifest_kb * 1000)

    def fetch_index(self) -> Index:
        """The registry's ``index.json`` of the configured model (size-capped, checked)."""
        where = f"{self.model}/index.json"
        raw = self.registry.fetch_document(where, self.doc_max)
        assert raw is not None  # not optional: absence raises
        index = parse_index(raw, where)
        if index.model != self.model:
            raise VerificationError(f"{where}: model is {index.model!r}, expected {self.model!r}")
        return index

    def channel_version(self) -> int:
        """The version the configured channel of ``index.json`` points at."""
        index = self.fetch_index()
        try:
            return index.resolve(self.config.model.channel)
        except ValueError as exc:
            raise VerificationError(f"{self.model}/index.json: {exc}") from exc

    def pull(self, version: int | None = None, *, allow_downgrade: bool = False) -> PullResult:
        """Install and activate ``version`` (default: the configured channel's).

        ``allow_downgrade`` is for an explicit rollback instruction; a channel never
        moves the device backwards. Raises an UpdateError subclass; the active
        release is untouched then.
        """
        with self.store.lock():
            active = self.store.active()
            if version is None:
                version = self.channel_version()
                held = self._channel_hold(version, active)
                if held is not None:
                    return held
            raw, signature, manifest = self._fetch_manifest(version)
            crash_point("manifest_fetched")
            same = self._check_rules(manifest, raw, active, allow_downgrade)
            if same is not None:  # make sure the active files are whole; repair if not
                repaired = self._fetch_files(manifest)
                note = f"v{version} is already active" + (" (repaired)" if repaired else "")
                return PullResult(same, False, repaired, note)
            fetched = self._fetch_files(manifest)
            release = self.store.add_release(raw, signature, manifest)
            self.store.activate(release)
            note = ""
            try:
                self.store.gc()
            except (StoreError, VerificationError, OSError) as exc:
                # The new release is active and whole; only old ones were not cleared.
                note = f"clean-up of old releases failed: {exc}"
            return PullResult(release, True, fetched, note)

    def _channel_hold(self, version: int, active: Release | None) -> PullResult | None:
        """Why the channel's ``version`` is not to be installed now, if it is not."""
        if active is None or active.model != self.model:
            return None
        channel = self.config.model.channel
        if version < active.version:
            return PullResult(
                active,
                False,
                0,
                f"v{active.version} is active, newer than channel {channel!r} (v{version}); "
                "a channel never moves a device backwards",
            )
        pointer = self.store.pointer()
        if pointer is not None and version in pointer.rolled_back:
            return PullResult(
                active,
                False,
                0,
                f"channel {channel!r} names v{version}, which was rolled back on this device; "
                f"pull it explicitly with --version {version} to try it again",
            )
        return None

    def _fetch_manifest(self, version: int) -> tuple[bytes, bytes | None, Manifest]:
        where = f"{self.model}/{version}/manifest.json"
        raw = self.registry.fetch_document(where, self.doc_max)
        assert raw is not None
        signature = None
        if self.public_key is not None:
            signature = self.registry.fetch_document(
                f"{where}.sig", SIGNATURE_MAX_BYTES, optional=True
            )
            # Checked before the manifest is even parsed: unsigned bytes get no say.
            verify_signature(self.public_key, raw, signature, where)
        manifest = parse_manifest(raw, where)
        if manifest.model != self.model:
            raise VerificationError(
                f"{where}: model is {manifest.model!r}, expected {self.model!r}"
            )
        if manifest.version != version:
            raise VerificationError(
                f"{where}: version is {manifest.version}, but it was fetched as v{version}"
            )
        return raw, signature, manifest

    def _check_rules(
        self, manifest: Manifest, raw: bytes, active: Release | None, allow_downgrade: bool
    ) -> Release | None:
        """Refuse what policy forbids. Returns the active release if it is this very one."""
        name = f"{manifest.model} v{manifest.version}"
        stored = self.store.manifest_bytes(manifest.model, manifest.version)
        if stored is not None and stored != raw:
            raise RefusedError(
                f"{name}: the registry's manifest (sha256 {sha256_bytes(raw)[:12]}…) differs "
                f"from the stored one (sha256 {sha256_bytes(stored)[:12]}…); a published "
                "version must never change"
            )
        if active is not None and active.model == manifest.model:
            if manifest.version == active.version:
                return active
            if manifest.version < active.version and not allow_downgrade:
                raise RefusedError(
                    f"{name}: lower than the active v{active.version}; refusing a downgrade "
                    "(roll back explicitly with `edge-agent models rollback --to "
                    f"{manifest.version}`)"
                )
        limit = self.config.registry.max_download_mb * MB
        for entry in manifest.files:
            if entry.size > limit:
                raise RefusedError(
                    f"{name}: {entry.name} is {entry.size / MB:.1f} MB, over "
                    f"registry.max_download_mb ({self.config.registry.max_download_mb:g})"
                )
        return None

    def _fetch_files(self, manifest: Manifest) -> int:
        missing = []
        for entry in manifest.files:
            if self.store.has_blob(entry):
                try:  # already here from another release: make sure it still is intact
                    self.store.verify_entry(entry)
                    continue
                except VerificationError:
                    self.store.discard_blob(entry)
            missing.append(entry)
        need = sum(e.size - self.store.partial_bytes(e) for e in missing)
        reserve = int(self.config.store.reserve_mb * MB)
        free = self.store.free_bytes()
        if need and need + reserve > free:  # nothing to write: no space is asked for
            raise StoreError(
                f"not enough free space in {self.store.root}: the release needs "
                f"{need / MB:.1f} MB and store.reserve_mb keeps {reserve / MB:.1f} MB free, "
                f"but only {free / MB:.1f} MB are free"
            )
        fetched = 0
        for entry in missing:
            resumed = self.store.partial_bytes(entry) > 0
            try:
                fetched += self._fetch_file(manifest, entry)
            except VerificationError:
                if not resumed:
                    raise
                # The bytes kept from an earlier attempt may be the bad ones (a server
                # that changed the file, a flipped bit at rest): they are deleted by now,
                # so start over from zero, once.
                fetched += self._fetch_file(manifest, entry)
        return fetched

    def _fetch_file(self, manifest: Manifest, entry: FileEntry) -> int:
        """Download one file into the store's blobs. Returns the bytes fetched."""
        part = self.store.part_path(entry)
        before = self.store.partial_bytes(entry)
        progress = self.progress(entry) if self.progress else None
        digest = self.registry.download(
            f"{manifest.model}/{manifest.version}/{entry.name}", part, entry.size, progress
        )
        self.store.install_blob(entry, part, digest)
        return entry.size - before
