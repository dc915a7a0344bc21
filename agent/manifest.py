"""The registry's documents: ``index.json`` and a release's ``manifest.json``.

Both are parsed strictly: the JSON by :func:`agent.strictjson.parse_object` (size,
depth, no NaN, no duplicate keys), then the fields: unknown fields, unsafe file names,
duplicate names and inconsistent references are refused with an error naming the field
(``files[1].name``). Parsing never touches the network or the disk.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.config import MODEL_NAME_PATTERN
from agent.errors import DocumentError, VerificationError
from agent.strictjson import parse_object

SCHEMA = 1
# A backstop: fetching applies registry.max_manifest_kb before the bytes get here.
MAX_BYTES = 16 * 2**20
Task = Literal["classification", "detection", "regression", "raw"]
TASKS: tuple[str, ...] = ("classification", "detection", "regression", "raw")
Role = Literal["model", "labels", "selftest", "extra"]
Variant = Literal["edgetpu", "cpu"]


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain file name; raise ValueError saying why not.

    Names come from a manifest the device did not write: they must not climb out of
    a folder, name an absolute path, or smuggle separators or control characters.
    """
    if not name:
        raise ValueError("file name is empty")
    if name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a file")
    for bad, why in (("/", "'/'"), ("\\", "'\\\\'"), ("\x00", "a NUL byte")):
        if bad in name:
            raise ValueError(f"file name {name!r} contains {why}")
    if ".." in name:
        raise ValueError(f"file name {name!r} contains '..'")
    if any(ord(ch) < 32 for ch in name):
        raise ValueError(f"file name {name!r} contains a control character")
    if len(name.encode()) > 255:
        raise ValueError("file name is longer than 255 bytes")
    return name


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FileEntry(_Doc):
    name: str = Field(description="Plain file name in the release folder.")
    role: Role = Field(description="What the file is for.")
    variant: Variant | None = Field(default=None, description="Model variant (role model).")
    size: int = Field(ge=0, description="Exact length in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256.")

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        try:
            return check_file_name(value)
        except ValueError as exc:
            raise PydanticCustomError("file_name", str(exc)) from None

    @model_validator(mode="after")
    def _variant(self) -> FileEntry:
        if self.role == "model" and self.variant is None:
            raise PydanticCustomError("variant", "a model file needs a variant (edgetpu or cpu)")
        if self.role != "model" and self.variant is not None:
            raise PydanticCustomError("variant", "only model files have a variant")
        return self


class SelfTest(_Doc):
    inputs: str = Field(description="File (listed in files) with the self-test inputs.")
    expect: str = Field(description="File (listed in files) with the expected outputs.")
    atol: float = Field(default=0.02, ge=0, description="Absolute tolerance.")


class Budget(_Doc):
    latency_ms_p95: float = Field(gt=0, description="Largest p95 latency accepted on device.")


class InputSpec(_Doc):
    mean: float = Field(default=0.0, description="Subtracted from each pixel.")
    std: float = Field(default=255.0, gt=0, description="Then divided into it.")


class Manifest(_Doc):
    schema_: Literal[1] = Field(alias="schema", description="Manifest schema version.")
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name.")
    version: int = Field(ge=1, description="Release version, newest highest.")
    created: str = Field(description="ISO 8601 time of publishing.")
    task: Task = Field(description="What the model's outputs mean.")
    files: list[FileEntry] = Field(min_length=1, description="Every file of the release.")
    selftest: SelfTest | None = Field(default=None, description="On-device self-test.")
    budget: Budget | None = Field(default=None, description="On-device latency budget.")
    input: InputSpec | None = Field(
        default=None,
        description="Pixel normalisation, (pixel - mean) / std; default [0, 1] for float "
        "inputs and raw pixels for quantised ones.",
    )

    @field_validator("files")
    @classmethod
    def _files(cls, files: list[FileEntry]) -> list[FileEntry]:
        names = [f.name for f in files]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PydanticCustomError("files", f"duplicate file names: {', '.join(duplicates)}")
        variants = [f.variant for f in files if f.role == "model"]
        if not variants:
            raise PydanticCustomError("files", "no file has role 'model'")
        if len(set(variants)) != len(variants):
            raise PydanticCustomError("files", "two model files have the same variant")
        return files

    @field_validator("selftest")
    @classmethod
    def _selftest_files(cls, selftest: SelfTest | None, info: ValidationInfo) -> SelfTest | None:
        names = {f.name for f in info.data.get("files", [])}
        if selftest is not None and names:
            for ref in (selftest.inputs, selftest.expect):
                if ref not in names:
                    raise PydanticCustomError("selftest", f"selftest file {ref!r} is not in files")
        return selftest

    def model_file(self, variant: str) -> FileEntry | None:
        """The model file of ``variant`` (``edgetpu`` or ``cpu``), if the release has one."""
        return next((f for f in self.files if f.role == "model" and f.variant == variant), None)

    def file(self, name: str) -> FileEntry:
        """The entry named ``name``. Raises KeyError."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


class Index(_Doc):
    schema_: Literal[1] = Field(alias="schema", description="Index schema version.")
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name.")
    versions: list[int] = Field(description="Published versions, complete releases only.")
    channels: dict[str, int] = Field(default_factory=dict, description="Channel -> version.")
    # Written by edge-fleet publish and index --renew; required by a device that checks
    # the index's signature (agent/signed_index.py), optional for an unsigned registry.
    version: int | None = Field(
        default=None, ge=1, strict=True, description="Raised by one on every change."
    )
    expires: str | None = Field(
        default=None,
        pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
        description="RFC 3339 UTC time after which devices refuse this index.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Index:
        if any(v < 1 for v in self.versions):
            raise PydanticCustomError("versions", "versions must be positive integers")
        for channel, version in self.channels.items():
            if version not in self.versions:
                raise PydanticCustomError(
                    "channels", f"channel {channel!r} names version {version}, not in versions"
                )
        return self


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse(raw: bytes, what: str, cls: type[_Doc], max_bytes: int) -> Any:
    try:
        data = parse_object(raw, what=what, max_bytes=max_bytes)
    except DocumentError as exc:
        raise VerificationError(str(exc)) from None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        where = f"{what}: {_loc(first['loc'])}" if first["loc"] else what
        raise VerificationError(f"{where}: {message}{more}") from exc


def parse_manifest(raw: bytes, what: str = "manifest.json", max_bytes: int = MAX_BYTES) -> Manifest:
    """Parse manifest bytes. Raises VerificationError naming the field that is wrong."""
    result: Manifest = _parse(raw, what, Manifest, max_bytes)
    return result


def parse_index(raw: bytes, what: str = "index.json", max_bytes: int = MAX_BYTES) -> Index:
    """Parse index bytes. Raises VerificationError naming the field that is wrong."""
    result: Index = _parse(raw, what, Index, max_bytes)
    return result


def dump_json(data: dict[str, Any]) -> bytes:
    """The registry's canonical JSON bytes: two-space indent, trailing newline.

    Raises ValueError for a non-finite float (publishing checks its numbers first).
    """
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
