"""Hashes and Ed25519 signatures.

A release is trusted by two facts: the manifest bytes carry a valid signature from
the registry key (when the device has one configured), and every file's length and
SHA-256 match the manifest. Everything here raises VerificationError on a mismatch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import VerificationError

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Raise VerificationError unless ``path`` has exactly ``size`` bytes and hash ``sha256``."""
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError as exc:
        raise VerificationError(f"{what}: missing ({path})") from exc
    if actual_size != size:
        raise VerificationError(f"{what}: {actual_size} bytes, manifest says {size}")
    actual = sha256_file(path)
    if not hmac.compare_digest(actual, sha256):
        raise VerificationError(f"{what}: sha256 {actual} does not match manifest {sha256}")


def load_public_key(path: Path, what: str = "registry.public_key") -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key. Raises VerificationError naming ``what`` and the file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{what}: cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"{what}: {path} is not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8, unencrypted) Ed25519 private key. Raises VerificationError."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise VerificationError(f"signing key: cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise VerificationError(f"signing key: {path} is not an Ed25519 private key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The ``.sig`` file content for ``data``: base64 of the Ed25519 signature, newline."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify_signature(key: Ed25519PublicKey, data: bytes, sig_file: bytes | None, what: str) -> None:
    """Raise VerificationError unless ``sig_file`` is a valid signature of ``data``."""
    if sig_file is None:
        raise VerificationError(f"{what}: unsigned, and registry.public_key requires a signature")
    try:
        signature = base64.b64decode(sig_file.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"{what}.sig: not base64") from exc
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise VerificationError(
            f"{what}: bad signature (signed by another key, or changed after signing)"
        ) from exc


def generate_keypair(
    out_dir: Path, name: str = "registry", force: bool = False
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (PEM) into ``out_dir``.

    Refuses to overwrite existing keys unless ``force``. Returns (private, public) paths.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: not a folder; --out names the folder for the keys")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; use --force to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path
