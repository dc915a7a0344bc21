"""A signed ``index.json`` over the real HTTP registry: freeze and repoint attacks fail.

Whoever controls the registry (or the network to it) tries to point the channel at
another signed version, to freeze a device on an old index, or to serve an expired
one. The device (registry.public_key set) refuses each with the reason, keeps serving
what it runs, and accepts a properly re-signed index, also on the ETag polling path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import pull as pull_module
from agent.errors import VerificationError
from agent.fleet.publish import PublishError, publish
from agent.signed_index import HISTORY_FILE, rfc3339
from agent.verify import generate_keypair, key_id, load_private_key, sign
from tests.conftest import MODEL, Device, Fleet, tflite_bytes
from tests.conftest import edge_fleet as fleet_cli
from tests.registry_server import RegistryServer

INDEX = f"{MODEL}/index.json"


def index_path(fleet: Fleet) -> Path:
    return fleet.registry / MODEL / "index.json"


def read_index(fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(index_path(fleet).read_bytes())
    return doc


def write_index(fleet: Fleet, doc: dict[str, Any], key: Path | None) -> None:
    """Replace index.json with ``doc``, signed by ``key`` (None: leave the .sig alone)."""
    raw = (json.dumps(doc, indent=2) + "\n").encode()
    index_path(fleet).write_bytes(raw)
    if key is not None:
        index_path(fleet).with_name("index.json.sig").write_bytes(sign(load_private_key(key), raw))


def test_published_index_is_signed_versioned_and_accepted(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    doc = read_index(fleet)
    assert doc["version"] == 1 and doc["expires"] > rfc3339(time.time() + 29 * 86400)
    assert device.updater().pull().release.version == 1
    seen = json.loads((device.root / "store" / HISTORY_FILE).read_bytes())
    assert seen["models"][MODEL]["version"] == 1
    fleet.release(2)
    assert read_index(fleet)["version"] == 2  # every change raises it


def test_expired_index_is_refused_and_the_device_keeps_serving(
    fleet: Fleet, device: Device
) -> None:
    fleet.release(1)
    assert device.updater().pull().changed
    fleet.release(2)
    doc = read_index(fleet)
    write_index(fleet, {**doc, "version": 3, "expires": rfc3339(time.time() - 3600)}, fleet.key)
    with pytest.raises(VerificationError, match=r"index.json: expired at .* index --renew"):
        device.updater().pull()
    device.assert_serving(1)


def test_replayed_older_index_is_refused_as_a_freeze(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    old_raw = index_path(fleet).read_bytes()
    old_sig = index_path(fleet).with_name("index.json.sig").read_bytes()
    assert device.updater().pull().release.version == 1
    fleet.release(2)
    fleet.release(3)
    assert device.updater().channel_version() == 3  # index version 3 seen
    # The attacker serves the old, validly signed index: stable stays at v1 forever.
    index_path(fleet).write_bytes(old_raw)
    index_path(fleet).with_name("index.json.sig").write_bytes(old_sig)
    with pytest.raises(
        VerificationError,
        match=r"version 1 is older than version 3 accepted before; refusing a replayed",
    ):
        device.updater().channel_version()  # a new Updater: the floor was persisted
    device.assert_serving(1)


def test_repointing_the_channel_without_re_signing_is_refused(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    fleet.release(2, channels=())
    assert device.updater().pull().release.version == 1
    doc = read_index(fleet)
    write_index(fleet, {**doc, "version": doc["version"] + 1, "channels": {"stable": 2}}, None)
    with pytest.raises(VerificationError, match=r"index.json: bad signature"):
        device.updater().pull()
    device.assert_serving(1)


def test_same_index_version_with_other_bytes_is_refused(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    fleet.release(2, channels=())
    assert device.updater().channel_version() == 1
    doc = read_index(fleet)
    write_index(fleet, {**doc, "channels": {"stable": 2}}, fleet.key)  # version not raised
    with pytest.raises(VerificationError, match=r"accepted before with other bytes"):
        device.updater().channel_version()


def test_unsigned_index_is_refused_when_a_key_is_configured(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    index_path(fleet).with_name("index.json.sig").unlink()
    with pytest.raises(VerificationError, match=r"index.json: unsigned, and registry"):
        device.updater().pull()
    device.assert_serving(None)


def test_renewed_index_is_accepted_and_changes_nothing_else(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    assert device.updater().channel_version() == 1
    before = read_index(fleet)
    registry = str(fleet.registry)
    renew = fleet_cli(
        *("index", "--model", MODEL, "--registry", registry, "--renew"),
        *("--sign-key", str(fleet.key), "--index-expiry-days", "60"),
    )
    assert renew.returncode == 0, renew.stderr
    assert (
        "version 2, expires" in renew.stdout and key_id(load_private_key(fleet.key)) in renew.stdout
    )
    after = read_index(fleet)
    assert after["version"] == 2 and after["expires"] > rfc3339(time.time() + 59 * 86400)
    assert {k: after[k] for k in ("versions", "channels")} == {
        k: before[k] for k in ("versions", "channels")
    }
    assert device.updater().channel_version() == 1
    shown = fleet_cli("index", "--model", MODEL, "--registry", registry, "--json")
    assert json.loads(shown.stdout)["version"] == 2
    unsigned = fleet_cli("index", "--model", MODEL, "--registry", registry, "--renew")
    assert unsigned.returncode == 2 and "--renew needs --sign-key" in unsigned.stderr


def test_etag_polling_fetches_the_signature_only_when_the_index_changed(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1)
    updater = device.updater()
    version, etag = updater.poll_channel(None)
    assert version == 1 and etag
    server.clear_log()
    assert updater.poll_channel(etag) == (None, etag)  # 304: no body, no signature
    assert [(r.path, r.status) for r in server.log] == [(INDEX, 304)]
    # A tampered index is refused; the caller keeps its old ETag and asks again later.
    doc = read_index(fleet)
    write_index(fleet, {**doc, "version": doc["version"] + 1, "versions": [1, 9]}, None)
    with pytest.raises(VerificationError, match="bad signature"):
        updater.poll_channel(etag)
    fleet.release(2)  # the operator's next publish signs a newer index
    server.clear_log()
    version, new_etag = updater.poll_channel(etag)
    assert version == 2 and new_etag != etag
    assert [r.path for r in server.log] == [INDEX, f"{INDEX}.sig"]


def test_without_a_key_the_index_is_read_as_before_with_one_warning(
    fleet: Fleet, device: Device, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull_module, "_unverified_warned", pull_module.threading.Event())
    device.set("registry", public_key=None)
    fleet.release(1, signed=False)
    with caplog.at_level(logging.WARNING, logger="agent.pull"):
        assert device.updater().channel_version() == 1
        assert device.updater().channel_version() == 1
    warnings = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
    assert len(warnings) == 1 and "registry.public_key is not set" in warnings[0]


def test_damaged_index_history_does_not_brick_the_device(
    fleet: Fleet, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.release(1)
    assert device.updater().channel_version() == 1
    history = device.root / "store" / HISTORY_FILE
    for junk in (b"{trunc", b'{"models": {"person-detector": {"version": "1"}}}', b"[1]"):
        history.write_bytes(junk)
        with caplog.at_level(logging.WARNING, logger="agent.signed_index"):
            assert device.updater().channel_version() == 1
        assert "damaged" in caplog.text
        assert json.loads(history.read_bytes())["models"][MODEL]["version"] == 1


def test_publishing_unsigned_over_a_signed_index_is_refused_and_changes_nothing(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.release(1)
    before = index_path(fleet).read_bytes()
    model = tmp_path / "m.tflite"
    model.write_bytes(tflite_bytes(100, 7))
    with pytest.raises(PublishError, match=r"is signed \(index.json.sig\).*pass --sign-key"):
        publish([model], model=MODEL, version=2, registry=fleet.registry, channels=("stable",))
    assert index_path(fleet).read_bytes() == before
    assert not (fleet.registry / MODEL / "2").exists()


def test_keygen_force_over_a_world_readable_key_writes_it_0600(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "registry.key").write_text("old\n")
    os.chmod(keys / "registry.key", 0o644)
    result = fleet_cli("keygen", "--out", str(keys), "--force")
    assert result.returncode == 0, result.stderr
    assert (keys / "registry.key").stat().st_mode & 0o777 == 0o600
    assert f"key id {key_id(load_private_key(keys / 'registry.key'))}" in result.stdout


def test_keygen_force_over_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not a key\n")
    os.chmod(victim, 0o644)
    (keys / "registry.key").symlink_to(victim)
    assert fleet_cli("keygen", "--out", str(keys)).returncode == 1  # exists: refused
    generate_keypair(keys, force=True)
    assert victim.read_text() == "not a key\n" and victim.stat().st_mode & 0o777 == 0o644
    assert not (keys / "registry.key").is_symlink()
    assert (keys / "registry.key").stat().st_mode & 0o777 == 0o600
