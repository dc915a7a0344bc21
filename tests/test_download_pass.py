"""A download is received, written and hashed in one pass, over a real loopback registry.

The hash is computed on a helper thread (agent/hashing.py) while the next chunk is
received; a file just downloaded and checked is not read a second time; written
bytes are handed to the disk as they come (writeback windows); small documents do
not wait on the server's Nagle and the client's delayed ACK.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import pytest

from agent import registry as registry_module
from agent import store as store_module
from agent.hashing import BackgroundSha256
from agent.registry import Registry
from tests.conftest import MODEL, Device, Fleet, serving_v1_with_v2_published
from tests.registry_server import RegistryServer

MODEL_FILE = f"{MODEL}/2/model.tflite"

CHUNKINGS = {
    "nothing": [],
    "one empty chunk": [b""],
    "one byte": [b"a"],
    "small chunks (hashed holding the GIL)": [bytes([i]) * 100 for i in range(50)],
    "1 MiB chunks": [os.urandom(1 << 20) for _ in range(5)],
    "mixed sizes and empties": [b"x" * 3000, b"", b"y", os.urandom(70_000), b"z" * 2047],
}


@pytest.mark.parametrize("depth", [1, 2, 8])
@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_background_sha256_is_the_sha256_of_the_chunks_in_order(name: str, depth: int) -> None:
    chunks = CHUNKINGS[name]
    with BackgroundSha256(depth) as digest:
        for chunk in chunks:
            digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_background_sha256_takes_no_chunk_after_its_digest() -> None:
    digest = BackgroundSha256()
    digest.update(b"abc")
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ValueError, match="after hexdigest"):
        digest.update(b"more")
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()  # unchanged, no wait


def test_background_sha256_thread_ends_when_the_block_is_left_by_an_error() -> None:
    with pytest.raises(RuntimeError), BackgroundSha256() as digest:
        digest.update(os.urandom(1 << 20))
        raise RuntimeError("the download broke off")
    assert not digest._thread.is_alive()


@pytest.fixture
def on_v1(fleet: Fleet, device: Device, server: RegistryServer) -> Device:
    return serving_v1_with_v2_published(fleet, device, server, v2_size=300_000)


def test_a_downloaded_file_is_not_read_a_second_time(
    on_v1: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name for p in on_v1.store.blobs.iterdir()}
    rechecked: list[Path] = []
    check_file = store_module.check_file

    def spy(path: Path, size: int, sha256: str, what: str) -> None:
        rechecked.append(path)
        check_file(path, size, sha256, what)

    monkeypatch.setattr(store_module, "check_file", spy)
    result = on_v1.updater().pull(2)
    assert result.changed
    downloaded = {p.name for p in on_v1.store.blobs.iterdir()} - before
    assert downloaded  # v2 brought new files, checked as they were received ...
    assert not [p for p in rechecked if p.name in downloaded]  # ... and not read again
    monkeypatch.undo()
    on_v1.assert_serving(2)  # whole and matching the manifest, as it lies on disk


def test_download_across_writeback_windows_and_a_cut_is_whole(
    on_v1: Device, server: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "WRITEBACK_BYTES", 40_000)
    windows: list[tuple[int, int]] = []
    fadvise = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        windows.append((offset, length))
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    server.fault(MODEL_FILE, "truncate", at=120_000)
    assert on_v1.updater().pull(2).changed
    on_v1.assert_serving(2)
    # Each transfer hands its bytes over in windows that follow each other, from where
    # it started: 0 for the first, the cut for the resumed one.
    assert windows and windows[0][0] == 0
    resumed = [w for w in windows if w[0] >= 120_000]
    assert resumed and resumed[0][0] == 120_000
    for (a, n), (b, _) in itertools.pairwise(windows):
        assert b in (a + n, 120_000)


def test_small_documents_do_not_wait_for_delayed_acks(fleet: Fleet, server: RegistryServer) -> None:
    # The test server writes headers and body in two sends without TCP_NODELAY (as
    # Python's http.server does): without TCP_QUICKACK on our side each document
    # costs the client's delayed ACK, 40 ms on Linux. 25 documents: >= 1 s then.
    fleet.release(1)
    registry = Registry(server.url)
    try:
        registry.fetch_document(f"{MODEL}/index.json", 100_000)  # connection made
        started = time.monotonic()
        for _ in range(25):
            registry.fetch_document(f"{MODEL}/index.json", 100_000)
        elapsed = time.monotonic() - started
    finally:
        registry.close()
    assert elapsed < 0.5, f"25 documents took {elapsed:.2f} s"
