"""The broker connection: one paho-mqtt 2.x client with TLS, credentials and reconnects.

:class:`Link` owns the client and its network thread and nothing else: it does not keep
messages (the outbox does) and knows no topics but the Last Will's. It speaks MQTT 5
and falls back to 3.1.1 when the broker refuses 5; it keeps a persistent session (MQTT 5
with ``session_expiry_s``) so subscriptions and queued commands outlive a disconnect;
it reconnects with capped, jittered backoff.

Callbacks run on paho's network thread; they must be quick and must not block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.backoff import backoff_delay
from agent.config import MqttConfig
from agent.contract import MqttProtocol
from agent.errors import ConfigError
from agent.mqtt_reasons import explain

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 132  # CONNACK "Unsupported protocol version" (paho maps 3.1.1's rc 1)
_STABLE_S = 10.0  # a connection up this long resets the backoff (not one kicked at once)
_DISCONNECT_WITH_WILL = 0x04


@dataclass(frozen=True)
class Incoming:
    """A message the broker delivered to us."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def read_password(config: MqttConfig, environ: dict[str, str] | None = None) -> str | None:
    """The broker password from ``password_file`` or the systemd credential, else None.

    Raises ConfigError naming the key when the file or credential cannot be read.
    """
    env = os.environ if environ is None else environ
    if config.password_file is not None:
        key, path = "mqtt.password_file", config.password_file
    elif config.password_credential is not None:
        folder = env.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ConfigError(
                [
                    "mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set; load the "
                    f"credential in the unit (LoadCredential={config.password_credential}:PATH)"
                ]
            )
        key, path = "mqtt.password_credential", Path(folder) / config.password_credential
    else:
        return None
    return read_first_line(path, key)


def read_first_line(path: Path, key: str) -> str:
    """The first line of a password file; ConfigError naming ``key`` when it is
    unreadable or empty."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{key}: cannot read {path}: {exc}"]) from exc
    if not lines or not lines[0]:
        raise ConfigError([f"{key}: {path} is empty"])
    return lines[0]


def _endpoint(url: str) -> tuple[str, int, bool]:
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "mqtts"
    return parts.hostname or "", parts.port or (8883 if tls else 1883), tls


class Link:
    """A paho client that keeps itself connected until :meth:`stop`."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        will: Will,
        *,
        on_connect: Callable[[bool], None],
        on_disconnect: Callable[[], None],
        on_ack: Callable[[int, int, str], None],  # mid, reason code, its name if failed
        on_message: Callable[[Incoming], None],
        subscriptions: tuple[str, ...] = (),
        environ: dict[str, str] | None = None,
    ) -> None:
        """Check the settings (ConfigError names the key); nothing connects before start()."""
        if config.url is None:
            raise ConfigError(["mqtt.url: not set"])
        self.config = config
        self.client_id = client_id
        self.will = will
        self.host, self.port, self.tls = _endpoint(config.url)
        self.password = read_password(config, environ)
        self.subscriptions = subscriptions
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_ack = on_ack
        self._on_message = on_message
        self.protocol: MqttProtocol = "3.1.1" if config.protocol == "3.1.1" else "5"
        self.connected = threading.Event()
        self.connects = 0  # successful connections since start
        self.generation = 0  # bumped when the client is rebuilt: its queue is gone then
        self.last_error = ""
        self._refused = False  # a CONNACK refusal was reported; its disconnect says no more
        self._attempt = 0
        self._up_since = 0.0
        self.window = config.max_inflight  # lowered to the broker's Receive Maximum
        self._lock = threading.Lock()
        self._stopping = False
        self._client = self._build()

    # -- the paho client ------------------------------------------------------------

    def _build(self) -> paho.Client:
        v5 = self.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.suppress_exceptions = True  # a callback bug is logged, never ends the thread
        client.max_inflight_messages_set(self.config.max_inflight)
        client.max_queued_messages_set(0)
        if self.tls:
            try:
                client.tls_set(
                    ca_certs=str(self.config.ca) if self.config.ca else None,
                    certfile=str(self.config.cert) if self.config.cert else None,
                    keyfile=str(self.config.key) if self.config.key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:
                key = "mqtt.cert/mqtt.key" if self.config.cert else "mqtt.ca"
                raise ConfigError([f"{key}: cannot load TLS files: {exc}"]) from exc
        if self.config.username:
            client.username_pw_set(self.config.username, self.password)
        client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        client.reconnect_delay_set(1, 1)
        return client

    def start(self) -> None:
        """Connect in the background; returns at once."""
        with self._lock:
            self._connect(self._client)

    def _connect(self, client: paho.Client) -> None:
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
        client.connect_async(
            self.host, self.port, self.config.keepalive_s, clean_start=False, properties=props
        )
        client.loop_start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Disconnect and end the network thread, publishing ``final`` (topic, payload;
        retained QoS 1) first when connected, so a clean stop reads as offline too."""
        with self._lock:
            self._stopping = True
            client = self._client
        sent = False
        if final is not None and self.connected.is_set():
            info = client.publish(final[0], final[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)  # bounded: it can hang when the broker goes
            sent = info.is_published()
        if final is not None and not sent and self.protocol == "5":
            # the offline status did not go out: let the broker send the Will instead
            client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            )
        else:
            client.disconnect()
        client.loop_stop()
        self.connected.clear()

    # -- publishing -----------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: dict[str, Any]
    ) -> int | None:
        """Hand a message to paho: its mid (QoS 1), 0 (QoS 0 sent), or None (not taken).

        A QoS 1 message is queued by paho even when the connection has just dropped
        (paho returns MQTT_ERR_NO_CONN then and sends it after the reconnect), so its mid
        is returned in that case too: resending it would make a duplicate.
        """
        props = None
        if properties and self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in properties.items():
                setattr(props, name, value)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # topic or payload paho will not send
            log.error("cannot publish to %s: %s", topic, exc)
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return info.mid if qos else 0
        if qos and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return info.mid
        return None

    # -- paho callbacks (network thread) ----------------------------------------------

    def _connected(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.connected.clear()
            self._refused = True
            self.last_error = explain(reason)
            downgrade = self.config.protocol == "auto" and self.protocol == "5"
            if reason.value == _UNSUPPORTED_PROTOCOL and downgrade:
                log.warning("%s does not speak MQTT 5; using 3.1.1", self.host)
                threading.Thread(target=self._downgrade, name="mqtt-downgrade").start()
                return
            self._report(logging.ERROR)
            return  # paho calls on_disconnect next, which sets the backoff
        with self._lock:
            if self._stopping:
                return
        self.connects += 1
        self._up_since = time.monotonic()
        self.last_error = ""
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        self.window = min(self.config.max_inflight, receive_max or 65535)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        log.info(
            "connected to %s:%d (MQTT %s, session %s)",
            self.host,
            self.port,
            self.protocol,
            "resumed" if flags.session_present else "new",
        )
        self._on_connect(flags.session_present)  # before connected: the writer sees both
        self.connected.set()

    def _downgrade(self) -> None:
        """Rebuild the client for MQTT 3.1.1 (paho's protocol is fixed per client)."""
        with self._lock:
            if self._stopping or self.protocol != "5":
                return
            old = self._client
            old.disconnect()
            old.loop_stop()
            self.protocol = "3.1.1"
            self.generation += 1
            self._client = self._build()
            self._connect(self._client)

    def _connect_failed(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from its ``except OSError`` around the attempt: the exception
        # (refused, DNS, TLS, timeout) is the one being handled.
        self.last_error = explain(sys.exc_info()[1], tls=self.tls)
        self._backoff(client)
        self._report(logging.WARNING)

    def _report(self, level: int) -> None:
        """Log why connecting failed. Repeats of one reason are rate-limited by the
        handler (agent.logs.RateLimit: the first, then one a minute with a count);
        another reason shows at once."""
        log.log(
            level,
            "cannot connect to %s:%d: %s; retrying",
            self.host,
            self.port,
            self.last_error,
            extra={"repeat_key": self.last_error},
        )

    def _disconnected(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and time.monotonic() - self._up_since > _STABLE_S:
            self._attempt = 0  # only a connection that lasted resets the backoff
        if was and not self._stopping:
            log.warning("disconnected from %s:%d: %s", self.host, self.port, reason)
            self._on_disconnect()
        elif not was and not self._stopping and not self._refused:
            # closed before any CONNACK: no exception reaches us, only the likely causes
            self.last_error = explain(None, tls=self.tls, client_cert=self.config.cert is not None)
            self._report(logging.WARNING)
        self._refused = False
        self._backoff(client)

    def _backoff(self, client: paho.Client) -> None:
        """Set paho's next reconnect wait: capped, jittered, growing per failed attempt."""
        self._attempt += 1
        delay = backoff_delay(self._attempt, 0.5, self.config.reconnect_max_s, low=0.5)
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho sleeps floats

    def _published(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._on_ack(mid, reason.value, str(reason) if reason.is_failure else "")

    def _message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self._on_message(Incoming(msg.topic, bytes(msg.payload), response, correlation))
