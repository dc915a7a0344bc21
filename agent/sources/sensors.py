"""Sensor samples from a serial line or UDP datagrams, cut into windows for a model.

A sample is ``channels`` numbers. Every ``hop`` samples (default: ``window``) a source
yields the last ``window`` of them as ``float32`` ``[window, channels]``. A sample of
the wrong shape, or text that is not numbers, is counted in ``bad_samples`` and
skipped: one garbled line must not stop a device.
"""

from __future__ import annotations

import json
import math
import re
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from agent.sources.base import SourceError

if TYPE_CHECKING:
    import numpy as np

    from agent.config import SerialSource as SerialConfig
    from agent.config import UdpSource as UdpConfig

MAX_LINE = 64 * 1024  # a serial "line" longer than this is noise: dropped as one bad sample
DATAGRAM = 65535  # largest UDP payload; the kernel cuts longer datagrams to this
SEPARATOR = re.compile(r"\s*,\s*|\s+")  # "1,,2" keeps its empty field: a bad sample


class _Windows:
    """Collects samples and hands out overlapping (``hop`` < ``window``) windows."""

    def __init__(self, window: int, hop: int, channels: int) -> None:
        self.window, self.hop, self.channels = window, hop, channels
        self.samples: list[list[float]] = []
        self.skip = 0  # with hop > window, samples to drop between two windows

    def clear(self) -> None:
        self.samples, self.skip = [], 0

    def add(self, sample: list[float]) -> np.ndarray | None:
        """Add one sample; return a window when this sample completes one."""
        import numpy as np

        if self.skip:
            self.skip -= 1
            return None
        self.samples.append(sample)
        if len(self.samples) < self.window:
            return None
        window = np.array(self.samples, dtype=np.float32)
        del self.samples[: self.hop]
        self.skip = max(self.hop - self.window, 0)
        return window


class _SensorSource:
    """Windows of samples; subclasses receive lines (``_receive``) and parse them.

    ``read(timeout)`` returns a window, or None when no window completed within
    ``timeout``; samples received so far are kept for the next read.
    """

    name: str
    live = True

    def __init__(self, config: SerialConfig | UdpConfig) -> None:
        self.channels = config.channels
        self._windows = _Windows(config.window, config.hop or config.window, config.channels)
        self._lines: deque[bytes] = deque()
        self.bad_samples = 0

    def read(self, timeout: float) -> np.ndarray | None:
        deadline = time.monotonic() + timeout
        while True:
            window = self._next_window()
            if window is not None:
                return window
            remaining = deadline - time.monotonic()
            self._lines.extend(self._receive(max(remaining, 0.0)))
            if remaining <= 0:  # the last receive did not wait
                return self._next_window()

    def _restart(self) -> None:
        """Forget what came before a (re)open: a window must not span the gap."""
        self._lines.clear()
        self._windows.clear()

    def _next_window(self) -> np.ndarray | None:
        while self._lines:
            line = self._lines.popleft()
            if not line.strip():
                continue  # blank lines, or the "\r" of "\r\n": not a sample
            values = self._parse(line)
            if values is None or len(values) != self.channels:
                self.bad_samples += 1
                continue
            window = self._windows.add(values)
            if window is not None:
                return window
        return None

    def _receive(self, timeout: float) -> list[bytes]:
        """Lines that arrived within ``timeout`` (maybe none). Raises SourceError."""
        raise NotImplementedError

    @staticmethod
    def _parse(line: bytes) -> list[float] | None:
        raise NotImplementedError


def _finite(values: list[float]) -> list[float] | None:
    return values if all(math.isfinite(v) for v in values) else None


class SerialSource(_SensorSource):
    """Text lines from a serial device: numbers separated by commas and/or spaces.

    ``open()`` raises SourceError naming the device when it cannot be opened; a read
    raises SourceError when the device disappears or fails. A read never waits longer
    than its ``timeout``: a line cut by it is completed by the next read.
    """

    name = "serial"

    def __init__(self, config: SerialConfig) -> None:
        super().__init__(config)
        self.device = config.device
        self.baudrate = config.baudrate
        self._serial: Any = None
        self._partial = b""

    def open(self) -> None:
        import serial

        self.close()
        try:
            # timeout=0: reads return what has arrived; waiting is select()'s, per read.
            self._serial = serial.Serial(self.device, self.baudrate, timeout=0)
        except OSError as exc:  # pyserial's SerialException is an OSError
            raise SourceError(f"serial {self.device}: cannot open: {exc}") from exc
        self._partial = b""
        self._restart()

    def _receive(self, timeout: float) -> list[bytes]:
        if self._serial is None:
            raise SourceError(f"serial {self.device}: not open")
        try:
            ready, _, _ = select.select([self._serial.fileno()], [], [], timeout)
            data = self._serial.read(4096) if ready else b""
        except OSError as exc:  # SerialException too: unplugged, or a hung-up line
            raise SourceError(f"serial {self.device}: {exc}") from exc
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LINE:
            self.bad_samples += 1
            self._partial = b""
        return lines

    @staticmethod
    def _parse(line: bytes) -> list[float] | None:
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        # Arduino sketches often print a comma after every value, the last one too.
        text = text[:-1] if text.endswith(",") else text
        try:
            return _finite([float(v) for v in SEPARATOR.split(text)])
        except ValueError:
            return None

    def close(self) -> None:
        serial_port, self._serial = self._serial, None
        if serial_port is not None:
            serial_port.close()


class UdpSource(_SensorSource):
    """JSON lines in UDP datagrams, one sample a line: ``3.2``, ``[1, 2]``,
    ``{"values": [1, 2]}`` or ``{"value": 3.2}``.

    ``open()`` binds (``bind``, ``port``) and raises SourceError naming both when it
    cannot; ``port`` then holds the port actually bound. Datagrams lost on the way are
    lost: UDP does not say.
    """

    name = "udp"

    def __init__(self, config: UdpConfig) -> None:
        super().__init__(config)
        self.bind = config.bind
        self.port = config.port
        self._socket: socket.socket | None = None

    def open(self) -> None:
        self.close()
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.bind, self.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise SourceError(f"udp {self.bind}:{self.port}: cannot bind: {exc}") from exc
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise SourceError(f"udp {self.bind}:{self.port}: cannot bind: {exc}") from exc
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._restart()

    def _receive(self, timeout: float) -> list[bytes]:
        if self._socket is None:
            raise SourceError(f"udp {self.bind}:{self.port}: not open")
        self._socket.settimeout(timeout)
        try:
            datagram = self._socket.recv(DATAGRAM)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError as exc:
            raise SourceError(f"udp {self.bind}:{self.port}: {exc}") from exc
        return datagram.split(b"\n")

    @staticmethod
    def _parse(line: bytes) -> list[float] | None:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):  # not JSON (or absurdly nested)
            return None
        if isinstance(value, dict):
            value = value.get("values", value.get("value"))
        if not isinstance(value, list):
            value = [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return None
        try:
            return _finite([float(v) for v in value])
        except OverflowError:  # an integer beyond any float
            return None

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
