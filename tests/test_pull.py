"""Pulling releases over real HTTP from a loopback registry that injects faults.

In every failure case the active release keeps serving (same version, files intact),
nothing half-downloaded is left to become active, and the error says what was wrong.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import (
    RefusedError,
    RegistryError,
    StoreError,
    TransportError,
    VerificationError,
)
from agent.fleet.publish import publish
from agent.registry import DeadlineError, Registry, UnreachableError
from agent.verify import load_private_key, sign
from tests.conftest import MODEL, Device, Fleet, serving_v1_with_v2_published, tflite_bytes
from tests.registry_server import RegistryServer

MODEL_FILE = f"{MODEL}/2/model.tflite"


@pytest.fixture
def on_v1(fleet: Fleet, device: Device, server: RegistryServer) -> Device:
    """A device serving v1, with v2 (300_000 bytes) published and not yet pulled."""
    return serving_v1_with_v2_published(fleet, device, server, v2_size=300_000)


def test_pull_installs_verified_release_and_activates_it(fleet: Fleet, device: Device) -> None:
    manifest = fleet.release(1, edgetpu=True)
    result = device.updater().pull()
    assert result.changed and result.release.version == 1
    assert result.fetched_bytes == sum(f["size"] for f in manifest["files"])
    device.assert_serving(1)
    store = device.store
    # Files are stored by hash, never under a name from the manifest.
    assert sorted(p.name for p in store.blobs.iterdir()) == sorted(
        f["sha256"] for f in manifest["files"]
    )
    assert device.leftovers() == []


def test_pulling_the_active_version_again_changes_nothing(
    on_v1: Device, server: RegistryServer
) -> None:
    result = on_v1.updater().pull(1)
    assert not result.changed and "already active" in result.note
    assert not any(r.path.endswith(".tflite") for r in server.log)


def test_channel_never_moves_the_device_backwards(fleet: Fleet, on_v1: Device) -> None:
    on_v1.updater().pull(2)
    fleet.release(1)  # re-publishing v1 unchanged is a no-op that moves stable back to v1
    result = on_v1.updater().pull()
    assert not result.changed and "never moves a device backwards" in result.note
    on_v1.assert_serving(2)


def test_truncated_download_keeps_old_model_serving(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "truncate", at=100_000, times=-1)
    with pytest.raises(TransportError, match=r"truncated at 100000 of 300000 bytes"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)
    # Resumes were attempted from where each cut left off, never from zero.
    starts = [r.range_start for r in server.requests_for(MODEL_FILE)]
    assert starts[0] is None and all(s == 100_000 for s in starts[1:])


def test_cut_download_resumes_with_range_and_fetches_only_the_rest(
    on_v1: Device, server: RegistryServer
) -> None:
    server.fault(MODEL_FILE, "truncate", at=120_000)
    result = on_v1.updater().pull(2)
    assert result.changed
    on_v1.assert_serving(2)
    requests = server.requests_for(MODEL_FILE)
    assert [(r.range_start, r.sent) for r in requests] == [(None, 120_000), (120_000, 180_000)]
    assert sum(r.sent for r in requests) == 300_000  # not one byte fetched twice


def test_pull_after_a_broken_off_one_counts_only_the_bytes_it_fetched(
    on_v1: Device, server: RegistryServer
) -> None:
    server.fault(MODEL_FILE, "truncate", at=120_000, times=3)  # the first try and 2 retries
    with pytest.raises(TransportError):
        on_v1.updater().pull(2)
    server.clear_log()
    result = on_v1.updater().pull(2)
    assert result.changed and result.fetched_bytes == 180_000
    assert [(r.range_start, r.sent) for r in server.requests_for(MODEL_FILE)] == [
        (120_000, 180_000)
    ]
    again = on_v1.updater().pull(2)  # already active: nothing crosses the network
    assert not again.changed and again.fetched_bytes == 0


def test_truncated_without_content_length_is_caught_by_manifest_size(
    on_v1: Device, server: RegistryServer
) -> None:
    server.fault(MODEL_FILE, "truncate_no_length", at=50_000, times=-1)
    with pytest.raises(TransportError, match=r"truncated at 50000 of 300000 bytes"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_body_longer_than_manifest_is_refused_before_reading(
    fleet: Fleet, on_v1: Device, server: RegistryServer
) -> None:
    with open(fleet.path(2, "model.tflite"), "ab") as f:
        f.write(b"EXTRA")
    with pytest.raises(VerificationError, match=r"server sends 300005 bytes, manifest says 300000"):
        on_v1.updater().pull(2)
    assert len(server.requests_for(MODEL_FILE)) == 1  # not retried
    on_v1.assert_serving(1)
    assert on_v1.leftovers() == []


def test_body_longer_than_manifest_without_content_length_is_cut_off(
    fleet: Fleet, on_v1: Device, server: RegistryServer
) -> None:
    with open(fleet.path(2, "model.tflite"), "ab") as f:
        f.write(b"x" * 5_000_000)
    server.fault(MODEL_FILE, "no_length")
    with pytest.raises(VerificationError, match=r"body longer than the manifest's 300000 bytes"):
        on_v1.updater().pull(2)
    # The hard maximum stops the read: far less than the 5.3 MB on offer lands on disk.
    on_v1.assert_serving(1)
    assert on_v1.leftovers() == []


def test_one_corrupted_byte_is_refused_and_nothing_kept(
    on_v1: Device, server: RegistryServer
) -> None:
    server.fault(MODEL_FILE, "corrupt", at=150_000)
    with pytest.raises(
        VerificationError, match=r"model.tflite: sha256 [0-9a-f]{64} does not match"
    ):
        on_v1.updater().pull(2)
    assert len(server.requests_for(MODEL_FILE)) == 1  # verification errors are not retried
    on_v1.assert_serving(1)
    assert on_v1.leftovers() == []
    # The next pull fetches clean bytes and succeeds.
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)


def test_trickling_server_hits_the_overall_deadline(on_v1: Device, server: RegistryServer) -> None:
    on_v1.set("registry", deadline_s=1.0, timeout_s=0.5)
    server.fault(MODEL_FILE, "trickle", interval=0.01, times=-1, max_seconds=5)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"overall deadline of 1 s exceeded"):
        on_v1.updater().pull(2)
    # Bytes kept arriving within the per-read timeout; only the deadline stopped it.
    assert time.monotonic() - started < 2.5
    on_v1.assert_serving(1)


def test_server_dribbling_headers_hits_the_overall_deadline(
    on_v1: Device, server: RegistryServer
) -> None:
    on_v1.set("registry", deadline_s=1.0, timeout_s=0.5)
    server.fault(f"{MODEL}/2/manifest.json", "slow_headers", interval=0.1, max_seconds=10)
    started = time.monotonic()
    with pytest.raises(DeadlineError, match=r"overall deadline of 1 s exceeded"):
        on_v1.updater().pull(2)
    # A header byte every 0.1 s never trips the 0.5 s read timeout; the deadline does.
    assert time.monotonic() - started < 2.5
    on_v1.assert_serving(1)


def test_stalled_server_trips_the_read_timeout(on_v1: Device, server: RegistryServer) -> None:
    on_v1.set("registry", timeout_s=0.3, retries=0)
    server.fault(MODEL_FILE, "stall", at=10_000, max_seconds=5)
    with pytest.raises(
        TransportError,
        match=r"transfer broke off at 10000 of 300000 bytes \(no data within the read timeout",
    ):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose accept queue is full: connection attempts get no answer at all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    waiting = []
    for _ in range(4):  # more than the queue holds; the kernel then drops the SYNs
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        waiting.append(client)
    yield port
    for client in waiting:
        client.close()
    listener.close()


def test_registry_giving_no_connection_fails_within_the_connect_timeout(silent_port: int) -> None:
    registry = Registry(
        f"http://127.0.0.1:{silent_port}/", timeout_s=30, connect_timeout_s=0.5, retries=5
    )
    started = time.monotonic()
    with pytest.raises(UnreachableError, match=r"no answer within 0.5 s \(registry.connect_"):
        registry.fetch_document(f"{MODEL}/index.json", 10_000)
    # Down when the fetch began: reported at once, the five retries not spent on it.
    assert time.monotonic() - started < 2.0
    registry.close()


def test_missing_file_404_is_not_retried(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "status", status=404)
    with pytest.raises(RegistryError, match=r"model.tflite: not found \(HTTP 404\)"):
        on_v1.updater().pull(2)
    assert len(server.requests_for(MODEL_FILE)) == 1
    on_v1.assert_serving(1)


def test_server_error_500_is_retried_then_given_up(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "status", status=500, times=-1)
    with pytest.raises(
        TransportError, match=r"HTTP 500 \(gave up on .*model.tflite after 3 attempts\)"
    ):
        on_v1.updater().pull(2)
    assert len(server.requests_for(MODEL_FILE)) == 3  # registry.retries = 2
    on_v1.assert_serving(1)


def test_transient_500_is_retried_and_succeeds(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "status", status=503)
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)


def test_redirect_to_another_host_is_refused(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "redirect", location=f"http://127.0.0.2:{server.port}/{MODEL_FILE}")
    with pytest.raises(RegistryError, match=r"redirected to another host \(http://127.0.0.2"):
        on_v1.updater().pull(2)
    assert all(r.path == MODEL_FILE for r in server.requests_for(MODEL_FILE))
    on_v1.assert_serving(1)


@pytest.fixture
def other_host(tmp_path: Path) -> Iterator[RegistryServer]:
    """A second server on another loopback address, serving the same paths."""
    root = tmp_path / "other-host"
    (root / MODEL / "2").mkdir(parents=True)
    (root / MODEL_FILE).write_bytes(b"not the registry's file")
    with RegistryServer(root, host="127.0.0.2") as srv:
        yield srv


@pytest.mark.parametrize(
    ("location", "refusal"),
    [
        # urlsplit reads host 127.0.0.1 here; urllib3, which connects, reads 127.0.0.2
        ("http://127.0.0.2:{other}\\@127.0.0.1:{port}/" + MODEL_FILE, "backslash"),
        ("http://127.0.0.2:{other}@127.0.0.1:{port}/" + MODEL_FILE, "user-info"),
        ("http://user@127.0.0.1:{port}/" + MODEL_FILE, "user-info"),
        ("//127.0.0.2:{other}/" + MODEL_FILE, "another host"),
        ("http://127.0.0.1:{port}\t@127.0.0.2:{other}/" + MODEL_FILE, "control characters"),
    ],
)
def test_redirect_read_differently_by_two_parsers_is_refused_and_never_followed(
    on_v1: Device, server: RegistryServer, other_host: RegistryServer, location: str, refusal: str
) -> None:
    hostile = location.format(port=server.port, other=other_host.port)
    server.fault(MODEL_FILE, "redirect", location=hostile)
    with pytest.raises(RegistryError, match=refusal) as caught:
        on_v1.updater().pull(2)
    assert "\n" not in str(caught.value)
    assert other_host.log == []  # not one request reached the other host
    on_v1.assert_serving(1)


def test_redirect_within_the_registry_is_followed(
    on_v1: Device, server: RegistryServer, fleet: Fleet
) -> None:
    mirror = fleet.registry / "mirror"
    mirror.mkdir()
    (mirror / "model.tflite").write_bytes(fleet.path(2, "model.tflite").read_bytes())
    server.fault(MODEL_FILE, "redirect", location="/mirror/model.tflite")
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)


def test_server_ignoring_range_restarts_cleanly(on_v1: Device, server: RegistryServer) -> None:
    server.fault(MODEL_FILE, "truncate", at=100_000)
    server.fault(MODEL_FILE, "ignore_range")
    result = on_v1.updater().pull(2)
    assert result.changed
    on_v1.assert_serving(2)
    # The first 100 kB came twice: the summary counts what crossed the network.
    assert result.fetched_bytes == 400_000 == sum(r.sent for r in server.requests_for(MODEL_FILE))


def test_resume_answered_with_another_range_is_not_spliced_in(
    on_v1: Device, server: RegistryServer
) -> None:
    server.fault(MODEL_FILE, "truncate", at=100_000)
    server.fault(MODEL_FILE, "shifted_range", at=10)
    assert on_v1.updater().pull(2).changed  # the bad answer is dropped and asked again
    on_v1.assert_serving(2)
    assert [r.range_start for r in server.requests_for(MODEL_FILE)] == [None, 100_000, 100_000]


def test_unsigned_manifest_is_refused_when_a_key_is_configured(fleet: Fleet, on_v1: Device) -> None:
    fleet.release(3)
    fleet.path(3, "manifest.json.sig").unlink()
    with pytest.raises(VerificationError, match=r"3/manifest.json: unsigned"):
        on_v1.updater().pull(3)
    on_v1.assert_serving(1)


def test_manifest_signed_by_another_key_is_refused(fleet: Fleet, on_v1: Device) -> None:
    manifest = fleet.path(2, "manifest.json")
    fleet.path(2, "manifest.json.sig").write_bytes(
        sign(load_private_key(fleet.other_key), manifest.read_bytes())
    )
    with pytest.raises(VerificationError, match=r"not signed by a trusted key: signed by key"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_manifest_signed_by_another_key_in_the_old_bare_format_is_refused(
    fleet: Fleet, on_v1: Device
) -> None:
    manifest = fleet.path(2, "manifest.json")
    bare = base64.b64encode(load_private_key(fleet.other_key).sign(manifest.read_bytes()))
    fleet.path(2, "manifest.json.sig").write_bytes(bare + b"\n")
    with pytest.raises(VerificationError, match=r"bad signature"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_release_signed_in_the_old_bare_format_is_still_accepted(
    fleet: Fleet, on_v1: Device
) -> None:
    manifest = fleet.path(2, "manifest.json")
    bare = base64.b64encode(load_private_key(fleet.key).sign(manifest.read_bytes()))
    fleet.path(2, "manifest.json.sig").write_bytes(bare + b"\n")
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)


def test_manifest_changed_after_signing_is_refused(fleet: Fleet, on_v1: Device) -> None:
    path = fleet.path(2, "manifest.json")
    data = json.loads(path.read_bytes())
    data["files"][0]["size"] += 1  # any change at all
    path.write_text(json.dumps(data, indent=2) + "\n")
    with pytest.raises(VerificationError, match=r"bad signature"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_unsigned_release_is_accepted_without_a_configured_key(
    fleet: Fleet, device: Device
) -> None:
    device.set("registry", public_key=None)
    fleet.release(1, signed=False)
    assert device.updater().pull().changed
    device.assert_serving(1)


def test_rollback_by_version_number_is_refused(fleet: Fleet, on_v1: Device) -> None:
    on_v1.updater().pull(2)
    with pytest.raises(RefusedError, match=r"v1: lower than the active v2; refusing a downgrade"):
        on_v1.updater().pull(1)
    on_v1.assert_serving(2)
    # The explicit path (an operator's rollback instruction) is allowed.
    assert on_v1.updater().pull(1, allow_downgrade=True).release.version == 1


def test_same_version_with_different_bytes_is_refused(fleet: Fleet, on_v1: Device) -> None:
    on_v1.updater().pull(2)
    # Someone rewrites v2 in the registry behind publish's back (publish itself refuses).
    folder = fleet.registry / MODEL / "2"
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    fleet.release(2, seed=99)
    with pytest.raises(RefusedError, match=r"differs from the stored one .* must never change"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(2)


def _rewrite_manifest(fleet: Fleet, version: int, change: dict[str, object]) -> None:
    path = fleet.path(version, "manifest.json")
    data = json.loads(path.read_bytes())
    for key, value in change.items():
        if key.startswith("file0."):
            data["files"][0][key.removeprefix("file0.")] = value
        else:
            data[key] = value
    raw = (json.dumps(data, indent=2) + "\n").encode()
    path.write_bytes(raw)
    fleet.path(version, "manifest.json.sig").write_bytes(sign(load_private_key(fleet.key), raw))


@pytest.mark.parametrize(
    "name", ["../../../etc/cron.d/evil", "sub/model.tflite", "/etc/passwd", "..", "a\\b"]
)
def test_path_traversal_file_name_is_refused(
    fleet: Fleet, on_v1: Device, name: str, tmp_path: object
) -> None:
    _rewrite_manifest(fleet, 2, {"file0.name": name})  # validly signed: the key holder erred
    with pytest.raises(VerificationError, match=r"manifest.json: files\[0\]\.name: file name"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)
    assert on_v1.leftovers() == []


def test_manifest_naming_another_model_is_refused(fleet: Fleet, on_v1: Device) -> None:
    _rewrite_manifest(fleet, 2, {"model": "other-model"})
    with pytest.raises(
        VerificationError, match=r"model is 'other-model', expected 'person-detector'"
    ):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_manifest_replayed_under_another_version_is_refused(fleet: Fleet, on_v1: Device) -> None:
    _rewrite_manifest(fleet, 2, {"version": 7})
    with pytest.raises(VerificationError, match=r"version is 7, but it was fetched as v2"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_oversized_manifest_is_refused(fleet: Fleet, on_v1: Device, server: RegistryServer) -> None:
    on_v1.set("registry", max_manifest_kb=4)
    _rewrite_manifest(fleet, 2, {"created": "x" * 10_000})
    with pytest.raises(
        VerificationError, match=r"2/manifest.json: \d+ bytes, over the limit of 4000"
    ):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_oversized_manifest_without_length_is_cut_off(
    fleet: Fleet, on_v1: Device, server: RegistryServer
) -> None:
    on_v1.set("registry", max_manifest_kb=4)
    _rewrite_manifest(fleet, 2, {"created": "x" * 10_000})
    server.fault(f"{MODEL}/2/manifest.json", "no_length")
    with pytest.raises(VerificationError, match=r"longer than the limit of 4000 bytes"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_file_over_max_download_is_refused_before_download(
    on_v1: Device, server: RegistryServer
) -> None:
    on_v1.set("registry", max_download_mb=0.1)
    with pytest.raises(
        RefusedError, match=r"model.tflite is 0.3 MB, over registry.max_download_mb \(0.1\)"
    ):
        on_v1.updater().pull(2)
    assert server.requests_for(MODEL_FILE) == []
    on_v1.assert_serving(1)


def test_free_space_is_checked_before_downloading(on_v1: Device, server: RegistryServer) -> None:
    free_mb = on_v1.store.free_bytes() / 1e6
    on_v1.set("store", reserve_mb=free_mb + 1000)
    with pytest.raises(StoreError, match=r"not enough free space .* store.reserve_mb keeps"):
        on_v1.updater().pull(2)
    assert server.requests_for(MODEL_FILE) == []
    on_v1.assert_serving(1)


def test_bad_kept_partial_is_discarded_and_fetched_from_zero(
    on_v1: Device, server: RegistryServer
) -> None:
    manifest = on_v1.updater()._fetch_manifest(2)[2]
    entry = manifest.file("model.tflite")
    store = on_v1.store
    store.part_path(entry).write_bytes(b"\xff" * 100_000)  # an earlier attempt's bad bytes
    result = on_v1.updater().pull(2)
    assert result.changed
    on_v1.assert_serving(2)
    assert [r.range_start for r in server.requests_for(MODEL_FILE)] == [100_000, None]
    assert result.fetched_bytes == 500_000  # the 200 kB resumed onto bad bytes, then all
    assert on_v1.leftovers() == []


def test_nothing_to_download_needs_no_free_space(on_v1: Device) -> None:
    free_mb = on_v1.store.free_bytes() / 1e6
    on_v1.set("store", reserve_mb=free_mb + 1000)
    result = on_v1.updater().pull(1)  # the active release, all files already stored
    assert not result.changed and result.note == "v1 is already active"
    on_v1.assert_serving(1)


def test_damaged_stored_blob_is_fetched_again(
    fleet: Fleet, on_v1: Device, server: RegistryServer
) -> None:
    # v3 shares its labels file with v1; bit rot in the stored copy must not be reused.
    fleet.release(3)
    store = on_v1.store
    active = store.active()
    assert active is not None
    labels = active.path(active.manifest.file("labels.txt"))
    labels.chmod(0o644)
    labels.write_bytes(b"rotten\n")
    assert on_v1.updater().pull(3).changed
    on_v1.assert_serving(3)
    assert [r.path for r in server.log if r.path.endswith("labels.txt")] == [
        f"{MODEL}/3/labels.txt"
    ]


def test_a_second_command_never_clears_a_running_update_half_way(on_v1: Device) -> None:
    # Another process is mid-install: it holds the lock and has a release staged.
    store = on_v1.store
    staged = store.tmp / "release-person-detector-2-abcd1234"
    with store.lock():
        staged.mkdir()
        (staged / "manifest.json").write_bytes(b"{}")
        assert on_v1.store.open() is not None  # what every command does first
        busy = on_v1.cli("models", "pull", "--version", "2")
        assert busy.returncode == 1 and "is busy" in busy.stderr
        assert (staged / "manifest.json").exists()  # untouched while the writer lives
    # Once the writer is gone (crashed), the next holder of the lock clears it.
    with store.lock():
        assert not staged.exists()
    on_v1.assert_serving(1)


def test_pulling_the_active_version_repairs_its_damaged_files(on_v1: Device) -> None:
    store = on_v1.store
    active = store.active()
    assert active is not None
    model = active.path(active.manifest.file("model.tflite"))
    model.chmod(0o644)
    model.write_bytes(b"bit rot")
    result = on_v1.updater().pull(1)
    assert not result.changed and result.note == "v1 is already active (repaired)"
    on_v1.assert_serving(1)


def test_unsigned_registry_is_not_asked_for_signatures_without_a_key(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    device.set("registry", public_key=None)
    fleet.release(1)
    assert device.updater().pull().changed
    assert not [r for r in server.log if r.path.endswith(".sig")]
    assert (device.store.releases / MODEL / "1" / "manifest.json.sig").exists() is False


def test_concurrent_update_is_refused_while_the_store_is_locked(on_v1: Device) -> None:
    with on_v1.store.lock(), pytest.raises(StoreError, match=r"is busy: another update holds it"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)


def test_store_keeps_the_configured_number_of_releases(fleet: Fleet, on_v1: Device) -> None:
    on_v1.set("store", keep=2)
    for version in (2, 3, 4):
        if version > 2:
            fleet.release(version)
        on_v1.updater().pull(version)
    store = on_v1.store
    assert store.versions(MODEL) == [3, 4]
    needed = {f.sha256 for v in (3, 4) for f in store.release(MODEL, v).manifest.files}  # type: ignore[union-attr]
    assert {p.name for p in store.blobs.iterdir()} == needed


def test_registry_over_file_url(fleet: Fleet, device: Device) -> None:
    device.set("registry", url=fleet.registry.as_uri())
    fleet.release(1)
    assert device.updater().pull().changed
    device.assert_serving(1)


def test_release_with_an_empty_file_installs(fleet: Fleet, device: Device, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.mkdir()
    (src / "model.tflite").write_bytes(tflite_bytes(1000, 5))
    (src / "labels.txt").write_bytes(b"")
    publish(
        [src / "model.tflite"],
        model=MODEL,
        version=1,
        registry=fleet.registry,
        labels=src / "labels.txt",
        sign_key=fleet.key,
        channels=("stable",),
    )
    assert device.updater().pull().changed
    device.assert_serving(1)


@pytest.mark.parametrize(
    ("header", "value"),
    [("Location", "http://[::1/x"), ("Location", "http://127.0.0.1:99999/x")],
)
def test_unusable_redirect_is_a_registry_error(
    on_v1: Device, server: RegistryServer, header: str, value: str
) -> None:
    server.fault(MODEL_FILE, "redirect", location=value)
    with pytest.raises(RegistryError, match=r"unusable redirect to"):
        on_v1.updater().pull(2)
    on_v1.assert_serving(1)
