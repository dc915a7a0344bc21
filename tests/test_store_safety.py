"""Store file safety: what is planted in ``tmp/`` or ``blobs/`` is never followed or reused.

A symbolic link, a hard link or a folder standing where the store expects its own
file must neither redirect a write or a chmod to another file nor become part of a
release. Pulls run over the real loopback HTTP registry, into real files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.manifest import FileEntry, parse_manifest
from agent.registry import Registry
from agent.store import Store
from tests.conftest import Device, Fleet, serving_v1_with_v2_published
from tests.registry_server import RegistryServer

V2_SIZE = 300_000


@pytest.fixture
def on_v1(fleet: Fleet, device: Device, server: RegistryServer) -> Device:
    """A device serving v1, with v2 published and not yet pulled."""
    return serving_v1_with_v2_published(fleet, device, server, v2_size=V2_SIZE)


@pytest.fixture
def entry(fleet: Fleet, on_v1: Device) -> FileEntry:
    """v2's model file, as its manifest lists it."""
    raw = fleet.path(2, "manifest.json").read_bytes()
    return parse_manifest(raw, "manifest.json").file("model.tflite")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the store that a planted link points at (as /etc/… would be)."""
    path = tmp_path / "outside" / "victim.conf"
    path.parent.mkdir()
    path.write_bytes(b"precious = true\n" * 64)
    path.chmod(0o640)
    return path


def _untouched(victim: Path) -> None:
    assert victim.read_bytes() == b"precious = true\n" * 64
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640


def _is_plain_blob(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert stat.S_IMODE(st.st_mode) == 0o444


def test_symlink_planted_at_the_partial_download_is_not_followed(
    on_v1: Device, entry: FileEntry, victim: Path
) -> None:
    store = on_v1.store
    store.part_path(entry).symlink_to(victim)
    assert on_v1.updater().pull(2).changed
    _untouched(victim)
    on_v1.assert_serving(2)
    _is_plain_blob(store.blobs / entry.sha256)


def test_download_into_a_symlinked_partial_writes_a_new_file_not_the_target(
    on_v1: Device, entry: FileEntry, victim: Path, server: RegistryServer
) -> None:
    """The registry's own open, with no store clean-up before it (a link planted late)."""
    store = on_v1.store
    part = store.part_path(entry)
    part.symlink_to(victim)
    registry = Registry(server.url, timeout_s=2, deadline_s=10, retries=1)
    try:
        digest = registry.download(f"person-detector/2/{entry.name}", part, entry.size)
    finally:
        registry.close()
    _untouched(victim)
    assert digest == entry.sha256
    assert not part.is_symlink() and part.stat().st_size == entry.size
    # a range request would mean the victim's bytes were taken as a partial download
    assert [r.range_start for r in server.requests_for(f"person-detector/2/{entry.name}")] == [None]


def test_hard_link_planted_at_the_partial_download_is_not_written_through(
    on_v1: Device, entry: FileEntry, victim: Path, server: RegistryServer
) -> None:
    part = on_v1.store.part_path(entry)
    os.link(victim, part)
    registry = Registry(server.url, timeout_s=2, deadline_s=10, retries=1)
    try:
        assert registry.download(f"person-detector/2/{entry.name}", part, entry.size) == (
            entry.sha256
        )
    finally:
        registry.close()
    _untouched(victim)
    assert os.lstat(part).st_nlink == 1


def test_installing_a_partial_that_became_a_symlink_never_chmods_its_target(
    on_v1: Device, entry: FileEntry, victim: Path
) -> None:
    store = on_v1.store
    part = store.part_path(entry)
    part.symlink_to(victim)
    with pytest.raises(StoreError, match=r"cannot install into") as caught:
        store.install_blob(entry, part, entry.sha256)
    assert "\n" not in str(caught.value)
    _untouched(victim)
    assert not (store.blobs / entry.sha256).exists()


def test_symlink_planted_as_a_blob_is_not_trusted_and_is_replaced(
    on_v1: Device, entry: FileEntry, fleet: Fleet, tmp_path: Path
) -> None:
    # The link points at a file with the right bytes: it would pass the hash check
    # today, and whoever owns that file could change the model under the device later.
    lookalike = tmp_path / "outside" / "lookalike.tflite"
    lookalike.parent.mkdir()
    lookalike.write_bytes(fleet.path(2, "model.tflite").read_bytes())
    lookalike.chmod(0o644)
    store = on_v1.store
    (store.blobs / entry.sha256).symlink_to(lookalike)
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)
    _is_plain_blob(store.blobs / entry.sha256)
    assert stat.S_IMODE(lookalike.stat().st_mode) == 0o644


def test_symlink_planted_as_a_blob_does_not_count_as_stored(
    on_v1: Device, entry: FileEntry, fleet: Fleet, tmp_path: Path
) -> None:
    lookalike = tmp_path / "lookalike.tflite"
    lookalike.write_bytes(fleet.path(2, "model.tflite").read_bytes())
    store = on_v1.store
    (store.blobs / entry.sha256).symlink_to(lookalike)
    assert not store.has_blob(entry)


@pytest.mark.parametrize("where", ["part", "blob"])
def test_folder_planted_in_place_of_a_file_is_cleared_and_the_pull_succeeds(
    on_v1: Device, entry: FileEntry, where: str
) -> None:
    store = on_v1.store
    path = store.part_path(entry) if where == "part" else store.blobs / entry.sha256
    (path / "inside").mkdir(parents=True)
    (path / "inside" / "file").write_bytes(b"x")
    result = on_v1.cli("models", "pull", "--version", "2")  # the real entry point
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    on_v1.assert_serving(2)
    if where == "blob":
        _is_plain_blob(path)
    assert on_v1.leftovers() == []


def test_download_into_a_folder_is_one_store_error_line(
    on_v1: Device, entry: FileEntry, server: RegistryServer
) -> None:
    part = on_v1.store.part_path(entry)
    part.mkdir()
    registry = Registry(server.url, timeout_s=2, deadline_s=10, retries=1)
    try:
        with pytest.raises(StoreError, match=r"\.part: cannot write: Is a directory") as caught:
            registry.download(f"person-detector/2/{entry.name}", part, entry.size)
    finally:
        registry.close()
    assert "\n" not in str(caught.value)
    assert part.is_dir()


def test_symlinked_store_lock_never_writes_into_its_target(on_v1: Device, victim: Path) -> None:
    store = on_v1.store
    lock = store.root / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    with store.lock():
        pass
    _untouched(victim)
    assert not lock.is_symlink()


def test_planted_files_are_reported_as_repairs(
    on_v1: Device, entry: FileEntry, victim: Path
) -> None:
    store = on_v1.store
    store.part_path(entry).symlink_to(victim)
    with store.lock():
        pass
    repairs = store.take_repairs()
    assert [(r.file, r.problem) for r in repairs] == [
        (str(store.part_path(entry)), "a symbolic link, not a file of ours")
    ]
    assert store.take_repairs() == []


@pytest.fixture
def outside_folder(tmp_path: Path) -> Path:
    """A folder outside the store holding files the agent may delete but must not."""
    folder = tmp_path / "outside-folder"
    (folder / "7").mkdir(parents=True)
    (folder / "7" / "manifest.json").write_bytes(b"{}")
    for name in ("precious.conf", "x.part", "1" * 64):
        (folder / name).write_bytes(b"precious\n")
    return folder


def _folder_untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["7", "precious.conf", "x.part", "1" * 64]
    )
    assert (folder / "7" / "manifest.json").read_bytes() == b"{}"


@pytest.mark.parametrize("name", ["blobs", "tmp", "releases"])
def test_a_store_folder_replaced_by_a_symlink_is_never_followed_or_emptied(
    on_v1: Device, outside_folder: Path, name: str
) -> None:
    store = on_v1.store
    folder = store.root / name
    folder.rename(store.root / f"{name}.real")  # (v1's files stay out of reach)
    folder.symlink_to(outside_folder)
    result = on_v1.cli("models", "pull", "--version", "2")
    assert result.returncode == 0, result.stderr
    _folder_untouched(outside_folder)
    assert not folder.is_symlink() and folder.is_dir()
    on_v1.assert_serving(2)


@pytest.mark.parametrize("name", ["blobs", "tmp", "releases"])
def test_a_dangling_symlink_in_place_of_a_store_folder_is_replaced_and_reported(
    on_v1: Device, tmp_path: Path, name: str
) -> None:
    store = on_v1.store
    folder = store.root / name
    folder.rename(store.root / f"{name}.real")
    folder.symlink_to(tmp_path / "nowhere")
    result = on_v1.cli("models", "pull", "--version", "2")
    assert result.returncode == 0, result.stderr
    assert not folder.is_symlink() and folder.is_dir()
    on_v1.assert_serving(2)
    fresh = Store(store.root)
    folder.rename(store.root / f"{name}.second")
    folder.symlink_to(tmp_path / "nowhere")
    fresh.open()
    first = fresh.repair()[0]  # (releases/ gone also leaves the pointer naming nothing)
    assert (first.file, first.problem) == (
        str(folder),
        "a symbolic link, not the store's own folder",
    )


def test_a_symlinked_model_folder_in_releases_is_removed_not_followed(
    on_v1: Device, outside_folder: Path
) -> None:
    on_v1.set("store", keep=1)  # the clean-up would remove other-model v7
    store = on_v1.store
    (store.releases / "other-model").symlink_to(outside_folder)
    result = on_v1.cli("models", "pull", "--version", "2")
    assert result.returncode == 0, result.stderr
    _folder_untouched(outside_folder)
    assert not (store.releases / "other-model").is_symlink()
    on_v1.assert_serving(2)


def test_a_fifo_planted_as_a_stored_manifest_never_hangs_a_pull(on_v1: Device) -> None:
    manifest = on_v1.store.releases / "person-detector" / "1" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    result = on_v1.cli("models", "pull", "--version", "2", timeout=20)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    on_v1.assert_serving(2)
