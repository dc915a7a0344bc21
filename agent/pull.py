"""Pulling a release: fetch, verify, store, activate.

The one path by which a model reaches the device. The order is fixed: manifest
(size-capped) -> signature -> manifest rules -> free space -> each file (length-capped,
deadline, resume) -> hash -> release folder -> atomic pointer switch -> clean-up.
Any failure before the switch leaves the active release exactly as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import Config
from agent.errors import RefusedError, RegistryError, StoreError, VerificationError
from agent.faults import crash_point
from agent.manifest import FileEntry, Index, Manifest, parse_index, parse_manifest
from agent.registry import Progress, Registry
from agent.signed_index import IndexHistory, check_index
from agent.store import Release, Store
from agent.verify import SIGNATURE_FILE_MAX_BYTES, KeyRing, sha256_bytes, verify_signatures

log = logging.getLogger(__name__)

MB = 1_000_000
SIGNATURE_MAX_BYTES = SIGNATURE_FILE_MAX_BYTES
_unverified_warned = threading.Event()  # the "index.json is not verified" warning, once


def _warn_unverified_once() -> None:
    if not _unverified_warned.is_set():
        _unverified_warned.set()
        log.warning(
            "registry.public_key is not set: index.json and releases are not verified, so "
            "whoever controls the registry or the network decides what this device runs"
        )


Phase = Callable[[str], None]
"""Told ``downloading`` and ``verifying`` as a staging moves on (for state and events)."""


@dataclass(frozen=True)
class Staged:
    """A release in the store, checked whole, ready to be validated and activated."""

    release: Release
    active: bool  # it is the active release already (its files were checked, repaired)
    fetched_bytes: int  # file bytes received over the network in this staging
    note: str = ""


@dataclass(frozen=True)
class PullResult:
    release: Release
    changed: bool  # False: it was already active, nothing was switched
    # File bytes received over the network in this pull: bytes kept from an earlier,
    # broken-off run are not counted, bytes fetched twice (a restart from zero) are.
    fetched_bytes: int
    note: str = ""


def channel_target(index: Index, channel: str) -> int:
    """The version ``channel`` names in ``index``: the only version a channel deploys.

    Publishing is not deploying: a version no channel names is never taken, not even
    by a device on an index that has no channels at all. Raises RegistryError saying
    how to fix it when ``channel`` is not in the index.
    """
    if channel in index.channels:
        return index.channels[channel]
    known = ", ".join(sorted(index.channels)) or "none"
    raise RegistryError(
        f"channel {channel} not in {index.model}/index.json (its channels: {known}); "
        f"nothing is deployed: publish with --channel {channel} (or pull a version "
        "explicitly)"
    )


def channel_hold(store: Store, model: str, channel: str, version: int) -> str | None:
    """Why ``channel``'s ``version`` of ``model`` is not to be installed now, if it is not:
    a channel never moves a device backwards, nor back to a version rolled back here."""
    pointer = store.pointer()
    if pointer is None or pointer.model != model:
        return None
    if version < pointer.version:
        return (
            f"v{pointer.version} is active, newer than channel {channel!r} (v{version}); "
            "a channel never moves a device backwards"
        )
    if version in pointer.rolled_back:
        return (
            f"channel {channel!r} names v{version}, which was rolled back on this device; "
            f"pull it explicitly with --version {version} to try it again"
        )
    return None


class Updater:
    """Pulls releases of one model (default: the configured one) into the store."""

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: Registry,
        progress: Callable[[FileEntry], Progress | None] | None = None,
        model: str | None = None,
    ) -> None:
        model = model or config.model.name
        if model is None:
            raise RefusedError("model.name is not set in the configuration: nothing to pull")
        self.model = model
        self.config = config
        self.store = store
        self.registry = registry
        self.progress = progress
        # Raises VerificationError naming the key file that cannot be used.
        self.keys = KeyRing.load(config.registry.trusted_keys, "registry.public_key(s)")
        self.doc_max = int(config.registry.max_manifest_kb * 1000)

    def fetch_index(self) -> Index:
        """The registry's ``index.json`` of the configured model (size-capped, checked:
        with trusted keys, signed, fresh and not older than one accepted before)."""
        where = f"{self.model}/index.json"
        raw = self.registry.fetch_document(where, self.doc_max)
        assert raw is not None  # not optional: absence raises
        return self._accept_index(raw)

    def channel_version(self) -> int:
        """The version the configured channel of ``index.json`` names (``channel_target``)."""
        return self._resolve(self.fetch_index())

    def poll_channel(self, etag: str | None) -> tuple[int | None, str | None]:
        """The channel's version, or None when ``index.json`` still has ``etag``.

        Returns the new ETag too. Raises as fetch_index.
        """
        where = f"{self.model}/index.json"
        fetched = self.registry.fetch_if_changed(where, self.doc_max, etag)
        if fetched.data is None:
            return None, fetched.etag
        # A refused index raises: the caller keeps its old ETag, so it is fetched again.
        return self._resolve(self._accept_index(fetched.data)), fetched.etag

    def _accept_index(self, raw: bytes) -> Index:
        """The index in ``raw`` if this device may act on it (agent/signed_index.py).

        With trusted keys its signature is fetched now (only when the index changed)
        and checked before parsing; the accepted version is remembered in the store.
        Raises VerificationError, TransportError or StoreError.
        """
        where = f"{self.model}/index.json"
        if self.keys is None:
            _warn_unverified_once()
            index = parse_index(raw, where)
            if index.model != self.model:
                raise VerificationError(
                    f"{where}: model is {index.model!r}, expected {self.model!r}"
                )
            return index
        signature = self.registry.fetch_document(f"{where}.sig", SIGNATURE_MAX_BYTES, optional=True)
        with IndexHistory(self.store.root) as history:
            index, seen = check_index(
                raw,
                signature,
                model=self.model,
                keys=self.keys,
                now=time.time(),
                skew_s=self.config.update.max_clock_skew_s,
                seen=history.get(self.model),
                where=where,
            )
            history.put(self.model, seen)
        return index

    def _resolve(self, index: Index) -> int:
        return channel_target(index, self.config.model.channel)

    def pull(
        self,
        version: int | None = None,
        *,
        allow_downgrade: bool = False,
        before_activate: Callable[[Release], None] | None = None,
    ) -> PullResult:
        """Install and activate ``version`` (default: the configured channel's).

        ``allow_downgrade`` is for an explicit rollback instruction; a channel never
        moves the device backwards. ``before_activate`` is called with the release
        just before the switch (the journal of an offline pull). Raises an UpdateError
        subclass; the active release is untouched then.
        """
        with self.store.lock():
            if version is None:
                version = self.channel_version()
                held = self.channel_hold(version)
                if held is not None:
                    active = self.store.active()
                    assert active is not None  # a hold needs an active release
                    return PullResult(active, False, 0, held)
            staged = self._stage(version, allow_downgrade, None)
            if staged.active:
                return PullResult(staged.release, False, staged.fetched_bytes, staged.note)
            if before_activate is not None:
                before_activate(staged.release)
            self.store.activate(staged.release)
            return PullResult(staged.release, True, staged.fetched_bytes, self.clean_up())

    def stage(
        self, version: int, *, allow_downgrade: bool = False, on_phase: Phase | None = None
    ) -> Staged:
        """Fetch and check ``version`` into the store without activating it.

        Raises an UpdateError subclass; the active release is untouched either way.
        """
        with self.store.lock():
            return self._stage(version, allow_downgrade, on_phase)

    def clean_up(self) -> str:
        """Drop releases beyond ``store.keep``; returns a note when that failed."""
        try:
            self.store.gc()
        except (StoreError, VerificationError, OSError) as exc:
            # The new release is active and whole; only old ones were not cleared.
            return f"clean-up of old releases failed: {exc}"
        return ""

    def _stage(self, version: int, allow_downgrade: bool, on_phase: Phase | None) -> Staged:
        active = self.store.active()
        if on_phase is not None:
            on_phase("downloading")
        raw, signature, manifest = self._fetch_manifest(version)
        crash_point("manifest_fetched")
        same = self._check_rules(manifest, raw, active, allow_downgrade)
        if same is not None:  # make sure the active files are whole; repair if not
            repaired = self._fetch_files(manifest)
            note = f"v{version} is already active" + (" (repaired)" if repaired else "")
            return Staged(same, True, repaired, note)
        fetched = self._fetch_files(manifest)
        if on_phase is not None:
            on_phase("verifying")
        # No second read of the files: each was checked whole just now, either as it
        # was received (length and hash of the bytes written, before its rename into
        # blobs/) or, when the store had it already, re-read in _fetch_files.
        release = self.store.add_release(raw, signature, manifest)
        return Staged(release, False, fetched)

    def channel_hold(self, version: int) -> str | None:
        """Why the channel's ``version`` is not to be installed now, if it is not."""
        return channel_hold(self.store, self.model, self.config.model.channel, version)

    def _fetch_manifest(self, version: int) -> tuple[bytes, bytes | None, Manifest]:
        where = f"{self.model}/{version}/manifest.json"
        raw = self.registry.fetch_document(where, self.doc_max)
        assert raw is not None
        signature = None
        if self.keys is not None:
            signature = self.registry.fetch_document(
                f"{where}.sig", SIGNATURE_MAX_BYTES, optional=True
            )
            # Checked before the manifest is even parsed: unsigned bytes get no say.
            verify_signatures(self.keys, raw, signature, where)
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
        received = self.registry.received_bytes
        for entry in missing:
            resumed = self.store.partial_bytes(entry) > 0
            try:
                self._fetch_file(manifest, entry)
            except VerificationError:
                if not resumed:
                    raise
                # The bytes kept from an earlier attempt may be the bad ones (a server
                # that changed the file, a flipped bit at rest): they are deleted by now,
                # so start over from zero, once.
                self._fetch_file(manifest, entry)
        return self.registry.received_bytes - received

    def _fetch_file(self, manifest: Manifest, entry: FileEntry) -> None:
        """Download one file into the store's blobs."""
        part = self.store.part_path(entry)
        progress = self.progress(entry) if self.progress else None
        digest = self.registry.download(
            f"{manifest.model}/{manifest.version}/{entry.name}", part, entry.size, progress
        )
        self.store.install_blob(entry, part, digest)
