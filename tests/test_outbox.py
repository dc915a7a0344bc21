"""The SQLite outbox on its own: numbering, durability across reopen, the cap, damage."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from agent.outbox import SEQ_BLOCK, Outbox, OutboxError, OutboxStats, Record


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


# -- a damaged file never stops the agent, and seq never goes back -------------------------


def _filled(path: Path, telemetry: int = 30, events: int = 3) -> dict[str, int]:
    """An outbox with messages in it, closed; returns the last seq of each stream."""
    outbox = Outbox(path, 10**7).open()
    outbox.write([_rec("telemetry", i) for i in range(telemetry)])
    outbox.write([_rec("events", i) for i in range(events)])
    outbox.close()
    return {"telemetry": telemetry, "events": events}


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def _next_seqs(outbox: Outbox) -> dict[str, int]:
    messages, _ = outbox.write([_rec("telemetry", 99), _rec("events", 99)])
    return {m.topic.rsplit("/", 1)[1]: json.loads(m.payload)["seq"] for m in messages}


@pytest.mark.parametrize(
    "counter, value",
    [("seq:telemetry", "'many'"), ("dropped", "'abc'"), ("seq:events", "-5"), ("seq:x", "4.5")],
)
def test_a_counter_of_the_wrong_type_replaces_the_outbox_and_seq_keeps_rising(
    tmp_path: Path, counter: str, value: str
) -> None:
    path = tmp_path / "outbox.sqlite"
    last = _filled(path)
    _sql(path, f"INSERT OR REPLACE INTO counters (name, value) VALUES ('{counter}', {value})")
    outbox = Outbox(path, 10**7).open()
    repair = outbox.repair
    assert repair is not None and counter in repair.problem and repair.lost == 0
    assert repair.kept_as.name.startswith("outbox.sqlite.damaged-") and repair.kept_as.exists()
    assert outbox.stats().depth == 33  # every message carried over
    seqs = _next_seqs(outbox)
    assert seqs["telemetry"] > last["telemetry"] and seqs["events"] > last["events"]
    event = repair.to_event()
    assert event["file"] == str(path) and event["action"].startswith("replaced; ")


def test_message_rows_that_cannot_be_sent_are_left_behind_and_counted_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite"
    last = _filled(path)
    _sql(
        path,
        "UPDATE messages SET qos = 'one' WHERE rowid = 2",
        "UPDATE messages SET size = x'00' WHERE rowid = 5",
    )
    outbox = Outbox(path, 10**7).open()
    assert outbox.repair is not None and outbox.repair.lost == 1  # a size is recomputed
    assert "2 row(s) of table messages" in outbox.repair.problem
    kept = outbox.pending(0, 100)
    assert len(kept) == 32 and all(m.qos == 1 for m in kept)
    assert _next_seqs(outbox) == {"telemetry": last["telemetry"] + 1, "events": last["events"] + 1}


@pytest.mark.parametrize("how", ["half", "empty", "garbled"])
def test_a_truncated_or_garbled_outbox_continues_seq_from_the_high_water_mark(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "outbox.sqlite"
    last = _filled(path)
    data = path.read_bytes()
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x5a" * 100 + data[100:])
    outbox = Outbox(path, 10**7).open()
    assert outbox.repair is not None and outbox.repair.seq_from == "high-water mark"
    if how == "half":
        assert outbox.repair.kept_as.read_bytes() == data[: len(data) // 2]
    seqs = _next_seqs(outbox)
    assert seqs["telemetry"] > last["telemetry"] and seqs["events"] > last["events"]
    assert outbox.repair.to_event()["lost"] in ("unknown", 33)


def test_only_the_newest_damaged_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    for stamp in (1000000001, 1000000002, 1000000003):
        Path(f"{path}.damaged-{stamp}").write_bytes(b"old")
    Path(f"{path}.damaged-1000000001-wal").write_bytes(b"old")
    path.write_bytes(b"garbage" * 100)
    outbox = Outbox(path, 10**6).open()
    assert outbox.repair is not None
    kept = sorted(p.name for p in tmp_path.glob("outbox.sqlite.damaged-*"))
    assert kept == [
        "outbox.sqlite.damaged-1000000002",
        "outbox.sqlite.damaged-1000000003",
        outbox.repair.kept_as.name,
    ]


def test_without_a_high_water_mark_seq_continues_from_the_clock_in_ms(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path)
    Path(f"{path}.seq").unlink()
    path.write_bytes(b"garbage" * 1000)
    before = time.time_ns() // 1_000_000
    outbox = Outbox(path, 10**7).open()
    assert outbox.repair is not None and outbox.repair.seq_from == "clock"
    assert outbox.repair.lost is None and outbox.repair.to_event()["lost"] == "unknown"
    assert min(_next_seqs(outbox).values()) > before
    outbox.close()
    # and it keeps counting from there across a restart
    again = Outbox(path, 10**7).open()
    assert again.repair is None and min(_next_seqs(again).values()) > before + 1


def test_a_deleted_outbox_does_not_start_seq_again_at_one(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    last = _filled(path)
    path.unlink()
    outbox = Outbox(path, 10**7).open()
    seqs = _next_seqs(outbox)
    assert seqs["telemetry"] > last["telemetry"] and seqs["events"] > last["events"]


def test_the_high_water_mark_is_written_ahead_not_per_message(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, 10**8).open()
    mark = Path(f"{path}.seq")
    outbox.write([_rec("results", 0)])
    first = json.loads(mark.read_text())["seq"]["results"]
    written = mark.stat().st_mtime_ns
    for i in range(20):
        outbox.write([_rec("results", i) for _ in range(50)])
    assert mark.stat().st_mtime_ns == written  # 1001 messages: still under the mark
    assert first == 1 + SEQ_BLOCK
    outbox.write([_rec("results", 0) for _ in range(SEQ_BLOCK)])
    assert json.loads(mark.read_text())["seq"]["results"] > 1002 + SEQ_BLOCK


def test_an_outbox_from_before_streams_is_migrated_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE messages (rowid INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
            size INTEGER NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO messages (topic, payload, qos, retain, size) VALUES
            ('edge/d/results', x'7b7d', 1, 0, 100), ('edge/d/state', x'7b7d', 1, 1, 100);
        INSERT INTO counters VALUES ('seq:results', 7), ('seq:state', 2), ('dropped', 3);
        """
    )
    db.close()
    outbox = Outbox(path, 10**7).open()
    assert outbox.repair is None and outbox.stats() == OutboxStats(2, 200, 3)
    assert json.loads(outbox.write([_rec("results", 0)])[0][0].payload)["seq"] == 8
    outbox.max_bytes = 250  # the old results row goes first, not the older-than-it state
    outbox.write([])
    left = [(m.topic, m.payload) for m in outbox.pending(0, 10)]
    assert left[0] == ("edge/d/state", b"{}") and len(left) == 2
    assert json.loads(left[1][1])["seq"] == 8


# -- the cap ------------------------------------------------------------------------


def test_the_cap_drops_results_then_telemetry_then_events_then_state(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", 10**7).open()
    order = ["state", "events", "telemetry", "results"]  # oldest first: the reverse of drops
    for stream in order:
        outbox.write([_rec(stream, i, size=100) for i in range(5)])
    size = outbox.stats().bytes // 20  # every row is the same size, give or take the topic
    dropped_so_far: list[str] = []
    for keep in (15, 10, 5, 0):
        outbox.max_bytes = keep * size + size // 2
        _, dropped = outbox.write([])
        dropped_so_far += list(dropped)
        left = {m.topic.rsplit("/", 1)[1] for m in outbox.pending(0, 100)}
        assert left == set(order[: keep // 5]), (keep, dropped)
    assert dropped_so_far == ["results", "telemetry", "events", "state"]
    assert outbox.stats().dropped == 20


# -- one process per outbox -------------------------------------------------------------


def test_a_second_open_of_the_same_outbox_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    first = Outbox(path, 10**6).open()
    with pytest.raises(OutboxError, match=rf"another agent \(pid {os.getpid()}\) uses the outbox"):
        Outbox(path, 10**6).open()
    first.close()
    Outbox(path, 10**6).open().close()  # free again once closed
