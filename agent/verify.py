"""Hashes, Ed25519 keys and signature files.

A release is trusted by two facts: the manifest bytes carry a valid signature from a
key the device trusts (when it has any configured), and every file's length and
SHA-256 match the manifest. ``index.json`` is signed the same way
(agent/signed_index.py adds its expiry and version rules).

Keys and key ids: a device trusts a :class:`KeyRing`, a set of public keys named by
key id (the first 16 hex digits of the SHA-256 of the raw 32-byte public key). A
signature file (``manifest.json.sig``, ``index.json.sig``) is JSON,
``{"signatures": [{"keyid": "…", "sig": "<base64>"}]}``: one signature per key, so a
release can be signed by an old and a new key while keys are rotated. The first
format, one bare base64 signature without a key id, is still accepted (checked
against every trusted key). Revoking a key is removing it from the devices' ring.

Everything here is pure (bytes in, verdict out) except loading and writing key files;
verification failures raise VerificationError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.atomic import write_atomic
from agent.errors import DocumentError, VerificationError
from agent.hashing import check_file as check_file  # the file checks live with the hashing
from agent.hashing import sha256_bytes as sha256_bytes
from agent.hashing import sha256_file as sha256_file
from agent.strictjson import parse_object

if TYPE_CHECKING:  # cryptography (~7 MB) is imported by the functions that use keys
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

KEYID_LENGTH = 16  # hex digits of sha256(raw public key)
MAX_SIGNATURES = 16  # in one signature file; more is not a rotation, it is an attack
SIGNATURE_FILE_MAX_BYTES = 4096
_KEYID = re.compile(r"^[0-9a-f]{16}$")


# ----- keys -----


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key id of ``key`` (or of a private key's public half): 16 hex digits."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEYID_LENGTH]


@dataclass(frozen=True)
class KeyRing:
    """The public keys a device trusts for one purpose, by key id.

    ``what`` names where they come from (``registry.public_key(s)``) for messages.
    """

    keys: Mapping[str, Ed25519PublicKey]
    what: str

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey], what: str) -> KeyRing:
        return cls({key_id(k): k for k in keys}, what)

    @classmethod
    def load(cls, paths: Sequence[Path], what: str) -> KeyRing | None:
        """The ring of the PEM public keys at ``paths``; None when there are none.

        Raises VerificationError naming ``what`` and the file that cannot be used.
        """
        if not paths:
            return None
        return cls.of((load_public_key(p, what) for p in paths), what)

    @property
    def ids(self) -> list[str]:
        return sorted(self.keys)


def load_public_key(path: Path, what: str = "registry.public_key") -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key. Raises VerificationError naming ``what`` and the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{what}: cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"{what}: {path} is not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8, unencrypted) Ed25519 private key. Raises VerificationError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise VerificationError(f"signing key: cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise VerificationError(f"signing key: {path} is not an Ed25519 private key")
    return key


# ----- signature files -----


@dataclass(frozen=True)
class Signature:
    """One signature of a signature file; ``keyid`` is None in the old bare format."""

    keyid: str | None
    sig: bytes


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(f"{what}: not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"{what}: not base64") from None
    if len(raw) != 64:
        raise VerificationError(f"{what}: {len(raw)} bytes, an Ed25519 signature has 64")
    return raw


def parse_signatures(sig_file: bytes, what: str) -> list[Signature]:
    """The signatures in a signature file (JSON, or the old bare base64).

    ``what`` names the file (``…/manifest.json.sig``). Raises VerificationError naming
    what is wrong.
    """
    if len(sig_file) > SIGNATURE_FILE_MAX_BYTES:
        raise VerificationError(f"{what}: over {SIGNATURE_FILE_MAX_BYTES} bytes")
    text = sig_file.strip()
    if not text:
        raise VerificationError(f"{what}: empty")
    if not text.startswith(b"{"):
        try:
            return [Signature(None, _b64(text.decode("ascii"), what))]
        except UnicodeDecodeError:
            raise VerificationError(f"{what}: not base64") from None
    try:
        doc = parse_object(text, what=what, max_bytes=SIGNATURE_FILE_MAX_BYTES, max_depth=3)
    except DocumentError as exc:
        raise VerificationError(str(exc)) from None
    if set(doc) != {"signatures"}:
        raise VerificationError(f'{what}: must be {{"signatures": [...]}} and nothing else')
    entries = doc["signatures"]
    if not isinstance(entries, list) or not entries:
        raise VerificationError(f"{what}: signatures: must be a list of at least one")
    if len(entries) > MAX_SIGNATURES:
        raise VerificationError(f"{what}: signatures: more than {MAX_SIGNATURES}")
    out: list[Signature] = []
    for i, entry in enumerate(entries):
        where = f"{what}: signatures[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            raise VerificationError(f'{where}: must be {{"keyid": …, "sig": …}}')
        keyid = entry["keyid"]
        if not isinstance(keyid, str) or not _KEYID.match(keyid):
            raise VerificationError(f"{where}.keyid: not {KEYID_LENGTH} lower-case hex digits")
        if any(s.keyid == keyid for s in out):
            raise VerificationError(f"{where}.keyid: {keyid} appears twice")
        out.append(Signature(keyid, _b64(entry["sig"], f"{where}.sig")))
    return out


def dump_signatures(signatures: Sequence[Signature]) -> bytes:
    """A signature file holding ``signatures`` (every one with a key id), sorted by it."""
    entries = []
    for s in sorted(signatures, key=lambda s: s.keyid or ""):
        if s.keyid is None:
            raise ValueError("a signature without a key id cannot be written")
        entries.append({"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()})
    return (json.dumps({"signatures": entries}, indent=2) + "\n").encode()


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """A signature file holding ``key``'s signature of ``data``."""
    return dump_signatures([Signature(key_id(key), key.sign(data))])


def add_signatures(
    sig_file: bytes | None, keys: Sequence[Ed25519PrivateKey], data: bytes, what: str
) -> bytes:
    """``sig_file`` with a signature of ``data`` by each of ``keys`` added, or replacing
    the one with the same key id; the other keys' signatures are kept.

    A signature in the old bare format is kept (with its key id) when one of ``keys``
    made it; otherwise it cannot be named and VerificationError says so, as it does for
    a file that cannot be read.
    """
    kept: dict[str, Signature] = {}
    for old in parse_signatures(sig_file, what) if sig_file is not None else []:
        if old.keyid is not None:
            kept[old.keyid] = old
            continue
        maker = next((k for k in keys if _verifies(k.public_key(), old.sig, data)), None)
        if maker is None:
            raise VerificationError(
                f"{what}: holds a signature in the old format (no key id) by a key not "
                "given here; pass that key too (--sign-key OLD --sign-key NEW) to keep it, "
                f"or delete {what} to drop it"
            )
    for key in keys:
        kept[key_id(key)] = Signature(key_id(key), key.sign(data))
    return dump_signatures(list(kept.values()))


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def verify_signatures(ring: KeyRing, data: bytes, sig_file: bytes | None, what: str) -> str:
    """Raise VerificationError unless ``sig_file`` holds a valid signature of ``data``
    by a key of ``ring``; returns that key's id.

    Signatures by keys outside the ring are ignored (a key being rotated in, or one
    revoked); an old-format signature is checked against every key of the ring.
    """
    if sig_file is None:
        raise VerificationError(f"{what}: unsigned, and {ring.what} requires a signature")
    signatures = parse_signatures(sig_file, f"{what}.sig")
    tried: list[str] = []
    for s in signatures:
        if s.keyid is None:  # the old format: any trusted key may have made it
            candidates = list(ring.keys.items())
        elif s.keyid in ring.keys:
            candidates = [(s.keyid, ring.keys[s.keyid])]
        else:  # a key this device does not trust (not yet, or no longer)
            continue
        for keyid, key in candidates:
            if _verifies(key, s.sig, data):
                return keyid
        tried.append(s.keyid or "(no key id)")
    if tried:
        raise VerificationError(
            f"{what}: bad signature (signed by another key than {ring.what}, or changed "
            "after signing)"
        )
    given = ", ".join(s.keyid or "?" for s in signatures)
    raise VerificationError(
        f"{what}: not signed by a trusted key: signed by key {given}, but {ring.what} "
        f"lists only {', '.join(ring.ids)} (a key removed from that list is revoked)"
    )


def verify_signature(key: Ed25519PublicKey, data: bytes, sig_file: bytes | None, what: str) -> None:
    """:func:`verify_signatures` with a ring of one key (``registry.public_key``)."""
    verify_signatures(KeyRing.of([key], "registry.public_key"), data, sig_file, what)


def generate_keypair(
    out_dir: Path, name: str = "registry", force: bool = False
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (PEM) into ``out_dir``.

    Refuses to overwrite existing keys unless ``force``. The private key is written to
    a new 0600 temp file renamed over the old one, so it is never readable by others,
    not even when it replaces a 0644 file or a symlink (which is replaced, not
    followed). Returns (private, public) paths.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: not a folder; --out names the folder for the keys")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{path} exists; use --force to replace it")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(private_path, pem, mode=0o600)
    write_atomic(
        public_path,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return private_path, public_path
