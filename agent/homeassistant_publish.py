"""Publishing Home Assistant discovery configs, and clearing the ones no longer wanted.

:class:`DiscoveryPublisher` does the I/O around :mod:`agent.homeassistant`'s payloads:

- at start it reads the topics it published before from ``<store.dir>/ha-discovery.json``
  and remembers which of them the config no longer wants (discovery turned off, a label
  removed, another prefix);
- on every connect (paho's thread, from :class:`agent.telemetry.Telemetry`) it
  publishes an empty retained message on each of those, then every wanted config,
  retained, QoS 1: a broker without persistence has them again after a restart;
- on Home Assistant's birth message (``<prefix>/status`` = ``online``) it publishes the
  configs again (at most every ``BIRTH_MIN_S``), as HA's docs ask of discovered devices.

The configs go straight to the broker, not through the outbox: they are the same on
every connect, and the outbox's envelope (``schema``, ``seq``, ``id``) does not belong
in a discovery payload. Nothing here may stop the agent: a failed publish or state file
is one log line, and the next connect tries again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.atomic import read_bounded, write_atomic
from agent.homeassistant import BIRTH_ONLINE, Discovery, stale_topics
from agent.mqtt import Incoming

log = logging.getLogger(__name__)

STATE_FILE = "ha-discovery.json"
STATE_MAX_BYTES = 256 * 1024
BIRTH_MIN_S = 2.0  # Home Assistant's birth message republishes at most this often

Publish = Callable[[str, bytes], bool]  # (topic, payload) retained QoS 1 -> handed over


class DiscoveryPublisher:
    """The device's discovery configs on the broker: published on connect, stale ones cleared."""

    def __init__(
        self,
        device: str,
        wanted: Sequence[Discovery],
        prefix: str,
        state_dir: Path,
        publish: Publish,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """No I/O. ``publish`` hands one retained QoS 1 message to the broker link and
        says whether it was taken; ``prefix`` is HA's discovery prefix (its birth topic
        is ``<prefix>/status``)."""
        self.device = device
        self.wanted = list(wanted)
        self.birth_topic = f"{prefix}/status"
        self.path = state_dir / STATE_FILE
        self.publish = publish
        self.clock = clock
        self.stale: list[str] = []
        self._last = -BIRTH_MIN_S
        # a topic this device may have published: <prefix…>/<component>/<device>/<id>/config
        # (object ids as HA's discovery reads them: pipeline names keep case and '-')
        self._ours = re.compile(
            rf"^[A-Za-z0-9][A-Za-z0-9._/-]*/[a-z_]+/{re.escape(device)}/[A-Za-z0-9_-]+/config$"
        )

    @property
    def active(self) -> bool:
        """There is something to publish or to clear."""
        return bool(self.wanted or self.stale)

    def handlers(self) -> dict[str, Callable[[Incoming], None]]:
        """The topic filters to subscribe to: HA's birth topic while discovery is on."""
        return {self.birth_topic: self.on_birth} if self.wanted else {}

    def start(self) -> None:
        """Read what was published before; remember (in the state file too) what to clear."""
        previous = self._load()
        self.stale = stale_topics(previous, self.wanted)
        if set(previous) != {d.topic for d in self.wanted} | set(self.stale):
            self._save([*self.stale, *(d.topic for d in self.wanted)])

    def on_connect(self) -> None:
        """Clear the stale configs, publish the wanted ones (paho's thread)."""
        self._last = self.clock()
        failed = [t for t in self.stale if not self.publish(t, b"")]
        if self.stale and not failed:
            log.info("home assistant: cleared %d discovery config(s)", len(self.stale))
            self.stale = []
            self._save([d.topic for d in self.wanted])
        failed += [d.topic for d in self.wanted if not self.publish(d.topic, d.payload())]
        if failed:
            log.warning(
                "home assistant: %d discovery message(s) not sent (first %s); "
                "sent again on the next connect",
                len(failed),
                failed[0],
            )

    def on_birth(self, message: Incoming) -> None:
        """Home Assistant (re)started: send the configs again (hostile input: only the
        exact payload ``online`` counts, and not more often than ``BIRTH_MIN_S``)."""
        if message.topic != self.birth_topic or message.payload != BIRTH_ONLINE:
            return
        if self.clock() - self._last < BIRTH_MIN_S:
            return
        self._last = self.clock()
        failed = [d.topic for d in self.wanted if not self.publish(d.topic, d.payload())]
        if failed:
            log.warning("home assistant: %d discovery config(s) not sent", len(failed))

    def _load(self) -> list[str]:
        """The topics published before; none (with one log line) for a bad file."""
        try:
            raw = read_bounded(self.path, STATE_MAX_BYTES)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read (%s); published configs are not cleared", self.path, exc)
            return []
        try:
            doc = json.loads(raw)
            topics = doc["topics"]
            if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
                raise ValueError("topics is not a list of strings")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("%s: not valid (%s); published configs are not cleared", self.path, exc)
            return []
        return [t for t in topics if self._ours.fullmatch(t)]

    def _save(self, topics: list[str]) -> None:
        data = json.dumps({"schema": 1, "topics": sorted(set(topics))}).encode()
        try:
            if not topics and not self.path.exists():
                return
            write_atomic(self.path, data, mode=0o600)
        except OSError as exc:
            log.warning("%s: cannot write: %s", self.path, exc)
