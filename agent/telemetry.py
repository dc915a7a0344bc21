"""Telemetry: what the device tells its operators, over MQTT, without losing any of it.

:class:`Telemetry` numbers every message, keeps it in the SQLite :class:`Outbox` and
only then hands it to the broker :class:`Link`; a message leaves the outbox when the
broker acknowledges it. One thread (the *writer*) does all of that in batches:

    record() ─► queue ─► writer: outbox.write(batch, acks) ─► link.publish (window of
                                  max_inflight) ◄─ acks ◄─ paho network thread

After a reconnect the writer sends the online status first, then replays the outbox
from its oldest message; after a restart it replays everything that was never
acknowledged. Messages paho still holds (sent before a drop, not acknowledged) are
resent by paho itself and not again by us, so a broker outage makes few duplicates.

Topics and payloads are docs/protocol.md's: ``<prefix>/<device>/{status,state,telemetry,
results,events,reply}``; every payload has ``schema``, ``ts``, ``seq`` (per device and
topic, from 1) and ``id``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from paho.mqtt.client import topic_matches_sub

from agent.config import MqttConfig, ResultsConfig
from agent.contract import (
    EventName,
    Figures,
    InferenceDoc,
    MachineDoc,
    OfflineReason,
    PipelineInferenceDoc,
    StateDoc,
    StatusDoc,
    StatusExtra,
    StatusState,
    TelemetryDoc,
    TelemetryExtra,
)
from agent.mqtt import Incoming, Link, Will
from agent.outbox import Message, Outbox, OutboxError, Record
from agent.pipeline import Result
from agent.runtime.adapters import Output
from agent.strictjson import dumps
from agent.sysinfo import SystemProbe

log = logging.getLogger(__name__)

_BATCH = 1000  # records per outbox transaction, at most
_TICK_S = 0.5  # the writer wakes at least this often
_ACK_BATCH = 1000  # acknowledged rows deleted in one commit
_ACK_WAIT_S = 0.5  # or after this long
_QUEUE_MAX = 100_000  # records waiting for the writer; beyond, the oldest are dropped
DROP_REPORT_S = 60.0  # at most one outbox_dropped event (and log line) this often
# PUBACK reasons that will not change on a retry: not authorized, topic name invalid,
# packet too large, payload format invalid. Other failures (quota, busy) are retried.
_PERMANENT = {0x87, 0x90, 0x95, 0x99}


def now_ts() -> float:
    return round(time.time(), 3)


class Topics:
    """The device's topic names under ``prefix``."""

    def __init__(self, prefix: str, device: str) -> None:
        self.prefix = prefix
        self.device = device
        self.base = f"{prefix}/{device}"

    def __call__(self, name: str) -> str:
        return f"{self.base}/{name}"


def _signature(output: Output) -> tuple[Any, ...]:
    """What must differ for on_change to publish: labels found (with, for a detection,
    those its cascade found on its crop), or values to 2 decimals."""
    if output.task == "classification":
        return tuple(sorted(label for _, label, _ in output.classes))
    if output.task == "detection":
        return tuple(
            sorted(
                (d.label, repr(_signature(d.cascade.output)) if d.cascade else "")
                for d in output.detections
            )
        )
    return tuple(round(v, 2) if isinstance(v, float) else repr(v) for v in output.values)


class ResultGate:
    """Decides which results are published, per ``results.publish``."""

    def __init__(self, config: ResultsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._last_signature: tuple[Any, ...] | None = None
        self._next = 0.0

    def admit(self, result: Result) -> bool:
        mode = self.config.publish
        if mode == "every":
            return True
        if mode == "off":
            return False
        if mode == "interval":
            now = self.clock()
            if now < self._next:
                return False
            self._next = now + self.config.interval_s
            return True
        signature = (result.model, result.version, _signature(result.output))
        if signature == self._last_signature:
            return False
        self._last_signature = signature
        return True


@dataclass
class _Counters:
    sent: int = 0  # handed to paho
    acked: int = 0
    rejected: int = 0  # the broker answered with a failure reason (not authorized, …)
    unsent: int = 0  # QoS 0 messages not sent for lack of a connection
    outbox_errors: int = 0
    overflow: int = 0  # records lost before the outbox because it kept failing


class Telemetry:
    """The device's MQTT voice: status, state, telemetry, results, events and replies."""

    def __init__(
        self,
        device: str,
        outbox: Outbox,
        mqtt: MqttConfig,
        results: ResultsConfig,
        *,
        interval_s: float,
        probe: SystemProbe | None = None,
        stats: Callable[[], InferenceDoc | None] | None = None,
        handlers: Mapping[str, Callable[[Incoming], None]] | None = None,
        environ: dict[str, str] | None = None,
        observe: Callable[[str, Mapping[str, Any]], None] | None = None,
        status: StatusExtra | None = None,
        drop_report_s: float = DROP_REPORT_S,
        on_connect: Callable[[], None] | None = None,
        pipelines: Callable[[], dict[str, PipelineInferenceDoc]] | None = None,
        extra: Callable[[], TelemetryExtra] | None = None,
    ) -> None:
        """Build (no I/O but reading the password); ``handlers`` maps whole topic filters
        (``edge/<device>/cmd/+``, the desired-state topics) to functions called on
        paho's thread; each is subscribed to on every connect. ``observe`` sees every
        record (stream, document) as it is made (``edge-agent demo`` prints them).
        ``status`` is added to every status message, the Last Will's too (the device's
        groups, so the fleet side knows the members of a group even while they are
        offline). ``drop_report_s``: at most one ``outbox_dropped`` event this often.
        ``on_connect`` is called on paho's thread after every connect (Home Assistant
        discovery publishes its retained configs then, through :meth:`publish_retained`).

        Raises ConfigError (from the Link) for unusable MQTT settings.
        """
        self.device = device
        self.topics = Topics(mqtt.topic_prefix, device)
        self.outbox = outbox
        self.interval_s = interval_s
        self.probe = probe
        self.stats_source = stats
        self.pipelines_source = pipelines  # several pipelines: each one's figures
        self.extra = extra  # shadow runs and output statistics (agent/shadow/)
        self.gate = ResultGate(results)
        self.results_qos = results.qos
        self.counters = _Counters()
        self.max_inflight = mqtt.max_inflight
        self.observe = observe
        self._handlers = dict(handlers or {})
        self._connect_hook = on_connect
        self._status: StatusExtra = status or {}
        self._queue: collections.deque[Record] = collections.deque()
        self._busy = False  # the writer holds records taken from the queue, not yet written
        self._acked_rows: list[int] = []  # acknowledged, not yet deleted from the outbox
        self._acked_set: set[int] = set()
        self._acked_since = 0.0
        self._acks: collections.deque[tuple[int, int, str]] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._reconnected = threading.Event()
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (rowid or 0, generation)
        self._inflight_rows: set[int] = set()
        self._cursor = 0  # highest outbox row handed to paho on this connection
        self._thread: threading.Thread | None = None
        self._generation = 0  # the Link's client generation the inflight map belongs to
        self._pause_until = 0.0  # after a deferred message: no sending before this
        self.drop_report_s = drop_report_s
        self._dropped: collections.Counter[str] = collections.Counter()  # not yet reported
        self._drop_report_at = 0.0  # monotonic: no outbox_dropped event before this
        self.link: Link | None = None
        self.machine: MachineDoc = {}  # the latest probe sample (empty before the first)
        if mqtt.url is not None:
            will = self._status_doc("offline", "lost")
            offline = {"schema": 1, "state": will["state"], "ts": now_ts(), **will}
            self.link = Link(
                mqtt,
                device,
                Will(self.topics("status"), dumps(offline).encode()),
                on_connect=self._on_connect,
                on_disconnect=self._wake.set,
                on_ack=self._on_ack,
                on_message=self._on_message,
                subscriptions=tuple(self._handlers),
                environ=environ,
            )

    # -- recording (any thread) ----------------------------------------------------

    def record(
        self,
        stream: str,
        body: Mapping[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        keep: bool | None = None,
        topic: str | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """Queue a message for ``<prefix>/<device>/<stream>`` (or ``topic``).

        QoS 1 messages are kept in the outbox until acknowledged; QoS 0 ones and
        ``keep=False`` ones are sent only if connected when their turn comes.
        """
        doc = {"ts": now_ts(), **body}
        if self.observe is not None:
            self.observe(stream, doc)
        if len(self._queue) >= _QUEUE_MAX:  # the outbox is failing: keep memory bounded
            self._queue.popleft()
            self.counters.overflow += 1
        self._queue.append(
            Record(
                stream,
                topic or self.topics(stream),
                doc,
                qos,
                retain,
                qos == 1 and (keep is None or keep),
                properties or {},
            )
        )
        if not self._wake.is_set():
            self._wake.set()

    def event(self, name: EventName, detail: Mapping[str, Any] | None = None) -> None:
        self.record("events", {"event": name, **(detail or {})})

    def state(self, state: StateDoc) -> None:
        """Publish the retained ``state`` (the active model, update phase, last error)."""
        self.record("state", state, retain=True)

    def result(self, result: Result) -> None:
        """Publish ``result`` if ``results.publish`` lets it through (pipeline thread)."""
        if self.gate.admit(result):
            self.record("results", result.to_dict(), qos=self.results_qos)

    def reply(self, topic: str, body: Mapping[str, Any], correlation: bytes | None) -> None:
        """Answer a command; sent once if connected, never kept (the asker may be gone)."""
        props = {"CorrelationData": correlation} if correlation is not None else None
        self.record("reply", body, topic=topic, keep=False, properties=props)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and the broker link; the outbox must be open. A damaged
        outbox file that opening replaced is reported first (``state_repaired``)."""
        if self.outbox.repair is not None:
            self.event("state_repaired", self.outbox.repair.to_event())
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        if self.link is not None:
            self.link.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is in the outbox (or sent, if direct)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.1))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Record what is queued, say offline (retained) when connected, disconnect.
        A no-op when never started (the agent refused to start)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.link is not None:
            final = None
            try:
                body = {"ts": now_ts(), **self._status_doc("offline", "stopped")}
                offline = Record("status", self.topics("status"), body, retain=True, keep=False)
                (message,), _ = self.outbox.write([offline])
                final = (message.topic, message.payload)
            except OutboxError as exc:
                log.error("%s", exc)
            self.link.stop(final=final)
            self._settle()  # acknowledgements that came in while stopping
            if self._acked_rows:
                try:
                    self.outbox.write([], self._acked_rows)
                except OutboxError as exc:
                    log.error("%s", exc)

    def _status_doc(self, state: StatusState, reason: OfflineReason | None = None) -> StatusDoc:
        """A status body: ``state``, ``reason`` (offline only), then the device's
        ``groups`` and ``agent_version`` (``status`` given at build)."""
        doc: StatusDoc = {"state": state}
        if reason is not None:
            doc["reason"] = reason
        if "groups" in self._status:
            doc["groups"] = self._status["groups"]
        if "agent_version" in self._status:
            doc["agent_version"] = self._status["agent_version"]
        return doc

    def depth(self) -> int:
        """Messages recorded and not yet acknowledged."""
        return max(0, self.outbox.stats().depth - len(self._acked_set))

    def snapshot(self) -> Figures:
        """The outbox and connection figures that telemetry carries."""
        link = self.link
        stats = self.outbox.stats()
        return {
            "outbox": {
                "depth": self.depth(),
                "bytes": stats.bytes,
                "dropped": stats.dropped,
                "overflow": self.counters.overflow,
            },
            "mqtt": {
                "connected": bool(link and link.connected.is_set()),
                "protocol": link.protocol if link else None,
                "connects": link.connects if link else 0,
                "inflight": len(self._inflight),
                "rejected": self.counters.rejected,
                "unsent_qos0": self.counters.unsent,
            },
        }

    # -- paho callbacks (network thread) ---------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        self._reconnected.set()
        self.record("status", self._status_doc("online"), retain=True, keep=False)
        if self._connect_hook is not None:
            try:
                self._connect_hook()
            except Exception:  # a hook bug must not kill paho's thread
                log.exception("on-connect hook failed")

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Hand one retained QoS 1 message straight to the broker link, outside the outbox
        (no envelope, not kept): whether paho took it. For documents that are the same on
        every connect and are sent again then (Home Assistant discovery configs)."""
        link = self.link
        return link is not None and link.publish(topic, payload, 1, True, {}) is not None

    def _on_ack(self, mid: int, code: int, reason: str) -> None:
        self._acks.append((mid, code, reason))
        if not self._wake.is_set():
            self._wake.set()

    def _on_message(self, message: Incoming) -> None:
        for pattern, handler in self._handlers.items():
            if topic_matches_sub(pattern, message.topic):
                try:
                    handler(message)
                except Exception:  # a handler bug must not kill paho's thread
                    log.exception("handler for %s failed", message.topic)
                return

    # -- the writer thread ------------------------------------------------------------

    def _telemetry(self) -> TelemetryDoc:
        machine: MachineDoc = self.probe.sample() if self.probe else {}
        self.machine = machine  # the latest sample, for the metrics endpoint
        inference = self.stats_source() if self.stats_source else None
        snapshot = self.snapshot()
        doc: TelemetryDoc = {
            **machine,  # type: ignore[typeddict-item]  # pipelines: set below
            "inference": inference,
            "outbox": snapshot["outbox"],
            "mqtt": snapshot["mqtt"],
        }
        if self.pipelines_source is not None:
            doc["pipelines"] = self.pipelines_source()
        extra = self.extra() if self.extra is not None else {}
        if "shadows" in extra:
            doc["shadows"] = extra["shadows"]
        if "outputs" in extra:
            doc["outputs"] = extra["outputs"]
        return doc

    def _run(self) -> None:
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_tick and not self._stop.is_set():
                try:
                    # retained: the fleet's `devices` shows the latest figures at once,
                    # and the last known ones of a device that is offline
                    self.record("telemetry", self._telemetry(), retain=True)
                except Exception:  # a sensor must not stop the outbox
                    log.exception("telemetry sample failed")
                next_tick = max(next_tick + self.interval_s, now)
            self._wake.wait(min(_TICK_S, max(next_tick - time.monotonic(), 0.0)))
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._step()
            except Exception:  # a bug here must not silence the device: log, go on
                log.exception("telemetry writer step failed")
                self._busy = False
                time.sleep(0.5)
            if stopping and not self._queue:
                break

    def _step(self) -> None:
        """One batch: settle acks, record queued messages, send what the window allows."""
        link = self.link
        generation = link.generation if link else 0
        if self._reconnected.is_set() or generation != self._generation:
            self._reconnected.clear()
            self._generation = generation
            for mid, (rowid, gen) in list(self._inflight.items()):
                if gen != generation:  # that paho client and its queue are gone
                    del self._inflight[mid]
                    self._inflight_rows.discard(rowid)
            self._cursor = 0
        self._settle()
        self._busy = True
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
        # Acknowledged rows are deleted with the next batch, or once enough gathered: a
        # commit (an fsync) per acknowledgement would make the outbox the bottleneck.
        # Until deleted they are skipped; after a crash they are sent again (duplicates).
        if (
            batch
            or len(self._acked_rows) >= _ACK_BATCH
            or (self._acked_rows and time.monotonic() - self._acked_since > _ACK_WAIT_S)
        ):
            try:
                messages, dropped = self.outbox.write(batch, self._acked_rows)
            except OutboxError as exc:
                self.counters.outbox_errors += 1
                log.error("%s; retrying", exc)
                self._queue.extendleft(reversed(batch))
                self._busy = False
                time.sleep(1.0)
                return
            self._acked_rows.clear()
            self._acked_set.clear()
            self._dropped.update(dropped)
            for message in messages:
                if message.rowid == 0:
                    self._send_direct(message)
        with self._idle:
            self._busy = False
            self._idle.notify_all()
        self._report_dropped()
        if link is not None and link.connected.is_set() and time.monotonic() >= self._pause_until:
            self._fill_window(link)

    def _report_dropped(self) -> None:
        """What the size cap dropped, by stream: one event (and log line) at most every
        ``drop_report_s``; drops in between are added to the next one."""
        now = time.monotonic()
        if not self._dropped or now < self._drop_report_at:
            return
        counts = dict(sorted(self._dropped.items()))
        self._dropped.clear()
        self._drop_report_at = now + self.drop_report_s
        total = self.outbox.stats().dropped
        log.warning(
            "outbox full (telemetry.outbox_max_mb): dropped %s; %d dropped in all",
            ", ".join(f"{n} {stream}" for stream, n in counts.items()),
            total,
        )
        self.event("outbox_dropped", {"dropped": counts, "total": total})

    def _settle(self) -> None:
        """Turn paho's acknowledgements into outbox rows to delete."""
        while self._acks:
            mid, code, reason = self._acks.popleft()
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            rowid = entry[0]
            self._inflight_rows.discard(rowid)
            if code >= 0x80 and code not in _PERMANENT:  # quota, busy, …: send it again later
                log.warning("broker deferred message %d: %s; retrying in 1 s", rowid, reason)
                if rowid:
                    self._cursor = min(self._cursor, rowid - 1)
                self._pause_until = time.monotonic() + 1.0
                continue
            self.counters.acked += 1
            if code >= 0x80:
                self.counters.rejected += 1
                log.warning("broker refused message %d: %s; not retried", rowid, reason)
            if rowid:
                if not self._acked_rows:
                    self._acked_since = time.monotonic()
                self._acked_rows.append(rowid)
                self._acked_set.add(rowid)

    def _send_direct(self, message: Message) -> None:
        link = self.link
        if link is None or not link.connected.is_set():
            if message.qos == 0:
                self.counters.unsent += 1
            return
        mid = link.publish(
            message.topic, message.payload, message.qos, message.retain, message.properties
        )
        if mid:
            self._inflight[mid] = (0, link.generation)
        if mid is not None:
            self.counters.sent += 1
        elif message.qos == 0:
            self.counters.unsent += 1

    def _fill_window(self, link: Link) -> None:
        """Hand paho the oldest outbox messages not yet handed over, up to the window."""
        room = min(self.max_inflight, link.window) - len(self._inflight)
        while room > 0:
            rows = self.outbox.pending(self._cursor, room)
            if not rows:
                return
            for message in rows:
                if message.rowid in self._inflight_rows or message.rowid in self._acked_set:
                    self._cursor = message.rowid
                    continue
                if room <= 0 or not link.connected.is_set():
                    return
                mid = link.publish(message.topic, message.payload, message.qos, message.retain, {})
                if mid is None:
                    return  # the connection just went; the reconnect replays from the start
                self._cursor = message.rowid
                old = self._inflight.get(mid)
                if old is not None:  # a mid paho reused: that message's fate is unknown
                    self._inflight_rows.discard(old[0])
                self._inflight[mid] = (message.rowid, link.generation)
                self._inflight_rows.add(message.rowid)
                self.counters.sent += 1
                room -= 1
