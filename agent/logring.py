"""The agent's recent log lines, kept in memory for the ``logs`` command.

:data:`RING` is a logging handler holding the last :data:`RING_LINES` records as text
lines (the text format, with the time); :func:`agent.logs.setup` installs it beside
the stream handler, so it sees what the operator's journal sees. :meth:`LogRing.tail`
gives the newest lines within a byte budget, secrets redacted
(:func:`agent.redact.redact_text`). Memory is bounded: at most ``RING_LINES`` lines of
at most ``LINE_MAX_CHARS`` characters each.
"""

from __future__ import annotations

import collections
import json
import logging
import threading

from agent.redact import redact_text

RING_LINES = 1000
LINE_MAX_CHARS = 4096  # a longer message (a traceback) is cut: the ring stays small


class LogRing(logging.Handler):
    """A bounded deque of formatted log lines; thread-safe."""

    def __init__(self, capacity: int = RING_LINES) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a message that cannot be formatted: not worth a traceback
            text = f"{record.levelname} {record.name}: (unformattable message)"
        text = redact_text(text)  # before the cut: a cut may split a secret from its name
        if len(text) > LINE_MAX_CHARS:
            text = text[:LINE_MAX_CHARS] + " …(cut)"
        with self._guard:
            self._lines.append(text)

    def clear(self) -> None:
        with self._guard:
            self._lines.clear()

    def tail(self, lines: int, max_bytes: int) -> tuple[list[str], bool]:
        """The newest ``lines`` lines, oldest first (redacted when taken), whose JSON strings
        together take at most ``max_bytes``; and whether older ones were left out
        for the byte budget (not for ``lines``)."""
        with self._guard:
            recent = list(self._lines)[-lines:] if lines > 0 else []
        kept: list[str] = []
        used = 0
        for line in reversed(recent):  # newest first: the budget cuts from the oldest
            text = line
            size = len(json.dumps(text, ensure_ascii=False).encode()) + 1  # and a comma
            if used + size > max_bytes:
                kept.reverse()
                return kept, True
            kept.append(text)
            used += size
        kept.reverse()
        return kept, False


RING = LogRing()
"""The process's ring (installed by :func:`agent.logs.setup`)."""
