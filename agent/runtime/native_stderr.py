"""The TFLite runtime's own stderr lines, kept off the operator's terminal.

``ai-edge-litert`` (2.3.0) prints ``INFO: Created TensorFlow Lite XNNPACK delegate for
CPU.`` from C++ straight to file descriptor 2 each time an interpreter is built, and
``TF_CPP_MIN_LOG_LEVEL`` does not silence it (measured). So while an interpreter is
built, fd 2 points at a temporary file, and what was written there is logged after:
the runtime's ``INFO:`` lines at DEBUG, every other line at WARNING, so an error from
the runtime (or another thread's stray write to stderr in that moment) is never lost.

fd 2 belongs to the whole process: one capture at a time (a lock), and the agent's
own log handler writes to a duplicate of fd 2 (``agent.logs.setup``), not through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

log = logging.getLogger("agent.runtime")

_lock = threading.Lock()


def forward(text: str, logger: logging.Logger = log) -> None:
    """Log captured ``text`` line by line: ``INFO:`` lines at DEBUG, others at WARNING."""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("INFO: "):
            logger.debug("%s", line)
        else:
            # "%s" alone: the rate limit tells repeats apart by their text then
            logger.warning("%s", line)


@contextlib.contextmanager
def captured(logger: logging.Logger = log) -> Iterator[None]:
    """Run the body with fd 2 sent to a temporary file, then :func:`forward` its text.

    The original fd 2 is back when the body ends, whether or not it raised (the text is
    forwarded then too: the runtime may have said why). Without a
    usable fd 2 (an embedding that closed it) the body runs uncaptured.
    """
    text = ""
    try:
        with _lock:
            try:
                saved = os.dup(2)
            except OSError:
                saved = -1
            if saved < 0:
                yield
                return
            # A temporary file, not a pipe: a pipe nobody reads fills up and blocks the writer.
            with tempfile.TemporaryFile() as sink:
                with contextlib.suppress(ValueError, OSError):
                    sys.stderr.flush()  # what Python wrote before goes where it was meant to
                os.dup2(sink.fileno(), 2)
                try:
                    yield
                finally:
                    with contextlib.suppress(ValueError, OSError):
                        sys.stderr.flush()
                    os.dup2(saved, 2)
                    os.close(saved)
                    sink.seek(0)
                    text = sink.read().decode("utf-8", errors="replace")
    finally:
        forward(text, logger)  # also when the body failed: the runtime may have said why
