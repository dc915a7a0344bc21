"""A model's ``index.json`` in a registry folder: read, rewritten, signed, renewed.

``index.json`` carries a ``version`` raised by one on every change and an ``expires``
time (``index_expiry_days`` ahead), and with signing keys a detached signature
``index.json.sig`` over its exact bytes (agent/signed_index.py is the device's side).
:func:`renew_index` re-signs it with a new expiry and no other change (a cron job).
Publishers of one model on this machine are serialised by :func:`publish_lock`
(the index is read-modify-write). Releases themselves are put in place by
agent/fleet/publish.py, which lists them here last.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.atomic import write_atomic
from agent.errors import ConfigError, EdgeAgentError
from agent.manifest import Index, dump_json, parse_index
from agent.signed_index import rfc3339
from agent.verify import add_signatures, key_id, load_private_key, parse_signatures

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_INDEX_EXPIRY_DAYS = 30.0


class PublishError(EdgeAgentError):
    """The release cannot be published as asked; the registry is unchanged."""


@contextlib.contextmanager
def publish_lock(model_dir: Path) -> Iterator[None]:
    """Serialise publishers of one model on this machine (index.json is read-modify-write)."""
    fd = os.open(model_dir / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_keys(sign_key: Path | Sequence[Path] | None) -> list[Ed25519PrivateKey]:
    """The private keys named by ``--sign-key`` (none, one or several).

    Raises VerificationError naming a file that is not an Ed25519 private key.
    """
    if sign_key is None:
        return []
    paths = [sign_key] if isinstance(sign_key, Path) else list(sign_key)
    return [load_private_key(path) for path in paths]


def check_expiry_days(days: float) -> None:
    if not (math.isfinite(days) and 0 < days <= 3650):
        raise ConfigError([f"--index-expiry-days: {days:g} is not a number of days in (0, 3650]"])


@dataclass(frozen=True)
class IndexInfo:
    """What an operator wants to know about a published index."""

    path: Path
    version: int | None
    expires: str | None
    channels: dict[str, int]
    versions: list[int]
    keyids: list[str]  # of index.json.sig; empty when unsigned


def read_index(model_dir: Path, keys: Sequence[Ed25519PrivateKey]) -> Index | None:
    """The current index (None: none yet). Refuses to drop a signature it cannot renew:
    an index signed before must stay signed, or devices with keys refuse it."""
    path = model_dir / "index.json"
    if not path.exists():
        return None
    try:
        index = parse_index(path.read_bytes(), str(path))
    except EdgeAgentError as exc:
        raise PublishError(f"{exc}; fix or remove it first") from None
    if not keys and (model_dir / "index.json.sig").exists():
        raise PublishError(
            f"{path} is signed (index.json.sig) and changing it unsigned would make devices "
            "with registry.public_key refuse it: pass --sign-key"
        )
    return index


def _write_index(
    model_dir: Path,
    old: Index | None,
    versions: list[int],
    channels: dict[str, int],
    model: str,
    keys: Sequence[Ed25519PrivateKey],
    expiry_days: float,
) -> Index:
    """Write index.json with the next version and a new expiry, then its signature."""
    data = {
        "schema": 1,
        "model": model,
        "versions": versions,
        "channels": channels,
        "version": (old.version or 0) + 1 if old is not None else 1,
        "expires": rfc3339(time.time() + expiry_days * 86400),
    }
    raw = dump_json(data)
    index = parse_index(raw, "index.json")  # the device's own rules, applied here
    path = model_dir / "index.json"
    write_atomic(path, raw)
    sig = model_dir / "index.json.sig"
    if keys:
        # A device reading between these two renames refuses the pair once (bad
        # signature) and reads both again on its next poll.
        write_atomic(sig, add_signatures(None, keys, raw, sig.name))
    else:
        sig.unlink(missing_ok=True)  # read_index refused this for a signed index
    return index


def update_index(
    model_dir: Path,
    old: Index | None,
    model: str,
    version: int,
    channels: tuple[str, ...],
    keys: Sequence[Ed25519PrivateKey],
    expiry_days: float,
) -> None:
    versions = set(old.versions) if old is not None else set()
    current = dict(old.channels) if old is not None else {}
    versions.add(version)
    current.update({channel: version for channel in channels})
    unchanged = (
        old is not None
        and sorted(versions) == old.versions
        and current == old.channels
        and old.version is not None
    )
    if unchanged and not keys:
        return  # nothing to change and nothing to re-sign: leave it byte for byte
    _write_index(model_dir, old, sorted(versions), current, model, keys, expiry_days)


def renew_index(
    registry: Path,
    model: str,
    sign_key: Path | Sequence[Path],
    expiry_days: float = DEFAULT_INDEX_EXPIRY_DAYS,
) -> IndexInfo:
    """Re-sign ``model``'s index.json with a new expiry and the next version, nothing
    else changed (for a cron job: run it well before the expiry).

    Raises PublishError (no such index, or one that cannot be read), ConfigError for a
    bad expiry, VerificationError for a key that cannot be loaded.
    """
    check_expiry_days(expiry_days)
    keys = load_keys(sign_key)
    if not keys:
        raise ConfigError(["--renew needs --sign-key: an index is renewed by signing it"])
    model_dir = registry / model
    if not (model_dir / "index.json").is_file():
        raise PublishError(f"{model_dir / 'index.json'}: no such file; publish a release first")
    with publish_lock(model_dir):
        old = read_index(model_dir, keys)
        assert old is not None
        _write_index(
            model_dir, old, list(old.versions), dict(old.channels), model, keys, expiry_days
        )
    return index_info(registry, model)


def index_info(registry: Path, model: str) -> IndexInfo:
    """What ``model``'s index.json says and who signed it. Raises PublishError."""
    path = registry / model / "index.json"
    try:
        index = parse_index(path.read_bytes(), str(path))
    except OSError as exc:
        raise PublishError(f"{path}: cannot read: {exc.strerror}") from None
    except EdgeAgentError as exc:
        raise PublishError(str(exc)) from None
    sig = path.with_name("index.json.sig")
    keyids: list[str] = []
    if sig.exists():
        try:
            keyids = [
                s.keyid or "(no key id)" for s in parse_signatures(sig.read_bytes(), str(sig))
            ]
        except EdgeAgentError as exc:
            raise PublishError(str(exc)) from None
    return IndexInfo(
        path, index.version, index.expires, dict(index.channels), list(index.versions), keyids
    )


def signing_key_ids(sign_key: Path | Sequence[Path] | None) -> list[str]:
    """The key ids of the ``--sign-key`` files, for the operator's output."""
    return [key_id(k) for k in load_keys(sign_key)]
