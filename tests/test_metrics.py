"""Prometheus on the device (``metrics.listen``): the exposition and the endpoint.

A real ``edge-agent run`` (tests/agentproc.py) is scraped over HTTP; what it serves is
checked by the real ``promtool check metrics`` and, when the ``prometheus`` binary is
installed, scraped by a real Prometheus queried through its HTTP API. The snapshot →
families rules are table tests; the endpoint's behaviour (a port in use, idle
clients) runs the real server in-process on loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics as agent_metrics
from agent.config import parse_config
from agent.contract import Figures, MachineDoc, OutputsDoc, ShadowDoc
from agent.errors import ConfigError
from agent.fleet.publish import publish
from agent.metrics import Metrics, Snapshot, families
from agent.metrics_models import PipelineFigures, UpdateFigures
from agent.pipeline import Stats
from tests.agentproc import MODEL, AgentProcess, wait_alive
from tests.broker import free_port
from tests.conftest import Models
from tests.pipecfg import two_pipelines

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
DEV = "dev-m"


def _scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text: str = reply.read().decode()
    return text


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels) -> value, by the library's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, tuple(sorted(labels.items()))))


def _free(port: int) -> None:
    """Raise unless a server could listen on ``port`` now (TIME_WAIT allowed, as servers do)."""
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def _promtool(text: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stderr


# -- the snapshot's families (no I/O) ------------------------------------------------------

STATS = Stats(
    frames=120,
    results=100,
    dropped=15,
    errors=5,
    fps=14.5,
    latency_ms_p50=20.0,
    latency_ms_p95=30.0,
    latency_ms_p99=40.0,
    infer_ms_p50=10.0,
    backend="edgetpu",
    model="birds",
    version=7,
    source_connected=True,
)
FIGURES: Figures = {
    "outbox": {"depth": 3, "bytes": 900, "dropped": 2, "overflow": 1},
    "mqtt": {
        "connected": True,
        "protocol": "5",
        "connects": 2,
        "inflight": 0,
        "rejected": 0,
        "unsent_qos0": 0,
    },
}
MACHINE: MachineDoc = {
    "cpu_pct": 25.0,
    "mem_pct": 50.0,
    "mem_available_mb": 512.0,
    "disk_free_mb": 1024.0,
    "temp_c": 48.5,
    "tpu_temp_c": None,
    "throttled": {"now": ["under_voltage"], "since_boot": ["under_voltage"]},
}


def _snapshot(**changes: Any) -> Snapshot:
    fields: dict[str, Any] = {
        "agent_version": "9.9.9",
        "inference": STATS,
        "phase": "probation",
        "outcomes": {"succeeded": 2, "failed": 1, "rolled_back": 0},
        "figures": FIGURES,
        "machine": MACHINE,
    }
    fields.update(changes)
    return Snapshot(**fields)


def _exposition(snapshot: Snapshot) -> str:
    registry = CollectorRegistry(auto_describe=False)

    class One:
        def collect(self) -> Any:
            return families(snapshot)

    registry.register(One())
    return generate_latest(registry).decode()


@pytest.mark.parametrize(
    ("snapshot", "present", "absent"),
    [
        (
            _snapshot(),
            {
                ("edge_agent_info", (("version", "9.9.9"),)): 1.0,
                (
                    "edge_agent_model_info",
                    (("backend", "edgetpu"), ("model", "birds"), ("version", "7")),
                ): 1.0,
                ("edge_agent_inference_fps", ()): 14.5,
                ("edge_agent_frames_total", ()): 120.0,
                ("edge_agent_frames_dropped_total", ()): 15.0,
                ("edge_agent_results_total", ()): 100.0,
                ("edge_agent_inference_errors_total", ()): 5.0,
                ("edge_agent_source_connected", ()): 1.0,
                ("edge_agent_update_phase", (("phase", "probation"),)): 1.0,
                ("edge_agent_update_phase", (("phase", "idle"),)): 0.0,
                ("edge_agent_update_outcomes_total", (("outcome", "succeeded"),)): 2.0,
                ("edge_agent_update_outcomes_total", (("outcome", "rolled_back"),)): 0.0,
                ("edge_agent_outbox_messages", ()): 3.0,
                ("edge_agent_outbox_bytes", ()): 900.0,
                ("edge_agent_outbox_dropped_total", (("reason", "full"),)): 2.0,
                ("edge_agent_outbox_dropped_total", (("reason", "overflow"),)): 1.0,
                ("edge_agent_mqtt_connected", ()): 1.0,
                ("edge_agent_mqtt_connects_total", ()): 2.0,
                ("edge_agent_system_cpu_usage_ratio", ()): 0.25,
                ("edge_agent_system_memory_usage_ratio", ()): 0.5,
                ("edge_agent_system_memory_available_bytes", ()): 512.0 * 2**20,
                ("edge_agent_store_free_bytes", ()): 1024.0 * 2**20,
                ("edge_agent_cpu_temperature_celsius", ()): 48.5,
                ("edge_agent_throttled", (("flag", "under_voltage"),)): 1.0,
                ("edge_agent_throttled", (("flag", "freq_capped"),)): 0.0,
            },
            # no TPU temperature on this board: absent, not 0
            {"edge_agent_tpu_temperature_celsius"},
        ),
        (
            # no model serving, no probe sample yet, no broker: nothing made up
            _snapshot(
                inference=None,
                phase="idle",
                machine={},
                figures={**FIGURES, "mqtt": {**FIGURES["mqtt"], "connected": False}},
            ),
            {
                ("edge_agent_update_phase", (("phase", "idle"),)): 1.0,
                ("edge_agent_mqtt_connected", ()): 0.0,
            },
            {
                "edge_agent_model_info",
                "edge_agent_inference_fps",
                "edge_agent_frames_total",
                "edge_agent_cpu_temperature_celsius",
                "edge_agent_system_cpu_usage_ratio",
                "edge_agent_throttled",
            },
        ),
        (
            _snapshot(machine={"temp_c": None, "tpu_temp_c": 61.0}),
            {("edge_agent_tpu_temperature_celsius", ()): 61.0},
            {
                "edge_agent_cpu_temperature_celsius",
                "edge_agent_throttled",
                "edge_agent_cpu_frequency_hertz",
                "edge_agent_wifi_signal_dbm",
            },
        ),
        (
            _snapshot(machine={"cpu_freq_mhz": 1500, "wifi_rssi_dbm": -61}),
            {
                ("edge_agent_cpu_frequency_hertz", ()): 1.5e9,
                ("edge_agent_wifi_signal_dbm", ()): -61.0,
            },
            {"edge_agent_tpu_temperature_celsius"},
        ),
    ],
    ids=["serving", "nothing-yet", "tpu-only", "pi-health"],
)
def test_snapshot_families_name_units_and_leave_missing_figures_out(
    snapshot: Snapshot,
    present: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    absent: set[str],
) -> None:
    text = _exposition(snapshot)
    samples = _samples(text)
    for key, value in present.items():
        assert samples.get(key) == value, (key, text)
    names = {name for name, _ in samples}
    assert not names & absent, names & absent
    _promtool(text)


SHADOW: ShadowDoc = {
    "model": "birds",
    "version": 8,
    "issued_at": 1.0,
    "phase": "running",
    "sample_pct": 10,
    "max_cpu_pct": 25,
    "frames": 40,
    "skipped": 3,
    "errors": 1,
    "error": None,
    "latency_ms_p50": 12.0,
    "active_latency_ms_p50": 10.0,
    "agreement": {"metric": "top1", "value": 0.975, "frames": 40},
}
OUTPUTS: OutputsDoc = {
    "version": 7,
    "frames": 100,
    "scores": [0, 0, 0, 0, 0, 10, 20, 30, 25, 15],
    "classes": {"robin": 60, "wren": 40},
    "previous": None,
}
SEVERAL = _snapshot(
    pipelines=(
        PipelineFigures(
            "door",
            "birds",
            STATS,
            {"model": "faces", "version": 2, "crops": 33, "infer_ms_p50": 4.0, "errors": 2},
        ),
        PipelineFigures("yard", "cars", replace(STATS, model="cars", frames=9)),
        PipelineFigures("gate", "birds", None),  # nothing serving there yet: no sample
    ),
    models={
        "birds": UpdateFigures("probation", {"succeeded": 2}),
        "faces": UpdateFigures("idle", {"failed": 1}),
        "cars": UpdateFigures("downloading", {}),
    },
)


@pytest.mark.parametrize(
    ("snapshot", "present", "absent"),
    [
        (
            SEVERAL,
            {
                (
                    "edge_agent_model_info",
                    (
                        ("backend", "edgetpu"),
                        ("model", "birds"),
                        ("pipeline", "door"),
                        ("version", "7"),
                    ),
                ): 1.0,
                ("edge_agent_frames_total", (("model", "birds"), ("pipeline", "door"))): 120.0,
                ("edge_agent_frames_total", (("model", "cars"), ("pipeline", "yard"))): 9.0,
                ("edge_agent_inference_fps", (("model", "cars"), ("pipeline", "yard"))): 14.5,
                ("edge_agent_source_connected", (("model", "birds"), ("pipeline", "door"))): 1.0,
                (
                    "edge_agent_cascade_crops_total",
                    (("model", "faces"), ("pipeline", "door")),
                ): 33.0,
                (
                    "edge_agent_cascade_errors_total",
                    (("model", "faces"), ("pipeline", "door")),
                ): 2.0,
                ("edge_agent_update_phase", (("model", "birds"), ("phase", "probation"))): 1.0,
                ("edge_agent_update_phase", (("model", "cars"), ("phase", "downloading"))): 1.0,
                ("edge_agent_update_phase", (("model", "cars"), ("phase", "idle"))): 0.0,
                (
                    "edge_agent_update_outcomes_total",
                    (("model", "faces"), ("outcome", "failed")),
                ): 1.0,
                (
                    "edge_agent_update_outcomes_total",
                    (("model", "birds"), ("outcome", "failed")),
                ): 0.0,
            },
            # every figure names its pipeline or model: none unlabelled, the idle one absent
            {
                ("edge_agent_frames_total", ()),
                ("edge_agent_update_phase", (("phase", "probation"),)),
                ("edge_agent_frames_total", (("model", "birds"), ("pipeline", "gate"))),
            },
        ),
        (
            _snapshot(shadows={"birds": SHADOW}, outputs={"birds": OUTPUTS}),
            {
                # the single model as it always was, beside its shadow run and outputs
                ("edge_agent_frames_total", ()): 120.0,
                ("edge_agent_update_phase", (("phase", "probation"),)): 1.0,
                (
                    "edge_agent_shadow_info",
                    (("model", "birds"), ("phase", "running"), ("version", "8")),
                ): 1.0,
                ("edge_agent_shadow_frames_total", (("model", "birds"), ("version", "8"))): 40.0,
                ("edge_agent_shadow_skipped_total", (("model", "birds"), ("version", "8"))): 3.0,
                ("edge_agent_shadow_errors_total", (("model", "birds"), ("version", "8"))): 1.0,
                (
                    "edge_agent_shadow_agreement",
                    (("metric", "top1"), ("model", "birds"), ("version", "8")),
                ): 0.975,
                ("edge_agent_output_frames_total", (("model", "birds"), ("version", "7"))): 100.0,
                (
                    "edge_agent_output_score_frames_total",
                    (("bin", "0.7"), ("model", "birds"), ("version", "7")),
                ): 30.0,
                (
                    "edge_agent_output_score_frames_total",
                    (("bin", "0.0"), ("model", "birds"), ("version", "7")),
                ): 0.0,
                (
                    "edge_agent_output_class_frames_total",
                    (("label", "wren"), ("model", "birds"), ("version", "7")),
                ): 40.0,
            },
            {("edge_agent_frames_total", (("model", "birds"), ("pipeline", "main")))},
        ),
        (
            # a shadow run before its first compared frame: no agreement made up
            _snapshot(
                shadows={
                    "birds": {
                        **SHADOW,
                        "phase": "loading",
                        "agreement": {"metric": "f1", "value": None, "frames": 0},
                    }
                }
            ),
            {("edge_agent_shadow_frames_total", (("model", "birds"), ("version", "8"))): 40.0},
            {
                (
                    "edge_agent_shadow_agreement",
                    (("metric", "f1"), ("model", "birds"), ("version", "8")),
                )
            },
        ),
    ],
    ids=["several-pipelines", "single-with-shadow", "shadow-not-compared-yet"],
)
def test_several_models_label_every_figure_and_shadows_name_their_model(
    snapshot: Snapshot,
    present: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    absent: set[tuple[str, tuple[tuple[str, str], ...]]],
) -> None:
    text = _exposition(snapshot)
    samples = _samples(text)
    for key, value in present.items():
        assert samples.get(key) == value, (key, text)
    assert not set(samples) & absent, set(samples) & absent
    _promtool(text)


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "error"),
    [
        ("localhost:9101", "not HOST:PORT with an IP address"),
        ("::1:9101", "not HOST:PORT with an IP address"),
        ("127.0.0.1", "not HOST:PORT with an IP address"),
        ("127.0.0.1:0", "the port must be a number in 1-65535"),
        ("127.0.0.1:http", "the port must be a number in 1-65535"),
    ],
)
def test_a_bad_listen_address_is_one_line_naming_the_key(listen: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump({"metrics": {"listen": listen}}))
    (line,) = str(caught.value).splitlines()
    assert line.startswith("config.yaml:2: metrics.listen:") and error in line, line


def test_metrics_are_off_unless_listen_is_set() -> None:
    assert parse_config("device: {id: d}").metrics.listen is None
    assert parse_config("metrics: {listen: '[::1]:9101'}").metrics.listen == "[::1]:9101"


def test_the_agent_refuses_a_bad_listen_with_exit_78_and_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"device": {"id": "d"}, "metrics": {"listen": "*:9101"}}))
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78, done.stderr
    assert "metrics.listen" in done.stderr and "Traceback" not in done.stderr, done.stderr


# -- the endpoint in-process ------------------------------------------------------------------


def _read() -> Snapshot:
    return _snapshot()


def test_a_port_in_use_is_one_line_then_the_endpoint_comes_when_it_frees(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent_metrics, "RETRY_S", 0.2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    metrics = Metrics(f"127.0.0.1:{port}", _read)
    try:
        metrics.start()
        time.sleep(0.7)  # several retries: still one line
        assert not metrics.serving
        lines = [r.getMessage() for r in caplog.records if "cannot listen" in r.getMessage()]
        assert len(lines) == 1 and f"metrics.listen 127.0.0.1:{port}" in lines[0], lines
        blocker.close()
        deadline = time.monotonic() + 5
        while not metrics.serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _value(_scrape(port), "edge_agent_frames_total") == 120.0
    finally:
        blocker.close()
        metrics.stop()
    _free(port)  # stop() let go of the port


def test_an_idle_client_does_not_hold_up_a_scrape_and_extra_ones_are_closed() -> None:
    port = free_port()
    metrics = Metrics(f"127.0.0.1:{port}", _read)
    metrics.start()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(agent_metrics.MAX_CLIENTS)]
    try:
        time.sleep(0.2)
        # every slot is held by a client that sends nothing: one more is closed at once
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert extra.recv(100) == b""
        for sock in idle[1:]:
            sock.close()
        time.sleep(0.2)
        assert "edge_agent_info" in _scrape(port)  # one idle client left: still served
    finally:
        for sock in idle:
            sock.close()
        metrics.stop()


def test_a_client_dripping_bytes_is_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_metrics, "REQUEST_DEADLINE_S", 1.0)
    port = free_port()
    metrics = Metrics(f"127.0.0.1:{port}", _read)
    metrics.start()
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(agent_metrics.MAX_CLIENTS)]
    try:
        for sock in slow:
            sock.sendall(b"G")  # a byte, then another well within the read timeout
        time.sleep(0.5)
        for sock in slow:
            sock.sendall(b"E")
        time.sleep(1.5)  # past the deadline: every place is free again
        assert "edge_agent_info" in _scrape(port)
    finally:
        for sock in slow:
            sock.close()
        metrics.stop()


# -- a real agent, scraped ---------------------------------------------------------------------


def _agent(tmp_path: Path, registry: Path, port: int, agents: list[AgentProcess]) -> AgentProcess:
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    }
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    agents.append(agent)
    return agent


def test_a_running_agent_serves_metrics_that_move_and_pass_promtool(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    port = free_port()
    agent = _agent(tmp_path, registry, port, agents).start()
    wait_alive(lambda: _serving(port), 60, "v1 pulled and serving", agent)
    frames = _value(_scrape(port), "edge_agent_frames_total")
    assert frames is not None and frames > 0
    wait_alive(
        lambda: (_value(_scrape(port), "edge_agent_frames_total") or 0) > frames,
        10,
        "frames_total growing",
        agent,
    )
    text = _scrape(port)
    assert _value(text, "edge_agent_model_info", model="colours", version="1", backend="cpu") == 1
    assert (_value(text, "edge_agent_inference_latency_seconds_count") or 0) > 0
    assert (_value(text, "edge_agent_inference_invoke_seconds_count") or 0) > 0
    assert _value(text, "edge_agent_inference_latency_seconds_bucket", le="2.0") is not None
    wait_alive(  # the pull of v1 goes through probation, then ends as succeeded
        lambda: _value(_scrape(port), "edge_agent_update_phase", phase="succeeded") == 1.0,
        20,
        "update phase succeeded",
        agent,
    )
    text = _scrape(port)
    assert _value(text, "edge_agent_update_outcomes_total", outcome="succeeded") == 1.0
    assert _value(text, "edge_agent_update_outcomes_total", outcome="failed") == 0.0
    assert _value(text, "edge_agent_mqtt_connected") == 0.0  # no broker configured
    assert (_value(text, "edge_agent_outbox_messages") or 0) > 0  # kept for the broker
    assert _value(text, "edge_agent_info", version=_agent_version()) == 1.0
    assert (_value(text, "process_resident_memory_bytes") or 0) > 0
    assert "edge_agent_system_cpu_usage_ratio" in text
    _promtool(text)
    assert agent.terminate() == 0
    _free(port)  # the agent let go of the port
    assert "Traceback" not in agent.log()


def test_a_reload_serves_metrics_on_the_same_port_again(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    """SIGHUP with a changed config: the old endpoint lets go before the new one binds."""
    port = free_port()
    agent = _agent(tmp_path, registry, port, agents).start()
    wait_alive(lambda: _serving(port), 60, "v1 pulled and serving", agent)
    agent.rewrite(telemetry={"interval_s": 0.5})
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_alive(lambda: "reload: applying" in agent.log(), 20, "reload", agent)
    wait_alive(lambda: agent.log().count("metrics: serving") == 2, 20, "served again", agent)
    wait_alive(lambda: _serving(port), 20, "frames counted after the reload", agent)
    assert "cannot listen" not in agent.log()
    assert agent.terminate() == 0


def test_two_pipelines_serve_labelled_figures_per_pipeline_and_model(
    tmp_path: Path, registry: Path, models: Models, agents: list[AgentProcess]
) -> None:
    """``pipelines:``: each pipeline's frames and histograms under its own labels, each
    model's update phase; the scrape passes promtool."""
    publish(
        [models.path("detector.tflite")],
        model="boxes",
        version=1,
        registry=registry,
        task="detection",
        labels=models.labels,
        channels=("stable",),
    )
    port = free_port()
    agent = two_pipelines(_agent(tmp_path, registry, port, agents), "boxes")
    agent.start()

    def frames(pipeline: str, model: str) -> float:
        try:
            text = _scrape(port)
        except OSError:
            return 0.0
        return _value(text, "edge_agent_frames_total", pipeline=pipeline, model=model) or 0.0

    wait_alive(lambda: frames("door", MODEL) > 0 and frames("yard", "boxes") > 0, 60, "both", agent)
    text = _scrape(port)
    assert _value(text, "edge_agent_frames_total") is None  # no unlabelled series beside them
    for pipeline, model in (("door", MODEL), ("yard", "boxes")):
        labels = {"pipeline": pipeline, "model": model}
        count = _value(text, "edge_agent_inference_latency_seconds_count", **labels)
        assert (count or 0) > 0, (labels, text)
        assert _value(text, "edge_agent_model_info", version="1", backend="cpu", **labels) == 1
    wait_alive(
        lambda: (
            _value(_scrape(port), "edge_agent_update_phase", model="boxes", phase="succeeded")
            == 1.0
        ),
        30,
        "boxes' update succeeded",
        agent,
    )
    text = _scrape(port)
    assert _value(text, "edge_agent_update_outcomes_total", model=MODEL, outcome="succeeded") == 1
    _promtool(text)
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log()


def _serving(port: int) -> bool:
    """Frames counted: the agent pulled v1 (it starts with an empty store) and serves."""
    try:
        return (_value(_scrape(port), "edge_agent_frames_total") or 0) > 0
    except OSError:
        return False


def _agent_version() -> str:
    from agent import __version__

    return __version__


def test_a_port_in_use_leaves_the_agent_serving_without_metrics(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        agent = _agent(tmp_path, registry, port, agents).start()
        # v1 pulled, serving, through its probation (which needs results): inference runs
        wait_alive(lambda: "update to v1 succeeded" in agent.log(), 60, "v1 serving", agent)
        log = agent.log()
        assert log.count("cannot listen") == 1, log
        assert f"metrics.listen 127.0.0.1:{port}" in log
        assert agent.terminate() == 0
        assert "Traceback" not in agent.log()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_a_real_prometheus_scrapes_the_agent(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    assert PROMETHEUS is not None
    port, web = free_port(), free_port()
    agent = _agent(tmp_path, registry, port, agents).start()
    wait_alive(lambda: _serving(port), 60, "v1 pulled and serving", agent)
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "edge-agent",
                        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                    }
                ],
            }
        )
    )
    log = (folder / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                doc = json.loads(reply.read())
        except OSError:
            return []
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    try:
        wait_alive(lambda: bool(query('up{job="edge-agent"} == 1')), 30, "up == 1", agent)
        wait_alive(
            lambda: bool(query("increase(edge_agent_frames_total[10s]) > 0")),
            30,
            "frames counted by Prometheus",
            agent,
        )
        (model,) = query("edge_agent_model_info")
        assert model["metric"]["model"] == "colours" and model["metric"]["backend"] == "cpu"
        quantile = query("histogram_quantile(0.95, edge_agent_inference_latency_seconds_bucket)")
        assert quantile and re.fullmatch(r"[0-9.e+-]+", quantile[0]["value"][1]), quantile
    finally:
        server.terminate()
        server.wait(20)
        log.close()
    assert agent.terminate() == 0


def test_without_prometheus_client_check_config_warns_and_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.preflight import check

    config = parse_config("metrics: {listen: '127.0.0.1:9101'}")
    assert not [w for w in check(config).warnings if w.startswith("metrics.listen")]
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    (warning,) = [w for w in check(config).warnings if w.startswith("metrics.listen")]
    assert "pip install 'edge-agent[metrics]'" in warning


def test_docs_list_every_metric_and_no_other() -> None:
    """docs/metrics.md's table is the contract: the same names as the code makes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(edge_agent_[a-z_]+)`", text, re.MULTILINE))
    full = _snapshot(
        machine={**MACHINE, "tpu_temp_c": 50.0, "cpu_freq_mhz": 1500, "wifi_rssi_dbm": -60}
    )
    suffix = {"counter": "_total", "info": "_info"}
    several = replace(SEVERAL, shadows={"birds": SHADOW}, outputs={"birds": OUTPUTS})
    made = {f.name + suffix.get(f.type, "") for f in [*families(full), *families(several)]} | {
        "edge_agent_inference_latency_seconds",
        "edge_agent_inference_invoke_seconds",
    }
    assert documented == made, (documented - made, made - documented)
