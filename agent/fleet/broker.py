"""The operator's side of the broker: a short-lived paho client for ``edge-fleet``.

Unlike the device's :class:`agent.mqtt.Link` it keeps nothing between runs: it connects
with a clean session, subscribes, reads what the broker holds (the retained status,
state, telemetry and desired states) and what arrives live, and publishes desired
state with QoS 1, waiting for the broker's acknowledgement. Every wait is bounded.

After subscribing it publishes a marker to a topic of its own and waits for it to come
back: the broker queues the retained messages of a subscription before anything
published later, so once the marker is back the snapshot of the fleet is complete
(a broker that refuses the marker costs a short quiet wait instead).
"""

from __future__ import annotations

import os
import queue
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import ConfigError, EdgeAgentError
from agent.mqtt import read_first_line

QUIET_S = 1.0  # without the marker: the snapshot is complete after this long without news


class BrokerError(EdgeAgentError):
    """The broker cannot be reached, refused us, or refused a message."""


@dataclass(frozen=True)
class BrokerOptions:
    """How an operator reaches the broker (``--broker``, ``--ca``, ``--cert``, …)."""

    url: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    prefix: str = "edge"
    timeout_s: float = 10.0  # connecting, subscribing, each acknowledgement

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls); raises ConfigError for a URL that is not mqtt(s)://HOST[:PORT]."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError([f"--broker: {self.url!r} is not an mqtt:// or mqtts:// URL"])
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError([f"--broker: {self.url!r} has an invalid port"]) from None
        if not tls and (self.ca or self.cert):
            raise ConfigError(["--ca/--cert need an mqtts:// --broker URL"])
        if (self.cert is None) != (self.key is None):
            raise ConfigError(["--cert and --key go together"])
        if self.password_file and not self.username:
            raise ConfigError(["--password-file needs --username"])
        return parts.hostname, port, tls


def options_from_args(args: Any, *, timeout_s: float | None = None) -> BrokerOptions:
    """The broker options of a fleet command's parsed ``args`` (``--broker``, ``--ca``,
    ``--cert``, ``--key``, ``--username``, ``--password-file``, ``--prefix``,
    ``--connect-timeout``, or ``timeout_s`` instead of the last)."""
    return BrokerOptions(
        url=args.broker or "",
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        username=args.username,
        password_file=args.password_file,
        prefix=args.prefix,
        timeout_s=args.connect_timeout if timeout_s is None else timeout_s,
    )


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retained: bool  # delivered from the broker's store, not published while we listened


def configure(client: paho.Client, options: BrokerOptions) -> None:
    """Set TLS (``--ca``, ``--cert``, ``--key``) and the user name and password
    (``--password-file``, else ``EDGE_FLEET_PASSWORD``) of ``options`` on ``client``.

    Raises ConfigError for options that do not fit together or TLS files that do not load.
    """
    _, _, tls = options.endpoint()
    if tls:
        try:
            client.tls_set(
                ca_certs=str(options.ca) if options.ca else None,
                certfile=str(options.cert) if options.cert else None,
                keyfile=str(options.key) if options.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"--ca/--cert/--key: cannot load TLS files: {exc}"]) from exc
    if options.username:
        path = options.password_file
        password = (
            os.environ.get("EDGE_FLEET_PASSWORD")
            if path is None
            else read_first_line(path, "--password-file")
        )
        client.username_pw_set(options.username, password)


class FleetBroker:
    """One connection: :meth:`connect`, then :meth:`messages` and :meth:`publish`."""

    def __init__(self, options: BrokerOptions) -> None:
        """Check the options (ConfigError names the option); nothing connects yet."""
        self.options = options
        self.host, self.port, _ = options.endpoint()
        self.client_id = f"edge-fleet-{uuid.uuid4().hex[:10]}"
        self.sync_topic = f"{options.prefix}/fleet/sync/{self.client_id}"
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._connack: threading.Event = threading.Event()
        self._connack_code: ReasonCode | None = None
        self._disconnected = threading.Event()
        self._acks: dict[int, ReasonCode | list[ReasonCode]] = {}
        self._ack = threading.Condition()
        self._synced = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        configure(self.client, options)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    # -- connecting ---------------------------------------------------------------------

    def connect(self, subscriptions: Sequence[str] = ()) -> None:
        """Connect, subscribe, and wait until the retained messages have arrived.

        Raises BrokerError when the broker cannot be reached, refuses the connection
        or a subscription (the message names it), or does not answer in time.
        """
        timeout = self.options.timeout_s
        where = f"{self.host}:{self.port}"
        try:
            self.client.connect(self.host, self.port, keepalive=30, clean_start=True)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot reach the broker at {where}: {exc}") from exc
        self.client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise BrokerError(f"the broker at {where} did not answer within {timeout:g} s")
        code = self._connack_code
        if code is None:
            self.close()
            raise BrokerError(
                f"the broker at {where} closed the connection before accepting it "
                "(check --ca, --cert and --key)"
            )
        if code.is_failure:
            self.close()
            raise BrokerError(f"the broker at {where} refused the connection: {code}")
        if not subscriptions:
            return
        topics = [*subscriptions, self.sync_topic]
        # QoS 0: mosquitto queues at most max_queued_messages (1000) QoS 1 messages per
        # client beyond those in flight, and drops the rest, retained ones included: at
        # QoS 1 a snapshot of more than ~340 devices came back incomplete (measured
        # with bench/fleet_devices.py). QoS 0 on a live TCP connection loses nothing;
        # a lost connection ends the command with an error.
        result, mid = self.client.subscribe([(t, 0) for t in topics])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"cannot subscribe: {paho.error_string(result)}")
        codes = self._wait_ack(mid, "SUBACK")
        granted = codes if isinstance(codes, list) else []
        for topic, reason in zip(topics, granted, strict=False):
            if reason.is_failure and topic != self.sync_topic:
                raise BrokerError(f"the broker refused the subscription to {topic}: {reason}")
        self._sync(granted[-1] if granted else None)

    def _sync(self, granted: ReasonCode | None) -> None:
        """Wait for the retained snapshot (see the module's docstring)."""
        if granted is not None and not granted.is_failure:
            try:
                self.publish(self.sync_topic, b"", retain=False)
                if self._synced.wait(self.options.timeout_s):
                    return
            except BrokerError:
                pass  # not allowed to publish there: fall back on a quiet wait
        last = self._inbox.qsize()
        deadline = time.monotonic() + self.options.timeout_s
        while time.monotonic() < deadline:
            time.sleep(QUIET_S)
            size = self._inbox.qsize()
            if size == last:
                return
            last = size

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> FleetBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading and writing ------------------------------------------------------------

    def messages(self, timeout: float = 0.0) -> list[Message]:
        """Everything received so far; waits up to ``timeout`` for the first one.

        Raises BrokerError when the connection was lost.
        """
        out: list[Message] = []
        try:
            out.append(
                self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            )
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if not out and self._disconnected.is_set():
            raise BrokerError("the connection to the broker was lost")
        return out

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK.

        Raises BrokerError when it is not sent, refused (the broker's reason, such as
        not authorized) or not acknowledged within the timeout.
        """
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        code = self._wait_ack(info.mid, "PUBACK")
        if isinstance(code, ReasonCode) and code.is_failure:
            raise BrokerError(f"the broker refused the message to {topic}: {code}")

    def _wait_ack(self, mid: int, what: str) -> Any:
        deadline = time.monotonic() + self.options.timeout_s
        with self._ack:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or self._disconnected.is_set():
                    raise BrokerError(
                        f"no {what} from the broker within {self.options.timeout_s:g} s"
                    )
                self._ack.wait(min(left, 0.1))
            return self._acks.pop(mid)

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack_code = reason_code
        self._connack.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._disconnected.set()
        self._connack.set()  # a connection refused before CONNACK ends the wait too

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._ack:
            self._acks[mid] = list(reason_codes)
            self._ack.notify_all()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._ack:
            self._acks[mid] = reason_code
            self._ack.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.sync_topic:
            self._synced.set()
            return
        self._inbox.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
