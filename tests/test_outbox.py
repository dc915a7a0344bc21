"""The SQLite outbox on its own: numbering, durability across reopen, the cap, damage."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.outbox import Outbox, OutboxError, Record


def _rec(stream: str, i: int, *, keep: bool = True, size: int = 0) -> Record:
    body = {"ts": 1.0, "i": i, "pad": "x" * size}
    return Record(stream, f"edge/d/{stream}", body, keep=keep)


def _seqs(outbox: Outbox) -> list[tuple[str, int]]:
    return [
        (m.topic.rsplit("/", 1)[1], json.loads(m.payload)["seq"]) for m in outbox.pending(0, 10_000)
    ]


def test_each_stream_counts_from_one_and_keeps_counting_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, 10**7).open()
    outbox.write([_rec("telemetry", 0), _rec("events", 0), _rec("telemetry", 1)])
    outbox.close()
    outbox = Outbox(path, 10**7).open()
    messages, _ = outbox.write([_rec("telemetry", 2), _rec("status", 0, keep=False)])
    assert _seqs(outbox) == [("telemetry", 1), ("events", 1), ("telemetry", 2), ("telemetry", 3)]
    direct = messages[1]
    assert direct.rowid == 0 and json.loads(direct.payload)["seq"] == 1  # numbered, not kept
    doc = json.loads(messages[0].payload)
    assert doc["schema"] == 1 and doc["ts"] == 1.0 and len(doc["id"]) == 24
    assert outbox.stats().depth == 4


def test_a_body_cannot_overwrite_the_envelope_id_or_seq(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", 10**7).open()
    body = {"ts": 1.0, "id": "same", "seq": 99, "schema": 7, "event": "x"}
    messages, _ = outbox.write([Record("events", "edge/d/events", body) for _ in range(3)])
    docs = [json.loads(m.payload) for m in messages]
    assert [d["seq"] for d in docs] == [1, 2, 3] and {d["schema"] for d in docs} == {1}
    assert len({d["id"] for d in docs}) == 3 and "same" not in {d["id"] for d in docs}
    assert list(docs[0])[:3] == ["schema", "seq", "id"]


def test_acknowledged_rows_leave_and_row_ids_never_repeat(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, 10**7).open()
    messages, _ = outbox.write([_rec("events", i) for i in range(3)])
    outbox.write([], [m.rowid for m in messages])
    assert outbox.stats().depth == 0 and outbox.stats().bytes == 0
    outbox.close()
    outbox = Outbox(path, 10**7).open()  # an empty table must not hand out old row ids again
    again, _ = outbox.write([_rec("events", 3)])
    assert again[0].rowid > messages[-1].rowid
    assert json.loads(again[0].payload)["seq"] == 4


def test_cap_drops_the_oldest_and_counts_them_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, 5_000).open()
    dropped_total = 0
    for i in range(40):
        _, dropped = outbox.write([_rec("results", i, size=400)])
        dropped_total += sum(dropped.values())
    stats = outbox.stats()
    assert stats.bytes <= 5_000 and dropped_total == stats.dropped > 0
    seqs = [s for _, s in _seqs(outbox)]
    assert seqs == list(range(41 - len(seqs), 41))  # the newest survive, in order
    assert len(seqs) + stats.dropped == 40
    outbox.close()
    assert Outbox(path, 5_000).open().stats().dropped == stats.dropped


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    outbox = Outbox(path, 10**6).open()
    outbox.write([_rec("events", 0)])
    assert outbox.stats().depth == 1
    aside = list(tmp_path.glob("outbox.sqlite.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not sqlite")
    assert outbox.repair is not None and outbox.repair.kept_as == aside[0]


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match="cannot create the outbox folder"):
        Outbox(blocker / "sub" / "outbox.sqlite", 10**6).open()


def test_written_messages_are_committed_before_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, 10**6).open()
    outbox.write([_rec("events", i) for i in range(5)])
    # a second connection (another process after a crash) sees them at once
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 5
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
