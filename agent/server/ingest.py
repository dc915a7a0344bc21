"""The ingester: device messages from the broker into the database, each stored once.

:class:`Ingester` is one MQTT 5 client (paho 2.x) with a fixed client id, a persistent
session (``clean_start=False`` and a session expiry) and QoS 1 subscriptions:

- ``$share/<group>/<prefix>/+/telemetry``, ``…/+/events`` and ``…/+/reply/#``: a
  shared subscription, so instances of one share group split these between them;
- ``<prefix>/+/status`` and ``<prefix>/+/state``: plain, so every instance gets the
  retained ones on its first subscription (a shared subscription delivers no retained
  message) — retain handling 1, so a resumed session is not sent them again.

paho's network thread only puts each message in a bounded queue; one worker thread
reads it (:func:`agent.server.inbound.read`), stores it in ONE transaction
(``record_messages`` on the keys, then the streams' writes; the batch and its retries:
:mod:`agent.server.ingest_batch`), commits, and only then acknowledges it
(``manual_ack``). A message the broker delivered but we never acknowledged is delivered
again after a reconnect, to this session: nothing acknowledged is lost, and a repeat
finds its key and is counted as a duplicate.

The database down: the worker keeps the message and retries with capped backoff; the
queue fills up to ``max_pending``, which is also the Receive Maximum we announce, so
the broker sends no more unacknowledged messages than the queue holds and keeps the
rest for us. A malformed message is counted by reason, acknowledged and skipped.
:meth:`Ingester.snapshot` gives the counters (for ``/healthz`` and ``/metrics``).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import ConfigError
from agent.fleet.acl import check_device_id, check_group_name, check_prefix
from agent.fleet.broker import BrokerError, BrokerOptions, configure
from agent.mqtt_reasons import explain, in_fleet_terms
from agent.server.inbound import subscriptions
from agent.server.ingest_batch import BatchWriter, Counters, Pending

log = logging.getLogger(__name__)

BATCH_MAX = 200  # messages stored in one transaction: one commit, not one per message


@dataclass(frozen=True)
class IngestOptions:
    """How one ingester instance subscribes."""

    client_id: str  # fixed per instance: its persistent session on the broker
    group: str = "edge-fleet"  # the share group of the instances
    session_expiry_s: int = 7 * 86_400  # the broker keeps our session this long offline
    max_pending: int = 1000  # messages held unacknowledged (queue + Receive Maximum)


@dataclass(frozen=True)
class IngestStats:
    """A snapshot of the counters (plain values, for /healthz and /metrics)."""

    received: int
    stored: int
    duplicates: int
    malformed: dict[str, int]  # by reason (agent.server.inbound.REASONS)
    queue_depth: int
    lag_s: float | None  # now - ts of the last message stored (the device's clock)
    broker_connected: bool  # connected and subscribed
    connects: int  # successful connections so far (> 1 after reconnects)
    database_ok: bool
    database_error: str | None


class Ingester:
    """Build, :meth:`start`, :meth:`stop`; :meth:`snapshot` at any time."""

    def __init__(
        self,
        engine: sa.Engine,
        broker: BrokerOptions,
        options: IngestOptions,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Check the options (ConfigError names the problem); nothing connects yet."""
        problems = [
            p
            for p in (
                check_group_name(options.group),
                check_device_id(options.client_id),  # the same rules: a plain name
                check_prefix(broker.prefix),
            )
            if p is not None
        ]
        if not 1 <= options.max_pending <= 65_535:
            problems.append("max_pending must be between 1 and 65535 (MQTT's Receive Maximum)")
        if problems:
            raise ConfigError(problems)
        self.engine = engine
        self.broker = broker
        self.options = options
        self.clock = clock
        self.host, self.port, self.tls = broker.endpoint()
        self._queue: queue.Queue[Pending] = queue.Queue(options.max_pending)
        self._lock = threading.Lock()
        self._counters = Counters()
        self._session = 0  # bumped on every CONNACK
        self._refused = False  # the last CONNACK refused us (already logged)
        self._holding = 0  # messages of the batch being stored (taken off the queue)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._acks: dict[int, ReasonCode] = {}  # PUBACKs of publish() not yet taken
        self._abandoned: set[int] = set()  # publishes given up on: their PUBACK is dropped
        self._ack_ready = threading.Condition(self._lock)
        self._writer = BatchWriter(
            engine, broker.prefix, self._counters, self._lock, self._stopping, clock
        )
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        configure(self.client, broker)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        # Called (from the worker) after a commit that stored news from a device (a
        # status, a state or an event): serve wires the rollout driver's nudge here.
        self.on_news: Callable[[], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and connect in the background: paho retries and reconnects
        with backoff (1 s doubling to 30 s) for as long as the broker is away, and
        subscribes again on every connection (a broker restarted without persistence
        has forgotten the session)."""
        self._stopping.clear()
        self._worker = threading.Thread(target=self._work, name="ingest", daemon=True)
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.options.session_expiry_s
        props.ReceiveMaximum = self.options.max_pending
        self.client.connect_async(
            self.host, self.port, keepalive=30, clean_start=False, properties=props
        )
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once a session is up and subscribed; False after ``timeout``."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, finish the one being stored, disconnect.

        What is still queued is not acknowledged: the broker keeps it in our session
        and delivers it again when this client id connects next.
        """
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout)
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.options.session_expiry_s
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self._connected.clear()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """Publish on this client's connection with QoS 1 and wait for the PUBACK
        (at most ``broker.timeout_s``): the server's :class:`~agent.server.context.Publisher`.

        Raises BrokerError when not connected (nothing is queued then), when the broker
        refuses the message (its reason, e.g. not authorized) or does not acknowledge it
        in time; a message that timed out may still reach the broker later.
        """
        where = f"{self.host}:{self.port}"
        if not self._connected.is_set():
            raise BrokerError(f"not connected to the broker at {where}; try again later")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        timeout = self.broker.timeout_s
        deadline = time.monotonic() + timeout
        with self._ack_ready:
            while info.mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected.is_set():
                    if len(self._abandoned) >= 1000:  # a broker that never answers
                        self._abandoned.clear()
                    self._abandoned.add(info.mid)
                    raise BrokerError(f"no PUBACK from the broker at {where} within {timeout:g} s")
                self._ack_ready.wait(min(left, 0.1))
            code = self._acks.pop(info.mid)
        if code.is_failure:
            raise BrokerError(f"the broker refused the message to {topic}: {code}")

    def snapshot(self) -> IngestStats:
        with self._lock:
            c = self._counters
            return IngestStats(
                received=c.received,
                stored=c.stored,
                duplicates=c.duplicates,
                malformed=dict(c.malformed),
                queue_depth=self._queue.qsize() + self._holding,
                lag_s=c.lag_s,
                broker_connected=self._connected.is_set(),
                connects=self._session,
                database_ok=c.database_error is None,
                database_error=c.database_error,
            )

    # -- paho callbacks (network thread): no I/O but the queue ----------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = True
            self._cannot_connect(explain(reason_code))
            return
        with self._lock:
            self._session += 1
        log.info(
            "connected to the broker at %s:%d (session %s)",
            self.host,
            self.port,
            "resumed" if flags.session_present else "new",
        )
        shared, plain = subscriptions(self.broker.prefix, self.options.group)
        # Retain handling 1: retained messages only for a subscription that is new, so
        # a resumed session is not sent every retained status and state again.
        topics = [(t, SubscribeOptions(qos=1)) for t in shared]
        topics += [(t, SubscribeOptions(qos=1, retainHandling=1)) for t in plain]
        client.subscribe(topics)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.warning("the broker refused ingest subscriptions: %s", ", ".join(refused))
        self._connected.set()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._ack_ready:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._acks[mid] = reason_code
            self._ack_ready.notify_all()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping.is_set():
            pass
        elif was:  # paho says "Unspecified error" (128) for a dropped socket too
            why = "connection dropped" if reason_code.value == 128 else str(reason_code)
            log.warning("lost the broker at %s:%d (%s); reconnecting", self.host, self.port, why)
        elif not self._refused:  # closed before any CONNACK: only the likely causes
            self._cannot_connect(explain(None, tls=self.tls, client_cert=bool(self.broker.cert)))
        self._refused = False

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the attempt: the exception
        # being handled (refused, DNS, TLS, timeout) says why.
        self._cannot_connect(explain(sys.exc_info()[1], tls=self.tls))

    def _cannot_connect(self, why: str) -> None:
        """One warning per reason; repeats are rate-limited by the log handler
        (agent.logs.RateLimit: the first, then one a minute with a count)."""
        why = in_fleet_terms(why)
        log.warning(
            "cannot connect to the broker at %s:%d: %s; retrying",
            self.host,
            self.port,
            why,
            extra={"repeat_key": why},
        )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._counters.received += 1
            session = self._session
        pending = Pending(msg.topic, bytes(msg.payload), msg.mid, msg.qos, session, self.clock())
        try:
            # Never blocks for long: the broker sends at most max_pending unacknowledged.
            self._queue.put(pending, timeout=1.0)
        except queue.Full:
            # Not acknowledged: the broker delivers it again after a reconnect.
            log.warning("ingest queue full; %s left unacknowledged", msg.topic)

    # -- the worker: store, commit, then acknowledge --------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < BATCH_MAX:  # what else is waiting: one transaction for all
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._take(batch)

    def _take(self, batch: list[Pending]) -> None:
        """Store ``batch`` in one transaction (retrying while the database is down),
        then acknowledge every message of it, in the order they arrived (MQTT §4.6)."""
        self._holding = len(batch)
        try:
            self._take_batch(batch)
        finally:
            self._holding = 0

    def _take_batch(self, batch: list[Pending]) -> None:
        news = self._writer.write(batch)
        if news is None:
            return  # stopping: not acknowledged, delivered again to this session later
        for pending in batch:
            self._ack(pending)
        if news and self.on_news is not None:
            self.on_news()

    def _ack(self, pending: Pending) -> None:
        with self._lock:
            current = pending.session == self._session
        # After a reconnect the broker sends the message again (same session): that
        # copy is found by its key and acknowledged then.
        if pending.qos > 0 and current:
            self.client.ack(pending.mid, pending.qos)
