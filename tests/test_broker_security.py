"""The broker's security, proven on a real mosquitto with real mutual TLS.

Devices and operators are their client certificates; the ACL from ``edge-fleet acl``
keeps each device to its own topics. mosquitto 2.0.11 answers a denied QoS 1
PUBLISH with PUBACK "Not authorized" (0x87), drops a denied QoS 0 one silently, and
grants a SUBSCRIBE to a forbidden topic ("Granted QoS 1") but never delivers a
message the subscriber may not read. "Nothing arrived" is proven with a marker: a
later message on the same path that did arrive.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet import cli
from agent.fleet.acl import render_acl
from tests.broker import (
    ClientTLS,
    Collector,
    Mosquitto,
    SecureBroker,
    connect_outcome,
    free_port,
    tls_for,
)
from tests.certs import TestCA

PROVISIONING = Path(__file__).resolve().parent.parent / "provisioning" / "mosquitto"
DENIED = "Not authorized"


def topics_of(collector: Collector) -> set[str]:
    return {m.topic for m in collector.messages()}


# -- who gets in -----------------------------------------------------------------------


def test_client_without_certificate_is_refused(secure_broker: SecureBroker) -> None:
    outcome = connect_outcome(secure_broker.broker.tls_url, tls=secure_broker.tls(None))
    assert outcome.startswith("failed"), outcome
    assert "peer did not return a certificate" in secure_broker.broker.log_text()
    # the same listener lets a certified device in: the refusal is about the certificate
    assert connect_outcome(secure_broker.broker.tls_url, tls=secure_broker.tls("dev-a")) == (
        "connected"
    )


def test_certificate_from_another_ca_is_refused(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    stranger = TestCA(tmp_path / "stranger-pki", "stranger CA").issue("dev-a")
    tls = tls_for(secure_broker.ca.cert_path, stranger)  # trusts the broker, not trusted by it
    outcome = connect_outcome(secure_broker.broker.tls_url, tls=tls)
    assert outcome.startswith("failed"), outcome
    assert "certificate verify failed" in secure_broker.broker.log_text()


# -- what a device may publish -----------------------------------------------------------


def test_device_telemetry_reaches_the_admin(secure_broker: SecureBroker) -> None:
    with (
        secure_broker.client("fleet", ["edge/#"]) as fleet,
        secure_broker.client("dev-a") as dev_a,
    ):
        payload = json.dumps({"schema": 1, "ts": 1.0, "cpu": 12.5}).encode()
        assert dev_a.publish("edge/dev-a/telemetry", payload) == "Success"
        received = fleet.wait_for_topic("edge/dev-a/telemetry")
    assert received.payload == payload


def test_device_cannot_publish_under_another_devices_topics(secure_broker: SecureBroker) -> None:
    own = [f"edge/dev-b/{name}" for name in ("status", "state", "telemetry", "events", "reply")]
    with (
        secure_broker.client("fleet", ["edge/#"]) as fleet,
        secure_broker.client("dev-a") as dev_a,
    ):
        for topic in own:
            assert dev_a.publish(topic, b"forged", qos=1) == DENIED, topic
        assert dev_a.publish("edge/dev-b/results", b"forged", qos=0) == "Success"  # no ack
        assert dev_a.publish("edge/dev-a/events", b"marker") == "Success"
        fleet.wait_for_topic("edge/dev-a/events")
    assert topics_of(fleet) == {"edge/dev-a/events"}


def test_device_cannot_read_another_devices_commands(secure_broker: SecureBroker) -> None:
    with (
        secure_broker.client("fleet") as fleet,
        secure_broker.client("dev-a", ["edge/dev-b/cmd/#", "edge/#", "edge/dev-a/cmd/#"]) as dev_a,
    ):
        # 2.0.11 grants the subscription and filters on delivery; refusing it is fine too
        assert dev_a.suback[0] in ("Granted QoS 1", DENIED)
        assert dev_a.suback[2] == "Granted QoS 1"
        for topic in ("edge/dev-b/cmd/ping", "edge/dev-b/desired", "edge/dev-b/telemetry"):
            assert fleet.publish(topic, b"{}") in ("Success", "No matching subscribers")
        assert fleet.publish("edge/dev-a/cmd/ping", b"{}") == "Success"
        dev_a.wait_for_topic("edge/dev-a/cmd/ping")
    assert topics_of(dev_a) == {"edge/dev-a/cmd/ping"}


def test_device_reads_its_groups_desired_state_and_no_other_group(
    secure_broker: SecureBroker,
) -> None:
    with secure_broker.client("fleet") as fleet:
        for topic in ("edge/groups/door/desired", "edge/groups/yard/desired", "edge/dev-a/desired"):
            desired = {"model": "person-detector", "version": 2, "for": topic}
            assert fleet.publish(topic, json.dumps(desired), retain=True) in (
                "Success",
                "No matching subscribers",
            )
    # Retained messages come in the order of the filters: the last one is the marker.
    filters = ["edge/groups/yard/desired", "edge/groups/+/desired", "edge/dev-a/desired"]
    with secure_broker.client("dev-a", filters) as dev_a:
        dev_a.wait_for_topic("edge/dev-a/desired")
        door = dev_a.messages("edge/groups/door/desired")
    assert topics_of(dev_a) == {"edge/groups/door/desired", "edge/dev-a/desired"}
    assert door and door[0].retain
    assert json.loads(door[0].payload)["for"] == "edge/groups/door/desired"


def test_device_reads_its_own_and_its_groups_per_model_and_shadow_topics_only(
    secure_broker: SecureBroker,
) -> None:
    mine = [
        "edge/dev-a/desired/people",
        "edge/dev-a/shadow/people",
        "edge/groups/door/desired/people",
        "edge/groups/door/shadow/people",
    ]
    others = ["edge/groups/yard/desired/people", "edge/groups/yard/shadow/people"]
    others += ["edge/dev-b/desired/people", "edge/dev-b/shadow/people"]
    with secure_broker.client("fleet") as fleet:
        for topic in others + mine:
            doc = {"model": "people", "version": 2, "for": topic}
            sent = fleet.publish(topic, json.dumps(doc), retain=True)
            assert sent in ("Success", "No matching subscribers")
    filters = ["edge/groups/+/desired/+", "edge/groups/+/shadow/+", "edge/+/desired/+"]
    with secure_broker.client("dev-a", [*filters, "edge/dev-a/shadow/+"]) as dev_a:
        dev_a.wait_for_topic("edge/dev-a/shadow/people")
        time.sleep(0.3)
        for topic in mine:
            assert dev_a.publish(topic, b'{"version": 1}', retain=True) == DENIED, topic
    assert topics_of(dev_a) == set(mine)


def test_device_writes_its_own_pipelines_results_only(secure_broker: SecureBroker) -> None:
    with (
        secure_broker.client("fleet", ["edge/+/results/#"]) as fleet,
        secure_broker.client("dev-a") as dev_a,
    ):
        for topic in ("edge/dev-b/results/door", "edge/dev-a/results/door/x"):
            assert dev_a.publish(topic, b"{}") == DENIED, topic
        assert dev_a.publish("edge/dev-a/results/door", b"{}") == "Success"
        fleet.wait_for_topic("edge/dev-a/results/door")
    assert topics_of(fleet) == {"edge/dev-a/results/door"}


def test_device_cannot_write_desired_states_or_commands(secure_broker: SecureBroker) -> None:
    forged = ["edge/dev-a/desired", "edge/groups/door/desired", "edge/dev-a/cmd/rollback"]
    with (
        secure_broker.client("fleet", [*forged, "edge/dev-a/status"]) as fleet,
        secure_broker.client("dev-a") as dev_a,
    ):
        for topic in forged:
            assert dev_a.publish(topic, b'{"version": 1}', retain=True) == DENIED, topic
        assert dev_a.publish("edge/dev-a/status", b'{"state":"online"}', retain=True) == "Success"
        fleet.wait_for_topic("edge/dev-a/status")
    assert topics_of(fleet) == {"edge/dev-a/status"}
    # and nothing was retained for later subscribers either
    with secure_broker.client("fleet", [*forged, "edge/dev-a/status"]) as late:
        late.wait_for_topic("edge/dev-a/status")
    assert topics_of(late) == {"edge/dev-a/status"}


def test_device_writes_only_its_own_home_assistant_discovery_configs(
    secure_broker: SecureBroker,
) -> None:
    own = "homeassistant/sensor/dev-a/fps/config"
    with (
        secure_broker.client("fleet", ["homeassistant/#"]) as ha,
        secure_broker.client("dev-a", ["homeassistant/status"]) as dev_a,
    ):
        for topic in (
            "homeassistant/sensor/dev-b/fps/config",  # another device's
            "homeassistant/sensor/dev-a/fps/state",  # not a config
            "homeassistant/sensor/dev-a/config",  # another shape
            "homeassistant/status",  # Home Assistant's own birth message
            "homeassistant/switch/dev-a/x/config",  # a kind the agent never makes: a
            "homeassistant/button/dev-a/x/config",  # command topic HA would publish to
        ):
            assert dev_a.publish(topic, b"{}", retain=True) == DENIED, topic
        assert dev_a.publish(own, b'{"name":"fps"}', retain=True) == "Success"
        kinds = [f"homeassistant/{kind}/dev-a/x/config" for kind in ("binary_sensor", "update")]
        for topic in kinds:  # the other kinds it makes
            assert dev_a.publish(topic, b"{}") == "Success"
            ha.wait_for_topic(topic)
        ha.wait_for_topic(own)
        # Home Assistant's birth message reaches the device
        assert ha.publish("homeassistant/status", b"online") == "Success"
        assert dev_a.wait_for_topic("homeassistant/status").payload == b"online"
    assert topics_of(ha) == {own, "homeassistant/status", *kinds}


def test_certificate_named_groups_gets_no_rights(secure_broker: SecureBroker) -> None:
    with secure_broker.client("groups") as impostor:
        # as a "device" it would own edge/groups/reply/#, i.e. group "reply"'s desired
        assert impostor.publish("edge/groups/reply/desired", b"{}") == DENIED
        assert impostor.publish("edge/groups/telemetry", b"{}") == DENIED


# -- the shipped broker config ------------------------------------------------------------


def test_shipped_mosquitto_config_runs_with_mutual_tls_and_the_acl(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """provisioning/mosquitto/edge-agent.conf, with only paths and port swapped for tests."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    server = secure_broker.client_cert("mosquitto-server")
    acl = folder / "edge-agent.acl"
    acl.write_text(secure_broker.acl_text)
    tls_port = free_port()
    text = (PROVISIONING / "edge-agent.conf").read_text()
    replacements = {
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "/etc/mosquitto/certs/ca.pem": str(secure_broker.ca.cert_path),
        "/etc/mosquitto/certs/broker.pem": str(server.cert),
        "/etc/mosquitto/certs/broker.key": str(server.key),
        "/etc/mosquitto/edge-agent.acl": str(acl),
        "persistence_location /var/lib/mosquitto/": f"persistence_location {folder}",
        "pid_file /run/mosquitto/mosquitto.pid": f"pid_file {folder}/mosquitto.pid",
        "log_dest file /var/log/mosquitto/mosquitto.log": "log_dest stderr",
    }
    if os.geteuid() == 0:  # the pytest tmp folder is not readable by user mosquitto
        replacements["user mosquitto"] = "user root"
    for old, new in replacements.items():
        assert old in text, f"the shipped config no longer has {old!r}"
        text = text.replace(old, new)
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    unswapped = [line for line in settings if any(p in line for p in ("/etc/", "/var/", "/run/"))]
    assert not unswapped, "paths not swapped for the test"

    broker = Mosquitto.with_config(folder / "mosquitto", text, tls_port=tls_port)
    with broker:
        url = f"mqtts://127.0.0.1:{tls_port}"
        ca = secure_broker.ca.cert_path
        no_cert = connect_outcome(url, tls=ClientTLS(ca))
        assert no_cert.startswith("failed"), no_cert
        with (
            Collector(url, tls=secure_broker.tls("fleet")) as fleet,
            Collector(url, tls=secure_broker.tls("dev-a")) as dev_a,
        ):
            assert fleet.subscribe(["edge/#"]) == ["Granted QoS 1"]
            assert dev_a.publish("edge/dev-b/telemetry", b"forged") == DENIED
            assert dev_a.publish("edge/dev-a/telemetry", b"{}") == "Success"
            fleet.wait_for_topic("edge/dev-a/telemetry")
            assert topics_of(fleet) == {"edge/dev-a/telemetry"}
            assert fleet.publish("edge/dev-a/desired", b"{}", retain=True) == "Success"
    # persistence went where the config says: a clean stop saved the database
    assert (folder / "mosquitto.db").is_file(), broker.log_tail()
    assert "Error:" not in broker.log_text(), broker.log_tail()  # no config complaints


def test_shipped_acl_example_is_what_edge_fleet_renders() -> None:
    expected = render_acl({"pi-lobby-01": ["entrances", "lobby"], "pi-yard-02": ["yard"]})
    assert (PROVISIONING / "edge-agent.acl.example").read_text() == expected


# -- render_acl and `edge-fleet acl` ------------------------------------------------------


def test_render_acl_grants_devices_only_their_own_topics() -> None:
    text = render_acl({"dev-a": ["door", "lobby", "door"], "dev-b": []}, prefix="acme/edge")
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write acme/edge/%u/status",
        "pattern write acme/edge/%u/state",
        "pattern write acme/edge/%u/telemetry",
        "pattern write acme/edge/%u/results",
        "pattern write acme/edge/%u/results/+",
        "pattern write acme/edge/%u/events",
        "pattern write acme/edge/%u/reply",
        "pattern write acme/edge/%u/reply/#",
        "pattern read acme/edge/%u/desired",
        "pattern read acme/edge/%u/desired/+",
        "pattern read acme/edge/%u/shadow/+",
        "pattern read acme/edge/%u/cmd/#",
        "pattern write homeassistant/sensor/%u/+/config",
        "pattern write homeassistant/binary_sensor/%u/+/config",
        "pattern write homeassistant/update/%u/+/config",
        "pattern read homeassistant/status",
        "user groups",
        "topic deny acme/edge/#",
        "topic deny homeassistant/#",
        "user dev-a",
        "topic read acme/edge/groups/door/desired",
        "topic read acme/edge/groups/door/desired/+",
        "topic read acme/edge/groups/door/shadow/+",
        "topic read acme/edge/groups/lobby/desired",
        "topic read acme/edge/groups/lobby/desired/+",
        "topic read acme/edge/groups/lobby/shadow/+",
        "user fleet",
        "topic readwrite acme/edge/#",
        "topic readwrite homeassistant/#",
    ]


@pytest.mark.parametrize(
    ("devices", "kwargs", "named"),
    [
        ({"dev/a": []}, {}, "'dev/a'"),
        ({"dev+": []}, {}, "'dev+'"),
        ({"#": []}, {}, "'#'"),
        ({"": []}, {}, "''"),
        ({"dev a": []}, {}, "'dev a'"),
        ({"groups": []}, {}, "'groups'"),
        ({"dev-a": ["yard/x"]}, {}, "'yard/x'"),
        ({"dev-a": ["+"]}, {}, "'+'"),
        ({"dev-a": [""]}, {}, "''"),
        ({"dev-a": []}, {"admins": ["ops team"]}, "'ops team'"),
        ({"dev-a": []}, {"admins": ["dev-a"]}, "'dev-a' is both"),
        ({"dev-a": []}, {"admins": []}, "at least one admin"),
        ({"dev-a": []}, {"prefix": "edge/#"}, "'edge/#'"),
        ({"dev-a": []}, {"prefix": "/edge"}, "'/edge'"),
        ({"dev-a": []}, {"prefix": "$SYS"}, "'$SYS'"),
        ({"dev-a": "door"}, {}, "must be a list"),
        ({"dev-a": []}, {"ha_prefix": "home/+"}, "home assistant topic prefix 'home/+'"),
    ],
)
def test_render_acl_refuses_names_unusable_in_topics(
    devices: dict[str, list[str]], kwargs: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        render_acl(devices, **kwargs)  # type: ignore[arg-type]
    assert named in str(raised.value)


def test_render_acl_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        render_acl({"a/b": ["x+"], "ok": ["#"]}, admins=["b c"])
    assert len(raised.value.problems) == 4


def test_edge_fleet_acl_prints_the_acl(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["acl", "--device", "dev-a=door,lobby", "--device", "dev-b", "--device", "dev-b=yard"]
    assert cli.main([*argv, "--admin", "fleet", "--admin", "ops"]) == 0
    out = capsys.readouterr().out
    expected = render_acl({"dev-a": ["door", "lobby"], "dev-b": ["yard"]}, admins=["fleet", "ops"])
    assert out == expected


def test_edge_fleet_acl_takes_the_home_assistant_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["acl", "--device", "dev-a", "--ha-prefix", "ha/site1"]) == 0
    out = capsys.readouterr().out
    assert out == render_acl({"dev-a": []}, ha_prefix="ha/site1")
    assert "pattern write ha/site1/sensor/%u/+/config\n" in out and "homeassistant/" not in out
    assert cli.main(["acl", "--device", "dev-a", "--ha-prefix", "ha/#"]) == 2
    assert "home assistant topic prefix 'ha/#' is not valid" in capsys.readouterr().err


def test_edge_fleet_acl_writes_the_file_atomically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edge-agent.acl"
    out.write_text("old\n")
    assert cli.main(["acl", "--device", "dev-a=door", "--prefix", "site1", "--out", str(out)]) == 0
    assert out.read_text() == render_acl({"dev-a": ["door"]}, prefix="site1")
    assert out.stat().st_mode & 0o777 == 0o644  # mosquitto reads it as its own user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge-agent.acl"]
    assert str(out) in capsys.readouterr().out


def test_edge_fleet_acl_with_a_bad_name_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edge-agent.acl"
    code = cli.main(["acl", "--device", "dev-a=door", "--device", "dev/b", "--out", str(out)])
    assert code == 2
    assert "'dev/b'" in capsys.readouterr().err
    assert not out.exists()
