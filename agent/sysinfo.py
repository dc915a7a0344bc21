"""What the device itself looks like: CPU, load, memory, disk, temperatures, uptime.

Read with psutil, and from sysfs where psutil has nothing: the SoC's thermal zones
(``/sys/class/thermal``), the Coral PCIe/M.2 driver's ``/sys/class/apex/*/temp``
(millidegrees) and the Raspberry Pi firmware's throttling flags (``get_throttled``, the
file behind ``vcgencmd get_throttled``). A missing sensor is ``None``, never an error;
a board without ``get_throttled`` sends no ``throttled`` at all.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from agent import __version__
from agent.contract import MachineDoc, ThrottledDoc, ThrottleFlag

THROTTLED_FILE = "devices/platform/soc/soc:firmware/get_throttled"  # under /sys
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


def _millidegrees(path: Path) -> float | None:
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


class SystemProbe:
    """Samples the machine and this process; cheap enough to call every few seconds."""

    def __init__(self, disk_path: Path, sysfs: Path = Path("/sys")) -> None:
        self.disk_path = disk_path
        self.sysfs = sysfs
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
        return doc
