"""Telemetry, the outbox and commands in one process, against a real mosquitto."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.commands import CommandError, Commands
from agent.config import MqttConfig, ResultsConfig
from agent.errors import ConfigError
from agent.mqtt import Incoming, read_password
from agent.outbox import Outbox
from agent.pipeline import Result
from agent.runtime.adapters import Detection, Output
from agent.sysinfo import SystemProbe
from agent.telemetry import ResultGate, Telemetry
from tests.broker import Mosquitto, Received, SecureBroker, subscriber, wait_until

DEV = "dev-t"


def _docs(messages: list[Received]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages]


def _telemetry(
    tmp_path: Path,
    url: str | None,
    *,
    results: ResultsConfig | None = None,
    commands: Commands | None = None,
    **mqtt: Any,
) -> Telemetry:
    handlers = {f"edge/{DEV}/cmd/+": commands.submit} if commands else None
    return Telemetry(
        DEV,
        Outbox(tmp_path / "outbox.sqlite", 10**7).open(),
        MqttConfig(url=url, reconnect_max_s=1, **mqtt),
        results or ResultsConfig(publish="every"),
        interval_s=0.2,
        probe=SystemProbe(tmp_path),
        stats=lambda: {"fps": 12.5, "latency_ms_p95": 7.0},
        handlers=handlers,
    )


@pytest.fixture
def running(tmp_path: Path, broker: Mosquitto) -> Iterator[Telemetry]:
    telemetry = _telemetry(tmp_path, broker.url)
    telemetry.start()
    yield telemetry
    telemetry.stop()


def test_online_status_is_retained_and_telemetry_carries_the_figures(
    running: Telemetry, broker: Mosquitto
) -> None:
    assert running.link is not None and running.link.connected.wait(5)
    assert wait_until(lambda: running.counters.acked >= 1)  # the status is at the broker
    watcher = subscriber(broker.url, [f"edge/{DEV}/#"])
    try:
        status = watcher.wait_for_topic(f"edge/{DEV}/status")
        assert status.retain and json.loads(status.payload)["state"] == "online"
        watcher.wait_for(lambda ms: sum(m.topic.endswith("/telemetry") for m in ms) >= 2)
        docs = _docs(watcher.messages(f"edge/{DEV}/telemetry"))
    finally:
        watcher.close()
    first, second = docs[0], docs[1]
    assert first["schema"] == 1 and second["seq"] == first["seq"] + 1
    assert first["id"] != second["id"] and second["ts"] >= first["ts"]
    for key in ("cpu_pct", "load", "mem_pct", "rss_mb", "disk_free_mb", "uptime_s"):
        assert first[key] is not None, key
    assert first["rss_mb"] > 10 and len(first["load"]) == 3
    assert first["inference"] == {"fps": 12.5, "latency_ms_p95": 7.0}
    assert first["outbox"]["depth"] >= 0 and first["mqtt"]["protocol"] == "5"


def test_clean_stop_leaves_a_retained_offline_status(tmp_path: Path, broker: Mosquitto) -> None:
    telemetry = _telemetry(tmp_path, broker.url)
    telemetry.start()
    assert telemetry.link is not None and telemetry.link.connected.wait(5)
    telemetry.stop()
    late = subscriber(broker.url, [f"edge/{DEV}/status"])  # joins afterwards: retained only
    try:
        doc = json.loads(late.wait_for_topic(f"edge/{DEV}/status").payload)
    finally:
        late.close()
    assert doc["state"] == "offline" and doc["reason"] == "stopped"


def test_messages_recorded_while_the_broker_is_down_arrive_in_order(
    tmp_path: Path, broker: Mosquitto
) -> None:
    broker.stop()
    telemetry = _telemetry(tmp_path, broker.url)
    telemetry.start()
    try:
        for i in range(300):
            telemetry.event("tick", {"i": i})
        assert telemetry.flush(5)
        assert telemetry.depth() >= 300  # kept, and nothing sent
        broker.start()
        watcher = subscriber(broker.url, [f"edge/{DEV}/events"])
        try:
            watcher.wait_for(
                lambda ms: any(json.loads(m.payload).get("i") == 299 for m in ms), timeout=15
            )
            ticks = [d["i"] for d in _docs(watcher.messages()) if d["event"] == "tick"]
        finally:
            watcher.close()
        assert ticks == list(range(300))
        assert wait_until(lambda: telemetry.depth() == 0, 5)
    finally:
        telemetry.stop()


def test_qos0_results_are_not_kept_while_disconnected(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"mqtt://127.0.0.1:{sock.getsockname()[1]}"
    telemetry = _telemetry(tmp_path, url, results=ResultsConfig(publish="every", qos=0))
    telemetry.start()
    try:
        for i in range(5):
            telemetry.result(_result(i, "red"))
        assert telemetry.flush(5)
        assert wait_until(lambda: telemetry.counters.unsent == 5)
        assert telemetry.outbox.stats().depth == 0 or all(
            m.topic.endswith(("/telemetry", "/events")) for m in telemetry.outbox.pending(0, 100)
        )
    finally:
        telemetry.stop()


def _result(frame: int, *labels: str, model: str = "m", version: int = 1) -> Result:
    output = Output(
        "detection",
        detections=[Detection(0, label, 0.9, (1.0, 2.0, 3.0, 4.0)) for label in labels],
    )
    return Result(frame, 0.0, model, version, "cpu", 1.0, 1.0, output)


def test_result_gate_on_change_interval_every_off() -> None:
    on_change = ResultGate(ResultsConfig(publish="on_change"))
    seen = [
        on_change.admit(_result(i, *labels))
        for i, labels in enumerate(
            [("cat",), ("cat",), ("cat", "dog"), ("dog", "cat"), (), ("cat",)]
        )
    ]
    assert seen == [True, False, True, False, True, True]
    assert on_change.admit(_result(9, "cat", version=2))  # a new model is a change
    now = [0.0]
    interval = ResultGate(ResultsConfig(publish="interval", interval_s=1), clock=lambda: now[0])
    admitted = []
    for step in range(25):
        now[0] = step * 0.1
        admitted.append(interval.admit(_result(step, "cat")))
    assert admitted.count(True) == 3  # at 0.0, 1.0, 2.0
    assert all(ResultGate(ResultsConfig(publish="every")).admit(_result(i)) for i in range(3))
    assert not ResultGate(ResultsConfig(publish="off")).admit(_result(0, "cat"))


# -- commands ------------------------------------------------------------------------


@pytest.fixture
def commanded(tmp_path: Path, broker: Mosquitto) -> Iterator[tuple[Telemetry, Commands]]:
    calls: list[dict[str, Any]] = []
    gate = threading.Event()

    def ping(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(args)
        return {"pong": True, "echo": args.get("x")}

    def rollback(args: dict[str, Any]) -> dict[str, Any]:
        raise CommandError("no earlier release in the store")

    def crash(args: dict[str, Any]) -> dict[str, Any]:
        gate.set()
        raise ZeroDivisionError("boom")

    holder: list[Telemetry] = []
    commands = Commands(
        {"ping": ping, "rollback": rollback, "crash": crash},
        lambda topic, body, corr: holder[0].reply(topic, body, corr),
        reply_topic=f"edge/{DEV}/reply",
        max_bytes=256,
    )
    telemetry = _telemetry(tmp_path, broker.url, commands=commands)
    holder.append(telemetry)
    commands.start()
    telemetry.start()
    assert telemetry.link is not None and telemetry.link.connected.wait(5)
    # the cmd/+ subscription goes out before the status; once that is acknowledged it holds
    assert wait_until(lambda: telemetry.counters.acked >= 1)
    yield telemetry, commands
    commands.stop()
    telemetry.stop()


def _ask(
    broker: Mosquitto, name: str, payload: bytes, *, response_topic: str | None = None
) -> dict[str, Any]:
    """Send a command and return the one reply it gets."""
    reply_topic = response_topic or f"edge/{DEV}/reply"
    asker = subscriber(broker.url, [reply_topic])
    try:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = b"corr-42"
        before = len(asker.messages())
        asker.publish(f"edge/{DEV}/cmd/{name}", payload, properties=props)
        got = asker.wait_for(lambda ms: len(ms) > before)[before]
        if response_topic is not None:
            assert got.properties is not None
            assert got.properties.CorrelationData == b"corr-42"
        doc: dict[str, Any] = json.loads(got.payload)
        return doc
    finally:
        asker.close()


def test_commands_reply_on_the_response_topic_or_the_device_reply_topic(
    commanded: tuple[Telemetry, Commands], broker: Mosquitto
) -> None:
    doc = _ask(broker, "ping", b'{"id": "r1", "x": 5}', response_topic="asker/7/replies")
    assert doc["ok"] and doc["result"] == {"pong": True, "echo": 5} and doc["request_id"] == "r1"
    assert doc["command"] == "ping" and doc["schema"] == 1 and "seq" in doc
    doc = _ask(broker, "ping", b"")
    assert doc["ok"] and doc["result"]["pong"]


@pytest.mark.parametrize(
    ("name", "payload", "error"),
    [
        ("reboot", b"{}", "unknown command 'reboot'; known: crash, ping, rollback"),
        ("ping", b"{not json", "payload: not valid JSON: Expecting property name"),
        ("ping", b"[1, 2]", "payload: not a JSON object but an array"),
        ("ping", b"\xff\xfe", "payload: not UTF-8"),
        ("ping", b'{"id": 1, "n": NaN}', "payload: not valid JSON: NaN is not a JSON number"),
        (
            "ping",
            b'{"x": "' + b"a" * 300 + b'"}',
            "payload too large: 309 bytes (mqtt.command_max_bytes is 256)",
        ),
        ("rollback", b"{}", "no earlier release in the store"),
        ("crash", b"{}", "internal error: ZeroDivisionError: boom"),
    ],
)
def test_bad_commands_get_an_error_reply_and_the_agent_keeps_serving(
    commanded: tuple[Telemetry, Commands],
    broker: Mosquitto,
    name: str,
    payload: bytes,
    error: str,
) -> None:
    doc = _ask(broker, name, payload)
    assert doc["ok"] is False and doc["command"] == name
    assert doc["error"].startswith(error), doc["error"]
    assert _ask(broker, "ping", b"{}")["ok"]  # still answering


# -- settings ------------------------------------------------------------------------


def test_password_comes_from_a_file_or_a_systemd_credential(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    cfg = MqttConfig(url="mqtt://h", username="u", password_file=secret)
    assert read_password(cfg) == "s3cret"
    cred = MqttConfig(url="mqtt://h", username="u", password_credential="mqtt-password")
    assert read_password(cred, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "s3cret"
    with pytest.raises(ConfigError, match=r"mqtt.password_credential: \$CREDENTIALS_DIRECTORY"):
        read_password(cred, {})
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read"):
        read_password(MqttConfig(url="mqtt://h", username="u", password_file=tmp_path / "no"))


def test_messages_the_broker_refuses_are_counted_and_do_not_block_the_outbox(
    tmp_path: Path, secure_broker: SecureBroker
) -> None:
    issued = secure_broker.client_cert("dev-a")  # dev-a's certificate, dev-t's topics
    telemetry = _telemetry(
        tmp_path,
        secure_broker.broker.tls_url,
        ca=secure_broker.ca.cert_path,
        cert=issued.cert,
        key=issued.key,
    )
    telemetry.start()
    try:
        for i in range(50):
            telemetry.event("tick", {"i": i})
        assert wait_until(lambda: telemetry.counters.rejected >= 50, 10)
        assert wait_until(lambda: telemetry.depth() == 0, 5)  # refused is settled, not retried
    finally:
        telemetry.stop()


class _V311OnlyProxy:
    """A TCP relay to a real broker that answers an MQTT 5 CONNECT the way a 3.1.1-only
    broker does (CONNACK, return code 1: unacceptable protocol version) and relays the rest."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = client.recv(65536)  # the CONNECT: fixed header, length, "\0\4MQTT", level
        level = first[first.index(b"MQTT") + 4]
        if level == 5:
            self.refused += 1
            client.sendall(b"\x20\x02\x00\x01")
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(first)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self._stop.set()
        self.server.close()


def test_a_broker_without_mqtt5_gets_mqtt_3_1_1(tmp_path: Path, broker: Mosquitto) -> None:
    proxy = _V311OnlyProxy(broker.port)
    watcher = subscriber(broker.url, [f"edge/{DEV}/events"])
    telemetry = _telemetry(tmp_path, f"mqtt://127.0.0.1:{proxy.port}")
    telemetry.start()
    try:
        telemetry.event("hello")
        watcher.wait_for(lambda ms: len(ms) >= 1, timeout=15)
        assert telemetry.link is not None and telemetry.link.protocol == "3.1.1"
        assert proxy.refused == 1
        assert json.loads(watcher.messages()[0].payload)["event"] == "hello"
    finally:
        telemetry.stop()
        watcher.close()
        proxy.close()


def test_json_that_breaks_the_parser_still_gets_one_error_reply() -> None:
    replies: list[dict[str, Any]] = []
    commands = Commands(
        {"ping": lambda args: {"pong": True}},
        lambda topic, body, corr: replies.append(dict(body)),
        reply_topic="edge/d/reply",
        max_bytes=100_000,
    )
    for payload in (b"[" * 50_000, b'{"n": ' + b"9" * 5000 + b"}"):
        commands.submit(Incoming("edge/d/cmd/ping", payload, None, None))
    assert [r["ok"] for r in replies] == [False, False]
    assert [r["error"].split(":")[:2] for r in replies] == [
        ["payload", " nested 50000 deep, over the limit of 32"],
        ["payload", " not valid JSON"],
    ]


def test_backoff_survives_any_number_of_attempts() -> None:
    from agent.backoff import backoff_delay

    assert 0.5 * 60 <= backoff_delay(100_000, 0.5, 60, low=0.5) <= 60


def _capped(tmp_path: Path, url: str, cap: int, drop_report_s: float) -> Telemetry:
    return Telemetry(
        DEV,
        Outbox(tmp_path / "outbox.sqlite", cap).open(),
        MqttConfig(url=url, reconnect_max_s=1),
        ResultsConfig(publish="every"),
        interval_s=3600,
        drop_report_s=drop_report_s,
    )


def _stored(telemetry: Telemetry) -> list[tuple[str, dict[str, Any]]]:
    return [
        (m.topic.rsplit("/", 1)[1], json.loads(m.payload))
        for m in telemetry.outbox.pending(0, 100_000)
    ]


def test_a_full_outbox_drops_results_first_keeps_events_and_state_and_says_so_once(
    tmp_path: Path, broker: Mosquitto
) -> None:
    broker.stop()
    telemetry = _capped(tmp_path, broker.url, 40_000, drop_report_s=60)
    telemetry.start()
    try:
        telemetry.state({"phase": "idle"})
        for i in range(20):
            telemetry.event("tick", {"i": i})
        assert telemetry.flush(5)
        for batch in range(6):  # six batches, each over the cap: six drops
            for i in range(100):
                telemetry.result(_result(batch * 100 + i, "red"))
            assert telemetry.flush(5)
        assert telemetry.flush(5)  # the outbox_dropped event, recorded by the last step
        stored = _stored(telemetry)
        ticks = [doc["i"] for stream, doc in stored if doc.get("event") == "tick"]
        assert ticks == list(range(20)) and [s for s, _ in stored].count("state") == 1
        reports = [doc for _, doc in stored if doc.get("event") == "outbox_dropped"]
        assert len(reports) == 1  # rate-limited: one a minute, however many drops
        assert set(reports[0]["dropped"]) == {"results"} and reports[0]["dropped"]["results"] > 0
        total = telemetry.outbox.stats().dropped
        assert total > reports[0]["dropped"]["results"]  # later drops wait for the next one
        broker.start()
        watcher = subscriber(broker.url, [f"edge/{DEV}/events"])
        try:
            watcher.wait_for(
                lambda ms: any(json.loads(m.payload)["event"] == "outbox_dropped" for m in ms),
                timeout=15,
            )
            sent = [d for d in _docs(watcher.messages()) if d["event"] == "outbox_dropped"]
        finally:
            watcher.close()
        assert sent[0]["dropped"] == reports[0]["dropped"] and sent[0]["total"] > 0
    finally:
        telemetry.stop()


def test_drops_between_reports_are_added_to_the_next_report(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"mqtt://127.0.0.1:{sock.getsockname()[1]}"
    telemetry = _capped(tmp_path, url, 20_000, drop_report_s=0.5)
    telemetry.start()
    try:
        for batch in range(4):
            for i in range(100):
                telemetry.result(_result(batch * 100 + i, "red"))
            assert telemetry.flush(5)

        def reported() -> int:
            docs = [doc for _, doc in _stored(telemetry) if doc.get("event") == "outbox_dropped"]
            return sum(sum(doc["dropped"].values()) for doc in docs)

        # every drop is reported, in at most one event per half second
        assert wait_until(lambda: reported() == telemetry.outbox.stats().dropped, 5)
    finally:
        telemetry.stop()
