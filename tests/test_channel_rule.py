"""Publishing is not deploying: a device takes only what its own channel names.

``edge-fleet publish`` without ``--channel`` puts a version in the registry and moves
no device. A device whose channel is not in ``index.json`` (an index with no channels
at all included) deploys nothing and says why, instead of taking the newest version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import RegistryError
from agent.fleet.publish import publish
from agent.manifest import parse_index
from agent.pull import channel_target
from tests.agentproc import MODEL, AgentProcess, publish_models, wait_alive
from tests.conftest import Device, Fleet, Models
from tests.registry_server import RegistryServer


def _index(channels: dict[str, int], versions: list[int]) -> bytes:
    return (
        f'{{"schema": 1, "model": "m", "versions": {versions}, '
        f'"channels": {str(channels).replace(chr(39), chr(34))}}}'
    ).encode()


@pytest.mark.parametrize(
    ("channels", "versions", "follow", "expected"),
    [
        ({"stable": 1}, [1, 2], "stable", 1),  # v2 published without a channel
        ({"stable": 1, "beta": 2}, [1, 2], "beta", 2),
        ({}, [1, 2, 3], "stable", None),  # no channels at all: not the newest
        ({"beta": 3}, [1, 2, 3], "stable", None),
    ],
)
def test_a_channel_deploys_only_the_version_it_names(
    channels: dict[str, int], versions: list[int], follow: str, expected: int | None
) -> None:
    index = parse_index(_index(channels, versions), "m/index.json")
    if expected is not None:
        assert channel_target(index, follow) == expected
        return
    with pytest.raises(RegistryError) as caught:
        channel_target(index, follow)
    assert str(caught.value).startswith(f"channel {follow} not in m/index.json")
    assert f"publish with --channel {follow}" in str(caught.value)


def test_pull_on_an_index_without_channels_installs_nothing(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1, channels=())
    with pytest.raises(RegistryError, match=r"channel stable not in .*publish with --channel"):
        device.updater().pull()
    assert not any(r.path.endswith(".tflite") for r in server.log)
    device.assert_serving(None)


def test_version_published_without_channel_does_not_move_the_device(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1)  # --channel stable
    assert device.updater().pull().release.version == 1
    fleet.release(2, channels=())
    result = device.updater().pull()
    assert not result.changed
    device.assert_serving(1)
    assert not any("/2/" in r.path for r in server.log)


def _agent(tmp_path: Path, url: str, agents: list[AgentProcess]) -> AgentProcess:
    agent = AgentProcess(
        tmp_path / "dev-ch",
        "dev-ch",
        {"registry": {"url": url, "poll_interval_s": 0.2, "retries": 0}},
    )
    agents.append(agent)
    return agent


def _outcome(agent: AgentProcess) -> tuple[int, str] | None:
    """(version, outcome) of the journal's last update, None before the first."""
    try:
        attempt = agent.journal().get("attempt") or {}
    except FileNotFoundError:
        return None
    return attempt.get("version"), attempt.get("outcome")


def _polls(server: RegistryServer) -> int:
    return sum(r.path == f"{MODEL}/index.json" for r in server.log)


def test_daemon_stays_on_its_channel_when_a_version_is_published_without_one(
    tmp_path: Path, models: Models, agents: list[AgentProcess]
) -> None:
    root = tmp_path / "registry"
    publish_models(root, models.root, (1,))  # --channel stable
    with RegistryServer(root) as server:
        agent = _agent(tmp_path, server.url, agents).start()
        wait_alive(
            lambda: _outcome(agent) == (1, "succeeded"),
            60,
            "v1 from the channel",
            agent,
        )
        publish(
            [models.root / "v2.tflite"],
            model=MODEL,
            version=2,
            registry=root,
            task="classification",
            labels=models.root / "colours.txt",
        )  # no --channel
        seen = _polls(server)
        wait_alive(lambda: _polls(server) >= seen + 5, 30, "five more polls", agent)
        assert not any(r.path.startswith(f"{MODEL}/2/") for r in server.log)
        assert _outcome(agent) == (1, "succeeded")
        assert agent.terminate() == 0


def test_daemon_on_an_index_without_channels_deploys_nothing_and_says_why(
    tmp_path: Path, models: Models, agents: list[AgentProcess]
) -> None:
    root = tmp_path / "registry"
    publish(
        [models.root / "v1.tflite"],
        model=MODEL,
        version=1,
        registry=root,
        task="classification",
        labels=models.root / "colours.txt",
    )  # no --channel: the index has no channels at all
    with RegistryServer(root) as server:
        agent = _agent(tmp_path, server.url, agents).start()
        wait_alive(lambda: _polls(server) >= 5, 30, "five polls", agent)
        assert not any(r.path.startswith(f"{MODEL}/1/") for r in server.log)
        assert "channel stable not in colours/index.json" in agent.log()
        assert "publish with --channel stable" in agent.log()
        assert agent.alive()
        assert agent.terminate() == 0
    assert not (Path(agent.settings["store"]["dir"]) / "active.json").exists()
