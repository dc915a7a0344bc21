"""The test broker itself (tests/broker.py): what other MQTT tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker import ConnectFailed, Mosquitto, subscriber


def test_plain_broker_restarts_on_the_same_port_and_collectors_resubscribe(
    broker: Mosquitto,
) -> None:
    with subscriber(broker.url, ["t/#"]) as sink:
        assert sink.suback == ["Granted QoS 1"]
        url = broker.url
        broker.restart()
        assert broker.url == url
        assert sink.wait_connected(5) and sink.connects == 2
        with subscriber(broker.url, []) as source:
            assert source.publish("t/1", b"x") == "Success"
        assert sink.wait_for_topic("t/1").payload == b"x"


def test_persistent_broker_keeps_retained_messages_across_a_restart(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "mosquitto", persistence=True) as broker:
        with subscriber(broker.url, []) as source:
            assert source.publish("t/desired", b"v2", retain=True) == "No matching subscribers"
        broker.restart()
        with subscriber(broker.url, ["t/desired"]) as late:
            assert late.wait_for_topic("t/desired").retain
    assert (tmp_path / "mosquitto" / "mosquitto.db").is_file()


def test_killed_broker_refuses_connections_until_started(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        broker.kill()
        assert not broker.running
        with pytest.raises(ConnectFailed):
            subscriber(broker.url, [], timeout=1)
        broker.start()
        with subscriber(broker.url, ["t"]) as again:
            assert again.suback == ["Granted QoS 1"]
    finally:
        broker.stop()
    assert "mosquitto version 2" in broker.log_text()


def test_broker_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    broken = Mosquitto.with_config(tmp_path / "m", "no_such_option 1\n", tls_port=1)
    expected = r"(?s)exited with \d+ at start; log tail:.*Unknown configuration variable"
    with pytest.raises(RuntimeError, match=expected):
        broken.start()
