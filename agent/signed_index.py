"""Trusting ``index.json``: signed, not expired, never older than one accepted before.

The index decides which version a channel names, so whoever could change it unsigned
could point a channel at any signed release, or freeze devices on an old one forever.
TUF's timestamp idea, kept simple: the publisher signs the exact bytes
(``index.json.sig``, the format of agent/verify.py), writes ``expires`` (RFC 3339 UTC)
and raises ``version`` by one on every change. A device with trusted keys refuses an
index that is unsigned, badly signed, expired (allowing ``update.max_clock_skew_s``),
older than the highest version it accepted, or of that same version with other bytes.

:func:`check_index` is the rule, pure (bytes, keys, clock and the last accepted record
in; the parsed index and the new record out). :class:`IndexHistory` is its memory:
the highest accepted version per model, kept in the store folder
(``index-seen.json``, replaced atomically, under a lock shared by every process).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.atomic import read_bounded, write_atomic
from agent.errors import StoreError, VerificationError
from agent.manifest import Index, parse_index
from agent.strictjson import parse_object
from agent.verify import KeyRing, sha256_bytes, verify_signatures

log = logging.getLogger(__name__)

HISTORY_FILE = "index-seen.json"
HISTORY_MAX_BYTES = 1 << 20
LOCK_WAIT_S = 10.0
RENEW = "edge-fleet index --renew"


@dataclass(frozen=True)
class Seen:
    """The highest index version a device accepted for one model, and its bytes' hash."""

    version: int
    sha256: str


def rfc3339(when: float) -> str:
    """``when`` (seconds since the epoch) as the index writes it: ``2026-12-01T10:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of a ``YYYY-MM-DDTHH:MM:SSZ`` time. Raises ValueError."""
    when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def check_index(
    raw: bytes,
    signature: bytes | None,
    *,
    model: str,
    keys: KeyRing,
    now: float,
    skew_s: float,
    seen: Seen | None,
    where: str,
) -> tuple[Index, Seen]:
    """The index in ``raw`` and the record to keep, if a device may act on it.

    The signature is checked before the bytes are parsed. Raises VerificationError
    naming the reason: unsigned, bad signature, wrong model, no version or expiry,
    older than ``seen`` (a replayed, frozen index), ``seen``'s version with other
    bytes, or expired at ``now`` even allowing ``skew_s``.
    """
    verify_signatures(keys, raw, signature, where)
    index = parse_index(raw, where)
    if index.model != model:
        raise VerificationError(f"{where}: model is {index.model!r}, expected {model!r}")
    if index.version is None or index.expires is None:
        missing = "version" if index.version is None else "expires"
        raise VerificationError(f"{where}: signed but has no {missing}; re-sign it with `{RENEW}`")
    digest = sha256_bytes(raw)
    if seen is not None:
        if index.version < seen.version:
            raise VerificationError(
                f"{where}: version {index.version} is older than version {seen.version} "
                "accepted before; refusing a replayed (frozen) index"
            )
        if index.version == seen.version and digest != seen.sha256:
            raise VerificationError(
                f"{where}: version {index.version} was accepted before with other bytes; "
                "a changed index must carry a higher version"
            )
    try:
        expires = parse_rfc3339(index.expires)
    except ValueError:
        raise VerificationError(f"{where}: expires: {index.expires!r} is not a time") from None
    if now - skew_s > expires:
        raise VerificationError(
            f"{where}: expired at {index.expires} (this device's clock says {rfc3339(now)}); "
            f"the registry must renew it: `{RENEW}`"
        )
    return index, Seen(index.version, digest)


class IndexHistory:
    """The highest accepted index version per model, in ``<store>/index-seen.json``.

    Use as a context manager: it holds an exclusive lock (shared with other agent and
    CLI processes on the store) from reading to saving, so two readers never lower it.
    A damaged file is logged and treated as empty: it must never brick a device, and
    the stored releases still keep a channel from moving it backwards.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / HISTORY_FILE
        self._lock_path = root / f".{HISTORY_FILE}.lock"
        self._fd: int | None = None
        self._seen: dict[str, Seen] = {}

    def __enter__(self) -> IndexHistory:
        self._fd = _lock(self._lock_path)
        self._seen = self._load()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def get(self, model: str) -> Seen | None:
        return self._seen.get(model)

    def put(self, model: str, seen: Seen) -> None:
        """Keep ``seen`` for ``model`` (written only when it changed). Raises StoreError."""
        if self._seen.get(model) == seen:
            return
        self._seen[model] = seen
        doc = {
            "schema": 1,
            "models": {
                m: {"version": s.version, "sha256": s.sha256} for m, s in self._seen.items()
            },
        }
        try:
            write_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write: {exc.strerror}") from exc

    def _load(self) -> dict[str, Seen]:
        try:
            raw = read_bounded(self.path, HISTORY_MAX_BYTES)  # never a link, FIFO or device
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("%s: cannot read (%s); starting a new one", self.path, reason)
            return {}
        try:
            models = parse_object(raw, what=str(self.path), max_bytes=HISTORY_MAX_BYTES)["models"]
            return {m: Seen(_int(s["version"]), _str(s["sha256"])) for m, s in dict(models).items()}
        except (ValueError, TypeError, KeyError) as exc:  # DocumentError is a ValueError
            log.warning(
                "%s: damaged (%s); starting a new one: the next signed index accepted "
                "sets the floor again",
                self.path,
                type(exc).__name__,
            )
            return {}


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("version")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("sha256")
    return value


def _lock(path: Path) -> int:
    """An exclusive flock on ``path``, waiting at most LOCK_WAIT_S. Raises StoreError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open: {exc.strerror}") from exc
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StoreError(f"{path}: held by another process for {LOCK_WAIT_S:g} s") from None
            time.sleep(0.01)
