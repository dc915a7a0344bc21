"""Logging setup: the level, the line format, events as ``key=value`` and rate limiting.

The contract (docs/troubleshooting.md "Logs", docs/protocol.md "Command line"):

- Level: ``--log-level`` (debug, info, warning, error), else ``$EDGE_AGENT_LOG_LEVEL``,
  else the command's default (``run``: info; other commands: warning).
- Format: ``--log-format`` (text, json), else ``$EDGE_AGENT_LOG_FORMAT``, else text.
  Text is ``2026-11-30 05:11:20 WARNING agent.mqtt: message`` on a terminal or in a file;
  under journald (``$JOURNAL_STREAM`` names our stderr, as systemd documents) the
  timestamp is left out (the journal adds its own) and every line starts with the
  syslog priority (``<4>`` for a warning, sd-daemon(3)) so journalctl shows levels.
  JSON is one object a line: ``ts``, ``level``, ``logger``, ``msg`` and an event's fields.
- Events (:func:`event`) read ``model_swapped model=colours version=2``: values quoted
  when they hold spaces, quotes or ``=``, control characters escaped (values come from
  the network), floats rounded.
- A warning or error repeated from the same line of code is let through once, then
  at most once a minute with ``(N similar messages suppressed)`` (:class:`RateLimit`).
- The last lines are also kept in memory (:data:`agent.logring.RING`) for the
  ``logs`` command.
- Native libraries: OpenCV's own ``[ WARN:…]`` lines are turned off unless debugging
  (``OPENCV_LOG_LEVEL``); the TFLite runtime's are captured by
  :mod:`agent.runtime.native_stderr`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, NamedTuple

from agent.logsettings import FORMAT_ENV as FORMAT_ENV
from agent.logsettings import FORMATS as FORMATS
from agent.logsettings import LEVEL_ENV as LEVEL_ENV
from agent.logsettings import LEVELS as LEVELS
from agent.logsettings import OLD_LEVEL_ENV, old_variable_used, resolve_format, resolve_level
from agent.logsettings import Format as Format
from agent.logsettings import LogSettingError as LogSettingError
from agent.logsettings import escape as _escape
from agent.strictjson import dumps

REPEAT_INTERVAL_S = 60.0
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# sd-daemon(3): SD_ERR "<3>", SD_WARNING "<4>", SD_INFO "<6>", SD_DEBUG "<7>"
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_journald(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is connected to the journal.

    systemd sets ``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of the service's stdout/stderr
    stream; it is inherited by children whose stderr goes elsewhere, so the numbers must
    match ``stream``'s own (systemd.exec(5)).
    """
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # StringIO, a closed stream
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


# -- events as key=value -------------------------------------------------------------

_BARE = re.compile(r"[^\s\"'=\\]+")
_KEY_JUNK = re.compile(r"[^A-Za-z0-9_.\-]")


def format_value(value: Any) -> str:
    """One value as ``kv`` writes it: bare when it can be, else double-quoted.

    None is ``null``, booleans ``true``/``false``; floats keep 3 decimals (3
    significant digits below 1); lists and dicts are compact JSON.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        return repr(round(value, 3)) if abs(value) >= 1 else f"{value:.3g}"
    if isinstance(value, list | tuple | dict):
        text = json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    else:
        text = str(value)
    escaped = _escape(text, quote=True)
    if escaped == text and _BARE.fullmatch(text):
        return text
    return f'"{escaped}"'


def kv(name: str, detail: Mapping[str, Any]) -> str:
    """``name key=value …`` in the order of ``detail``; see :func:`format_value`."""
    parts = [_KEY_JUNK.sub("_", name) or "event"]
    parts += [f"{_KEY_JUNK.sub('_', str(k)) or '_'}={format_value(v)}" for k, v in detail.items()]
    return " ".join(parts)


class Event(NamedTuple):  # not a dataclass: `dataclasses` is not loaded by check-config
    """A log message that is an event: text formatters show :func:`kv`, JSON its fields."""

    name: str
    detail: Mapping[str, Any]

    def __str__(self) -> str:
        return kv(self.name, self.detail)


def event(
    logger: logging.Logger, name: str, detail: Mapping[str, Any], level: int = logging.INFO
) -> None:
    """Log event ``name`` with its fields (``name key=value …`` in text)."""
    logger.log(level, Event(name, dict(detail)))


# -- formatters ----------------------------------------------------------------------


def _suffix(record: logging.LogRecord) -> str:
    count = getattr(record, "suppressed", 0)
    return f" ({count} similar messages suppressed)" if count else ""


class TextFormatter(logging.Formatter):
    """``DATE TIME LEVEL logger: message``; under journald ``<P>LEVEL logger: message``
    on every line (journald reads the priority per line)."""

    def __init__(self, journald: bool = False) -> None:
        stamp = "" if journald else "%(asctime)s "
        super().__init__(stamp + "%(levelname)s %(name)s: %(message)s", datefmt=DATE_FORMAT)
        self.journald = journald

    def formatMessage(self, record: logging.LogRecord) -> str:
        lines = record.message.split("\n")  # a message may span lines; nothing else shows raw
        record.message = "\n".join(_escape(line) for line in lines) + _suffix(record)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journald:
            return text
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``;
    an event adds ``event`` and its fields; ``suppressed`` and ``exc`` when there are."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if isinstance(record.msg, Event):
            doc["event"] = record.msg.name
            for key, value in record.msg.detail.items():
                doc[key if key not in doc else f"{key}_"] = value
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            doc["suppressed"] = suppressed
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return dumps(doc, default=str, ensure_ascii=False)  # strict: a NaN field is null


# -- rate limiting ---------------------------------------------------------------------


class Window(NamedTuple):
    """One message's window: when it was last let through, how many were held since."""

    shown_at: float
    held: int = 0


def admit(window: Window | None, now: float, interval_s: float) -> tuple[bool, int, Window]:
    """Whether a repeat of a message goes out now, the count of those held back before
    it (to report with it), and the new window. The first always goes out."""
    if window is None or now - window.shown_at >= interval_s:
        return True, window.held if window else 0, Window(now)
    return False, 0, Window(window.shown_at, window.held + 1)


_ONLY_PLACEHOLDERS = re.compile(r"(?:%[-#0 +]*\d*(?:\.\d+)?[a-z%]|[\s:;,.()])*")


class RateLimit(logging.Filter):
    """Lets a repeated warning or error through once per ``interval_s``.

    Repeats are recognised by logger and message template (``record.msg``), not the
    text, so ``frame %d …`` is one message whatever the frame. A template that is only
    placeholders (``"%s"``) is keyed on its text instead; a record with a
    ``repeat_key`` attribute (``extra={"repeat_key": why}``) on template and that key.
    The count of held-back repeats goes out with the next one (``record.suppressed``).
    At most ``max_keys`` messages are remembered (the oldest forgotten first).
    Thread-safe.
    """

    def __init__(
        self,
        interval_s: float = REPEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
        max_keys: int = 1000,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.level = level
        self.max_keys = max_keys
        self._windows: collections.OrderedDict[tuple[str, int, str], Window] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def _key(self, record: logging.LogRecord) -> tuple[str, int, str]:
        msg = record.msg
        explicit = getattr(record, "repeat_key", None)
        if explicit is not None:
            template = f"{msg}\0{explicit}"
        elif isinstance(msg, Event):
            template = msg.name
        elif isinstance(msg, str) and not _ONLY_PLACEHOLDERS.fullmatch(msg):
            template = msg
        else:
            template = record.getMessage()
        return record.name, record.levelno, template

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = self._key(record)
        with self._lock:
            show, held, window = admit(self._windows.get(key), self.clock(), self.interval_s)
            self._windows[key] = window
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if show and held:
            record.suppressed = held
        return show


# -- setup -------------------------------------------------------------------------------

_HANDLER_NAME = "edge-agent"
_duplicates: list[IO[str]] = []


def setup(
    level: str | None,
    fmt: str | None,
    stream: IO[str],
    *,
    default: str = "info",
    environ: Mapping[str, str] | None = None,
    ring: bool = True,
) -> int:
    """Send the process's logs to ``stream``; returns the level in force.

    ``level`` and ``fmt`` are the command-line options (None when not given); see the
    module docstring for the environment and defaults. Replaces an earlier setup's
    handler (calling it twice is safe). ``ring``: also keep the last lines in memory
    (:data:`agent.logring.RING`, read by a running agent's ``logs`` command). Unless
    the level is debug, OpenCV's own logging is limited to errors (``OPENCV_LOG_LEVEL``,
    set only if unset).
    Raises LogSettingError for a value that is not a choice.
    """
    env = os.environ if environ is None else environ
    number = resolve_level(level, env, default)
    chosen = resolve_format(fmt, env)
    handler = logging.StreamHandler(_own_stream(stream))
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if chosen == "json" else TextFormatter(under_journald(stream, env))
    )
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        if isinstance(old, logging.StreamHandler) and old.stream in _duplicates:
            _duplicates.remove(old.stream)
            old.stream.close()
    root.addHandler(handler)
    if ring:
        _install_ring(root)
    root.setLevel(number)
    logging.captureWarnings(True)
    if number > logging.DEBUG:
        _quiet_opencv()
    if old_variable_used(level, env):
        logging.getLogger(__name__).warning(
            "%s is deprecated: set %s instead", OLD_LEVEL_ENV, LEVEL_ENV
        )
    return number


def _install_ring(root: logging.Logger) -> None:
    """The in-memory ring of recent lines for the ``logs`` command (agent.logring):
    text lines with the time, repeats limited like the stream's."""
    from agent.logring import RING  # and agent.redact: only where the lines are kept

    if RING not in root.handlers:
        RING.setFormatter(TextFormatter())
        RING.addFilter(RateLimit())
        root.addHandler(RING)


def _own_stream(stream: IO[str]) -> IO[str]:
    """For stderr, a stream on a duplicate of fd 2: the runtime's stray output is
    captured by pointing fd 2 elsewhere for a moment (agent.runtime.native_stderr), and
    the agent's own lines written meanwhile must still reach the operator."""
    try:
        if stream.fileno() != 2:
            return stream
        stream.flush()
        own = os.fdopen(
            os.dup(2),
            "w",
            buffering=1,
            encoding=getattr(stream, "encoding", None) or "utf-8",
            errors="backslashreplace",
        )
    except (OSError, ValueError, AttributeError):  # no real fd 2 (a StringIO): as it is
        return stream
    _duplicates.append(own)  # closed when a later setup() replaces the handler
    return own


def _quiet_opencv() -> None:
    # Read by OpenCV when cv2 is imported, which happens later (sources import it).
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:  # already imported (a library user): ask it directly
        with contextlib.suppress(AttributeError):
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
