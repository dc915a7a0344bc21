"""The device's model store: verified releases on disk, one of them active.

Layout under ``store.dir``::

    blobs/<sha256>                      every file, named by its hash (read-only)
    releases/<model>/<version>/         manifest.json (+ manifest.json.sig), as fetched
    tmp/<sha256>.part                   downloads in progress (kept for resume)
    active.json                         the pointer: which release is active, and history

Invariants, kept across a crash at any instant:

- a blob exists only once its length and hash were checked, and is fsynced;
- a release folder appears (by one rename) only when all its blobs exist;
- ``active.json`` is replaced atomically and names only a release folder that exists.

Damage is repaired whenever the lock is taken: a pointer that cannot be read, or that
names a release that is gone, is moved aside (``active.json.damaged-*``) and the release
active before it is made active again, or none (``_check_pointer`` says why); anything
in ``tmp/`` or ``blobs/`` that is not a regular file of ours is removed, never followed,
and so is a link in place of ``blobs/``, ``releases/``, ``tmp/`` or ``releases/<model>/``.
Each repair is recorded as a ``Repair`` for the daemon to report.

So after any crash exactly the old or the new release is active, and its files match.
No name taken from a manifest is ever used as a path: blobs are named by hash.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from agent import lazylog
from agent.atomic import fsync_dir, is_ours, read_bounded, same_file, write_atomic
from agent.config import MODEL_NAME_PATTERN
from agent.errors import RefusedError, StoreError, VerificationError
from agent.faults import crash_point
from agent.hashing import check_file, sha256_bytes
from agent.manifest import MAX_BYTES as MANIFEST_MAX_BYTES
from agent.manifest import FileEntry, Manifest, parse_manifest
from agent.repairs import Repair

log = lazylog.get(__name__)  # logging is imported when a line is logged

POINTER = "active.json"
HISTORY_MAX = 32
POINTER_MAX_BYTES = 64 * 1024  # a pointer is a few hundred bytes; HISTORY_MAX bounds it
DAMAGED_KEEP = 3  # active.json.damaged-* copies kept for forensics


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _rmtree(path: Path) -> None:
    """``shutil.rmtree``, ignoring errors; shutil (zlib, bz2, lzma) only when removing."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "a special file"
    if st.st_nlink != 1:
        return "a file with a second name (hard link)"
    return "another user's file"


class Release(msgspec.Struct, frozen=True):
    """A release present in the store: its manifest and where its files are."""

    manifest: Manifest
    manifest_sha256: str
    blobs: Path

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def version(self) -> int:
        return self.manifest.version

    def path(self, entry: FileEntry) -> Path:
        """Where the file of ``entry`` lives (named by its hash)."""
        return self.blobs / entry.sha256

    def model_path(self, variant: str) -> Path | None:
        entry = self.manifest.model_file(variant)
        return None if entry is None else self.path(entry)


class Pointer(msgspec.Struct, frozen=True):
    """The content of ``active.json``."""

    model: str
    version: int
    manifest_sha256: str
    activated_at: str
    history: list[int] = msgspec.field(default_factory=list)  # activation order, oldest first
    # left by rollback: channels skip them
    rolled_back: list[int] = msgspec.field(default_factory=list)

    @property
    def previous(self) -> int | None:
        earlier = [v for v in self.history if v != self.version]
        return earlier[-1] if earlier else None

    def to_json(self) -> bytes:
        return (json.dumps({"schema": 1, **msgspec.structs.asdict(self)}, indent=2) + "\n").encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_pointer(raw: bytes, where: str) -> Pointer:
    """The pointer document ``raw``, checked field by field (no I/O).

    Raises StoreError naming ``where`` and the first thing wrong: not JSON (truncated,
    NUL bytes, NaN), not an object, a field missing or of the wrong type, a model name
    that could not be a folder name, a version below 1.
    """
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise StoreError(f"{where}: damaged pointer: not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{where}: damaged pointer: a {type(data).__name__}, not an object")

    def field_(name: str, kind: type, default: Any = None) -> Any:
        value = data.get(name, default)
        if value is None or not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if name not in data else f"a {type(value).__name__}"
            raise StoreError(
                f"{where}: damaged pointer: {name} is {got}, expected a {kind.__name__}"
            )
        return value

    def versions(name: str) -> list[int]:
        value = field_(name, list, [])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise StoreError(f"{where}: damaged pointer: {name} holds other than versions")
        return list(value)

    model = field_("model", str)
    if not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise StoreError(f"{where}: damaged pointer: model {model!r} is not a model name")
    version = field_("version", int)
    if version < 1:
        raise StoreError(f"{where}: damaged pointer: version {version} is not a version")
    sha = field_("manifest_sha256", str)
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise StoreError(f"{where}: damaged pointer: manifest_sha256 is not a SHA-256")
    return Pointer(
        model=model,
        version=version,
        manifest_sha256=sha,
        activated_at=field_("activated_at", str, ""),
        history=versions("history"),
        rolled_back=versions("rolled_back"),
    )


def _read_manifest(path: Path) -> bytes:
    """A stored manifest's bytes: bounded, never through a link or from a FIFO planted
    there. Raises FileNotFoundError, OSError, or VerificationError when too long."""
    try:
        return read_bounded(path, MANIFEST_MAX_BYTES)
    except ValueError as exc:
        raise VerificationError(f"{path}: {exc}") from None


class Store:
    """The model store at ``root``; ``keep`` releases are kept for rollback."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self.blobs = root / "blobs"
        self.releases = root / "releases"
        self.tmp = root / "tmp"
        self.repairs: list[Repair] = []  # found while holding the lock; see take_repairs

    def open(self) -> Store:
        """Create the layout if needed. Touches nothing another process may be writing.

        ``store.dir`` itself may be a link (to another disk); the folders inside it must
        be the store's own: a link or a file in place of ``blobs/``, ``releases/`` or
        ``tmp/`` is removed (its target untouched) and an empty folder made, since the
        clean-up deletes what it finds there.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in (self.blobs, self.releases, self.tmp):
                self._clear_for_folder(folder, "the store's own folder")
                folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store.dir: cannot create {exc.filename}: {exc.strerror}") from exc
        return self

    def _clear_for_folder(self, path: Path, role: str) -> None:
        """Remove whatever stands at ``path`` that is not a real folder (a link goes,
        never its target), recording the repair. Raises OSError."""
        st = _lstat(path)
        if st is None or stat.S_ISDIR(st.st_mode):
            return
        path.unlink()
        kind = "a file" if is_ours(st) else _kind(st)
        self._repaired(path, f"{kind}, not {role}", "removed, not followed")

    def _recover(self) -> None:
        """Clear what a crashed writer left half-done, remove what was planted in
        ``tmp/`` or ``blobs/`` and repair a damaged pointer. Only ever called holding
        the lock."""
        for pattern in ("release-*", "gone-*"):  # a staged release never renamed in; a GC
            for stale in self.tmp.glob(pattern):
                _rmtree(stale)
        for stale in self.root.glob(f".{POINTER}.*.tmp"):  # a pointer never switched in
            stale.unlink(missing_ok=True)
        # A link in place of a folder of the store, or of a model's folder of releases
        # (the clean-up renames and deletes what is inside), is removed, not followed.
        try:
            for folder in (self.blobs, self.releases, self.tmp):
                self._clear_for_folder(folder, "the store's own folder")
                folder.mkdir(exist_ok=True)
            for path in self.releases.iterdir():
                self._clear_for_folder(path, "a model's folder of releases")
        except OSError as exc:
            raise StoreError(f"{exc.filename}: cannot repair: {exc.strerror}") from exc
        # What is not a file of ours in tmp/ or blobs/ (a link, a folder, a FIFO, a
        # hard link) was planted or damaged: it is removed, never followed or reused.
        for folder in (self.tmp, self.blobs):
            for path in folder.iterdir():
                if folder is self.tmp and not path.name.endswith(".part"):
                    continue
                st = _lstat(path)
                if st is not None and not is_ours(st):
                    what = _kind(st)
                    with contextlib.suppress(StoreError):
                        self._remove(path)
                        self._repaired(path, f"{what}, not a file of ours", "removed, not followed")
        self._check_pointer()

    def _repaired(self, path: Path, problem: str, action: str) -> None:
        repair = Repair(str(path), problem, action)
        log.warning("store repaired: %s", repair)
        self.repairs.append(repair)

    def repair(self) -> list[Repair]:
        """Take the lock once to repair the store now; returns every repair not yet taken.

        For the daemon at start, before anything reads the pointer. Raises StoreError
        when another process holds the lock (it repairs on taking it).
        """
        with self.lock():
            pass
        return self.take_repairs()

    def take_repairs(self) -> list[Repair]:
        """The repairs made since the last call (for the daemon to raise as events)."""
        taken, self.repairs = self.repairs, []
        return taken

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's write lock, then clear what a crashed writer left.

        Raises StoreError at once if another process holds it.
        """
        fd = self._open_lock_file()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise StoreError(
                    f"store {self.root} is busy: another update holds it (pid {holder})"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._recover()
            yield
        finally:
            os.close(fd)

    def _open_lock_file(self) -> int:
        """``.lock``, never through a link (the pid is written into it)."""
        path = self.root / ".lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link: remove the link itself, make a file
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                raise StoreError(f"{path}: cannot open the store's lock: {exc.strerror}") from exc
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                return fd
            os.close(fd)
            break
        raise StoreError(f"{path}: not a plain file (a link or a second name); remove it")

    # ----- reading -----

    def pointer(self) -> Pointer | None:
        """The active pointer, or None when nothing was ever activated.

        Raises StoreError when ``active.json`` is damaged (``parse_pointer``); taking
        the lock repairs it (``_check_pointer``).
        """
        path = self.root / POINTER
        try:
            raw = read_bounded(path, POINTER_MAX_BYTES)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StoreError(f"{path}: damaged pointer: {reason}") from exc
        return parse_pointer(raw, str(path))

    def release(self, model: str, version: int) -> Release | None:
        """The stored release ``model`` v``version``, or None if it is not in the store."""
        folder = self.releases / model / str(version)
        try:
            raw = _read_manifest(folder / "manifest.json")
        except FileNotFoundError:
            return None
        manifest = parse_manifest(raw, f"{folder}/manifest.json")
        return Release(manifest, sha256_bytes(raw), self.blobs)

    def active(self) -> Release | None:
        """The active release, or None. Raises StoreError if the pointer is damaged or
        names no release in the store (taking the lock repairs both)."""
        pointer = self.pointer()
        if pointer is None:
            return None
        release, problem = self._pointed(pointer)
        if release is None:
            raise StoreError(f"{self.root / POINTER}: {problem}")
        return release

    def _pointed(self, pointer: Pointer) -> tuple[Release | None, str]:
        """The release ``pointer`` names, or None and why it cannot be had."""
        name = f"{pointer.model} v{pointer.version}"
        try:
            release = self.release(pointer.model, pointer.version)
        except (VerificationError, OSError) as exc:
            return None, f"names {name}, whose stored manifest is damaged ({exc})"
        if release is None:
            return None, f"names {name}, which is not in the store"
        if release.manifest_sha256 != pointer.manifest_sha256:
            return None, f"names {name} with another manifest than the stored one"
        return release, ""

    def _check_pointer(self) -> None:
        """Repair a damaged pointer, or one naming a release that is gone. Holding the lock.

        The policy: a release is made active again only if this device ran it before,
        as the damaged pointer's own history says, and it is stored and verifies: the
        most recently activated such one, skipping versions rolled back here. With no
        history to trust (the document cannot be read), nothing is active: the agent
        serves nothing until the channel or a desired state installs a release through
        the full gate (verify, self-test, probation). The store alone cannot tell which
        stored release passed its self-test (one that failed stays stored until the
        clean-up), so guessing the newest could serve a release refused here.
        The damaged file is kept as ``active.json.damaged-<time>``; each repair is
        recorded (``take_repairs``).
        """
        path = self.root / POINTER
        try:
            pointer = self.pointer()
        except StoreError as exc:
            pointer, problem = None, str(exc).removeprefix(f"{path}: ")
        else:
            if pointer is None:
                return
            release, problem = self._pointed(pointer)
            if release is not None:
                return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = path.with_name(f"{POINTER}.damaged-{stamp}-{os.urandom(2).hex()}")
        try:
            os.replace(path, kept)  # a link or a folder is moved as it is, not followed
            fsync_dir(self.root)
        except OSError as exc:
            raise StoreError(f"{path}: {problem}; cannot move it aside: {exc.strerror}") from exc
        for old in sorted(self.root.glob(f"{POINTER}.damaged-*"))[:-DAMAGED_KEEP]:
            with contextlib.suppress(OSError):
                old.unlink()
        chosen = self._last_good(pointer) if pointer is not None else None
        if chosen is None:
            action = (
                f"kept as {kept.name}; no release is active: serving nothing until the "
                "channel or a desired state installs one"
            )
        else:
            assert pointer is not None
            history = [v for v in pointer.history if v != pointer.version and v != chosen.version]
            self._write_pointer(
                Pointer(
                    model=chosen.model,
                    version=chosen.version,
                    manifest_sha256=chosen.manifest_sha256,
                    activated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    history=[*history, chosen.version][-HISTORY_MAX:],
                    rolled_back=pointer.rolled_back,
                )
            )
            action = (
                f"kept as {kept.name}; {chosen.model} v{chosen.version} is active again "
                "(the release active before it, stored and verified)"
            )
        self._repaired(path, problem, action)

    def _last_good(self, pointer: Pointer) -> Release | None:
        """The most recently activated release of ``pointer``'s history, other than
        the one it names, not rolled back, stored and whole."""
        for version in reversed(pointer.history):
            if version == pointer.version or version in pointer.rolled_back:
                continue
            try:
                release = self.release(pointer.model, version)
                if release is not None:
                    self.verify(release)
                    return release
            except (VerificationError, OSError):
                continue
        return None

    def versions(self, model: str) -> list[int]:
        """Versions of ``model`` in the store, ascending."""
        folder = self.releases / model
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def manifest_bytes(self, model: str, version: int) -> bytes | None:
        try:
            return _read_manifest(self.releases / model / str(version) / "manifest.json")
        except FileNotFoundError:
            return None

    # ----- writing (hold the lock) -----

    def has_blob(self, entry: FileEntry) -> bool:
        """The blob is here: a regular file of ours of the right size (a link never is)."""
        st = _lstat(self.blobs / entry.sha256)
        return st is not None and is_ours(st) and st.st_size == entry.size

    def part_path(self, entry: FileEntry) -> Path:
        return self.tmp / f"{entry.sha256}.part"

    def partial_bytes(self, entry: FileEntry) -> int:
        """Bytes a download may resume from: 0 unless the partial file is ours."""
        st = _lstat(self.part_path(entry))
        return st.st_size if st is not None and is_ours(st) else 0

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def install_blob(self, entry: FileEntry, part: Path, digest: str) -> None:
        """Move a finished download into ``blobs/`` once its hash is the manifest's.

        Raises VerificationError (and deletes the download) on a hash mismatch.
        """
        if digest != entry.sha256:
            part.unlink(missing_ok=True)
            raise VerificationError(
                f"{entry.name}: sha256 {digest} does not match the manifest's {entry.sha256}"
            )
        blob = self.blobs / entry.sha256
        try:
            # Through a descriptor opened without following a link: the mode and the
            # fsync apply to our file, never to one a link at ``part`` points at.
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if not is_ours(os.fstat(fd)):
                    raise StoreError(
                        f"{entry.name}: {part} is not a regular file of ours; not installed"
                    )
                os.fsync(fd)
                crash_point("blob_downloaded")
                os.fchmod(fd, 0o444)
                os.replace(part, blob)  # replaces a link at ``blob`` itself, not its target
                if not same_file(fd, blob):  # swapped between the check and the rename
                    blob.unlink(missing_ok=True)
                    raise StoreError(f"{entry.name}: {part} changed while it was installed")
            finally:
                os.close(fd)
            fsync_dir(self.blobs)
        except OSError as exc:
            raise StoreError(
                f"{entry.name}: cannot install into {self.blobs}: {exc.strerror or exc}"
            ) from exc
        crash_point("blob_installed")

    def add_release(
        self, raw_manifest: bytes, signature: bytes | None, manifest: Manifest
    ) -> Release:
        """Make a release folder appear, in one rename, once all its blobs exist.

        Raises RefusedError if the store holds this version with other bytes.
        """
        existing = self.manifest_bytes(manifest.model, manifest.version)
        if existing is not None:
            if existing != raw_manifest:
                raise RefusedError(
                    f"{manifest.model} v{manifest.version}: the store holds this version with "
                    "different bytes; a published version never changes, publish a new one"
                )
            return Release(manifest, sha256_bytes(raw_manifest), self.blobs)
        for entry in manifest.files:
            if not self.has_blob(entry):
                raise StoreError(f"{entry.name}: not in the store; cannot add the release")
        staging = self.tmp / f"release-{manifest.model}-{manifest.version}-{os.urandom(4).hex()}"
        try:
            staging.mkdir()
            files = {"manifest.json": raw_manifest}
            if signature is not None:
                files["manifest.json.sig"] = signature
            for name, data in files.items():
                with open(staging / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(staging)
            crash_point("release_staged")
            model_dir = self.releases / manifest.model
            if not model_dir.exists():
                model_dir.mkdir()
                fsync_dir(self.releases)
            os.rename(staging, model_dir / str(manifest.version))
            fsync_dir(model_dir)
        except OSError as exc:
            _rmtree(staging)
            raise StoreError(f"cannot add {manifest.model} v{manifest.version}: {exc}") from exc
        if self.manifest_bytes(manifest.model, manifest.version) != raw_manifest:
            raise StoreError(
                f"{manifest.model} v{manifest.version}: the release folder is incomplete"
            )
        crash_point("release_added")
        return Release(manifest, sha256_bytes(raw_manifest), self.blobs)

    def verify_entry(self, entry: FileEntry) -> None:
        """Re-check one stored file against its entry. Raises VerificationError."""
        path = self.blobs / entry.sha256
        st = _lstat(path)
        if st is not None and not is_ours(st):  # a link may point anywhere, and change
            raise VerificationError(
                f"{entry.name} in the store: {path} is not a regular file of ours"
            )
        check_file(
            self.blobs / entry.sha256, entry.size, entry.sha256, f"{entry.name} in the store"
        )

    def verify(self, release: Release) -> None:
        """Re-check every file of ``release`` against its manifest. Raises VerificationError."""
        for entry in release.manifest.files:
            self.verify_entry(entry)

    def discard_blob(self, entry: FileEntry) -> None:
        """Remove a damaged blob (or whatever stands in its place) so that it is fetched
        again. Raises StoreError when it cannot be removed."""
        self._remove(self.blobs / entry.sha256)

    def _remove(self, path: Path) -> None:
        """Remove ``path`` without following it: a folder is first moved into ``tmp/``
        in one rename (then deleted), anything else unlinked. Raises StoreError."""
        try:
            st = _lstat(path)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                doomed = self.tmp / f"gone-{os.urandom(4).hex()}"
                os.rename(path, doomed)
                _rmtree(doomed)  # never follows links inside
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror or exc}; remove it") from exc

    def activate(self, release: Release, *, rolled_back_from: int | None = None) -> Pointer:
        """Switch the active pointer to ``release`` atomically. The release must be stored.

        ``rolled_back_from`` marks the version being left as rolled back, so that a
        channel does not bring it straight back; activating a version clears its mark.
        """
        current = self.pointer()
        same_model = current is not None and current.model == release.model
        history = current.history if current is not None and same_model else []
        history = [v for v in history if v != release.version][-(HISTORY_MAX - 1) :]
        marked = current.rolled_back if current is not None and same_model else []
        marked = [v for v in marked if v not in (release.version, rolled_back_from)]
        if rolled_back_from is not None:
            marked.append(rolled_back_from)
        pointer = Pointer(
            model=release.model,
            version=release.version,
            manifest_sha256=release.manifest_sha256,
            activated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            history=[*history, release.version],
            rolled_back=marked[-HISTORY_MAX:],
        )
        self._write_pointer(pointer)
        return pointer

    def _write_pointer(self, pointer: Pointer) -> None:
        try:
            write_atomic(self.root / POINTER, pointer.to_json(), crash_tag="pointer")
        except OSError as exc:
            raise StoreError(f"cannot switch {self.root / POINTER}: {exc}") from exc

    def rollback(self, to: int | None = None) -> Release:
        """Make an earlier stored release active at once, with no download.

        ``to`` None means the previously active one. Raises StoreError when there is
        none, or ``to`` is not in the store; VerificationError if its files are damaged.
        """
        pointer = self.pointer()
        if pointer is None:
            raise StoreError("nothing is active: there is nothing to roll back from")
        stored = self.versions(pointer.model)
        if to is None:
            candidates = [
                v for v in reversed(pointer.history) if v != pointer.version and v in stored
            ]
            if not candidates:
                raise StoreError(
                    f"no earlier release of {pointer.model} in the store to roll back to"
                )
            to = candidates[0]
        if to == pointer.version:
            raise RefusedError(f"{pointer.model} v{to} is already active")
        release = self.release(pointer.model, to)
        if release is None:
            have = ", ".join(f"v{v}" for v in stored) or "none"
            raise StoreError(f"{pointer.model} v{to} is not in the store (stored: {have})")
        self.verify(release)
        self.activate(release, rolled_back_from=pointer.version)
        return release

    def gc(self) -> list[str]:
        """Keep the active release and the ``keep`` most recently used; drop the rest.

        Returns what was removed. Blobs no kept release needs go too, and so do
        leftover partial downloads.
        """
        pointer = self.pointer()
        all_releases = [
            (model_dir.name, v)
            for model_dir in self.releases.iterdir()
            if model_dir.is_dir()
            for v in self.versions(model_dir.name)
        ]
        order: list[tuple[str, int]] = []
        if pointer is not None:
            order += [(pointer.model, v) for v in reversed(pointer.history)]
        order += sorted(all_releases, key=lambda r: r[1], reverse=True)
        kept: list[tuple[str, int]] = []
        for item in order:
            if item in all_releases and item not in kept and len(kept) < self.keep:
                kept.append(item)
        if pointer is not None and (pointer.model, pointer.version) not in kept:
            kept.append((pointer.model, pointer.version))
        removed = []
        needed: set[str] = set()
        for model, version in kept:
            release = self.release(model, version)
            if release is None:  # never guess what a kept release needs: delete nothing
                raise StoreError(f"{model} v{version}: release folder unreadable; clean-up skipped")
            needed.update(f.sha256 for f in release.manifest.files)
        for model, version in all_releases:
            if (model, version) in kept:
                continue
            doomed = self.tmp / f"gone-{model}-{version}-{os.urandom(4).hex()}"
            os.rename(self.releases / model / str(version), doomed)  # vanish in one step
            _rmtree(doomed)
            removed.append(f"{model} v{version}")
        for blob in self.blobs.iterdir():
            if blob.name not in needed:
                blob.unlink(missing_ok=True)
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
        return removed
