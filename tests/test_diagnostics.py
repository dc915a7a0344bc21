"""Remote diagnostics: ``logs``, ``diagnostics`` and ``snapshot`` over the command channel.

The rules by tables (redaction, the ``lines`` argument, dpkg's status, the JPEG
plan), the log ring with real logging, the JPEG budget with real OpenCV, and the
three commands sent by the fleet user to real agent processes through a real
mosquitto with mutual TLS and the fleet's ACL.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.commands import CommandError
from agent.config import SNAPSHOT_MAX_KB, as_dict, parse_config
from agent.contract import Figures
from agent.diagnostics import LOGS_MAX, Diagnostics, lines_argument, package_version
from agent.logring import LogRing
from agent.logs import TextFormatter
from agent.redact import REDACTED, key_action, redact_config, redact_text
from agent.snapshot import MIN_SIDE, QUALITIES, SnapshotError, attempts, encode_jpeg
from agent.store import Store
from tests.agentproc import AgentProcess, wait_alive
from tests.broker import Collector, SecureBroker

R = REDACTED
PLAIN = "model_swapped model=colours version=2 backend=cpu"
KEY_PATH = "public key /etc/edge-agent/registry.pub loaded"


# -- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("connecting to mqtts://dev:s3cret@broker:8883", f"connecting to mqtts://dev:{R}@broker:8883"),
        ("rtsp://cam:p@ss@10.0.0.5/stream", f"rtsp://cam:{R}@10.0.0.5/stream"),  # @ in it
        ("http://broker:8883/x", "http://broker:8883/x"),  # no user: nothing to hide
        ("password=hunter2 retries=3", f"password={R} retries=3"),
        ("mqtt.password: hunter2", f"mqtt.password: {R}"),
        ('{"token": "abc 123", "n": 1}', f'{{"token": "{R}", "n": 1}}'),  # stays JSON
        ("passphrase='a b' next", f"passphrase='{R}' next"),
        ("GET /index.json?access_key=AKIA1&page=2", f"GET /index.json?access_key={R}&page=2"),
        ("api-key: zzz", f"api-key: {R}"),
        ("Authorization: Bearer eyJhbGciOi.x.y", f"Authorization: {R}"),
        ("header Basic dXNlcjpwYXNz sent", f"header Basic {R} sent"),
        (
            "key:\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\nend",
            f"key:\n{R}\nend",
        ),
        ("-----BEGIN PRIVATE KEY-----\nMIIEv (cut)", R),  # a cut one, to the end
        (PLAIN, PLAIN),
        (KEY_PATH, KEY_PATH),
        (f"password={R}", f"password={R}"),  # twice is once
        ("Authorization: Token abc123", f"Authorization: {R}"),
        ("Authorization: Digest username=x", f"Authorization: {R}"),
        ("https://ghp_abcdefghijklmnopqrstuvwxyz0123@github.com/x", f"https://{R}@github.com/x"),
        ("mqtts://fleet@broker:8883", "mqtts://fleet@broker:8883"),  # a name, not a token
        ('{"password": "a\\"b c", "x": 1}', f'{{"password": "{R}", "x": 1}}'),
        ("token expired for pi-1", "token expired for pi-1"),
    ],
)  # fmt: skip
def test_redact_text_removes_secrets_and_keeps_the_rest(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("key", "action"),
    [
        ("password", "redact"),
        ("mqtt_password", "redact"),
        ("api_key", "redact"),
        ("token", "redact"),
        ("client_secret", "redact"),
        ("private_key", "redact"),
        ("password_file", "keep"),  # where it lives, not what it is
        ("password_credential", "keep"),
        ("key", "keep"),  # mqtt.key: the path of the device's key
        ("public_key", "keep"),
        ("username", "keep"),
        ("url", "keep"),  # its strings still lose a user:password@
    ],
)
def test_config_keys_are_redacted_by_name(key: str, action: str) -> None:
    assert key_action(key) == action


def test_the_loaded_config_loses_its_secrets_and_keeps_its_shape() -> None:
    config = parse_config(
        "mqtt: {url: 'mqtts://dev:s3cret@127.0.0.1:8883', username: dev,\n"
        "       password_file: /etc/edge-agent/mqtt.pw, ca: /etc/ca.pem,\n"
        "       cert: /etc/dev.pem, key: /etc/dev.key}\n"
        "source: {type: mjpeg, url: 'http://cam:hunter2@10.0.0.5/video.mjpg'}\n",
        env={},
    )
    doc = redact_config(as_dict(config))
    assert doc["mqtt"]["url"] == f"mqtts://dev:{R}@127.0.0.1:8883"
    assert doc["source"]["url"] == f"http://cam:{R}@10.0.0.5/video.mjpg"
    assert doc["mqtt"]["password_file"] == "/etc/edge-agent/mqtt.pw"
    assert doc["mqtt"]["key"] == "/etc/dev.key"
    assert doc["privacy"] == {"snapshots": False, "snapshot_max_kb": 96}
    text = json.dumps(doc)
    assert "s3cret" not in text and "hunter2" not in text
    assert redact_config({"token": None, "tokens": ["a"]}) == {"token": None, "tokens": R}


# -- the log ring --------------------------------------------------------------------------


def ring_with(lines: list[str], capacity: int = 1000) -> LogRing:
    ring = LogRing(capacity)
    ring.setFormatter(TextFormatter())
    logger = logging.getLogger(f"test.ring.{id(ring)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(ring)
    for line in lines:
        logger.info("%s", line)
    logger.removeHandler(ring)
    return ring


def test_the_ring_keeps_the_newest_lines_redacted_within_the_byte_budget() -> None:
    ring = ring_with([f"line {i} password=secret{i}" for i in range(50)], capacity=20)
    lines, cut = ring.tail(100, 64 * 1024)  # more asked than kept: the 20 newest
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"line {i} password={R}" for i in range(30, 50)
    ]
    assert not cut and "secret" not in "".join(lines)
    assert len(ring.tail(3, 64 * 1024)[0]) == 3
    lines, cut = ring.tail(20, 300)  # bytes cut from the oldest
    assert cut and 0 < len(lines) < 20
    assert lines[-1].endswith(f"line 49 password={R}")
    assert len(json.dumps(lines)) <= 300


def test_the_ring_cuts_a_huge_message() -> None:
    lines, _ = ring_with(["x" * 100_000]).tail(1, 64 * 1024)
    assert len(lines[0]) < 5000 and lines[0].endswith("…(cut)")


def test_a_secret_split_by_the_cut_is_redacted_before_it() -> None:
    # the cut falls inside a long password, before its "@host": redacted first, the
    # password does not leak (a line's prefix is ~52 characters: time, level, logger)
    password = "hunter2" * 8
    pad = "x" * (4096 - 52 - len("rtsp://cam:") - 28)
    (kept,), _ = ring_with([f"{pad} rtsp://cam:{password}@10.0.0.9/stream"]).tail(1, 65536)
    assert "hunter2" not in kept, kept[-80:]  # (redacted, the line fits: no cut)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, 100),
        ({"lines": 1}, 1),
        ({"lines": LOGS_MAX}, LOGS_MAX),
        ({"lines": 0}, "lines: must be an integer from 1 to 500"),
        ({"lines": LOGS_MAX + 1}, "lines: must be an integer from 1 to 500"),
        ({"lines": "10"}, "lines: must be an integer from 1 to 500"),
        ({"lines": True}, "lines: must be an integer from 1 to 500"),
        ({"lines": 2.5}, "lines: must be an integer from 1 to 500"),
        ({"lines": 5, "grep": "x"}, "unknown argument 'grep'; logs takes lines"),
    ],
)
def test_the_lines_argument(args: dict[str, Any], expected: int | str) -> None:
    if isinstance(expected, int):
        assert lines_argument(args) == expected
    else:
        with pytest.raises(CommandError, match=f"^{expected}$"):
            lines_argument(args)


STATUS = """Package: libc6
Version: 2.36-9
Status: install ok installed

Package: libedgetpu1-std
Status: install ok installed
Version: 16.0

"""


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (STATUS, "16.0"),
        (STATUS.replace("libedgetpu1-std", "libedgetpu1-max"), "16.0"),
        (STATUS.replace("libedgetpu1-std", "libedgetpu-dev"), None),
        ("Package: libedgetpu1-std\n\nVersion: 1\n", None),  # another stanza's version
        ("", None),
    ],
)
def test_libedgetpus_version_comes_from_dpkgs_status(text: str, version: str | None) -> None:
    assert package_version(text.splitlines(), ("libedgetpu1-std", "libedgetpu1-max")) == version


# -- the snapshot's JPEG -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "first", "last", "count"),
    [
        ((640, 480), (640, 480, QUALITIES[0]), (80, 60, QUALITIES[-1]), 4),  # not 40x30
        ((64, 48), (64, 48, QUALITIES[0]), (64, 48, QUALITIES[-1]), 1),  # not 32x24
        ((16, 16), (16, 16, QUALITIES[0]), (16, 16, QUALITIES[-1]), 1),  # its own size
        ((8192, 8192), (8192, 8192, QUALITIES[0]), (32, 32, QUALITIES[-1]), 9),
    ],
)
def test_the_jpeg_plan_lowers_quality_then_halves_the_size(
    size: tuple[int, int], first: tuple[int, int, int], last: tuple[int, int, int], count: int
) -> None:
    plan = attempts(*size)
    assert plan[0] == first and plan[-1] == last
    assert len(plan) == count * len(QUALITIES)
    assert all(min(w, h) >= MIN_SIDE for w, h, _ in plan[len(QUALITIES) :])


def noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def decoded(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


@pytest.mark.parametrize("max_kb", [200, 40, 8])
def test_a_snapshot_fits_its_budget_or_is_refused(max_kb: int) -> None:
    frame = noise(480, 640)
    jpeg = encode_jpeg(frame, max_kb * 1024)
    assert len(jpeg.data) <= max_kb * 1024
    assert decoded(jpeg.data).shape == (jpeg.height, jpeg.width, 3)
    assert jpeg.width <= 640 and jpeg.height <= 480
    with pytest.raises(SnapshotError, match=r"raise privacy\.snapshot_max_kb"):
        encode_jpeg(frame, 100)  # not even 80x60 of noise fits 100 bytes


def test_a_snapshot_keeps_the_colours() -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[..., 0] = 255  # red, as sources give RGB
    pixel = decoded(encode_jpeg(frame, 64 * 1024).data)[24, 32]  # OpenCV decodes BGR
    assert pixel[2] > 200 and pixel[0] < 50


@pytest.mark.parametrize(
    "frame",
    [np.zeros((32, 1), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(10, np.uint8)],
)
def test_a_source_without_images_has_no_snapshot(frame: np.ndarray) -> None:
    with pytest.raises(SnapshotError, match="the source gives no image"):
        encode_jpeg(frame, 64 * 1024)


# -- the handlers ------------------------------------------------------------------------------


FIGURES: Figures = {
    "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
    "mqtt": {
        "connected": False, "protocol": None, "connects": 0, "inflight": 0, "rejected": 0,
        "unsent_qos0": 0,
    },
}  # fmt: skip


def handlers(tmp_path: Path, yaml_text: str) -> tuple[Diagnostics, list[tuple[str, Any]]]:
    events: list[tuple[str, Any]] = []
    diagnostics = Diagnostics(
        parse_config(yaml_text, env={}),
        Store(tmp_path / "store").open(),
        lambda: FIGURES,
        lambda: None,
        lambda: noise(48, 64),
        lambda name, detail: events.append((name, dict(detail))),
        ring_with(["ready: colours v1"]),
    )
    return diagnostics, events


def test_snapshots_are_refused_unless_the_config_allows_them(tmp_path: Path) -> None:
    diagnostics, events = handlers(tmp_path, "model: {name: colours}")
    with pytest.raises(CommandError, match=r"set privacy.snapshots: true"):
        diagnostics.snapshot({})
    assert events == [
        ("diagnostics_requested", {"command": "snapshot", "error": events[0][1]["error"]})
    ]
    allowed, events = handlers(tmp_path / "on", "privacy: {snapshots: true}")
    result = allowed.snapshot({})
    assert decoded(base64.b64decode(result["jpeg_base64"])).shape == (48, 64, 3)
    assert events == [("diagnostics_requested", {"command": "snapshot"})]


def test_every_diagnostics_command_is_an_event(tmp_path: Path) -> None:
    diagnostics, events = handlers(tmp_path, "model: {name: colours}")
    assert diagnostics.logs({"lines": 5})["lines"][-1].endswith("ready: colours v1")
    with pytest.raises(CommandError):
        diagnostics.logs({"lines": -1})
    report = diagnostics.diagnostics({})
    assert report["versions"]["agent"] == __version__
    assert report["store"]["releases"] == [] and report["store"]["active"] is None
    assert [detail["command"] for _, detail in events] == ["logs", "logs", "diagnostics"]
    assert "error" in events[1][1]


# -- real agents, a real broker, the shipped ACL ---------------------------------------------------


def agent_on(
    secure_broker: SecureBroker, root: Path, device: str, registry: Path, privacy: dict[str, Any]
) -> AgentProcess:
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri()},
        "mqtt": {**secure_broker.agent_mqtt(device), "reconnect_max_s": 1},
        "privacy": privacy,
    }
    return AgentProcess(root / device, device, settings).start()


def ask(fleet: Collector, agent: AgentProcess, command: str, args: dict[str, Any]) -> Any:
    """Send ``command`` as the fleet user; the agent's reply to it."""
    topic = f"edge/{agent.device_id}/reply"
    request_id = f"{command}-{len(fleet.messages(topic))}"
    payload = json.dumps({"id": request_id, **args})
    assert fleet.publish(f"edge/{agent.device_id}/cmd/{command}", payload) == "Success"

    def answered() -> bool:
        return any(
            json.loads(m.payload).get("request_id") == request_id for m in fleet.messages(topic)
        )

    wait_alive(answered, 20, f"a reply to {command}", agent)
    return next(
        doc
        for m in fleet.messages(topic)
        if (doc := json.loads(m.payload)).get("request_id") == request_id
    )


def serving(fleet: Collector, agent: AgentProcess) -> bool:
    for message in fleet.messages(f"edge/{agent.device_id}/telemetry"):
        inference = json.loads(message.payload).get("inference")
        if inference and inference["results"] > 0:
            return True
    return False


def test_the_fleet_gets_logs_diagnostics_and_a_snapshot_under_the_shipped_acl(
    tmp_path: Path, secure_broker: SecureBroker, registry: Path, agents: list[AgentProcess]
) -> None:
    with secure_broker.client("fleet", ["edge/#"]) as fleet:
        open_ = agent_on(secure_broker, tmp_path, "dev-a", registry, {"snapshots": True})
        closed = agent_on(secure_broker, tmp_path, "dev-b", registry, {})
        agents += [open_, closed]
        for agent in (open_, closed):
            wait_alive(lambda a=agent: serving(fleet, a), 60, "inference", agent)  # type: ignore[misc]

        logs = ask(fleet, open_, "logs", {"lines": 50})
        assert logs["ok"], logs
        lines = logs["result"]["lines"]
        assert 0 < len(lines) <= 50 and logs["result"]["count"] == len(lines)
        assert any("ready:" in line for line in lines), lines
        assert ask(fleet, open_, "logs", {"lines": 10_000})["error"] == (
            "lines: must be an integer from 1 to 500"
        )

        report = ask(fleet, open_, "diagnostics", {})
        assert report["ok"], report
        result = report["result"]
        assert result["versions"]["agent"] == __version__
        assert result["versions"]["ai-edge-litert"] or result["versions"]["tflite-runtime"]
        assert result["config"]["device"]["id"] == "dev-a"
        assert result["config"]["privacy"] == {"snapshots": True, "snapshot_max_kb": 96}
        store = result["store"]
        assert store["model"] == "colours" and store["active"] == 1
        assert [r["version"] for r in store["releases"]] == [1]
        assert store["releases"][0]["active"] and store["releases"][0]["bytes"] > 0
        assert result["mqtt"]["connected"] is True and "depth" in result["outbox"]
        assert result["inference"]["model"] == "colours"

        shot = ask(fleet, open_, "snapshot", {})
        assert shot["ok"], shot
        image = decoded(base64.b64decode(shot["result"]["jpeg_base64"]))
        assert image.shape[0] <= 48 and image.shape[1] <= 64  # the synthetic 64x48 frame
        assert (shot["result"]["frame_width"], shot["result"]["frame_height"]) == (64, 48)
        assert shot["result"]["bytes"] <= 96 * 1024

        refused = ask(fleet, closed, "snapshot", {})
        assert not refused["ok"] and "privacy.snapshots: true" in refused["error"]

        def requested(agent: AgentProcess) -> list[dict[str, Any]]:
            docs = [json.loads(m.payload) for m in fleet.messages(f"edge/{agent.device_id}/events")]
            return [d for d in docs if d["event"] == "diagnostics_requested"]

        wait_alive(lambda: len(requested(open_)) == 4, 10, "four events", open_)
        assert [d["command"] for d in requested(open_)] == [
            "logs",
            "logs",
            "diagnostics",
            "snapshot",
        ]
        wait_alive(lambda: len(requested(closed)) == 1, 10, "the refusal's event", closed)
        assert requested(closed)[0]["command"] == "snapshot" and requested(closed)[0]["error"]
        for agent in (open_, closed):
            assert agent.terminate() == 0


def test_a_config_too_large_to_send_is_named_not_sent(tmp_path: Path) -> None:
    groups = ", ".join(f"group-{i:05d}-{'x' * 40}" for i in range(3000))
    diagnostics, _ = handlers(tmp_path, f"device: {{groups: [{groups}]}}")
    config = diagnostics.diagnostics({})["config"]
    assert config["error"].endswith(f"over {128 * 1024}: not sent")


def test_the_largest_snapshot_reply_fits_the_shipped_brokers_packets() -> None:
    conf = Path(__file__).resolve().parent.parent / "provisioning/mosquitto/edge-agent.conf"
    limit = next(
        int(line.split()[1])
        for line in conf.read_text().splitlines()
        if line.startswith("max_packet_size ")
    )
    jpeg = base64.b64encode(bytes(SNAPSHOT_MAX_KB * 1024)).decode()
    reply = {
        "schema": 1, "seq": 2**40, "id": "f" * 24, "ts": 1764500000.123,
        "command": "snapshot", "ok": True, "request_id": "r" * 16000,  # ~ command_max_bytes
        "result": {
            "format": "jpeg", "width": 8192, "height": 8192, "frame_width": 8192,
            "frame_height": 8192, "quality": 85, "bytes": SNAPSHOT_MAX_KB * 1024,
            "jpeg_base64": jpeg,
        },
    }  # fmt: skip
    topic = "edge/" + "d" * 64 + "/reply/" + "r" * 128  # a long id, a response topic
    packet = len(json.dumps(reply)) + len(topic) + 64  # fixed header, properties
    assert packet < limit
