"""Publishing releases and the manifest contract they follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import VerificationError
from agent.fleet.publish import PublishError, publish
from agent.manifest import parse_index, parse_manifest
from agent.verify import load_public_key, sha256_file, verify_signature
from tests.conftest import MODEL, Fleet, edge_fleet, tflite_bytes


def test_publish_writes_the_registry_layout(fleet: Fleet) -> None:
    fleet.release(1, edgetpu=True, channels=("stable", "beta"))
    folder = fleet.registry / MODEL / "1"
    raw = (folder / "manifest.json").read_bytes()
    manifest = parse_manifest(raw)
    assert manifest.model == MODEL and manifest.version == 1 and manifest.task == "detection"
    roles = {(f.name, f.role, f.variant) for f in manifest.files}
    assert roles == {
        ("model.tflite", "model", "cpu"),
        ("model_edgetpu.tflite", "model", "edgetpu"),
        ("labels.txt", "labels", None),
    }
    for entry in manifest.files:
        assert (folder / entry.name).stat().st_size == entry.size
        assert sha256_file(folder / entry.name) == entry.sha256
    verify_signature(
        load_public_key(fleet.pub), raw, (folder / "manifest.json.sig").read_bytes(), "m"
    )
    index = parse_index((fleet.registry / MODEL / "index.json").read_bytes())
    assert index.versions == [1] and index.channels == {"stable": 1, "beta": 1}


def test_publish_keeps_channels_it_was_not_asked_to_move(fleet: Fleet) -> None:
    fleet.release(1, channels=("stable",))
    fleet.release(2, channels=("beta",))
    index = json.loads((fleet.registry / MODEL / "index.json").read_bytes())
    assert index.pop("version") == 2 and index.pop("expires")
    assert index == {
        "schema": 1,
        "model": MODEL,
        "versions": [1, 2],
        "channels": {"stable": 1, "beta": 2},
    }


def test_publishing_the_same_release_again_is_a_no_op(fleet: Fleet) -> None:
    first = fleet.release(1)
    second = fleet.release(1)
    assert first == second


def test_publish_refuses_to_overwrite_a_version_with_other_bytes(fleet: Fleet) -> None:
    fleet.release(1)
    before = (fleet.registry / MODEL / "1" / "manifest.json").read_bytes()
    with pytest.raises(PublishError, match=r"v1 is already published with different content"):
        fleet.release(1, seed=42)
    assert (fleet.registry / MODEL / "1" / "manifest.json").read_bytes() == before


def test_publish_over_a_damaged_version_folder_says_so(fleet: Fleet) -> None:
    (fleet.registry / MODEL / "1").mkdir(parents=True)
    with pytest.raises(PublishError, match=r"exists but holds no readable manifest.json"):
        fleet.release(1)


def test_publish_refuses_a_file_that_is_not_tflite(fleet: Fleet, tmp_path: Path) -> None:
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"\x00" * 100)
    with pytest.raises(PublishError, match=r"model.tflite: not a TFLite model"):
        publish([fake], model=MODEL, version=1, registry=fleet.registry)
    assert not (fleet.registry / MODEL / "1").exists()


def test_publish_refuses_two_models_of_one_variant(fleet: Fleet, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "m.tflite", tmp_path / "b" / "n.tflite"
    for i, path in enumerate((a, b)):
        path.parent.mkdir()
        path.write_bytes(tflite_bytes(100, i))
    with pytest.raises(PublishError, match=r"two model files have the same variant"):
        publish([a, b], model=MODEL, version=1, registry=fleet.registry)


def test_publish_refuses_a_bad_model_name(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(tflite_bytes(100, 1))
    with pytest.raises(PublishError, match=r"model: must be letters, digits, .*starting with"):
        publish([path], model="../evil", version=1, registry=fleet.registry)


def test_fleet_cli_keygen_and_publish(tmp_path: Path) -> None:
    assert edge_fleet("keygen", "--out", str(tmp_path / "k")).returncode == 0
    assert (tmp_path / "k" / "registry.key").stat().st_mode & 0o777 == 0o600
    again = edge_fleet("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "exists; use --force" in again.stderr
    model = tmp_path / "det_edgetpu.tflite"
    model.write_bytes(tflite_bytes(1000, 3))
    publish_args = ["publish", str(model), "--model", "det", "--version", "1"]
    publish_args += ["--registry", str(tmp_path / "reg")]
    result = edge_fleet(
        *publish_args,
        *("--sign-key", str(tmp_path / "k" / "registry.key")),
        *("--task", "classification", "--json"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"][0]["variant"] == "edgetpu"
    bad = edge_fleet(*publish_args, "--task", "nonsense")
    assert bad.returncode == 2  # usage error


MANIFEST = {
    "schema": 1,
    "model": "m",
    "version": 1,
    "created": "2026-11-23T10:00:00Z",
    "task": "raw",
    "files": [
        {"name": "model.tflite", "role": "model", "variant": "cpu", "size": 1, "sha256": "a" * 64}
    ],
}


def _manifest_error(**change: object) -> str:
    data = json.loads(json.dumps(MANIFEST))
    data.update(change)
    with pytest.raises(VerificationError) as info:
        parse_manifest(json.dumps(data).encode())
    return str(info.value)


def test_manifest_rules_name_the_field() -> None:
    entry = MANIFEST["files"][0]  # type: ignore[index]
    assert "files[0].sha256: must be 64 lower-case hex digits" in _manifest_error(
        files=[{**entry, "sha256": "XYZ"}]
    )
    assert "files[0]: a model file needs a variant" in _manifest_error(
        files=[{k: v for k, v in entry.items() if k != "variant"}]
    )
    assert "files: duplicate file names: model.tflite" in _manifest_error(files=[entry, entry])
    assert "files: no file has role 'model'" in _manifest_error(
        files=[{"name": "l.txt", "role": "labels", "size": 1, "sha256": "b" * 64}]
    )
    assert "colour: unknown field" in _manifest_error(colour="red")
    assert "schema: Invalid enum value 2" in _manifest_error(schema=2)
    assert "selftest: selftest file 'x.npz' is not in files" in _manifest_error(
        selftest={"inputs": "x.npz", "expect": "model.tflite"}
    )
    with pytest.raises(VerificationError, match=r"manifest\.json: not valid JSON"):
        parse_manifest(b"{nope")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "/abs", "..hidden", "a\\b", "nul\x00", "tab\tname"]
)
def test_manifest_refuses_unsafe_file_names(name: str) -> None:
    entry = {**MANIFEST["files"][0], "name": name}  # type: ignore[index]
    assert "files[0].name: file name" in _manifest_error(files=[entry])


@pytest.mark.parametrize("reserved", ["manifest.json", "index.json"])
def test_publish_refuses_a_labels_file_with_a_registry_name(
    fleet: Fleet, tmp_path: Path, reserved: str
) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(tflite_bytes(100, 1))
    (tmp_path / reserved).write_text("person\n")
    with pytest.raises(PublishError, match=r"is the registry's own file name"):
        publish(
            [model], model=MODEL, version=1, registry=fleet.registry, labels=tmp_path / reserved
        )


def test_republishing_an_unsigned_release_with_a_key_signs_it(fleet: Fleet) -> None:
    fleet.release(1, signed=False)
    sig = fleet.path(1, "manifest.json.sig")
    assert not sig.exists()
    fleet.release(1, signed=True)
    raw = fleet.path(1, "manifest.json").read_bytes()
    verify_signature(load_public_key(fleet.pub), raw, sig.read_bytes(), "manifest.json")


def test_publish_detection_format_reaches_the_device_that_loads_the_release(
    tmp_path: Path,
) -> None:
    """``--detection-format`` lands in the manifest; a device reads the model's one output
    as that head. A v8 [1, 84, 2100] head declared yolov5 is read as v5 (79 classes)."""
    import shutil

    import numpy as np

    from agent.config import RuntimeConfig
    from agent.modelgen_yolo import yolo_detector
    from agent.runtime import ModelFiles, load_model
    from agent.store import Release

    model = tmp_path / "yolo.tflite"
    model.write_bytes(yolo_detector("yolov8"))
    labels = tmp_path / "coco.txt"
    labels.write_text("person\nbicycle\ncar\n")
    registry = tmp_path / "reg"
    args = ["publish", str(model), "--model", "yolo", "--registry", str(registry)]
    for version, fmt in ((1, "yolov8"), (2, "yolov5")):
        result = edge_fleet(
            *args,
            *("--version", str(version), "--labels", str(labels)),
            *("--task", "detection", "--detection-format", fmt, "--json"),
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["detection_format"] == fmt
    layouts = []
    for version in (1, 2):
        folder = registry / "yolo" / str(version)
        parsed = parse_manifest((folder / "manifest.json").read_bytes())
        blobs = tmp_path / f"blobs{version}"
        blobs.mkdir()
        for entry in parsed.files:
            shutil.copy(folder / entry.name, blobs / entry.sha256)
        files = ModelFiles.from_release(Release(parsed, "", blobs))
        loaded = load_model(files, RuntimeConfig(warmup_runs=0), min_score=0.5)
        layouts.append((loaded.adapter.yolo.format, loaded.adapter.yolo.classes))  # type: ignore[union-attr]
        if version == 1:
            red = np.zeros((480, 640, 3), np.uint8)
            red[..., 0] = 255
            assert [d.label for d in loaded.run(red).detections] == ["person", "car"]
    assert layouts == [("yolov8", 80), ("yolov5", 79)]


def test_publish_detection_format_needs_the_detection_task_and_a_known_format(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(tflite_bytes(1000, 1))
    args = ["publish", str(model), "--model", "m", "--version", "1"]
    args += ["--registry", str(tmp_path / "reg"), "--detection-format", "yolov8"]
    raw = edge_fleet(*args, "--task", "raw")
    assert raw.returncode == 1 and "Traceback" not in raw.stderr
    assert (
        raw.stderr.strip()
        .splitlines()[-1]
        .endswith("--detection-format: only for --task detection (this release is --task raw)")
    )
    unknown = edge_fleet(*args[:-1], "yolo9000", "--task", "detection")
    assert unknown.returncode == 2 and "--detection-format: invalid choice" in unknown.stderr
    assert not (tmp_path / "reg").exists()


# Registries are written by edge-fleet publish (ints), but another JSON writer may write
# every number as a float: a whole float is taken for a whole-number field; text is not.
@pytest.mark.parametrize(
    "change",
    [
        {"version": 1.0},
        {"schema": 1.0},
        {"budget": {"latency_ms_p95": 5}},
        {"files": [{**MANIFEST["files"][0], "size": 10.0}]},  # type: ignore[index]
    ],
)
def test_a_manifest_with_whole_floats_for_whole_numbers_is_taken(change: dict[str, object]) -> None:
    data = {**MANIFEST, **change}
    manifest = parse_manifest(json.dumps(data).encode())
    assert type(manifest.version) is int and all(type(f.size) is int for f in manifest.files)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": "1"}, "manifest.json: version: Expected `int`, got `str`"),
        ({"version": 1.5}, "manifest.json: version: Expected `int`, got `float`"),
        ({"schema": "1"}, "manifest.json: schema: Expected `int`, got `str`"),
        ({"budget": {"latency_ms_p95": "5"}}, "manifest.json: budget.latency_ms_p95: Expected"),
        ({"created": None, "task": "raw"}, "manifest.json: created: Expected `str`, got `null`"),
        ({"files": []}, "manifest.json: files: Expected `array` of length"),
    ],
)
def test_a_manifest_number_written_as_text_is_refused(
    change: dict[str, object], expected: str
) -> None:
    assert _manifest_error(**change).startswith(expected)


def test_a_manifest_missing_a_field_names_it() -> None:
    data = {k: v for k, v in MANIFEST.items() if k != "version"}
    with pytest.raises(VerificationError, match=r"^manifest.json: version: required$"):
        parse_manifest(json.dumps(data).encode())


def test_an_index_takes_whole_float_versions_and_refuses_text() -> None:
    index = parse_index(
        b'{"schema": 1, "model": "m", "versions": [1, 2.0], "channels": {"s": 2.0}}'
    )
    assert index.versions == [1, 2] and index.channels == {"s": 2}
    with pytest.raises(VerificationError, match=r"^index.json: versions\[1\]: Expected `int`"):
        parse_index(b'{"schema": 1, "model": "m", "versions": [1, "2"]}')


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b'{"schema": 1, "model": "m", "versions": [1], "channels": {"\\ud800": 1}}',
            "index.json: channels: text that is not valid Unicode",
        ),
        (
            b'{"schema": 1, "model": "\\udc80", "versions": [1]}',
            "index.json: model: text that is not valid Unicode",
        ),
    ],
)
def test_an_index_with_text_that_is_not_unicode_is_refused(raw: bytes, expected: str) -> None:
    with pytest.raises(VerificationError) as info:
        parse_index(raw)
    assert str(info.value) == expected


def test_a_manifest_file_name_that_is_not_unicode_is_refused() -> None:
    entry = {**MANIFEST["files"][0], "name": "m\ud800.tflite"}  # type: ignore[dict-item]
    assert _manifest_error(files=[entry]) == (
        "manifest.json: files[0].name: text that is not valid Unicode"
    )
