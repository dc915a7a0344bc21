"""The machine's figures from a sysfs tree: temperatures and the Pi's throttling flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.contract import validator
from agent.sysinfo import THROTTLED_FILE, SystemProbe, throttle_flags

ALL = ("under_voltage", "freq_capped", "throttled", "soft_temp_limit")
BOTH = ["under_voltage", "throttled"]


@pytest.mark.parametrize(
    ("value", "now", "since_boot"),
    [
        (0x0, [], []),
        (0x50005, ["under_voltage", "throttled"], ["under_voltage", "throttled"]),
        (0x50000, [], ["under_voltage", "throttled"]),  # it happened, it is over
        (0x80008, ["soft_temp_limit"], ["soft_temp_limit"]),
        (0x20002, ["freq_capped"], ["freq_capped"]),
        (0xF000F, list(ALL), list(ALL)),
        (0x1_0000_0000 | 0x1, ["under_voltage"], []),  # bits the firmware may add: ignored
    ],
)
def test_get_throttled_bits_become_named_flags(
    value: int, now: list[str], since_boot: list[str]
) -> None:
    assert throttle_flags(value) == {"now": now, "since_boot": since_boot}


def sysfs(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50005\n", {"now": BOTH, "since_boot": BOTH}),
        ("0x0\n", {"now": [], "since_boot": []}),
        ("garbage\n", None),  # unreadable: absent, not zero
        (None, None),  # not a Pi: absent
    ],
)
def test_a_sample_carries_the_flags_only_where_the_board_has_them(
    tmp_path: Path, text: str | None, expected: dict[str, list[str]] | None
) -> None:
    files = {"class/thermal/thermal_zone0/temp": "61234\n", "class/apex/apex_0/temp": "70500\n"}
    if text is not None:
        files[THROTTLED_FILE] = text
    probe = SystemProbe(tmp_path, sysfs=sysfs(tmp_path / "sys", files))
    doc = probe.sample()
    assert doc["temp_c"] == 61.2 and doc["tpu_temp_c"] == 70.5
    assert doc.get("throttled") == expected
    if expected is None:
        assert "throttled" not in doc
    envelope = {"schema": 1, "seq": 1, "id": "x", "ts": 1.0}
    figures = {
        "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
        "mqtt": {
            "connected": True, "protocol": "5", "connects": 1, "inflight": 0, "rejected": 0,
            "unsent_qos0": 0,
        },
    }  # fmt: skip
    validator("telemetry").validate_python({**envelope, **doc, "inference": None, **figures})
