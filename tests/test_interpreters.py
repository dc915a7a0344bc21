"""runtime.interpreters and runtime.threads: auto, on the real interpreter.

Several interpreters serve one stream (agent/workers.py): results come back in frame
order, none lost, a swap replaces the whole set between two frames. The calibration's
rules (agent/runtime/calibrate.py) are table-tested; the calibration itself runs on a
real model. The Edge TPU keeps one interpreter (the stand-in delegate,
tests/native/fake_edgetpu.c).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import RuntimeConfig, parse_config
from agent.errors import ConfigError
from agent.pipeline import Pipeline, Result
from agent.runtime import BACKENDS, LoadedModel, ModelFiles, load_model
from agent.runtime import calibrate as calibration
from agent.runtime.backends import CpuBackend
from agent.runtime.calibrate import Candidate, Measurement, candidates, choose
from agent.sources import MemorySource, pattern_frames
from tests.conftest import Models
from tests.test_pipeline import FlakyTpu

FRAMES = pattern_frames(64, 48)


def several(models: Models, version: int, interpreters: int, name: str | None = None) -> Any:
    path = models.path(name or f"v{version}.tflite")
    files = ModelFiles(name="colours", version=version, task="raw", cpu=path)
    return load_model(files, RuntimeConfig(warmup_runs=1, interpreters=interpreters))


def offset_of(result: Result) -> int:
    return int(result.output.values[0]["values"][0] // 1000)


@pytest.fixture(autouse=True)
def fresh_calibration() -> Iterator[None]:
    calibration.forget()
    yield
    calibration.forget()


class Seen:
    """Results, and the names of the pipeline's threads seen while it ran."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.threads: set[str] = set()

    def result(self, result: Result) -> None:
        self.results.append(result)
        if len(self.results) % 50 == 0:
            self.threads.update(t.name for t in threading.enumerate())


def test_several_interpreters_give_every_frame_once_in_strictly_increasing_order(
    zoo_file: Any,
) -> None:
    """A real model on three interpreters, a file played as fast as possible: invokes
    overlap and finish out of order, results never do."""
    files = ModelFiles.from_file(zoo_file("face_detection_short_range.tflite"))
    model = load_model(files, RuntimeConfig(warmup_runs=1, interpreters=3))
    assert model.workers == 3 and model.choice.to_dict() == {
        "interpreters": 3,
        "threads": 1,
        "chosen_by": "config",
        "note": None,
    }
    seen = Seen()
    pipeline = Pipeline(MemorySource(FRAMES * 20), model, seen.result)
    pipeline.start()
    try:
        assert pipeline.wait(60)
    finally:
        pipeline.stop()
    assert [r.frame for r in seen.results] == list(range(600))  # none lost, none twice
    assert {"pipeline-infer-w0", "pipeline-infer-w1", "pipeline-infer-w2"} <= seen.threads
    stats = pipeline.stats()
    assert (stats.results, stats.dropped, stats.errors) == (600, 0, 0)
    assert stats.runtime is not None and stats.runtime["interpreters"] == 3


def test_swap_with_several_interpreters_replaces_the_whole_set_between_two_frames(
    models: Models,
) -> None:
    got: list[Result] = []
    events: list[tuple[str, dict[str, Any]]] = []
    pipeline = Pipeline(
        MemorySource(FRAMES * 100),
        several(models, 1, 1),
        got.append,
        lambda name, detail: events.append((name, detail)),
    )
    pipeline.start()
    try:
        deadline = time.monotonic() + 30
        while len(got) < 200:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # one interpreter -> two -> three -> one on another input size
        for version, interpreters, name in ((2, 2, None), (3, 3, None), (4, 1, "v4_small")):
            served = len(got)
            assert pipeline.swap(several(models, version, interpreters, name and name + ".tflite"))
            while len(got) < served + 200:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        assert pipeline.wait(20)
    finally:
        pipeline.stop()
    assert [r.frame for r in got] == list(range(3000))
    versions = [r.version for r in got]
    # all results after a swap from the new version, none before it
    assert versions == sorted(versions) and set(versions) == {1, 2, 3, 4}
    assert all(offset_of(r) == r.version for r in got)
    assert [d["version"] for n, d in events if n == "model_swapped"] == [2, 3, 4]


def test_a_live_source_with_several_interpreters_drops_old_frames_results_in_order(
    models: Models,
) -> None:
    """A "camera" faster than the model: frames are dropped (counted), never queued at
    the interpreters, and what is served still comes out in frame order."""
    got: list[Result] = []

    def slow(result: Result) -> None:
        got.append(result)
        time.sleep(0.002)  # a consumer slower than the camera

    source = MemorySource(FRAMES, loop=True, live=True)
    pipeline = Pipeline(source, several(models, 1, 2), slow)
    pipeline.start()
    try:
        deadline = time.monotonic() + 20
        while len(got) < 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        pipeline.stop()
    frames = [r.frame for r in got]
    assert frames == sorted(set(frames))  # strictly increasing
    stats = pipeline.stats()
    assert stats.dropped > 0 and stats.frames >= stats.results + stats.dropped


# -- the calibration's rules -----------------------------------------------------------

C = Candidate


@pytest.mark.parametrize(
    ("interpreters", "threads", "ncores", "expected"),
    [
        (1, 2, 4, [C(1, 2)]),  # nothing to calibrate
        (3, 2, 4, [C(3, 1)]),  # several interpreters: one thread each
        (3, "auto", 4, [C(3, 1)]),
        (1, "auto", 2, [C(1, 1), C(1, 2)]),
        (1, "auto", 1, [C(1, 1)]),
        ("auto", "auto", 2, [C(1, 1), C(2, 1), C(1, 2)]),
        ("auto", "auto", 4, [C(1, 1), C(4, 1), C(1, 4), C(2, 1), C(3, 1), C(1, 2), C(1, 3)]),
        ("auto", 2, 2, [C(1, 2), C(2, 1)]),
        ("auto", "auto", 1, [C(1, 1)]),
        ("auto", "auto", 64, 31),  # capped at 16 cores: 16 singles and 15 pools
    ],
)
def test_candidates(interpreters: Any, threads: Any, ncores: int, expected: Any) -> None:
    plan = candidates(interpreters, threads, ncores)
    if isinstance(expected, int):
        assert len(plan) == expected and max(plan).interpreters == 16
    else:
        assert plan == expected


@pytest.mark.parametrize(
    ("measured", "chosen"),
    [
        ({C(1, 1): 60, C(2, 1): 105, C(1, 2): 80}, C(2, 1)),  # both cores, two interpreters
        ({C(1, 1): 60, C(2, 1): 62, C(1, 2): 61}, C(1, 1)),  # within 5 %: the cheapest
        ({C(1, 1): 100, C(2, 1): 90, C(1, 2): 180}, C(1, 2)),  # threads scale better
        ({C(1, 1): 100, C(2, 1): 104, C(1, 2): 105}, C(1, 1)),
        ({C(1, 1): 100, C(2, 1): 106, C(1, 2): 110}, C(2, 1)),  # within 5 %, on 2 cores:
        # interpreters before threads (the pipeline's own work overlaps their invokes)
        ({C(1, 1): 100, C(2, 1): 100, C(1, 2): 112}, C(1, 2)),  # >5 % over the others
        ({C(1, 2): 80, C(2, 1): 80}, C(2, 1)),
        ({C(1, 1): 100, C(2, 1): 103, C(1, 2): 180, C(1, 4): 185, C(4, 1): 186}, C(1, 2)),
        ({C(3, 1): 10}, C(3, 1)),
        ({C(1, 1): 0.0, C(2, 1): 0.0}, C(1, 1)),
    ],
)
def test_choose(measured: dict[Candidate, float], chosen: Candidate) -> None:
    assert choose([Measurement(c, v) for c, v in measured.items()]) == chosen


def test_choose_without_measurements_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing measured"):
        choose([])


def test_auto_calibrates_on_the_real_model_records_the_choice_and_reuses_it(
    zoo_file: Any, caplog: pytest.LogCaptureFixture
) -> None:
    files = ModelFiles.from_file(zoo_file("face_detection_short_range.tflite"))
    auto = RuntimeConfig(warmup_runs=1, interpreters="auto", threads="auto")
    with caplog.at_level("INFO", logger="agent.runtime.model"):
        model = load_model(files, auto)
    lines = [r.getMessage() for r in caplog.records if "chosen by calibration" in r.getMessage()]
    assert len(lines) == 1 and "interpreters x threads: 1x1" in lines[0]
    choice = model.choice
    assert choice.chosen_by == "calibration"
    assert Candidate(choice.interpreters, choice.threads) in candidates(
        "auto", "auto", calibration.cores()
    )
    assert model.workers == choice.interpreters
    assert model.run(FRAMES[0]) is not None
    model.close()
    caplog.clear()
    with caplog.at_level("INFO", logger="agent.runtime.model"):
        again = load_model(files, auto)  # e.g. a hot swap: no second calibration
    assert not [r for r in caplog.records if "chosen by calibration" in r.getMessage()]
    assert (again.choice.interpreters, again.choice.threads) == (
        choice.interpreters,
        choice.threads,
    )
    again.close()


def test_a_remembered_choice_serves_only_the_settings_it_was_made_for(
    zoo_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if calibration.cores() < 2:
        pytest.skip("one core: nothing to choose between")
    files = ModelFiles.from_file(zoo_file("face_detection_short_range.tflite"))
    both = RuntimeConfig(warmup_runs=1, interpreters="auto", threads="auto")
    with monkeypatch.context() as patched:  # this calibration picks one interpreter of 2
        patched.setattr(calibration, "choose", lambda measured: Candidate(1, 2))
        first = load_model(files, both)
    assert (first.choice.interpreters, first.choice.threads) == (1, 2)
    first.close()  # remembered for these settings
    # a reload with threads fixed at 1: the candidates are 1x1, 2x1; never a 1x2
    one_thread = RuntimeConfig(warmup_runs=1, interpreters="auto", threads=1)
    model = load_model(files, one_thread)
    try:
        assert model.choice.threads == 1
        assert Candidate(model.choice.interpreters, 1) in candidates("auto", 1, calibration.cores())
    finally:
        model.close()
    fixed = load_model(files, RuntimeConfig(warmup_runs=1, interpreters=1, threads=2))
    try:  # fixed settings are served as they are, never from a calibration
        assert (fixed.choice.interpreters, fixed.choice.threads) == (1, 2)
        assert fixed.choice.chosen_by == "config"
    finally:
        fixed.close()


def test_calibration_is_bounded_the_first_candidate_always_measured(models: Models) -> None:
    """Out of time after the first candidate (a clock that jumps): the rest are not
    tried, the first wins, and every interpreter it did not keep is closed."""
    made: list[CpuBackend] = []

    def make(threads: int) -> CpuBackend:
        backend = CpuBackend(threads)
        backend.load(models.path("v1.tflite"))
        made.append(backend)
        return backend

    ticks = iter(range(0, 10_000, 10))
    winner, kept, measured = calibration.calibrate(
        [C(1, 1), C(2, 1), C(1, 2)], make, budget_s=5, clock=lambda: float(next(ticks))
    )
    assert winner == C(1, 1) and [m.candidate for m in measured] == [C(1, 1)]
    assert len(kept) == 1 and len(made) == 1 and kept[0] is made[0]


def test_calibration_closes_the_losers(models: Models) -> None:
    made: list[CpuBackend] = []

    def make(threads: int) -> CpuBackend:
        backend = CpuBackend(threads)
        backend.load(models.path("v1.tflite"))
        made.append(backend)
        return backend

    winner, kept, measured = calibration.calibrate([C(1, 1), C(2, 1), C(1, 2)], make, 0.3)
    assert len(measured) == 3 and len(made) == 3  # two one-thread ones shared, one of two
    assert len(kept) == winner.interpreters
    for backend in made:
        closed = backend._interpreter is None
        assert closed == (not any(backend is k for k in kept))


# -- config ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "17", "two", "true", "1.5", "-1", "[2]", "''"])
def test_bad_interpreters_is_one_line_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"runtime:\n  interpreters: {value}\n")
    [problem] = info.value.problems  # the value shown when it is text or a boolean
    assert re.fullmatch(
        r"config\.yaml:2: runtime\.interpreters: (must be|\S+ is not) auto or a whole "
        r"number 1\.\.16",
        problem,
    ), problem


@pytest.mark.parametrize("value", ["0", "65", "many", "false"])
def test_bad_threads_is_one_line_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"runtime:\n  threads: {value}\n")
    [problem] = info.value.problems
    assert re.fullmatch(
        r"config\.yaml:2: runtime\.threads: (must be|\S+ is not) auto or a whole number 1\.\.64",
        problem,
    ), problem


def test_interpreters_and_threads_accept_auto_and_counts() -> None:
    runtime = parse_config("runtime: {interpreters: auto, threads: auto}").runtime
    assert (runtime.interpreters, runtime.threads) == ("auto", "auto")
    runtime = parse_config("runtime: {interpreters: 16, threads: 64}").runtime
    assert (runtime.interpreters, runtime.threads) == (16, 64)
    runtime = parse_config("", env={"EDGE_AGENT_RUNTIME_INTERPRETERS": "2"}).runtime
    assert runtime.interpreters == 2
    assert parse_config("").runtime.interpreters == 1  # the default: as before


# -- the Edge TPU: one interpreter per TPU ------------------------------------------------


def test_edgetpu_keeps_one_interpreter_and_says_so(
    models: Models, fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_PRESENT", "1")
    # the stand-in delegate takes no ops, so the "edgetpu" variant here is a CPU model
    both = ModelFiles(
        name="colours",
        version=1,
        task="raw",
        cpu=models.path("v1.tflite"),
        edgetpu=models.path("v2.tflite"),
    )
    for interpreters in (3, "auto"):
        runtime = RuntimeConfig(
            edgetpu_library=str(fake_edgetpu),
            warmup_runs=1,
            interpreters=interpreters,  # type: ignore[arg-type]
            threads="auto",
        )
        model: LoadedModel = load_model(both, runtime)
        assert model.backend_name == "edgetpu" and model.workers == 1
        assert model.choice.to_dict() == {
            "interpreters": 1,
            "threads": 1,
            "chosen_by": "config",
            "note": f"runtime.interpreters: {interpreters} ignored: one interpreter per Edge TPU",
        }
        model.close()
    # the CPU variant of the same release (accelerator: cpu) gets its interpreters
    cpu = load_model(both, RuntimeConfig(warmup_runs=1, interpreters=3), accelerator="cpu")
    assert cpu.backend_name == "cpu" and cpu.workers == 3
    cpu.close()


def test_stalled_tpu_is_watched_alone_then_the_cpu_variant_serves_on_several_in_order(
    models: Models,
) -> None:
    """interpreters: 3 with an Edge TPU: one interpreter on the TPU, its invokes watched;
    after a stall the cpu variant takes over on three interpreters, results in order."""
    plan: dict[str, Any] = {"stall_at": 31, "stalled": threading.Event(), "refuse_reload": True}
    files = ModelFiles(
        name="colours",
        version=7,
        task="raw",
        cpu=models.path("v1.tflite"),
        edgetpu=models.path("v2.tflite"),
    )
    runtime = RuntimeConfig(warmup_runs=1, interpreters=3, threads=1)
    backends = {"edgetpu": lambda runtime: FlakyTpu(plan), "cpu": BACKENDS["cpu"]}

    def reload(files: ModelFiles, accelerator: str) -> LoadedModel:
        return load_model(files, runtime, accelerator=accelerator, backends=backends)

    model = reload(files, "auto")
    assert model.backend_name == "edgetpu" and model.workers == 1
    assert "one interpreter per Edge TPU" in model.choice.note
    got: list[Result] = []
    events: list[str] = []
    pipeline = Pipeline(
        MemorySource(FRAMES * 10),
        model,
        got.append,
        lambda name, detail: events.append(name),
        invoke_timeout_s=0.3,
        reload=reload,
    )
    pipeline.start()
    try:
        assert pipeline.wait(30)
    finally:
        pipeline.stop()
        plan["stalled"].set()
    assert events == ["accelerator_lost", "accelerator_fallback", "source_ended"]
    assert pipeline.model.backend_name == "cpu" and pipeline.model.workers == 3
    frames = [r.frame for r in got]
    assert frames == [f for f in range(300) if f != 29]  # the stalled frame is lost
    backends_seen = [r.backend for r in got]
    switch = backends_seen.index("cpu")
    assert backends_seen == ["edgetpu"] * switch + ["cpu"] * (len(got) - switch)


class FailingCpu(CpuBackend):
    """The real CPU interpreter, failing one invoke on cue (counted across instances)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(threads=1)
        self.plan = plan

    def infer(self, tensors: list[Any]) -> list[Any]:
        with self.plan["lock"]:
            self.plan["calls"] += 1
            fail = self.plan["calls"] == self.plan["fail_at"]
        if fail:
            raise RuntimeError("Failed to invoke")
        return super().infer(tensors)


def test_a_failed_invoke_on_one_interpreter_costs_that_frame_only(models: Models) -> None:
    plan: dict[str, Any] = {"calls": 0, "fail_at": 0, "lock": threading.Lock()}
    files = ModelFiles(name="colours", version=1, task="raw", cpu=models.path("v1.tflite"))
    model = load_model(
        files,
        RuntimeConfig(warmup_runs=1, interpreters=2),
        backends={"cpu": lambda runtime: FailingCpu(plan)},
    )
    assert model.workers == 2
    plan["fail_at"] = plan["calls"] + 50  # a frame in mid-stream, on either interpreter
    got: list[Result] = []
    pipeline = Pipeline(MemorySource(FRAMES * 10), model, got.append)
    pipeline.start()
    try:
        assert pipeline.wait(20)
    finally:
        pipeline.stop()
    frames = [r.frame for r in got]
    assert len(frames) == 299 and frames == sorted(frames)  # in order, one missing
    missing = set(range(300)) - set(frames)
    # the 50th invoke: frame 49, or a neighbour when two interpreters started out of turn
    assert len(missing) == 1 and 47 <= missing.pop() <= 51
    assert pipeline.stats().errors == 1


def test_several_interpreters_prepare_each_frame_on_the_worker_that_runs_it(
    zoo_file: Any,
) -> None:
    """With several interpreters the capture thread hands frames on as they come and the
    workers resize them (both cores, beside each other's invokes); a frame that does not
    fit costs that frame only, counted, and the others come out in frame order."""
    files = ModelFiles.from_file(zoo_file("face_detection_short_range.tflite"))
    model = load_model(files, RuntimeConfig(warmup_runs=1, interpreters=2))
    prepared_on: set[str] = set()
    prepare = model.prepare

    def recording(frame: Any) -> Any:
        prepared_on.add(threading.current_thread().name)
        return prepare(frame)

    model.prepare = recording  # type: ignore[method-assign]
    unfit = FRAMES[0][:, :, :2]  # two channels: the model wants three
    frames = [*FRAMES * 5, unfit, *FRAMES * 5]
    seen = Seen()
    pipeline = Pipeline(MemorySource(frames), model, seen.result)
    pipeline.start()
    try:
        assert pipeline.wait(60)
    finally:
        pipeline.stop()
    bad = len(FRAMES) * 5
    assert [r.frame for r in seen.results] == [i for i in range(len(frames)) if i != bad]
    assert prepared_on == {"pipeline-infer-w0", "pipeline-infer-w1"}
    stats = pipeline.stats()
    assert (stats.results, stats.errors) == (len(frames) - 1, 1)
