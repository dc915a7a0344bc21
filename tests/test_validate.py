"""The validation gate: self-tests and latency budgets, from publish to the device.

Real models (agent.modelgen), published into a registry folder, pulled over HTTP into
a device's store, loaded on the real TFLite interpreter (cpu) and validated there.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import ConfigError, ValidationError
from agent.fleet.publish import PublishError, publish
from agent.manifest import dump_json, parse_manifest
from agent.runtime import ModelFiles, load_model
from agent.runtime.backends import CpuBackend
from agent.runtime.model import patient
from agent.validate import (
    MAX_ARRAY_BYTES,
    WARMUP_RUNS,
    ValidationReport,
    npz_bytes,
    read_samples,
    validate,
)
from agent.verify import load_private_key, sha256_bytes, sha256_file, sign
from tests.conftest import MODEL, Device, Fleet, Models


@pytest.fixture
def cpu_device(device: Device) -> Device:
    return device.set("runtime", accelerator="cpu", warmup_runs=1)


def _publish(fleet: Fleet, model_file: Path, version: int, **options: Any) -> dict[str, Any]:
    """Publish ``model_file`` as MODEL v``version``, signed, with the self-test ``options``."""
    result = publish(
        [model_file],
        model=MODEL,
        version=version,
        registry=fleet.registry,
        sign_key=fleet.key,
        **options,
    )
    return result.manifest


def _publish_by_hand(
    fleet: Fleet, version: int, model_file: Path, inputs: bytes, expect: bytes
) -> None:
    """A release with a self-test as any registry writer might make it: publish's own
    checks of the files against the model are not applied."""
    folder = fleet.registry / MODEL / str(version)
    folder.mkdir(parents=True)
    files = [
        (model_file.name, model_file.read_bytes(), {"role": "model", "variant": "cpu"}),
        ("in.npz", inputs, {"role": "selftest"}),
        ("out.npz", expect, {"role": "selftest"}),
    ]
    entries = []
    for name, data, role in files:
        (folder / name).write_bytes(data)
        entries.append({"name": name, **role, "size": len(data), "sha256": sha256_bytes(data)})
    manifest = {
        "schema": 1,
        "model": MODEL,
        "version": version,
        "created": "2026-11-23T10:00:00Z",
        "task": "raw",
        "files": entries,
        "selftest": {"inputs": "in.npz", "expect": "out.npz"},
    }
    raw = dump_json(manifest)
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.json.sig").write_bytes(sign(load_private_key(fleet.key), raw))


def _gate(device: Device, version: int, **options: Any) -> ValidationReport:
    """Pull ``version`` onto the device, load it as the daemon does, and validate it."""
    release = device.updater().pull(version).release
    model = load_model(ModelFiles.from_release(release), device.config.runtime)
    try:
        return validate(release, model, **options)
    finally:
        model.close()


def _outputs(model_file: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """What ``model_file`` answers to each sample, stacked as in a selftest-expect file."""
    backend = CpuBackend()
    backend.load(model_file)
    try:
        runs = [backend.infer([a[i] for a in inputs]) for i in range(len(inputs[0]))]
    finally:
        backend.close()
    return [np.stack([run[k] for run in runs]) for k in range(len(runs[0]))]


def _fleet_publish(*args: str) -> subprocess.CompletedProcess[str]:
    """``edge-fleet publish ARGS`` as a subprocess (the real entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "agent.fleet.cli", "publish", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # the operator's own tool, not ours
    return path


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(7).random((n, 1, size, size, 3), dtype=np.float32)


# ----- passing releases -----


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("classifier.tflite", 1),
        ("classifier_uint8.tflite", 1),
        ("detector.tflite", 4),
        ("regressor.tflite", 1),
    ],
)
def test_release_with_random_selftest_passes_on_the_device(
    fleet: Fleet, cpu_device: Device, models: Models, name: str, outputs: int
) -> None:
    manifest = _publish(fleet, models.path(name), 1, selftest_random=4)
    assert manifest["selftest"] == {
        "inputs": "selftest.npz",
        "expect": "selftest-expect.npz",
        "atol": 0.02,
    }
    with np.load(fleet.path(1, "selftest-expect.npz")) as expect:
        assert sorted(expect.files) == [f"output_{k}" for k in range(outputs)]
    report = _gate(cpu_device, 1)
    assert report.selftest_samples == 4
    assert report.max_abs_error == 0.0  # the same interpreter, the same inputs
    assert report.latency_ms_p95 is None and report.runs == 0
    assert report.to_dict() == {
        "selftest_samples": 4,
        "max_abs_error": 0.0,
        "latency_ms_p95": None,
        "runs": 0,
    }


def test_release_without_selftest_or_budget_passes_with_nothing_measured(
    fleet: Fleet, cpu_device: Device, models: Models
) -> None:
    _publish(fleet, models.path("classifier.tflite"), 1)
    assert _gate(cpu_device, 1) == ValidationReport(0, None, None, 0)


def test_quantised_outputs_are_compared_in_dequantised_units(
    fleet: Fleet, cpu_device: Device, models: Models, tmp_path: Path
) -> None:
    uint8 = models.path("classifier_uint8.tflite")
    _publish(fleet, uint8, 1, selftest_random=3)
    inputs = fleet.path(1, "selftest.npz")
    with np.load(fleet.path(1, "selftest-expect.npz")) as expect:
        exact = expect["output_0"]
    assert exact.dtype == np.uint8
    # One quantisation step off is 1/255 ≈ 0.0039: within atol 0.01 (a raw comparison
    # would see a difference of 1); five steps, 0.0196, are not.
    one_off = _save(tmp_path / "one.npz", output_0=exact + 1)
    five_off = _save(tmp_path / "five.npz", output_0=exact + 5)
    _publish(fleet, uint8, 2, selftest_inputs=inputs, selftest_expect=one_off, atol=0.01)
    _publish(fleet, uint8, 3, selftest_inputs=inputs, selftest_expect=five_off, atol=0.01)

    report = _gate(cpu_device, 2)
    assert report.max_abs_error == pytest.approx(1 / 255)
    with pytest.raises(
        ValidationError,
        match=r"^selftest failed: output_0 sample 0 differs by 0\.01961 \(atol 0\.01\); "
        r"3 of 3 comparisons fail$",
    ):
        _gate(cpu_device, 3)


def test_budget_measures_p95_and_refuses_a_release_over_it(
    fleet: Fleet, cpu_device: Device, models: Models
) -> None:
    classifier = models.path("classifier.tflite")
    manifest = _publish(fleet, classifier, 1, budget_p95_ms=10_000)
    assert manifest["budget"] == {"latency_ms_p95": 10_000} and "selftest" not in manifest
    report = _gate(cpu_device, 1, budget_runs=20)  # no self-test: timed on zeros
    assert report.runs == 20 and report.selftest_samples == 0
    assert report.latency_ms_p95 is not None and 0 < report.latency_ms_p95 < 10_000

    _publish(fleet, classifier, 2, selftest_random=2, budget_p95_ms=1e-6)
    with pytest.raises(
        ValidationError,
        match=r"^budget: p95 latency [0-9.e-]+ ms on cpu exceeds the manifest's 1e-06 ms "
        r"\(20 runs\)$",
    ):
        _gate(cpu_device, 2, budget_runs=20)


def test_beside_a_stream_every_gate_invoke_waits_for_a_gap_and_the_wait_is_not_timed(
    fleet: Fleet, cpu_device: Device, models: Models
) -> None:
    _publish(fleet, models.path("classifier.tflite"), 1, selftest_random=3, budget_p95_ms=10_000)
    gaps: list[float] = []

    def pace() -> bool:  # a stream whose gaps come 50 ms apart
        time.sleep(0.05)
        gaps.append(time.monotonic())
        return True

    report = _gate(cpu_device, 1, budget_runs=6, pace=pace)
    assert report.selftest_samples == 3 and report.runs == 6
    assert len(gaps) == 3 + WARMUP_RUNS + 6  # one gap per invoke: samples, warm-up, timed
    assert report.latency_ms_p95 is not None and report.latency_ms_p95 < 40  # waits untimed


@pytest.mark.parametrize(
    ("answers", "calls"),
    [
        ([True] * 6, 6),  # gaps every time: always paced
        ([False, False], 2),  # no gaps (a file as fast as possible): gives up after two
        ([False, True, False, True, False, True], 6),  # misses apart: keeps pacing
        ([True, False, False], 3),
    ],
)
def test_a_patient_pace_gives_up_after_two_misses_in_a_row(answers: list[bool], calls: int) -> None:
    asked = iter(answers)
    count = 0

    def pace() -> bool:
        nonlocal count
        count += 1
        return next(asked)

    step = patient(pace)
    for _ in range(6):
        step()
    assert count == calls


# ----- failing releases -----


def test_expectations_of_another_model_fail_naming_output_and_deviation(
    fleet: Fleet, cpu_device: Device, models: Models, tmp_path: Path
) -> None:
    inputs = _save(tmp_path / "inputs.npz", input_0=_images(3))
    # The expectations of colour_classifier(offset=1000), computed by publish itself.
    other = tmp_path / "other-registry"
    publish(
        [models.path("v1.tflite")], model=MODEL, version=1, registry=other, selftest_inputs=inputs
    )
    wrong = other / MODEL / "1" / "selftest-expect.npz"
    _publish(
        fleet, models.path("classifier.tflite"), 1, selftest_inputs=inputs, selftest_expect=wrong
    )
    with pytest.raises(
        ValidationError,
        match=r"^selftest failed: output_0 sample \d differs by 1000 \(atol 0\.02\); "
        r"3 of 3 comparisons fail$",
    ):
        _gate(cpu_device, 1)


def test_a_nan_output_fails_the_selftest(
    fleet: Fleet, cpu_device: Device, models: Models, tmp_path: Path
) -> None:
    samples = np.zeros((2, 1, 4, 2), dtype=np.float32)
    samples[1, 0, 2, 1] = np.nan
    inputs = _save(tmp_path / "in.npz", input_0=samples)
    expect = _save(tmp_path / "out.npz", output_0=np.zeros((2, 1, 2), dtype=np.float32))
    _publish(
        fleet, models.path("regressor.tflite"), 1, selftest_inputs=inputs, selftest_expect=expect
    )
    with pytest.raises(
        ValidationError, match=r"^selftest failed: output_0 sample 1 is not finite$"
    ):
        _gate(cpu_device, 1)


def test_selftest_for_another_input_shape_is_named_on_publish_and_on_the_device(
    fleet: Fleet, cpu_device: Device, models: Models, tmp_path: Path
) -> None:
    small = _save(tmp_path / "small.npz", input_0=_images(2, size=16))
    needs = r"input_0 has shape \(2, 1, 16, 16, 3\), the model's input 0 needs \(N, 1, 32, 32, 3\)"
    with pytest.raises(PublishError, match=rf"small\.npz: {needs}$"):
        _publish(fleet, models.path("classifier.tflite"), 1, selftest_inputs=small)
    assert not (fleet.registry / MODEL / "1").exists()

    # A registry written by other tools may still carry one: the device names it.
    expect = npz_bytes({"output_0": np.zeros((2, 1, 3), dtype=np.float32)})
    _publish_by_hand(fleet, 1, models.path("classifier.tflite"), small.read_bytes(), expect)
    with pytest.raises(ValidationError, match=rf"^selftest: in\.npz: {needs}$"):
        _gate(cpu_device, 1)


def test_a_corrupt_selftest_file_is_a_validation_error(
    fleet: Fleet, cpu_device: Device, models: Models
) -> None:
    good = npz_bytes({"input_0": _images(1)})
    _publish_by_hand(fleet, 1, models.path("classifier.tflite"), good, good[: len(good) // 2])
    with pytest.raises(ValidationError, match=r"^selftest: out\.npz: not a valid \.npz file: "):
        _gate(cpu_device, 1)


def test_the_deadline_stops_the_selftest(fleet: Fleet, cpu_device: Device, models: Models) -> None:
    _publish(fleet, models.path("classifier.tflite"), 1, selftest_random=4)
    with pytest.raises(
        ValidationError, match=r"^selftest: the 0 s deadline passed after 0 of 4 samples$"
    ):
        _gate(cpu_device, 1, deadline_s=0)


# ----- reading untrusted self-test files -----


@pytest.fixture(scope="module")
def classifier_specs(models: Models) -> Iterator[CpuBackend]:
    backend = CpuBackend()
    backend.load(models.path("classifier.tflite"))
    yield backend
    backend.close()


def _zip(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "hostile.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def test_hostile_npz_files_are_refused_before_anything_large_is_read(
    tmp_path: Path, classifier_specs: CpuBackend
) -> None:
    def refusal(path: Path) -> str:
        with pytest.raises(ValidationError) as info:
            read_samples(path, "t", "input", classifier_specs.inputs)
        return str(info.value)

    # A header that promises 50 GB (over tiny data): refused, nothing allocated.
    bomb = _zip(tmp_path, {"input_0.npy": _npy_header("|u1", (1000, 1, 4096, 4096, 3))})
    assert f"its arrays hold more than {MAX_ARRAY_BYTES} bytes" in refusal(bomb)
    # A pickle (object array) is never loaded.
    pickled = _zip(tmp_path, {"input_0.npy": _npy_header("|O", (1,)) + b"\x80\x04N."})
    assert "holds Python objects (a pickle)" in refusal(pickled)
    assert "member 'evil.sh' is not an .npy array" in refusal(_zip(tmp_path, {"evil.sh": b"x"}))
    garbage = tmp_path / "garbage.npz"
    for data in (b"", b"PK\x03\x04" + b"\x00" * 40, b"\x93NUMPY\x01\x00"):
        garbage.write_bytes(data)
        assert refusal(garbage).startswith("t: not a valid .npz file: ")
    np.save(tmp_path / "single.npy", _images(1))
    assert refusal(tmp_path / "single.npy") == "t: a single .npy array, not an .npz file"
    # Well-formed, but not what the model takes.
    named = _save(tmp_path / "named.npz", image=_images(1))
    assert refusal(named) == "t: holds image; the model has 1 input(s): input_0"
    doubles = _save(tmp_path / "f64.npz", input_0=_images(1).astype(np.float64))
    assert refusal(doubles) == "t: input_0 has dtype float64, the model's input 0 is float32"
    many = tmp_path / "many.npz"
    many.write_bytes(npz_bytes({"input_0": np.zeros((1001, 1, 32, 32, 3), np.float32)}))
    assert refusal(many) == "t: input_0 holds 1001 samples, more than 1000"


# ----- publishing -----


def test_republishing_with_computed_expectations_is_unchanged(
    fleet: Fleet, models: Models, tmp_path: Path
) -> None:
    inputs = _save(tmp_path / "inputs.npz", input_0=_images(3))
    for options in (["--selftest-random", "4"], ["--selftest-inputs", str(inputs)]):
        args = [str(models.path("classifier.tflite")), "--model", "m", "--registry"]
        args += [str(tmp_path / f"reg{options[0]}"), "--version", "1", *options]
        first = _fleet_publish(*args)
        assert first.returncode == 0 and "published: m v1" in first.stdout, first.stderr
        expect = tmp_path / f"reg{options[0]}" / "m" / "1" / "selftest-expect.npz"
        before = expect.read_bytes()
        again = _fleet_publish(*args)
        assert again.returncode == 0, again.stderr
        assert "already published (unchanged): m v1" in again.stdout
        assert expect.read_bytes() == before
    # The same version with other self-test samples is other content: refused.
    changed = _fleet_publish(*args[:-2], "--selftest-random", "5")
    assert changed.returncode == 1 and "already published with different content" in (
        changed.stderr
    )


def test_cli_selftest_and_budget_flags_write_the_manifest_fields(
    models: Models, tmp_path: Path
) -> None:
    classifier = models.path("classifier.tflite")
    images = _images(2)
    inputs = _save(tmp_path / "in.npz", input_0=images)
    expect = _save(tmp_path / "out.npz", output_0=_outputs(classifier, [images])[0])
    registry = tmp_path / "reg"
    base = [str(classifier), "--model", "m", "--registry", str(registry)]
    result = _fleet_publish(
        *base,
        *("--version", "1", "--selftest-inputs", str(inputs), "--selftest-expect", str(expect)),
        *("--atol", "0.05", "--budget-p95-ms", "40", "--json"),
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["selftest"] == {
        "inputs": "selftest.npz",
        "expect": "selftest-expect.npz",
        "atol": 0.05,
    }
    assert manifest["budget"] == {"latency_ms_p95": 40}
    folder = registry / "m" / "1"
    assert parse_manifest((folder / "manifest.json").read_bytes()).selftest is not None
    selftest = {f["name"]: f for f in manifest["files"] if f["role"] == "selftest"}
    assert sorted(selftest) == ["selftest-expect.npz", "selftest.npz"]
    for name, given in (("selftest.npz", inputs), ("selftest-expect.npz", expect)):
        assert (folder / name).read_bytes() == given.read_bytes()  # copied as given
        assert selftest[name]["size"] == given.stat().st_size
        assert selftest[name]["sha256"] == sha256_file(folder / name)

    # Options that do not go together are bad usage (exit 2), and nothing is written.
    tpu_only = tmp_path / "m_edgetpu.tflite"
    tpu_only.write_bytes(models.path("edgetpu_stub.tflite").read_bytes())
    for args, says in (
        ([*base, "--selftest-expect", str(expect)], "--selftest-expect needs the inputs"),
        ([*base, "--selftest-random", "2", "--selftest-inputs", str(inputs)], "not allowed"),
        ([*base, "--atol", "0.1"], "--atol is the self-test's tolerance"),
        ([*base, "--selftest-random", "0"], "--selftest-random: 0 is not a sample count"),
        ([*base, "--budget-p95-ms", "-1"], "--budget-p95-ms: -1.0 is not a latency"),
        (
            [str(tpu_only), *base[1:], "--selftest-inputs", str(inputs)],
            "only an edgetpu variant, so the expected outputs cannot be computed here: "
            "pass --selftest-expect",
        ),
    ):
        refused = _fleet_publish(*args, "--version", "2")
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
    assert not (registry / "m" / "2").exists()


def test_publish_refuses_expectations_that_do_not_fit_the_model(
    fleet: Fleet, models: Models, tmp_path: Path
) -> None:
    inputs = _save(tmp_path / "in.npz", input_0=_images(2))
    three = _save(tmp_path / "three.npz", output_0=np.zeros((3, 1, 3), dtype=np.float32))
    with pytest.raises(PublishError, match=r"three\.npz: holds 3 samples, the inputs 2$"):
        _publish(
            fleet,
            models.path("classifier.tflite"),
            1,
            selftest_inputs=inputs,
            selftest_expect=three,
        )
    with pytest.raises(ConfigError, match=r"--selftest-inputs and --selftest-random exclude"):
        _publish(
            fleet, models.path("classifier.tflite"), 1, selftest_inputs=inputs, selftest_random=2
        )
    assert not (fleet.registry / MODEL / "1").exists()
