"""Key rotation end to end, as docs/fleet.md tells an operator to do it.

(a) devices trust the old and the new key; (b) releases, the index and desired states
are re-signed with the new key; (c) the old key is dropped from the devices, which
revokes it. At each step the device accepts what it should, and after (c) refuses
what only the dropped key signed. Releases go through the real HTTP registry and
``edge-fleet`` as a subprocess; the deploy key through a real agent and mosquitto.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import VerificationError
from agent.fleet.publish import publish
from agent.verify import generate_keypair, key_id, load_private_key, parse_signatures, sign
from tests.agentproc import MODEL as AGENT_MODEL
from tests.agentproc import AgentProcess, Tap, publish_models, wait_alive
from tests.broker import Mosquitto
from tests.conftest import MODEL, Device, Fleet, Models, tflite_bytes
from tests.conftest import edge_fleet as fleet_cli
from tests.registry_server import RegistryServer
from tests.test_fleet import run_fleet


def republish(fleet: Fleet, version: int, *keys: Path) -> subprocess.CompletedProcess[str]:
    """``edge-fleet publish`` of an already published release, with ``keys``."""
    src = fleet.root / "src" / f"{MODEL}-{version}"
    args = ["publish", str(src / "model.tflite"), "--labels", str(src / "labels.txt")]
    args += ["--model", MODEL, "--version", str(version), "--task", "detection"]
    args += ["--registry", str(fleet.registry)]
    for key in keys:
        args += ["--sign-key", str(key)]
    return fleet_cli(*args)


def release_with(fleet: Fleet, version: int, key: Path) -> None:
    """Publish ``version`` (channel stable) signed by ``key`` alone."""
    src = fleet.root / "src" / f"{MODEL}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.tflite").write_bytes(tflite_bytes(50_000, version))
    publish(
        [src / "model.tflite"],
        model=MODEL,
        version=version,
        registry=fleet.registry,
        sign_key=key,
        channels=("stable",),
    )


def keyids(path: Path) -> set[str | None]:
    return {s.keyid for s in parse_signatures(path.read_bytes(), str(path))}


def test_release_key_rotation_trust_both_re_sign_drop_old(
    fleet: Fleet, device: Device, tmp_path: Path
) -> None:
    old = fleet.key
    made = fleet_cli("keygen", "--out", str(tmp_path / "new"), "--name", "registry")
    assert made.returncode == 0, made.stderr
    new, new_pub = tmp_path / "new" / "registry.key", tmp_path / "new" / "registry.pub"
    old_id, new_id = key_id(load_private_key(old)), key_id(load_private_key(new))
    assert f"key id {new_id}" in made.stdout

    fleet.release(1)  # signed by the old key, as before the rotation
    assert device.updater().pull().release.version == 1

    # (a) the devices trust both keys; what the old key signs still installs.
    device.set("registry", public_key=str(fleet.pub), public_keys=[str(new_pub)])
    fleet.release(2)
    assert device.updater().pull().release.version == 2

    # (b) re-sign the published releases with the new key: a signature is added, the
    # manifest bytes never change; the index is re-signed by the new key.
    manifest = fleet.path(2, "manifest.json").read_bytes()
    for version in (1, 2):
        result = republish(fleet, version, new)
        assert result.returncode == 0, result.stderr
        assert "already published (unchanged)" in result.stdout and new_id in result.stdout
        assert keyids(fleet.path(version, "manifest.json.sig")) == {old_id, new_id}
    assert fleet.path(2, "manifest.json").read_bytes() == manifest
    assert keyids(fleet.registry / MODEL / "index.json.sig") == {new_id}
    release_with(fleet, 3, new)  # new releases: the new key only
    assert keyids(fleet.path(3, "manifest.json.sig")) == {new_id}
    assert device.updater().pull().release.version == 3

    # (c) drop the old key from the devices: it is revoked.
    device.set("registry", public_key=str(new_pub), public_keys=[])
    assert device.updater().pull(2, allow_downgrade=True).release.version == 2  # re-signed
    assert device.updater().pull(3).release.version == 3
    # A release the old key alone signs (a stolen key, an old pipeline) is refused ...
    release_with(fleet, 4, old)
    with pytest.raises(VerificationError, match=rf"not signed by a trusted key: .*{old_id}"):
        device.updater().pull(4)
    # ... and so is an index the old key alone signs (v4's publish wrote one), even
    # with a higher version than any seen.
    index = fleet.registry / MODEL / "index.json"
    doc = json.loads(index.read_bytes())
    doc["version"] += 5
    raw = (json.dumps(doc) + "\n").encode()
    index.write_bytes(raw)
    index.with_name("index.json.sig").write_bytes(sign(load_private_key(old), raw))
    with pytest.raises(VerificationError, match=r"index\.json: not signed by a trusted key"):
        device.updater().channel_version()
    device.assert_serving(3)


def test_publish_adding_a_key_to_an_old_format_signature_needs_the_old_key(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.release(1)
    sig = fleet.path(1, "manifest.json.sig")
    raw = fleet.path(1, "manifest.json").read_bytes()
    import base64

    sig.write_bytes(base64.b64encode(load_private_key(fleet.key).sign(raw)) + b"\n")
    new, _ = generate_keypair(tmp_path / "new")
    refused = republish(fleet, 1, new)
    assert refused.returncode == 1 and "old format (no key id)" in refused.stderr
    both = republish(fleet, 1, fleet.key, new)
    assert both.returncode == 0, both.stderr
    assert keyids(sig) == {key_id(load_private_key(fleet.key)), key_id(load_private_key(new))}


# ----- the deploy key, through a real agent and broker -----


@pytest.fixture
def deploy_lab(
    tmp_path: Path, models: Models, broker: Mosquitto
) -> Iterator[tuple[AgentProcess, Tap, Path, Path, Path, Path]]:
    registry = tmp_path / "registry"
    publish_models(registry, models.root, (1, 2))
    old, old_pub = generate_keypair(tmp_path / "keys", "deploy-old")
    new, new_pub = generate_keypair(tmp_path / "keys", "deploy-new")
    tap = Tap("127.0.0.1", broker.port, ["edge/#"])
    with RegistryServer(registry) as server:
        agent = AgentProcess(
            tmp_path / "dev-k",
            "dev-k",
            {
                "registry": {"url": server.url, "poll_interval_s": 3600},
                "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
                "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 8},
                "update": {
                    "probation_s": 1,
                    "budget_runs": 5,
                    "desired_public_key": str(old_pub),
                    "desired_public_keys": [str(new_pub)],
                },
            },
        )
        try:
            yield agent, tap, old, new, old_pub, new_pub
        finally:
            tap.close()
            agent.close()


def test_deploy_key_rotation_trust_both_re_sign_drop_old(
    deploy_lab: tuple[AgentProcess, Tap, Path, Path, Path, Path], broker: Mosquitto
) -> None:
    agent, tap, old, new, _, new_pub = deploy_lab

    def deploy(version: int, key: Path) -> tuple[int, str]:
        run = run_fleet(
            *("deploy", "--broker", broker.url, "--model", AGENT_MODEL, "--device", "dev-k"),
            *("--version", str(version), "--sign-key", str(key), "--wait", "45"),
        )
        return run.code, run.out + run.err

    # (a) the device trusts old and new: either key's desired state is applied.
    agent.start()
    code, out = deploy(1, old)
    assert code == 0, out + agent.log()[-3000:]
    code, out = deploy(2, new)  # (b) desired states are issued with the new key from now on
    assert code == 0, out + agent.log()[-3000:]
    assert agent.terminate() == 0

    # (c) the old deploy key is dropped from the device: revoked.
    agent.rewrite(update={"desired_public_key": str(new_pub), "desired_public_keys": []})
    agent.start()
    wait_alive(
        lambda: any(d.get("version") == 2 for d in tap.docs("/state")), 30, "back on v2", agent
    )
    code, out = deploy(1, old)
    assert code == 1 and "does not list" in out and key_id(load_private_key(old)) in out, out
    # desired_invalid events name the topic, not the instruction: let this one pass by
    # before the next deploy watches the same topic.
    tap.wait(
        lambda: any(d.get("event") == "desired_invalid" for d in tap.docs("/events")),
        10,
        "the refusal event",
    )
    time.sleep(1.0)
    code, out = deploy(1, new)
    assert code == 0, out + agent.log()[-3000:]
    assert agent.terminate() == 0
