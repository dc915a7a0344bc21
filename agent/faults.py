"""Crash points for the crash-safety tests.

The install path calls ``crash_point(NAME)`` between its durable steps. When the
environment variable ``EDGE_AGENT_CRASH_AT`` equals NAME the process SIGKILLs itself
right there, as a power cut would stop it. Tests run the agent as a subprocess with
each name in turn and check that a restart finds exactly the old or the new release.
Unset (always, in production), a crash point is one dictionary lookup.
"""

from __future__ import annotations

import os

CRASH_ENV = "EDGE_AGENT_CRASH_AT"

# In the order the install path reaches them.
CRASH_POINTS = (
    "manifest_fetched",
    "download_partial",
    "blob_downloaded",
    "blob_installed",
    "release_staged",
    "release_added",
    "pointer_written",
    "pointer_replaced",
)
PUBLISH_CRASH_POINTS = ("publish_staged", "publish_renamed")


def crash_point(name: str) -> None:
    """SIGKILL this process if the crash-point variable names ``name``."""
    if os.environ.get(CRASH_ENV) == name:
        import signal  # not on a command line's path (~0.5 ms)

        os.kill(os.getpid(), signal.SIGKILL)
