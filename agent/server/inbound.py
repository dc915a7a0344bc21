"""What the ingester makes of one device message: pure rules, no I/O, tested by tables.

A message is a topic and bytes from a device, that is from anyone who holds a device's
certificate. :func:`read` turns it into an :class:`Inbound` (device, stream, the cleaned
document, the key it is stored under once) or a :class:`Malformed` with a reason from
:data:`REASONS`; nothing it is given makes it raise.

- The topic: ``<prefix>/<device>/<stream>`` with a device id as the fleet accepts it
  (:func:`agent.fleet.acl.check_device_id`) and the tables hold (at most
  :data:`agent.server.schema.DEVICE` characters), or ``<prefix>/<device>/reply[/…]``.
- The bytes: at most :data:`agent.fleet.reports.MAX_BYTES`, nested at most
  :data:`~agent.fleet.reports.MAX_DEPTH`, a JSON object by
  :func:`agent.strictjson.parse_object`'s rules.
- The document: valid for the stream's type in :mod:`agent.contract` (strict: no
  coercion); a reply needs ``command`` (a string) and ``ok`` (true or false). Forward
  compatible: a key the contract does not know, or an event name it does not know, is
  what a newer agent sends, and is kept when it is a plain name (:data:`PLAIN_NAME`);
  a known key with a wrong type, or an unknown key that is not a plain name, is
  refused. What is stored is the document after :func:`agent.fleet.reports.clean`
  (every string printable and capped: at :data:`agent.fleet.reports.MAX_TEXT`
  characters, a reply's at :data:`REPLY_MAX_TEXT` so that a ``logs`` reply's lines,
  each up to :data:`agent.logring.LINE_MAX_CHARS`, arrive whole; the message as a
  whole stays within ``MAX_BYTES``, which a 64 KiB ``logs`` reply and a
  ``diagnostics`` reply with its 128 KiB config fit).
- The key (:func:`message_key`): the envelope's ``id``; a message without one (the Last
  Will, which the broker publishes for the agent, and command replies) is keyed by a
  hash of its device, stream and bytes, so a redelivery of the same bytes is still
  recognised, and a new Will (its ``ts`` is the time of that connection) is not.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from pydantic import ValidationError

from agent.contract import validator
from agent.errors import DocumentError
from agent.fleet.acl import check_device_id
from agent.fleet.reports import MAX_BYTES, MAX_DEPTH, MAX_TEXT, clean, printable
from agent.logring import LINE_MAX_CHARS
from agent.server.schema import DEVICE
from agent.strictjson import nesting_depth, parse_object

Stream = Literal["status", "state", "telemetry", "events", "reply"]
SHARED_STREAMS: Final[tuple[Stream, ...]] = ("telemetry", "events", "reply")
"""Taken by one instance of a share group each (``$share/<group>/…``)."""
RETAINED_STREAMS: Final[tuple[Stream, ...]] = ("status", "state")
"""Taken by every instance (a plain subscription), so each learns the retained ones."""

Reason = Literal["topic", "too_large", "too_deep", "not_json", "contract", "key"]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)
MAX_KEY = 64  # the messages table's id column
REPLY_MAX_TEXT: Final = LINE_MAX_CHARS + 16  # a log line and the ring's " …(cut)" mark
PLAIN_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""What a key or an event name from a newer agent may look like to be kept."""


@dataclass(frozen=True)
class Inbound:
    """A device message fit to store."""

    device: str
    stream: Stream
    doc: dict[str, Any]  # cleaned: strings printable and capped
    key: str  # the messages table's id: stored once
    ts: float | None  # the device's clock (None: a reply)


@dataclass(frozen=True)
class Malformed:
    """A message skipped, and why (``reason`` is one of :data:`REASONS`)."""

    reason: Reason
    detail: str


def subscriptions(prefix: str, group: str) -> tuple[list[str], list[str]]:
    """(shared, plain) topic filters: telemetry, events and replies shared by the
    instances of ``group``; status and state on a plain subscription each.

    Retained messages are not delivered on a shared subscription (MQTT 5, 4.8.2), so
    an instance that starts would not learn the fleet's retained status and state
    there; both are small and rare, so every instance takes them and the message key
    stores each once.
    """
    shared = [f"$share/{group}/{prefix}/+/{s}" for s in ("telemetry", "events")]
    shared.append(f"$share/{group}/{prefix}/+/reply/#")  # …/reply and …/reply/<anything>
    plain = [f"{prefix}/+/{s}" for s in RETAINED_STREAMS]
    return shared, plain


def parse_topic(prefix: str, topic: str) -> tuple[str, Stream] | Malformed:
    """(device, stream) of a device's topic under ``prefix``."""
    if not topic.startswith(prefix + "/"):
        return Malformed("topic", "not under the prefix")
    levels = topic[len(prefix) + 1 :].split("/")
    if len(levels) < 2:
        return Malformed("topic", "not a device's topic")
    device, stream = levels[0], levels[1]
    problem = check_device_id(device)
    if problem is not None:
        return Malformed("topic", problem)
    if len(device) > DEVICE:  # PostgreSQL would refuse the row; SQLite would keep it
        return Malformed("topic", f"device id of {len(device)} characters, over {DEVICE}")
    if stream == "reply":
        return device, "reply"
    if len(levels) == 2:
        for known in (*RETAINED_STREAMS, *SHARED_STREAMS):
            if stream == known:
                return device, known
    return Malformed("topic", "not a stream the server keeps")


def message_key(device: str, stream: str, doc: dict[str, Any], payload: bytes) -> str | None:
    """The key a message is stored under once: its ``id``, else a hash of device, stream
    and bytes (``h:`` and 40 hex digits). None for an ``id`` that is not a non-empty
    string of at most :data:`MAX_KEY` characters."""
    msg_id = doc.get("id")
    if msg_id is None:
        digest = hashlib.sha256(f"{device}\0{stream}\0".encode() + payload).hexdigest()
        return f"h:{digest[:40]}"
    if isinstance(msg_id, str) and 0 < len(msg_id) <= MAX_KEY:
        return msg_id
    return None


def read(prefix: str, topic: str, payload: bytes) -> Inbound | Malformed:
    """The message on ``topic`` with ``payload``, checked (module docstring)."""
    where = parse_topic(prefix, topic)
    if isinstance(where, Malformed):
        return where
    device, stream = where
    if len(payload) > MAX_BYTES:
        return Malformed("too_large", f"{len(payload)} bytes, over {MAX_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Malformed("not_json", "not UTF-8")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        return Malformed("too_deep", f"nested {depth} deep, over {MAX_DEPTH}")
    try:
        doc = parse_object(payload, what=stream, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH)
    except DocumentError as exc:
        return Malformed("not_json", str(exc))
    problem = _contract_problem(stream, doc)
    if problem is not None:
        return Malformed("contract", problem)
    key = message_key(device, stream, doc, payload)
    if key is None:
        return Malformed("key", f"id is not a string of 1 to {MAX_KEY} characters")
    cleaned, _ = clean(stream, doc, REPLY_MAX_TEXT if stream == "reply" else MAX_TEXT)
    if stream == "events" and "event" not in cleaned:
        # clean() keeps only the event names this agent knows; the contract check above
        # let through a newer agent's only when it is a plain name: keep it
        cleaned["event"] = doc["event"]
    ts = doc.get("ts")  # the contract made it a number
    return Inbound(device, stream, cleaned, key, float(ts) if isinstance(ts, int | float) else None)


def _contract_problem(stream: Stream, doc: dict[str, Any]) -> str | None:
    if stream == "reply":
        if not isinstance(doc.get("command"), str) or not isinstance(doc.get("ok"), bool):
            return "a reply needs command (a string) and ok (true or false)"
        return None
    try:
        validator(stream).validate_python(doc)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not _newer(stream, e["type"], e["loc"], e["input"])]
        if not errors:
            return None
        where = printable(".".join(str(p) for p in errors[0]["loc"]) or stream, 80)
        return f"{len(errors)} error(s), first {where}: {errors[0]['msg']}"
    return None


def _newer(stream: Stream, kind: str, loc: tuple[int | str, ...], value: Any) -> bool:
    """Whether a validation error is only what a newer agent would send: a key the
    contract does not know, or (events) an event name it does not know, plainly named."""
    if kind == "extra_forbidden":
        return isinstance(loc[-1], str) and PLAIN_NAME.fullmatch(loc[-1]) is not None
    if stream == "events" and kind == "literal_error" and tuple(loc) == ("event",):
        return isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None
    return False
