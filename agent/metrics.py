"""Prometheus on the device: ``metrics.listen`` serves ``/metrics`` (docs/metrics.md).

The exposition is made by ``prometheus_client`` from a registry of this agent's own
(not the library's global one):

- two histograms, observed per result on the pipeline's thread (two ``observe``
  calls, a few microseconds): capture → result latency and the interpreter's invoke;
- everything else is read at scrape time by a collector from :class:`Snapshot`, the
  figures telemetry sends (pipeline stats, outbox and MQTT figures, the latest probe
  sample, the update phase and outcome counts): no second bookkeeping.
  :func:`families` turns a snapshot into metric families and does no I/O; with several
  models the inference and update families carry ``pipeline``/``model`` labels, and
  shadow runs and output statistics have families of their own (agent/metrics_models.py);
- the library's process and platform collectors (``process_*``, ``python_info``).

The endpoint is the library's WSGI app on a small threaded server bound to exactly
``metrics.listen``: each read times out after ``REQUEST_TIMEOUT_S`` and a connection
is cut after ``REQUEST_DEADLINE_S`` whatever it sends (a byte every few seconds does not
keep a place), at most
``MAX_CLIENTS`` are served at once (more are closed), and no name is looked up. A port
that cannot be bound is one log line: the agent serves on without metrics and tries
again every ``RETRY_S``. Only imported when ``metrics.listen`` is set.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent import metrics_models
from agent.contract import (
    STATE_PHASES,
    THROTTLE_FLAGS,
    UPDATE_OUTCOMES,
    Figures,
    MachineDoc,
    OutputsDoc,
    ShadowDoc,
    StatePhase,
)
from agent.metrics_models import PipelineFigures, UpdateFigures
from agent.pipeline import Result, Stats

log = logging.getLogger(__name__)

# Capture → result and invoke, 1 ms to 2 s (a Coral invoke is ~2-20 ms, a CPU one on a
# Pi 10-500 ms; beyond 2 s the runtime's invoke_timeout_ms steps in by default).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
RETRY_S = 30.0  # a port in use: try to bind again this often
REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing is dropped after this long
MAX_CLIENTS = 4  # connections served at once; more are closed at once
REQUEST_DEADLINE_S = 30.0  # a connection's whole life: a scrape takes milliseconds


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reads: the figures telemetry sends, taken together."""

    agent_version: str
    inference: Stats | None  # None: no model serving
    phase: StatePhase
    outcomes: Mapping[str, int]  # terminal update outcomes since start
    figures: Figures  # outbox and MQTT
    machine: MachineDoc  # the latest probe sample; empty before the first
    # several models: every pipeline's figures and each model's update, labelled (then
    # ``inference``, ``phase`` and ``outcomes`` are not exposed unlabelled)
    pipelines: tuple[PipelineFigures, ...] = ()
    models: Mapping[str, UpdateFigures] = field(default_factory=dict)
    shadows: Mapping[str, ShadowDoc] = field(default_factory=dict)  # both shapes
    outputs: Mapping[str, OutputsDoc] = field(default_factory=dict)  # both shapes


def split_listen(listen: str) -> tuple[str, int, socket.AddressFamily]:
    """``metrics.listen`` (validated by the config) as host, port and address family."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    version = ipaddress.ip_address(host).version
    return host, int(port), socket.AF_INET6 if version == 6 else socket.AF_INET


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _update(snapshot: Snapshot) -> Iterable[Metric]:
    phase = GaugeMetricFamily(
        "edge_agent_update_phase",
        "The update phase, or the last update's outcome (1 for the current one).",
        labels=["phase"],
    )
    for name in STATE_PHASES:
        phase.add_metric([name], float(name == snapshot.phase))
    yield phase
    outcomes = CounterMetricFamily(
        "edge_agent_update_outcomes", "Updates ended since start, by outcome.", labels=["outcome"]
    )
    for outcome in UPDATE_OUTCOMES:
        outcomes.add_metric([outcome], snapshot.outcomes.get(outcome, 0))
    yield outcomes


def _link(figures: Figures) -> Iterable[Metric]:
    outbox, mqtt = figures["outbox"], figures["mqtt"]
    yield _gauge(
        "edge_agent_outbox_messages", "Messages kept, not yet acknowledged.", outbox["depth"]
    )
    yield _gauge("edge_agent_outbox_bytes", "Size of the kept messages.", outbox["bytes"])
    dropped = CounterMetricFamily(
        "edge_agent_outbox_dropped",
        "Messages lost: full (the outbox's size cap, oldest first), overflow (the outbox "
        "kept failing).",
        labels=["reason"],
    )
    dropped.add_metric(["full"], outbox["dropped"])
    dropped.add_metric(["overflow"], outbox["overflow"])
    yield dropped
    yield _gauge(
        "edge_agent_mqtt_connected", "1 while connected to the broker.", float(mqtt["connected"])
    )
    yield _counter("edge_agent_mqtt_connects", "Connections made to the broker.", mqtt["connects"])
    yield _counter(
        "edge_agent_mqtt_rejected", "Messages the broker refused (not retried).", mqtt["rejected"]
    )


def _machine(machine: MachineDoc) -> Iterable[Metric]:
    """The probe's figures; a figure the board does not have is absent, never 0."""
    ratios = (
        ("cpu_pct", "edge_agent_system_cpu_usage_ratio", "CPU busy, all cores (0-1)."),
        ("mem_pct", "edge_agent_system_memory_usage_ratio", "Memory in use (0-1)."),
    )
    for key, name, doc in ratios:
        value = machine.get(key)
        if isinstance(value, (int, float)):
            yield _gauge(name, doc, value / 100.0)
    sizes = (
        ("mem_available_mb", "edge_agent_system_memory_available_bytes", "Memory available."),
        ("disk_free_mb", "edge_agent_store_free_bytes", "Free space where models are kept."),
    )
    for key, name, doc in sizes:
        value = machine.get(key)
        if isinstance(value, (int, float)):
            yield _gauge(name, doc, round(value * 2**20))
    temperatures = (
        ("temp_c", "edge_agent_cpu_temperature_celsius", "SoC temperature."),
        ("tpu_temp_c", "edge_agent_tpu_temperature_celsius", "Hottest PCIe/M.2 Edge TPU."),
    )
    for key, name, doc in temperatures:
        value = machine.get(key)
        if isinstance(value, (int, float)):
            yield _gauge(name, doc, value)
    freq = machine.get("cpu_freq_mhz")
    if isinstance(freq, (int, float)):
        yield _gauge("edge_agent_cpu_frequency_hertz", "Current CPU frequency.", freq * 1e6)
    rssi = machine.get("wifi_rssi_dbm")
    if isinstance(rssi, (int, float)):
        yield _gauge("edge_agent_wifi_signal_dbm", "Wi-Fi signal level (RSSI).", rssi)
    throttled = machine.get("throttled")
    if throttled is not None:
        flags = GaugeMetricFamily(
            "edge_agent_throttled",
            "Firmware flags set now (get_throttled): 1 set, 0 clear.",
            labels=["flag"],
        )
        for flag in THROTTLE_FLAGS:
            flags.add_metric([flag], float(flag in throttled["now"]))
        yield flags


def families(snapshot: Snapshot) -> list[Metric]:
    """The metric families of one snapshot (no I/O); absent figures make no sample."""
    found: list[Metric] = [
        InfoMetricFamily("edge_agent", "This agent.", value={"version": snapshot.agent_version})
    ]
    if snapshot.pipelines or snapshot.models:  # several models: labelled
        found.extend(metrics_models.pipelines(snapshot.pipelines))
        found.extend(metrics_models.updates(snapshot.models))
    else:
        if snapshot.inference is not None:
            found.extend(metrics_models.inference([((), snapshot.inference)], []))
        found.extend(_update(snapshot))
    found.extend(metrics_models.shadows(snapshot.shadows))
    found.extend(metrics_models.outputs(snapshot.outputs))
    found.extend(_link(snapshot.figures))
    found.extend(_machine(snapshot.machine))
    return found


class _SnapshotCollector(Collector):
    """Reads a snapshot per scrape; a failing read is logged and gives no families."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        try:
            return families(self.read())
        except Exception as exc:  # a bug here must not break the scrape's other metrics
            log.warning("metrics: reading the agent's figures failed: %r", exc)
            return []


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # StreamRequestHandler sets it on the socket

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks for the host's FQDN: a DNS lookup; not wanted here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # busy: close, do not queue
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(REQUEST_DEADLINE_S, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


def _cut(sock: socket.socket) -> None:
    """End a connection past its deadline (its thread's read returns, the place frees)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Metrics:
    """The histograms, the registry and the endpoint: build, start(), stop()."""

    def __init__(
        self, listen: str, read: Callable[[], Snapshot], per_pipeline: bool = False
    ) -> None:
        """``per_pipeline``: several models; the histograms carry ``pipeline`` and
        ``model`` labels (``observing`` names them)."""
        self.listen = listen
        labels = ("pipeline", "model") if per_pipeline else ()
        self.address = split_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "edge_agent_inference_latency_seconds",
            "Capture to result, per result.",
            labelnames=labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.invoke = Histogram(
            "edge_agent_inference_invoke_seconds",
            "The interpreter's invoke alone, per result.",
            labelnames=labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(read))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: _Server | None = None
        self._serve: threading.Thread | None = None
        self._retrying: threading.Thread | None = None
        self._stop = threading.Event()

    def observing(
        self, on_result: Callable[[Result], None], pipeline: str | None = None, model: str = ""
    ) -> Callable[[Result], None]:
        """``on_result`` that observes each result first; with ``per_pipeline``, into
        the series of ``pipeline`` and ``model``."""
        latency, invoke = self.latency, self.invoke
        if pipeline is not None:
            latency, invoke = latency.labels(pipeline, model), invoke.labels(pipeline, model)

        def both(result: Result) -> None:
            latency.observe(result.latency_ms / 1000.0)
            invoke.observe(result.infer_ms / 1000.0)
            on_result(result)

        return both

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen on ``metrics.listen``; when that fails, log one line and retry every
        ``RETRY_S`` in a thread (the agent goes on without metrics meanwhile)."""
        if self._bind(first=True):
            return
        self._retrying = threading.Thread(target=self._retry, name="metrics-bind", daemon=True)
        self._retrying.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop retrying and serving; the port is free when this returns."""
        self._stop.set()
        if self._retrying is not None:  # first: it may be binding just now
            self._retrying.join(timeout)
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._serve is not None:
            self._serve.join(timeout)

    def _retry(self) -> None:
        while not self._stop.wait(RETRY_S):
            if self._bind(first=False):
                return

    def _bind(self, first: bool) -> bool:
        host, port, family = self.address
        try:
            server = _Server((host, port), family)
        except OSError as exc:
            if first:
                log.error(
                    "metrics.listen %s: cannot listen (%s); serving on without metrics, "
                    "retrying every %g s",
                    self.listen,
                    exc.strerror or exc,
                    RETRY_S,
                )
            return False
        server.set_app(make_wsgi_app(self.registry))
        self._server = server
        self._serve = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._serve.start()
        log.info("metrics: serving http://%s/metrics", self.listen)
        return True
