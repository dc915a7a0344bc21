"""Why a broker connection failed, in words an operator can act on.

:func:`explain` turns what paho reports (an exception from the connect attempt, or the
CONNACK reason code) into one phrase that starts with the kind of failure (connection
refused, DNS, TLS, authentication, timeout) and names the setting to check.
"""

from __future__ import annotations

import errno
import socket
import ssl

from paho.mqtt.reasoncodes import ReasonCode

# MQTT 5 CONNACK reason codes (paho maps MQTT 3.1.1's return codes onto them)
_REFUSALS: dict[int, str] = {
    132: "the broker does not speak this MQTT version (set mqtt.protocol)",
    133: "the broker refused the client id (device.id)",
    134: "authentication failed: bad user name or password "
    "(check mqtt.username and mqtt.password_file)",
    135: "authentication failed: not authorized (check mqtt.username, the password or the "
    "client certificate, and the broker's ACL)",
    136: "the broker is unavailable; retrying",
    137: "the broker is busy; retrying",
    138: "authentication failed: this client is banned by the broker",
    140: "authentication failed: the broker does not accept this authentication method",
    156: "the broker asks to use another server",
    157: "the broker has moved to another server",
    159: "the broker refused: connecting too often (connection rate exceeded)",
}

# OpenSSL X509_V_ERR_* codes worth their own words
_VERIFY: dict[int, str] = {
    9: "TLS: the broker's certificate is not valid yet (is the device's clock set?)",
    10: "TLS: the broker's certificate has expired (or the device's clock is wrong)",
    18: "TLS: the broker's certificate is self-signed and not trusted: set mqtt.ca to it",
    19: "TLS: the broker's CA is not trusted: set mqtt.ca to the CA that signed it",
    20: "TLS: the broker's certificate is not signed by mqtt.ca (wrong CA file?)",
    62: "TLS: the broker's certificate does not name this host: use a name it carries in mqtt.url",
}


def explain(
    cause: BaseException | ReasonCode | int | None,
    *,
    tls: bool = False,
    client_cert: bool = False,
) -> str:
    """One phrase saying why a connection failed and what to check.

    ``cause`` is the exception of a failed connect attempt, a CONNACK reason code, or
    None when the broker closed the connection before answering; ``tls`` and
    ``client_cert`` say how we connected (for the likely reasons of such a close).
    Never raises.
    """
    if cause is None:
        return _closed(tls, client_cert)
    if isinstance(cause, ReasonCode | int):
        code = cause.value if isinstance(cause, ReasonCode) else cause
        return _REFUSALS.get(code, f"the broker refused the connection: {cause}")
    return _exception(cause, tls)


def _closed(tls: bool, client_cert: bool) -> str:
    if tls and not client_cert:
        return (
            "the broker closed the TLS connection before answering: it may require a "
            "client certificate (set mqtt.cert and mqtt.key)"
        )
    if tls:
        return (
            "the broker closed the TLS connection before answering: it may not accept the "
            "client certificate (mqtt.cert: signed by the broker's CA, not expired?)"
        )
    return (
        "the broker closed the connection before answering: is this a TLS port? "
        "(then use mqtts:// and mqtt.ca)"
    )


def _exception(exc: BaseException, tls: bool) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _VERIFY:
            return _VERIFY[code]
        return (
            f"TLS: certificate verify failed ({exc.verify_message}): check that mqtt.ca "
            "signed the broker's certificate"
        )
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or str(exc)  # set by OpenSSL, not by SSLError()
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return "TLS: the port does not speak TLS (use mqtt:// or the broker's TLS port)"
        if "CERTIFICATE_REQUIRED" in reason:
            return "TLS: the broker requires a client certificate (set mqtt.cert and mqtt.key)"
        return f"TLS: handshake failed ({reason})"
    if isinstance(exc, socket.gaierror):
        return f"DNS: the host name cannot be resolved ({exc.strerror}): check mqtt.url"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there (broker down or wrong port?)"
    if isinstance(exc, ConnectionResetError):
        hint = " (mqtts:// to a port without TLS ends so)" if tls else ""
        return f"connection reset by the broker{hint}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out: no answer from the host (firewall, or wrong host?)"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"unreachable: {exc.strerror} (is the network up?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# explain() names the agent's settings; the fleet commands take options instead.
_FLEET_TERMS = (
    ("mqtt.username and mqtt.password_file", "--username and --password-file"),
    ("mqtt.username", "--username"),
    ("mqtt.cert and mqtt.key", "--cert and --key"),
    ("mqtt.cert", "--cert"),
    ("mqtt.ca", "--ca"),
    ("mqtt.url", "--broker"),
    ("(set mqtt.protocol)", "(the fleet tools need MQTT 5)"),
    ("(device.id)", "(--client-id)"),
    ("the device's clock", "this machine's clock"),
)


def in_fleet_terms(phrase: str) -> str:
    """``phrase`` from :func:`explain` with the agent's setting names replaced by the
    fleet commands' options (``mqtt.ca`` → ``--ca``, ``mqtt.url`` → ``--broker``, …)."""
    for agent_term, fleet_term in _FLEET_TERMS:
        phrase = phrase.replace(agent_term, fleet_term)
    return phrase
