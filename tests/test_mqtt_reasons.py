"""MQTT connection failures say why: ``agent.mqtt_reasons.explain`` by table, then the
agent's ``Link`` against real mosquitto brokers (nothing listening, a password broker,
a mutual-TLS broker) with the warning it logs."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.mqtt import Link, Will
from agent.mqtt_reasons import explain
from tests.broker import Mosquitto, SecureBroker, free_port, wait_until


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    error.verify_code = code
    error.verify_message = message
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason)
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("cause", "tls", "starts"),
    [
        (ConnectionRefusedError(111, "Connection refused"), False, "connection refused"),
        (socket.gaierror(-2, "Name or service not known"), False, "DNS: the host name cannot"),
        (TimeoutError("timed out"), False, "timed out"),
        (ConnectionResetError(104, "reset"), True, "connection reset by the broker (mqtts://"),
        (OSError(113, "No route to host"), False, "unreachable: No route to host"),
        (_verify_error(62, "Hostname mismatch"), True, "TLS: the broker's certificate does not"),
        (_verify_error(10, "certificate has expired"), True, "TLS: the broker's certificate has"),
        (_verify_error(7, "certificate signature failure"), True, "TLS: certificate verify"),
        (_ssl_error("WRONG_VERSION_NUMBER"), True, "TLS: the port does not speak TLS"),
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), True, "TLS: the broker requires a"),
        (_ssl_error("SOMETHING_ELSE"), True, "TLS: handshake failed (SOMETHING_ELSE)"),
        (ReasonCode(PacketTypes.CONNACK, identifier=134), False, "authentication failed: bad"),
        (ReasonCode(PacketTypes.CONNACK, identifier=135), False, "authentication failed: not"),
        (138, False, "authentication failed: this client is banned"),
        (133, False, "the broker refused the client id"),
        (ReasonCode(PacketTypes.CONNACK, identifier=151), False, "the broker refused the conn"),
        (None, True, "the broker closed the TLS connection before answering: it may require"),
        (None, False, "the broker closed the connection before answering: is this a TLS"),
    ],
)
def test_explain_names_the_kind_of_failure_first(cause: Any, tls: bool, starts: str) -> None:
    assert explain(cause, tls=tls).startswith(starts), explain(cause, tls=tls)


# -- against real brokers -------------------------------------------------------------------


def _link(config: MqttConfig) -> Link:
    return Link(
        config,
        "reasons-test",
        Will("edge/reasons-test/status", b"offline"),
        on_connect=lambda resumed: None,
        on_disconnect=lambda: None,
        on_ack=lambda mid, code, name: None,
        on_message=lambda message: None,
    )


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, "agent.mqtt")
    yield caplog


def _first_line(link: Link, caplog: pytest.LogCaptureFixture) -> str:
    link.start()
    try:
        assert wait_until(lambda: bool(caplog.records), 10), "nothing logged"
        assert not link.connected.is_set()
    finally:
        link.stop()
    return caplog.records[0].getMessage()


def test_nothing_listening_is_logged_as_connection_refused(
    warnings: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    line = _first_line(_link(MqttConfig(url=f"mqtt://127.0.0.1:{port}")), warnings)
    assert line == (
        f"cannot connect to 127.0.0.1:{port}: connection refused: nothing listens there "
        "(broker down or wrong port?); retrying"
    )


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto whose only listener wants user alice, password secret."""
    port = free_port()
    passwords = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "alice", "secret"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    text = "\n".join(
        [
            "user root",
            "per_listener_settings true",
            "log_dest stderr",
            "persistence false",
            f"listener {port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {passwords}",
            "",
        ]
    )
    with Mosquitto.with_config(tmp_path / "mosquitto", text, tls_port=port) as broker:
        yield broker


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_wrong_password_is_logged_as_an_authentication_failure(
    password_broker: Mosquitto,
    warnings: pytest.LogCaptureFixture,
    tmp_path: Path,
    protocol: Any,
) -> None:
    wrong = tmp_path / "password"
    wrong.write_text("not-the-secret\n")
    port = password_broker.tls_port  # the plain listener the config names
    config = MqttConfig(
        url=f"mqtt://127.0.0.1:{port}",
        username="alice",
        password_file=wrong,
        protocol=protocol,
    )
    line = _first_line(_link(config), warnings)
    assert line.startswith(f"cannot connect to 127.0.0.1:{port}: authentication failed: ")
    assert warnings.records[0].levelno == logging.ERROR  # it will not fix itself


def test_tls_without_the_required_client_certificate_says_so(
    secure_broker: SecureBroker, warnings: pytest.LogCaptureFixture
) -> None:
    config = MqttConfig(url=secure_broker.broker.tls_url, ca=secure_broker.ca.cert_path)
    line = _first_line(_link(config), warnings)
    assert "it may require a client certificate (set mqtt.cert and mqtt.key)" in line


def test_tls_to_a_host_name_the_certificate_lacks_says_so(
    secure_broker: SecureBroker, warnings: pytest.LogCaptureFixture
) -> None:
    port = secure_broker.broker.tls_port
    config = MqttConfig(url=f"mqtts://localhost:{port}", ca=secure_broker.ca.cert_path)
    line = _first_line(_link(config), warnings)
    assert line.startswith(
        f"cannot connect to localhost:{port}: TLS: the broker's certificate does not name"
    )
