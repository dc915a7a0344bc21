"""The device's CLI and the running agent agree, through the local control socket.

Agents run as real subprocesses on a ``file://`` registry with real generated models;
the CLI runs as a real subprocess against the same config file. What is asserted is
what the operator sees (status, exit codes) and what the agent serves (its results'
version in ``status``), not only the store's pointer.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.config import parse_config
from agent.control import AgentLock
from agent.errors import ConfigError
from agent.fleet.publish import publish
from agent.validate import npz_bytes
from tests.agentproc import MODEL, AgentProcess, publish_models, wait_alive
from tests.conftest import Models

DEV = "dev-c"


def _agent(tmp_path: Path, registry: Path, agents: list[AgentProcess]) -> AgentProcess:
    settings: dict[str, Any] = {"registry": {"url": registry.as_uri(), "poll_interval_s": 3600}}
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    agents.append(agent)
    return agent


def _cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _status(agent: AgentProcess) -> dict[str, Any]:
    result = _cli(agent, "status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _served(agent: AgentProcess) -> int | None:
    """The version whose results the agent produces now (its pipeline, not the pointer)."""
    daemon = _status(agent)["daemon"]["status"] or {}
    stats = daemon.get("stats") or {}
    version: int | None = stats.get("version")
    return version


def _socket(agent: AgentProcess) -> Path:
    return agent.root / "control.sock"


def _failing_selftest(tmp_path: Path, registry: Path, models: Models, version: int) -> None:
    """Publish ``version`` with self-test expectations it cannot meet."""
    inputs, expect = tmp_path / "in.npz", tmp_path / "expect.npz"
    samples = np.random.default_rng(1).random((2, 1, 32, 32, 3), dtype=np.float32)
    inputs.write_bytes(npz_bytes({"input_0": samples}))
    outputs = samples.mean(axis=(2, 3)) + 3000.0  # what v3 would answer, not this one
    expect.write_bytes(npz_bytes({"output_0": outputs.astype(np.float32)}))
    publish(
        [models.root / f"v{version}.tflite"],
        model=MODEL,
        version=version,
        registry=registry,
        task="classification",
        labels=models.root / "colours.txt",
        selftest_inputs=inputs,
        selftest_expect=expect,
    )


def _serving_v1(tmp_path: Path, registry: Path, agents: list[AgentProcess]) -> AgentProcess:
    agent = _agent(tmp_path, registry, agents).start()
    wait_alive(lambda: _served(agent) == 1, 60, "v1 served, seen through the socket", agent)
    wait_alive(
        lambda: _status(agent)["daemon"]["status"]["phase"] == "succeeded",
        30,
        "v1's probation passed",
        agent,
    )
    return agent


def test_status_shows_what_the_daemon_serves(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    assert agent.proc is not None
    data = _status(agent)
    daemon = data["daemon"]
    assert daemon["running"] and daemon["socket"] == str(_socket(agent))
    served = daemon["status"]
    assert served["pid"] == agent.proc.pid and served["serving"] == 1
    assert served["agent_version"] == data["agent_version"] == __version__
    assert served["stats"]["backend"] == "cpu" and served["stats"]["fps"] > 0
    assert served["broker"] == {
        "url": None,
        "connected": False,
        "queued": served["broker"]["queued"],
    }
    assert data["active"]["version"] == 1  # the store's view is still there
    text = _cli(agent, "status").stdout
    assert f"daemon:   running (pid {agent.proc.pid}" in text
    assert f"serving:  {MODEL} v1 on cpu:" in text and "fps" in text
    assert "; 1 interpreter x 2 threads (config)" in text  # runtime.interpreters, .threads
    assert "broker:   none configured" in text
    assert agent.terminate() == 0
    assert not _socket(agent).exists()
    stopped = _cli(agent, "status")
    assert stopped.returncode == 0 and "daemon:   not running" in stopped.stdout
    assert "active:   colours v1" in stopped.stdout


def test_control_socket_is_0660(tmp_path: Path, registry: Path, agents: list[AgentProcess]) -> None:
    old = os.umask(0o077)  # systemd's UMask=0077 for the unit; the child inherits it
    try:
        agent = _agent(tmp_path, registry, agents).start()
    finally:
        os.umask(old)
    wait_alive(_socket(agent).exists, 30, "the control socket", agent)
    mode = _socket(agent).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def _raw(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent dropped an oversized request: it may close first
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:  # closed with our unread bytes still in its buffer
            pass
        return data


def test_malformed_control_request_gets_error_and_daemon_lives(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    path = _socket(agent)
    for payload, error in [
        (b"not json\n", "request: not valid JSON"),
        (b"[1, 2]\n", "request: not a JSON object but an array"),
        (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"command": "rollback", "args": {"version": "two"}}\n', "positive integer"),
        (b'{"command": "pull", "args": [1]}\n', "args must be a JSON object"),
        (b"\xff\xfe\n", "request: not UTF-8"),
        (b'{"command": "ping", "command": "status"}\n', "key 'command' appears twice"),
    ]:
        reply = json.loads(_raw(path, payload))
        assert reply["ok"] is False and error in reply["error"], (payload, reply)
    oversized = _raw(path, b"x" * 70_000)  # over 64 KiB: refused (the reply may be lost
    assert oversized in (
        b"",
        b'{"command": null, "ok": false, "error": "request larger than 65536 bytes: dropped"}\n',
    )  # when the agent's close resets the connection)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:  # connects, says nothing
        silent.connect(str(path))
        reply = json.loads(_raw(path, b'{"command": "ping"}\n'))  # answered after its timeout
    assert reply["ok"] and reply["result"]["pong"] is True
    assert agent.alive() and _served(agent) == 1
    assert "Traceback" not in agent.log()


def test_stale_socket_file_is_replaced(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, registry, agents)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(_socket(agent)))  # what a SIGKILLed agent leaves: a file nobody answers
    stale.close()
    assert _socket(agent).exists()
    agent.start()
    wait_alive(lambda: _served(agent) == 1, 60, "v1 served through the new socket", agent)


def test_pull_and_rollback_through_the_daemon_change_what_is_served(
    tmp_path: Path, registry: Path, models: Models, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    publish_models(registry, models.root, (2,))
    pulled = _cli(agent, "models", "pull")  # the channel's: v2, through the agent's gate
    assert pulled.returncode == 0, pulled.stderr
    assert "v2: " in pulled.stdout and "v2 succeeded: probation passed" in pulled.stdout
    assert _served(agent) == 2
    update = _status(agent)["daemon"]["status"]["update"]
    assert update["source"] == "local" and update["outcome"] == "succeeded"
    # A downgrade by version is refused as without an agent: roll back instead.
    down = _cli(agent, "models", "pull", "--version", "1")
    assert down.returncode == 1
    assert "refusing a downgrade" in down.stdout and "models rollback --to 1" in down.stdout
    assert _served(agent) == 2
    back = _cli(agent, "models", "rollback")
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == f"rolled back {MODEL} to v1 (was v2)"
    assert _served(agent) == 1  # what serves changed, not only the pointer


def test_auto_interpreters_calibrate_once_and_the_next_version_keeps_the_choice(
    tmp_path: Path, registry: Path, models: Models, agents: list[AgentProcess]
) -> None:
    """runtime.interpreters/threads: auto on a real agent: the calibration at the first
    load is in the state and in one log line; a hot swap to v2 reuses it."""
    agent = _agent(tmp_path, registry, agents)
    agent.rewrite(runtime={"interpreters": "auto", "threads": "auto"})
    agent.start()
    wait_alive(lambda: _served(agent) == 1, 60, "v1 served", agent)
    wait_alive(
        lambda: _status(agent)["daemon"]["status"]["phase"] == "succeeded",
        30,
        "v1's probation passed",
        agent,
    )
    runtime = _status(agent)["daemon"]["status"]["runtime"]
    assert runtime["chosen_by"] == "calibration" and runtime["note"] is None
    assert runtime["interpreters"] >= 1 and runtime["threads"] >= 1
    assert agent.log().count("chosen by calibration") == 1
    publish_models(registry, models.root, (2,))
    pulled = _cli(agent, "models", "pull")
    assert pulled.returncode == 0, pulled.stderr
    assert _served(agent) == 2
    assert _status(agent)["daemon"]["status"]["runtime"] == runtime
    assert agent.log().count("chosen by calibration") == 1  # not again beside the stream
    text = _cli(agent, "status").stdout
    assert f"x {runtime['threads']} thread" in text and "(calibration)" in text
    assert agent.terminate() == 0


def test_pull_through_the_daemon_runs_the_gate(
    tmp_path: Path, registry: Path, models: Models, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    _failing_selftest(tmp_path, registry, models, 2)
    result = _cli(agent, "models", "pull", "--version", "2")
    assert result.returncode == 1
    assert "v2 failed: validation: selftest failed: output_0" in result.stdout, result.stdout
    assert _served(agent) == 1
    assert agent.journal()["bad"][0]["version"] == 2


def test_pull_without_daemon_is_gated_at_the_next_start(
    tmp_path: Path, registry: Path, models: Models, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    assert agent.terminate() == 0
    _failing_selftest(tmp_path, registry, models, 2)
    offline = _cli(agent, "models", "pull", "--version", "2")
    assert offline.returncode == 0, offline.stderr
    assert "activated colours v2" in offline.stdout
    assert agent.journal()["attempt"]["source"] == "local-offline"
    agent.start()  # the gate runs before v2 is served: it fails, v1 serves
    wait_alive(lambda: _served(agent) == 1, 60, "v1 served after the gate", agent)
    served = _status(agent)["daemon"]["status"]
    assert served["version"] == 1 and served["update"]["outcome"] == "rolled_back"
    assert "selftest failed" in served["update"]["reason"]
    assert f"{MODEL}@2" in served["bad"]


def test_store_is_not_touched_while_an_agent_holds_it_without_answering(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _serving_v1(tmp_path, registry, agents)
    assert agent.terminate() == 0
    lock = AgentLock(agent.root / "store")  # an agent whose socket does not answer
    lock.acquire()
    try:
        result = _cli(agent, "models", "rollback")
        assert result.returncode == 1
        assert f"the agent is running (pid {os.getpid()})" in result.stderr
        assert "not doing `models rollback` on the store" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        status = _cli(agent, "status")
        assert status.returncode == 0 and "does not answer" in status.stdout
    finally:
        lock.release()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("control:\n  socket: /tmp/" + "s" * 120 + "\n", "bytes, more than a Unix socket"),
        ("store:\n  dir: /" + "d" * 110 + "/models\n", "(the default, beside store.dir)"),
    ],
)
def test_socket_path_too_long_is_a_config_error(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=r"control\.socket") as caught:
        parse_config(text, env={})
    assert problem in str(caught.value)


def test_stopped_agent_answers_nothing_quickly(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"store:\n  dir: {tmp_path / 'store'}\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "daemon:   not running" in result.stdout
    assert time.monotonic() - started < 10


def _fake_agent(path: Path, reply: bytes, stop: threading.Event) -> threading.Thread:
    """Something else listening at the control socket: it answers every request with
    ``reply`` (well-formed JSON, but not what an agent says)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)

    def serve() -> None:
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    conn.recv(65536)
                    conn.sendall(reply + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "reply",
    [
        b'{"ok": true, "result": [1, 2]}',
        b'{"ok": true, "result": {}}',
        b'{"ok": true, "result": {"pid": "x", "uptime_s": "y", "broker": 3, "stats": {}}}',
        b'{"ok": false, "error": {"a": [1]}}',
    ],
)
@pytest.mark.parametrize("command", [["status"], ["models", "pull"], ["models", "rollback"]])
def test_control_socket_answering_nonsense_is_one_line(
    tmp_path: Path, reply: bytes, command: list[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"store:\n  dir: {tmp_path / 'store'}\n")
    stop = threading.Event()
    thread = _fake_agent(tmp_path / "control.sock", reply, stop)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", *command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stop.set()
        thread.join(5)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    if command == ["status"]:  # the store is still shown; the daemon line says what was wrong
        assert result.returncode == 0, result.stderr
        assert "daemon:   the agent at" in result.stdout and "unreadable" in result.stdout
    else:  # never done on the store behind the back of something that answers
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "{'a'" not in result.stderr  # no Python reprs


_STATUS = {
    "pid": 1,
    "uptime_s": 2,
    "stats": None,
    "update": None,
    "broker": {"url": None, "connected": False, "queued": 0},
    "runtime": {"interpreters": 2, "threads": 1, "chosen_by": "config"},
}


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({}, "daemon:   running"),
        ({"said_by_a_newer_agent": {"x": 1}}, "daemon:   running"),  # unknown keys allowed
        (
            {"runtime": {**_STATUS["runtime"], "interpreters": "2"}},  # type: ignore[dict-item]
            "runtime.interpreters: Expected `int`, got `str`",
        ),
        ({"uptime_s": "2"}, "status: uptime_s: Expected `float`, got `str`"),
        ({"broker": {"connected": False, "queued": 0}}, "status: broker.url: required"),
    ],
)
def test_a_status_reply_is_checked_strictly(
    tmp_path: Path, change: dict[str, Any], shown: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"store:\n  dir: {tmp_path / 'store'}\n")
    reply = json.dumps({"ok": True, "result": {**_STATUS, **change}}).encode()
    stop = threading.Event()
    thread = _fake_agent(tmp_path / "control.sock", reply, stop)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stop.set()
        thread.join(5)
    assert result.returncode == 0, result.stderr  # "2" crashed status with a TypeError
    assert shown in result.stdout, result.stdout
