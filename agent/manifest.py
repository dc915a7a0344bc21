"""The registry's documents: ``index.json`` and a release's ``manifest.json``.

Both are parsed strictly: the JSON by :func:`agent.strictjson.parse_object` (size,
depth, no NaN, no duplicate keys), then the fields: unknown fields, unsafe file names,
duplicate names and inconsistent references are refused with an error naming the field
(``files[1].name``). Parsing never touches the network or the disk.
"""

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from agent.config_sections import MODEL_NAME_PATTERN, MODEL_NAME_RULE
from agent.errors import DocumentError, VerificationError
from agent.strictjson import parse_object
from agent.structs import dotted, encodes, locate, rule_pattern

SCHEMA = 1
# A backstop: fetching applies registry.max_manifest_kb before the bytes get here.
MAX_BYTES = 16 * 2**20
Task = Literal["classification", "detection", "regression", "raw"]
TASKS: tuple[str, ...] = ("classification", "detection", "regression", "raw")
Role = Literal["model", "labels", "selftest", "extra"]
Variant = Literal["edgetpu", "cpu"]
DetectionFormat = Literal["ssd", "yolov5", "yolov8"]
DETECTION_FORMATS: tuple[str, ...] = ("ssd", "yolov5", "yolov8")
_MODEL_NAME = rule_pattern(MODEL_NAME_PATTERN, MODEL_NAME_RULE)


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


class _Doc(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A registry document's part: unknown fields refused, immutable. A rule on one
    field raises ``ValueError("<field>: <problem>")`` in ``__post_init__``."""


class FileEntry(_Doc, frozen=True, kw_only=True):
    name: Annotated[str, Meta(description="Plain file name in the release folder.")]
    role: Annotated[Role, Meta(description="What the file is for.")]
    variant: Annotated[Variant | None, Meta(description="Model variant (role model).")] = None
    size: Annotated[int, Meta(ge=0, description="Exact length in bytes.")]
    sha256: Annotated[
        str,
        Meta(
            pattern=rule_pattern(r"^[0-9a-f]{64}$", "64 lower-case hex digits"),
            description="Lower-case hex SHA-256.",
        ),
    ]

    def __post_init__(self) -> None:
        try:
            check_file_name(self.name)
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None
        if self.role == "model" and self.variant is None:
            raise ValueError("a model file needs a variant (edgetpu or cpu)")
        if self.role != "model" and self.variant is not None:
            raise ValueError("only model files have a variant")


class SelfTest(_Doc, frozen=True, kw_only=True):
    inputs: Annotated[str, Meta(description="File (listed in files) with the self-test inputs.")]
    expect: Annotated[str, Meta(description="File (listed in files) with the expected outputs.")]
    atol: Annotated[float, Meta(ge=0, description="Absolute tolerance.")] = 0.02


class Budget(_Doc, frozen=True, kw_only=True):
    latency_ms_p95: Annotated[
        float, Meta(gt=0, description="Largest p95 latency accepted on device.")
    ]


class InputSpec(_Doc, frozen=True, kw_only=True):
    mean: Annotated[float, Meta(description="Subtracted from each pixel.")] = 0.0
    std: Annotated[float, Meta(gt=0, description="Then divided into it.")] = 255.0


class Manifest(_Doc, frozen=True, kw_only=True):
    schema_: Annotated[Literal[1], Meta(description="Manifest schema version.")] = msgspec.field(
        name="schema"
    )
    model: Annotated[str, Meta(pattern=_MODEL_NAME, description="Model name.")]
    version: Annotated[int, Meta(ge=1, description="Release version, newest highest.")]
    created: Annotated[str, Meta(description="ISO 8601 time of publishing.")]
    task: Annotated[Task, Meta(description="What the model's outputs mean.")]
    files: Annotated[list[FileEntry], Meta(min_length=1, description="Every file of the release.")]
    selftest: Annotated[SelfTest | None, Meta(description="On-device self-test.")] = None
    budget: Annotated[Budget | None, Meta(description="On-device latency budget.")] = None
    input: Annotated[
        InputSpec | None,
        Meta(
            description="Pixel normalisation, (pixel - mean) / std; default [0, 1] for float "
            "inputs and raw pixels for quantised ones."
        ),
    ] = None
    detection_format: Annotated[
        DetectionFormat | None,
        Meta(
            description="A detection model's outputs: ssd (4 post-processed outputs), yolov5 "
            "([1, anchors, 5+classes]) or yolov8 (v8/v11: [1, 4+classes, anchors]); default: "
            "told by the outputs' shapes."
        ),
    ] = None

    def __post_init__(self) -> None:
        if self.detection_format is not None and self.task != "detection":
            raise ValueError(f"detection_format: only for task detection, not {self.task}")
        names = [f.name for f in self.files]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"files: duplicate file names: {', '.join(duplicates)}")
        variants = [f.variant for f in self.files if f.role == "model"]
        if not variants:
            raise ValueError("files: no file has role 'model'")
        if len(set(variants)) != len(variants):
            raise ValueError("files: two model files have the same variant")
        if self.selftest is not None:
            for ref in (self.selftest.inputs, self.selftest.expect):
                if ref not in names:
                    raise ValueError(f"selftest: selftest file {ref!r} is not in files")

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


class Index(_Doc, frozen=True, kw_only=True):
    schema_: Annotated[Literal[1], Meta(description="Index schema version.")] = msgspec.field(
        name="schema"
    )
    model: Annotated[str, Meta(pattern=_MODEL_NAME, description="Model name.")]
    versions: Annotated[list[int], Meta(description="Published versions, complete releases only.")]
    channels: Annotated[dict[str, int], Meta(description="Channel -> version.")] = msgspec.field(
        default_factory=dict
    )
    # Written by edge-fleet publish and index --renew; required by a device that checks
    # the index's signature (agent/signed_index.py), optional for an unsigned registry.
    version: Annotated[
        Annotated[int, Meta(ge=1)] | None, Meta(description="Raised by one on every change.")
    ] = None
    expires: Annotated[
        Annotated[
            str,
            Meta(
                pattern=rule_pattern(
                    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", "a UTC time like 2030-01-31T12:00:00Z"
                )
            ),
        ]
        | None,
        Meta(description="RFC 3339 UTC time after which devices refuse this index."),
    ] = None

    def __post_init__(self) -> None:
        if any(v < 1 for v in self.versions):
            raise ValueError("versions must be positive integers")
        for channel, version in self.channels.items():
            if version not in self.versions:
                raise ValueError(f"channel {channel!r} names version {version}, not in versions")


_WHOLE_MAX = 2**53  # a float above this is not exactly one whole number


def _normalised(data: Any) -> tuple[Any, tuple[str | int, ...] | None]:
    """``data`` with every whole float as an int (``"size": 10.0`` from a JSON writer
    that writes numbers as floats; a float field takes the int as it was), and the
    path of the first text that does not encode as UTF-8 (a lone surrogate, ``"\\ud800"``
    in the JSON), else None. Strings stay strings: ``"size": "10"`` is refused."""
    if isinstance(data, float):
        return (int(data) if data.is_integer() and abs(data) <= _WHOLE_MAX else data), None
    if isinstance(data, str):
        return data, None if data.isascii() or encodes(data) else ()
    if isinstance(data, list):
        items = []
        for index, item in enumerate(data):
            value, bad = _normalised(item)
            if bad is not None:
                return data, (index, *bad)
            items.append(value)
        return items, None
    if isinstance(data, dict):
        fields = {}
        for key, item in data.items():
            if not encodes(key):
                return data, ()
            value, bad = _normalised(item)
            if bad is not None:
                return data, (key, *bad)
            fields[key] = value
        return fields, None
    return data, None


def _parse(raw: bytes, what: str, cls: type[_Doc], max_bytes: int) -> Any:
    try:
        data = parse_object(raw, what=what, max_bytes=max_bytes)
    except DocumentError as exc:
        raise VerificationError(str(exc)) from None
    data, bad = _normalised(data)  # depth is bounded by parse_object
    if bad is not None:
        where = f"{dotted(bad)}: " if bad else ""
        raise VerificationError(f"{what}: {where}text that is not valid Unicode")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        path, message = locate(exc)
        where = dotted(path)
        raise VerificationError(
            f"{what}: {where}: {message}" if where else f"{what}: {message}"
        ) from exc


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
