"""A real mosquitto broker for tests, and a recording MQTT client (``Collector``).

``Mosquitto`` runs ``/usr/sbin/mosquitto`` (or the first ``mosquitto`` on PATH) as a
subprocess on loopback: always a plain, anonymous listener without ACL, and, given a
``TLSSetup``, a second listener that demands a client certificate, takes the
certificate's CN as the user name and applies an ACL file. Ports are picked once and
kept across restarts, so clients can reconnect to the same URL.

``Collector`` is a paho-mqtt 2.x client (MQTT 5) running in its own network thread
that records every message it receives and can publish and wait for the broker's
acknowledgement. ``subscriber()`` makes a connected, subscribed one;
``connect_outcome()`` tries a connection and says how it went, without raising.

``start_secure_broker()`` / ``SecureBroker`` is the broker as the fleet runs it: a CA,
mutual TLS and the ACL from ``agent.fleet.acl`` (the ``secure_broker`` fixture).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.fleet.acl import render_acl
from tests.certs import Issued, TestCA

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _mosquitto_binary() -> str:
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    found = shutil.which("mosquitto")
    if found is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    return found


def free_port(avoid: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it), not ``avoid``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != avoid:
            return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TLSSetup:
    """The broker side of TLS: the CA that signs client certificates, the server's pair."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClientTLS:
    """The client side of TLS: the CA to trust and, optionally, a client certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


class Mosquitto:
    """A mosquitto subprocess on 127.0.0.1 for one test.

    Everything it writes (config, log, persistence database) stays in ``folder``.
    The broker keeps running as the current user (``user root`` when that is root), so
    files in a private tmp folder stay readable to it.
    """

    def __init__(
        self,
        folder: Path,
        *,
        tls: TLSSetup | None = None,
        acl: Path | None = None,
        persistence: bool = False,
        debug_log: bool = False,
        extra_conf: Sequence[str] = (),
    ) -> None:
        """Prepare (not start) a broker; ``debug_log`` logs every packet (slow, verbose);
        ``extra_conf`` lines go into the global part of the config."""
        if acl is not None and tls is None:
            raise ValueError("an ACL applies to the TLS listener only; give tls= too")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.tls = tls
        self.acl = acl
        self.persistence = persistence
        self.debug_log = debug_log
        self.extra_conf = list(extra_conf)
        self.conf_path = folder / "mosquitto.conf"
        self.log_path = folder / "mosquitto.log"
        self._port: int | None = free_port()
        self._tls_port = free_port(avoid=self._port) if tls is not None else None
        self._may_move = True  # ports may change until the first successful start
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_conf()

    @classmethod
    def with_config(cls, folder: Path, text: str, *, tls_port: int) -> Mosquitto:
        """A broker that runs ``text`` verbatim as its mosquitto.conf (not started).

        For testing shipped configs: ``text`` must open a TLS listener on ``tls_port``
        (start() waits for it) and may have no plain listener, so ``port`` and ``url``
        raise then. Paths in ``text`` are used as they are.
        """
        broker = cls(folder)
        broker._port = None
        broker._tls_port = tls_port
        broker._may_move = False  # the caller's text names the port
        broker.conf_path.write_text(text)
        return broker

    # -- configuration --------------------------------------------------------------

    def _write_conf(self) -> None:
        # Running as root, mosquitto would switch to user "mosquitto", which cannot
        # read pytest's 0700 tmp folders; "user root" keeps it as it is (and has no
        # effect when the tests run as an ordinary user).
        lines = [
            "# written by tests/broker.py",
            "user root",
            "per_listener_settings true",
            "log_dest stderr",
            "log_timestamp_format %H:%M:%S",
            "log_type all" if self.debug_log else "log_type error",
        ]
        if not self.debug_log:
            lines += [
                "log_type warning",
                "log_type notice",
                "log_type information",
                "log_type subscribe",
                "log_type unsubscribe",
            ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.folder}",
                "persistence_file mosquitto.db",
            ]
        else:
            lines.append("persistence false")
        lines += self.extra_conf
        lines += ["", f"listener {self._port} 127.0.0.1", "allow_anonymous true"]
        if self.tls is not None:
            lines += [
                "",
                f"listener {self._tls_port} 127.0.0.1",
                "allow_anonymous false",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
            if self.acl is not None:
                lines.append(f"acl_file {self.acl}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- addresses --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The plain (anonymous, no ACL) listener's port."""
        if self._port is None:
            raise RuntimeError("this broker has no plain listener")
        return self._port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port; raises RuntimeError when the broker has no TLS."""
        if self._tls_port is None:
            raise RuntimeError("this broker has no TLS listener")
        return self._tls_port

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    # -- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Mosquitto:
        """Start mosquitto and return once every listener accepts TCP connections.

        If another process took a chosen port before the very first start, new ports
        are picked (up to 3 times); after that the ports never change. Raises
        RuntimeError, with the log's tail, if the process exits or the ports do not
        open within START_TIMEOUT_S (the process is killed then).
        """
        if self.running:
            raise RuntimeError("mosquitto is already running")
        for _attempt in range(3):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once()
            except RuntimeError:
                stolen = b"Address already in use" in self.log_path.read_bytes()[log_start:]
                if not (stolen and self._may_move and self._port is not None):
                    raise
            self._port = free_port()
            self._tls_port = free_port(avoid=self._port) if self._tls_port is not None else None
            self._write_conf()
        raise RuntimeError(f"no free ports for mosquitto; log tail:\n{self.log_tail()}")

    def _start_once(self) -> Mosquitto:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [_mosquitto_binary(), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ports = [port for port in (self._port, self._tls_port) if port is not None]
        deadline = time.monotonic() + START_TIMEOUT_S
        accepted_at: float | None = None
        while True:
            # Accepting ports may belong to someone else (mosquitto then exits with
            # "Address already in use"): ready once mosquitto logs "running" (log_type
            # information) or, for configs that do not log it, is still alive 0.3 s later.
            if all(_accepts(port) for port in ports):
                accepted_at = accepted_at or time.monotonic()
                running = b" running\n" in self.log_path.read_bytes()[log_start:]
                if self._proc.poll() is None and (running or time.monotonic() - accepted_at > 0.3):
                    self._may_move = False
                    return self
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise RuntimeError(
                    f"mosquitto exited with {code} at start; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not open {ports} in {START_TIMEOUT_S} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM and wait (persistence is saved then); SIGKILL after STOP_TIMEOUT_S.

        Returns once the process is gone; a no-op when it is not running.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL (no persistence save, as a power cut) and reap the process."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def restart(self) -> Mosquitto:
        """Stop (gracefully) if running, then start again on the same ports."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """Everything mosquitto has logged so far, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- clients ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as the client got it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


def _address(url_or_host_port: str | tuple[str, int]) -> tuple[str, int, bool]:
    """(host, port, tls) from ``mqtt://h:p``, ``mqtts://h:p`` or a ``(host, port)`` pair."""
    if isinstance(url_or_host_port, tuple):
        host, port = url_or_host_port
        return host, port, False
    parts = urllib.parse.urlsplit(url_or_host_port)
    if parts.scheme not in ("mqtt", "mqtts") or parts.hostname is None or parts.port is None:
        raise ValueError(f"not an mqtt://HOST:PORT or mqtts://HOST:PORT URL: {url_or_host_port}")
    return parts.hostname, parts.port, parts.scheme == "mqtts"


class ConnectFailed(Exception):
    """The broker could not be reached, the TLS handshake failed or CONNACK refused."""


class Collector:
    """A connected MQTT 5 client that records what it receives.

    Thread-safe: paho's network thread appends, tests read. Every wait is bounded.
    After a lost connection paho reconnects (1 s backoff at first) and the Collector
    subscribes again to what it had (clean sessions); messages sent meanwhile are
    not seen. Construct with ``subscriber()``; ``close()`` (or ``with``) when done.
    """

    def __init__(
        self,
        url_or_host_port: str | tuple[str, int],
        *,
        tls: ClientTLS | None = None,
        client_id: str | None = None,
        timeout: float = 5.0,
        reconnect: bool = True,
    ) -> None:
        """Connect and wait for a successful CONNACK.

        Raises ConnectFailed (with the reason) if the TCP connect or TLS handshake
        fails, the broker refuses, or no CONNACK arrives within ``timeout``. With
        ``reconnect=False`` paho never retries, which also makes a failed attempt
        return at once (paho's retry wait cannot be interrupted for up to 1 s).
        """
        host, port, wants_tls = _address(url_or_host_port)
        if wants_tls and tls is None:
            raise ValueError("an mqtts:// URL needs tls=ClientTLS(...)")
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._connack: ReasonCode | None = None
        self._disconnect: ReasonCode | None = None
        self._connected = threading.Event()  # set while a session is up
        self._gave_up = threading.Event()  # refused, or failed before the first CONNACK
        self._topics: list[tuple[str, int]] = []  # re-subscribed after a reconnect
        self._resubscribe_mid: int | None = None
        self._ready = threading.Event()  # connected and, after a reconnect, re-subscribed
        self.connects = 0  # successful CONNACKs so far (> 1 after reconnects)
        self.suback: list[str] = []  # reason names of subscriber()'s SUBACK, one per topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=reconnect,
        )
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
            )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:  # refused, TLS handshake failure (ssl.SSLError), …
            raise ConnectFailed(f"connect to {host}:{port} failed: {exc!r}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.01):
            if self._gave_up.is_set() or time.monotonic() > deadline:
                self.close()
                raise ConnectFailed(
                    f"no successful CONNACK from {host}:{port} "
                    f"(connack={self._connack}, disconnect={self._disconnect})"
                )

    # -- callbacks (paho's network thread) ----------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code
        if reason_code.is_failure:
            self._gave_up.set()
            client.disconnect()  # no retries: a refusal is the outcome
            return
        self.connects += 1
        self._connected.set()
        if self.connects > 1 and self._topics:
            # the broker may have lost them (clean or expired session): ready on SUBACK
            self._resubscribe_mid = client.subscribe(self._topics)[1]
        else:
            self._ready.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._disconnect = reason_code
        self._connected.clear()
        self._ready.clear()
        if self.connects == 0:
            self._gave_up.set()  # never got in (e.g. the broker rejected our certificate)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._resubscribe_mid:  # same thread as _on_connect: no race
            self._resubscribe_mid = None
            self._ready.set()
            return
        with self._lock:
            self._subacks[mid] = list(reason_codes)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._pubacks[mid] = reason_code

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        received = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props)
        with self._lock:
            self._messages.append(received)

    # -- operations ---------------------------------------------------------------------

    def _wait_for_ack(
        self, table: Mapping[int, object], mid: int, what: str, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if mid in table:
                    return
            if not self._connected.is_set():
                raise ConnectFailed(f"disconnected ({self._disconnect}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            time.sleep(0.005)

    def subscribe(self, topics: Sequence[str], *, qos: int = 1, timeout: float = 5.0) -> list[str]:
        """Subscribe and wait for the SUBACK; returns one reason name per topic.

        A granted subscription reads "Granted QoS 0/1/2"; a refused one, e.g.
        "Not authorized". Raises TimeoutError without a SUBACK within ``timeout``.
        """
        if not topics:
            return []
        wanted = [(topic, qos) for topic in topics]
        self._topics += wanted
        result, mid = self.client.subscribe(wanted)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectFailed(f"subscribe failed: {mqtt.error_string(result)}")
        self._wait_for_ack(self._subacks, mid, "SUBACK", timeout)
        with self._lock:
            codes = self._subacks.pop(mid)
        return [code.getName() for code in codes]

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Publish and, for QoS 1/2, wait for the broker's PUBACK/PUBCOMP.

        Returns the acknowledgement's reason name ("Success", "No matching
        subscribers", "Not authorized", …); "Success" for QoS 0 once written out.
        Raises TimeoutError when no acknowledgement arrives within ``timeout``.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed(f"publish failed: {mqtt.error_string(info.rc)}")
        self._wait_for_ack(self._pubacks, info.mid, "PUBACK", timeout)
        with self._lock:
            return self._pubacks.pop(info.mid).getName()

    def messages(self, topic: str | None = None) -> list[Received]:
        """A snapshot of the messages received so far (only ``topic``'s when given)."""
        with self._lock:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 5.0
    ) -> list[Received]:
        """Poll until ``predicate(messages)`` is true; returns that snapshot.

        Raises TimeoutError (listing what did arrive) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.messages()
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                topics = [m.topic for m in snapshot]
                raise TimeoutError(f"condition not met in {timeout} s; received: {topics}")
            time.sleep(0.01)

    def wait_for_topic(self, topic: str, timeout: float = 5.0) -> Received:
        """The first message on ``topic``, waiting up to ``timeout`` seconds."""
        self.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout)
        return self.messages(topic)[0]

    @property
    def connected(self) -> bool:
        """A session is up now (paho reconnects by itself after a lost connection)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float = 5.0) -> bool:
        """Wait until a session is up and, after a reconnect (e.g. a broker restart), the
        earlier subscriptions are acknowledged again; False on timeout."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Disconnect and stop the network thread; safe to call twice."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def subscriber(
    url_or_host_port: str | tuple[str, int],
    topics: Sequence[str],
    *,
    tls: ClientTLS | None = None,
    client_id: str | None = None,
    qos: int = 1,
    timeout: float = 5.0,
) -> Collector:
    """A Collector connected to the broker and subscribed to ``topics`` (SUBACK received).

    ``topics`` may be empty (a client that only publishes). The SUBACK's reason names
    ("Granted QoS 1", "Not authorized", …) are in ``collector.suback``. Raises
    ConnectFailed if it cannot connect, TimeoutError if the SUBACK does not come within
    ``timeout``.
    """
    collector = Collector(url_or_host_port, tls=tls, client_id=client_id, timeout=timeout)
    try:
        collector.suback = collector.subscribe(topics, qos=qos, timeout=timeout)
    except BaseException:
        collector.close()
        raise
    return collector


def connect_outcome(
    url_or_host_port: str | tuple[str, int], *, tls: ClientTLS | None, timeout: float = 5.0
) -> str:
    """Try to connect; "connected" on a successful CONNACK, else why it failed.

    Never raises for a refused connection, so tests can assert on the outcome.
    """
    try:
        collector = Collector(url_or_host_port, tls=tls, timeout=timeout, reconnect=False)
    except ConnectFailed as exc:
        return f"failed: {exc}"
    collector.close()
    return "connected"


def tls_for(ca: Path, issued: Issued | None = None) -> ClientTLS:
    """ClientTLS trusting ``ca``, presenting ``issued`` as the client certificate if given."""
    if issued is None:
        return ClientTLS(ca)
    return ClientTLS(ca, issued.cert, issued.key)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every 10 ms; True as soon as it holds, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- a broker as the fleet runs it ------------------------------------------------------

SECURE_DEVICES: dict[str, list[str]] = {"dev-a": ["door"], "dev-b": ["yard"]}
SECURE_ADMINS = ("fleet",)


@dataclass
class SecureBroker:
    """A started broker with a TLS listener, mutual TLS and the fleet's ACL.

    ``broker.tls_url`` is the secured listener (client certificate CN = user name,
    ACL from agent.fleet.acl.render_acl); ``broker.url`` stays plain and unrestricted.
    """

    broker: Mosquitto
    ca: TestCA
    acl_text: str
    _issued: dict[str, Issued] = field(default_factory=dict)

    def client_cert(self, cn: str) -> Issued:
        """A client certificate with CN ``cn`` signed by the broker's CA (one per CN)."""
        if cn not in self._issued:
            self._issued[cn] = self.ca.issue(cn)
        return self._issued[cn]

    def agent_mqtt(self, cn: str) -> dict[str, str]:
        """An agent's ``mqtt`` config keys for the TLS listener as ``cn`` (a device id):
        ``url``, ``ca``, and ``cn``'s certificate and key."""
        issued = self.client_cert(cn)
        return {
            "url": self.broker.tls_url,
            "ca": str(self.ca.cert_path),
            "cert": str(issued.cert),
            "key": str(issued.key),
        }

    def tls(self, cn: str | None) -> ClientTLS:
        """Client TLS trusting the CA, presenting ``cn``'s certificate (none when None)."""
        return tls_for(self.ca.cert_path, None if cn is None else self.client_cert(cn))

    def client(
        self,
        cn: str,
        topics: Sequence[str] = (),
        *,
        client_id: str | None = None,
        timeout: float = 5.0,
    ) -> Collector:
        """A Collector on the TLS listener as ``cn``, subscribed to ``topics`` (SUBACK in).

        Raises ConnectFailed if the broker does not let ``cn`` in.
        """
        return subscriber(
            self.broker.tls_url,
            topics,
            tls=self.tls(cn),
            client_id=client_id,
            timeout=timeout,
        )


def start_secure_broker(
    folder: Path,
    devices: Mapping[str, Sequence[str]] = SECURE_DEVICES,
    *,
    admins: Sequence[str] = SECURE_ADMINS,
    persistence: bool = False,
) -> SecureBroker:
    """Make a CA and a server certificate in ``folder``, render the ACL, start mosquitto.

    The caller stops ``result.broker``. Raises RuntimeError if mosquitto does not start.
    """
    ca = TestCA(folder / "pki")
    server = ca.issue("mosquitto-server")
    acl_text = render_acl(devices, admins=admins)
    acl = folder / "edge-agent.acl"
    acl.write_text(acl_text)
    broker = Mosquitto(
        folder / "mosquitto",
        tls=TLSSetup(ca.cert_path, server.cert, server.key),
        acl=acl,
        persistence=persistence,
    )
    broker.start()
    return SecureBroker(broker, ca, acl_text, {"mosquitto-server": server})


__all__ = [
    "ClientTLS",
    "Collector",
    "ConnectFailed",
    "Mosquitto",
    "Received",
    "SecureBroker",
    "TLSSetup",
    "connect_outcome",
    "free_port",
    "start_secure_broker",
    "subscriber",
    "tls_for",
    "wait_until",
]
