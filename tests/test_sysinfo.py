"""The machine's figures from sysfs/procfs trees: temperatures, the Pi's throttling flags,
the CPU clock, the Wi-Fi signal and the addresses."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest

from agent.contract import validator
from agent.sysinfo import (
    CPU_FREQ_FILE,
    THROTTLED_FILE,
    WIRELESS_FILE,
    Address,
    Net,
    SystemProbe,
    ip_addresses,
    throttle_flags,
    wifi_rssi,
)

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


HEADER = (
    "Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE\n"
    " face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22\n"
)


def row(name: str, link: str, level: str, noise: str = "-256") -> str:
    """One interface's line of /proc/net/wireless."""
    return f" {name}: 0000   {link}  {level}  {noise}        0      0      0      0      0   0\n"


@pytest.mark.parametrize(
    ("text", "rssi"),
    [
        (HEADER + row("wlan0", "70.", "-40."), -40),
        (HEADER + row("wlan1", "30.", "-81.").lstrip(), -81),
        (HEADER + row("wlan0", "50.", "-60.") + row("wlan1", "70.", "-40."), -60),  # the first
        (HEADER, None),  # the file is there, no wireless interface: absent
        (HEADER + row("wlan0", "0.", "0.", "0"), None),  # not associated
        (HEADER + row("wlan0", "0.", "-256."), None),  # not associated
        (HEADER + row("wlan0", "70.", "40.", "0"), None),  # relative units, not dBm
        (HEADER + row("wlan0", "70.", "loud"), None),  # garbage
        (HEADER + " wlan0:\n", None),
        ("", None),
    ],
)
def test_wifi_rssi_is_the_first_wireless_interfaces_level_in_dbm(
    text: str, rssi: int | None
) -> None:
    assert wifi_rssi(text) == rssi


V4, V6 = socket.AF_INET, socket.AF_INET6
PACKET = 17  # AF_PACKET: a MAC address, not an IP one


@pytest.mark.parametrize(
    ("addresses", "up", "expected"),
    [
        (
            {
                "lo": [Address(V4, "127.0.0.1"), Address(V6, "::1")],
                "eth0": [
                    Address(V4, "192.0.2.2"),
                    Address(V6, "fd00::2"),
                    Address(V6, "fe80::fc:ff:fe00:1%eth0"),
                    Address(PACKET, "02:fc:00:00:00:01"),
                ],
                "wlan0": [Address(V4, "10.0.0.7")],
            },
            ["lo", "eth0", "wlan0"],
            ["192.0.2.2", "10.0.0.7", "fd00::2"],  # IPv4 first, interfaces by name
        ),
        ({"eth0": [Address(V4, "192.0.2.2")]}, [], []),  # down: none
        ({"lo": [Address(V4, "127.0.0.1")]}, ["lo"], []),  # loopback only: none
        ({"eth0": [Address(V4, "169.254.1.2")]}, ["eth0"], ["169.254.1.2"]),  # no DHCP: tells
        ({"eth0": [Address(V4, "not an address")]}, ["eth0"], []),
        ({"br": [Address(V4, f"172.17.0.{i}") for i in range(1, 20)]}, ["br"],
         [f"172.17.0.{i}" for i in range(1, 9)]),  # bounded
        ({"a": [Address(V4, "192.0.2.9")], "b": [Address(V4, "192.0.2.9")]}, ["a", "b"],
         ["192.0.2.9"]),  # once
    ],
)  # fmt: skip
def test_ip_addresses_are_the_up_interfaces_non_loopback_ones(
    addresses: dict[str, list[Address]], up: list[str], expected: list[str]
) -> None:
    assert ip_addresses(addresses, up) == expected


def no_network() -> tuple[dict[str, list[Address]], list[str]]:
    return {"lo": [Address(V4, "127.0.0.1")]}, ["lo"]


def wifi_board() -> tuple[dict[str, list[Address]], list[str]]:
    return {"wlan0": [Address(V4, "10.0.0.7")]}, ["wlan0"]


@pytest.mark.parametrize(
    ("sys_files", "proc_files", "net", "expected"),
    [
        (  # a Pi 4 on Wi-Fi
            {CPU_FREQ_FILE: "1500000\n"},
            {WIRELESS_FILE: HEADER + row("wlan0", "70.", "-52.")},
            wifi_board,
            {"cpu_freq_mhz": 1500.0, "wifi_rssi_dbm": -52, "ip_addresses": ["10.0.0.7"]},
        ),
        (  # a board without cpufreq, Wi-Fi or a network: each absent, not zero or null
            {},
            {},
            no_network,
            {},
        ),
        (  # cpufreq says 0, the Wi-Fi is not associated
            {CPU_FREQ_FILE: "0\n"},
            {WIRELESS_FILE: HEADER + row("wlan0", "0.", "-256.")},
            no_network,
            {},
        ),
        ({CPU_FREQ_FILE: "fast\n"}, {WIRELESS_FILE: "garbage"}, no_network, {}),
    ],
)
def test_a_sample_carries_clock_wifi_and_addresses_only_where_the_board_has_them(
    tmp_path: Path,
    sys_files: dict[str, str],
    proc_files: dict[str, str],
    net: Net,
    expected: dict[str, object],
) -> None:
    probe = SystemProbe(
        tmp_path,
        sysfs=sysfs(tmp_path / "sys", sys_files),
        procfs=sysfs(tmp_path / "proc", proc_files),
        net=net,
    )
    doc = probe.sample()
    keys = ("cpu_freq_mhz", "wifi_rssi_dbm", "ip_addresses")
    assert {key: doc[key] for key in keys if key in doc} == expected  # type: ignore[literal-required]
    envelope = {"schema": 1, "seq": 1, "id": "x", "ts": 1.0}
    figures = {
        "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
        "mqtt": {
            "connected": True, "protocol": "5", "connects": 1, "inflight": 0, "rejected": 0,
            "unsent_qos0": 0,
        },
    }  # fmt: skip
    validator("telemetry").validate_python({**envelope, **doc, "inference": None, **figures})


def test_the_real_machine_reports_its_clock_and_addresses(tmp_path: Path) -> None:
    doc = SystemProbe(tmp_path).sample()  # this machine: psutil's clock, eth0's addresses
    if psutil.cpu_freq() is not None:
        assert doc["cpu_freq_mhz"] > 0
    assert all(not a.startswith(("127.", "::1")) for a in doc.get("ip_addresses", []))
