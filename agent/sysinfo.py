"""What the device itself looks like: CPU, load, memory, disk, temperatures, uptime,
clock, Wi-Fi and addresses.

Read with psutil, and from sysfs/procfs where psutil has nothing: the SoC's thermal
zones (``/sys/class/thermal``), the Coral PCIe/M.2 driver's ``/sys/class/apex/*/temp``
(millidegrees), the Raspberry Pi firmware's throttling flags (``get_throttled``, the
file behind ``vcgencmd get_throttled``), the CPU clock (cpufreq's ``scaling_cur_freq``)
and the Wi-Fi signal (``/proc/net/wireless``). A missing temperature is ``None``, never
an error; what a board does not have at all (``throttled``, ``cpu_freq_mhz``,
``wifi_rssi_dbm``, ``ip_addresses``) is absent from the sample, not zero or null.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from agent import __version__
from agent.contract import MachineDoc, ThrottledDoc, ThrottleFlag

THROTTLED_FILE = "devices/platform/soc/soc:firmware/get_throttled"  # under /sys
CPU_FREQ_FILE = "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"  # kHz, under /sys
WIRELESS_FILE = "net/wireless"  # under /proc
MAX_ADDRESSES = 8  # ip_addresses: a board with docker bridges has many; telemetry stays small
# get_throttled's bits: the flag set now, and the same flag 16 bits up since boot
THROTTLE_BITS: tuple[tuple[int, ThrottleFlag], ...] = (
    (0, "under_voltage"),
    (1, "freq_capped"),
    (2, "throttled"),
    (3, "soft_temp_limit"),
)


def throttle_flags(value: int) -> ThrottledDoc:
    """``get_throttled``'s number as the flags set now and those seen since boot."""
    now: list[str] = [flag for bit, flag in THROTTLE_BITS if value >> bit & 1]
    since: list[str] = [flag for bit, flag in THROTTLE_BITS if value >> (bit + 16) & 1]
    return {"now": now, "since_boot": since}


def wifi_rssi(text: str) -> int | None:
    """The signal level in dBm of the first interface in ``/proc/net/wireless``'s
    ``text``, or None (no wireless interface, not associated, a level that is no dBm).

    After two header lines each row reads ``wlan0: 0000   70.  -40.  -256 …``: the
    interface, status, link quality, then the level (dBm where the driver reports dBm).
    """
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not name.strip() or len(fields) < 3:
            continue
        try:
            level = float(fields[2].rstrip("."))
        except ValueError:
            return None
        # 0 and -256 are what drivers show when not associated; positive levels are
        # relative units, not dBm
        return round(level) if -150 < level < 0 else None
    return None


class Address(NamedTuple):
    """One of psutil's ``net_if_addrs()`` entries, the fields read here."""

    family: int
    address: str


def ip_addresses(
    addresses: Mapping[str, Sequence[Address]], up: Sequence[str], limit: int = MAX_ADDRESSES
) -> list[str]:
    """The IPv4 then IPv6 addresses of the interfaces in ``up``, by interface name,
    at most ``limit``: without loopback and IPv6 link-local ones (every interface
    has one; they would crowd out the rest)."""
    found: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for name in sorted(set(up) & set(addresses)):
        for entry in addresses[name]:
            if entry.family not in found:
                continue
            text = entry.address.split("%", 1)[0]  # fe80::1%eth0: the scope is no address
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_loopback or (ip.version == 6 and ip.is_link_local):
                continue
            if text not in found[entry.family]:
                found[entry.family].append(text)
    return (found[socket.AF_INET] + found[socket.AF_INET6])[:limit]


def _psutil_net() -> tuple[Mapping[str, Sequence[Address]], list[str]]:
    addresses = {
        name: [Address(int(a.family), a.address) for a in entries]
        for name, entries in psutil.net_if_addrs().items()
    }
    up = [name for name, stats in psutil.net_if_stats().items() if stats.isup]
    return addresses, up


Net = Callable[[], tuple[Mapping[str, Sequence[Address]], list[str]]]


def _millidegrees(path: Path) -> float | None:
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


class SystemProbe:
    """Samples the machine and this process; cheap enough to call every few seconds."""

    def __init__(
        self,
        disk_path: Path,
        sysfs: Path = Path("/sys"),
        procfs: Path = Path("/proc"),
        net: Net = _psutil_net,
    ) -> None:
        """``sysfs``, ``procfs`` and ``net`` (interfaces' addresses and those up) are
        the machine's own unless a test gives fakes."""
        self.disk_path = disk_path
        self.sysfs = sysfs
        self.procfs = procfs
        self.net = net
        self.started = time.monotonic()
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # the first call only primes the counters
        self._process.cpu_percent(None)

    def cpu_temperature(self) -> float | None:
        """The SoC temperature in °C: psutil's sensors, else the first thermal zone."""
        if self.sysfs == Path("/sys"):
            reader = getattr(psutil, "sensors_temperatures", None)  # absent on some systems
            sensors: dict[str, list[Any]] = reader() if reader else {}
            for name in ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "soc_thermal"):
                if sensors.get(name):
                    return round(float(sensors[name][0].current), 1)
        for zone in sorted((self.sysfs / "class" / "thermal").glob("thermal_zone*")):
            value = _millidegrees(zone / "temp")
            if value is not None:
                return value
        return None

    def tpu_temperature(self) -> float | None:
        """The hottest Coral PCIe/M.2 Edge TPU in °C, or None (none, or a USB one)."""
        values = [
            v
            for path in sorted((self.sysfs / "class" / "apex").glob("apex_*/temp"))
            if (v := _millidegrees(path)) is not None
        ]
        return max(values) if values else None

    def throttled(self) -> ThrottledDoc | None:
        """The firmware's throttling flags, or None on a board without them."""
        try:
            text = (self.sysfs / THROTTLED_FILE).read_text(errors="replace").strip()
            return throttle_flags(int(text, 16))  # "50005" or "0x50005"
        except (OSError, ValueError):
            return None

    def cpu_freq_mhz(self) -> float | None:
        """cpu0's current clock in MHz: cpufreq's file, else psutil (the real /sys
        only: it reads /proc/cpuinfo on x86); None without either."""
        try:
            khz = int((self.sysfs / CPU_FREQ_FILE).read_text().strip())
            return round(khz / 1000.0, 1) if khz > 0 else None
        except (OSError, ValueError):
            pass
        if self.sysfs != Path("/sys"):
            return None
        try:
            freq = psutil.cpu_freq()
        except (OSError, RuntimeError, NotImplementedError):
            return None
        return round(float(freq.current), 1) if freq is not None and freq.current > 0 else None

    def wifi_rssi_dbm(self) -> int | None:
        """The first wireless interface's signal in dBm, or None without Wi-Fi."""
        try:
            text = (self.procfs / WIRELESS_FILE).read_text(errors="replace")[:65536]
        except OSError:
            return None
        return wifi_rssi(text)

    def ip_addresses(self) -> list[str]:
        """Non-loopback addresses of the interfaces that are up (:func:`ip_addresses`)."""
        try:
            addresses, up = self.net()
        except OSError:
            return []
        return ip_addresses(addresses, up)

    def _disk_free_mb(self) -> float | None:
        path = self.disk_path
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            return round(psutil.disk_usage(str(path)).free / 2**20, 1)
        except OSError:
            return None

    def sample(self) -> MachineDoc:
        memory = psutil.virtual_memory()
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            agent_cpu = self._process.cpu_percent(None)
        doc: MachineDoc = {
            "agent_version": __version__,
            "cpu_pct": psutil.cpu_percent(None),
            "load": [round(v, 2) for v in os.getloadavg()],
            "mem_pct": memory.percent,
            "mem_available_mb": round(memory.available / 2**20, 1),
            "rss_mb": round(rss / 2**20, 1),
            "agent_cpu_pct": agent_cpu,
            "disk_free_mb": self._disk_free_mb(),
            "temp_c": self.cpu_temperature(),
            "tpu_temp_c": self.tpu_temperature(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "boot_uptime_s": round(time.time() - psutil.boot_time()),
        }
        if (throttled := self.throttled()) is not None:
            doc["throttled"] = throttled
        if (freq := self.cpu_freq_mhz()) is not None:
            doc["cpu_freq_mhz"] = freq
        if (rssi := self.wifi_rssi_dbm()) is not None:
            doc["wifi_rssi_dbm"] = rssi
        if addresses := self.ip_addresses():
            doc["ip_addresses"] = addresses
        return doc
