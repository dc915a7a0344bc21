"""Desired state: what the fleet wants this device to run.

The fleet publishes retained ``{"model": NAME, "version": N, "issued_at": …}`` to
``<prefix>/<device>/desired`` and to ``<prefix>/groups/<group>/desired``. The device's
own wins over its groups'; among groups the most recently issued wins. An empty
retained message clears a source. Parsing is strict about the three fields it acts on
and ignores others, so the fleet side can add to the document without breaking devices.

Signed desired state (``edge-fleet deploy --sign-key``) adds two fields: ``target``
(``device:<id>`` or ``group:<name>``: the topic it was made for, so it cannot be
replayed onto another device's or group's topic), ``keyid`` (the signing key's id,
agent/verify.py) and ``signature``, the base64 Ed25519 signature of :func:`canonical`
of the document (``keyid`` included). A device with ``update.desired_public_key(s)``
set refuses a document without a valid signature by one of those keys (one without a
``keyid``, from older fleet tools, is checked against each); a document issued before
the one the device last applied is refused as stale by the updater.

A document issued further ahead of the device's clock than ``update.max_clock_skew_s``
is refused too (:func:`check_clock`): applied, it would make every later instruction
look stale, until the device's clock caught up with it.

While a desired state downloads, :func:`download_progress` says how far it got (event
``update_progress``, at most every ``telemetry.interval_s``, only when bytes arrived),
so the fleet's rollouts can tell a long download from a silent device.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.config import MODEL_NAME_PATTERN
from agent.contract import EventName
from agent.strictjson import parse_object

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.manifest import FileEntry
    from agent.registry import Progress
    from agent.verify import KeyRing

MAX_PAYLOAD = 4096
# A shadow instruction's own fields (agent/shadow/instruction.py): signed with the same
# keys and ``target`` as a desired state, so a desired-state topic refuses a document
# that has them (a retained shadow instruction, copied onto the desired-state topic by
# whoever can write there, would otherwise activate the candidate it only tries out).
SHADOW_FIELDS = ("sample_pct", "max_cpu_pct", "promote")
SIGNATURE = "signature"
KEYID = "keyid"


@dataclass(frozen=True)
class Desired:
    """One desired release and where it came from (``device`` or ``group:NAME``)."""

    model: str
    version: int
    issued_at: float  # seconds since the epoch, as the fleet's clock saw it
    source: str

    @property
    def key(self) -> tuple[str, int, float]:
        """Two desired states with the same key are the same instruction."""
        return (self.model, self.version, self.issued_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "issued_at": self.issued_at,
            "source": self.source,
        }


def _issued_at(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("issued_at: must be seconds since the epoch or an ISO 8601 time")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("issued_at: must be a finite, non-negative number")
        return float(value)
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"issued_at: {value!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise ValueError(f"issued_at: {value!r} has no time zone (add Z for UTC)")
        return when.timestamp()
    raise ValueError("issued_at: must be seconds since the epoch or an ISO 8601 time")


def _utc(ts: float) -> str:
    """``ts`` as an ISO 8601 UTC time, or as the number when no calendar holds it."""
    try:
        when = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return f"{ts:g}"
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _number(seconds: float) -> str:
    """Seconds to the millisecond (``1764500000.123``), short however large."""
    return f"{round(seconds, 3):.15g}"


def check_clock(desired: Desired, now: float, max_skew_s: float) -> None:
    """Raise ValueError when ``desired`` was issued more than ``max_skew_s`` seconds after
    ``now`` (the device's clock), naming both times."""
    ahead = desired.issued_at - now
    if ahead > max_skew_s:
        raise ValueError(
            f"issued_at: {_number(desired.issued_at)} ({_utc(desired.issued_at)}) is "
            f"{ahead:.6g} s ahead of this device's clock ({_number(now)}, {_utc(now)}), more "
            f"than update.max_clock_skew_s ({max_skew_s:g} s); refused so that it cannot make "
            "every later desired state look stale: check the clocks of the fleet tools "
            "and of this device (NTP), then deploy again"
        )


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes a desired state's signature covers: every field but ``signature``, as
    compact JSON with sorted keys (the same on the fleet side and on the device)."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_desired(doc: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``doc`` with ``keyid`` and ``signature`` (it should carry ``target``)."""
    from agent.verify import key_id

    body = {**{k: v for k, v in doc.items() if k != SIGNATURE}, KEYID: key_id(key)}
    signature = base64.b64encode(key.sign(canonical(body))).decode()
    return {**body, SIGNATURE: signature}


def target_of(source: str, device: str) -> str:
    """The ``target`` a signed desired state for ``source`` carries."""
    return f"device:{device}" if source == "device" else source


def _check_signature(doc: dict[str, Any], keys: KeyRing) -> None:
    from cryptography.exceptions import InvalidSignature

    signature = doc.get(SIGNATURE)
    if signature is None:
        raise ValueError(f"signature: missing, and {keys.what} requires one")
    if not isinstance(signature, str):
        raise ValueError("signature: not a base64 string")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("signature: not a base64 string") from None
    keyid = doc.get(KEYID)
    if keyid is None:  # older fleet tools: any trusted key may have made it
        candidates = list(keys.keys.values())
    elif not isinstance(keyid, str):
        raise ValueError("keyid: not a string")
    elif keyid in keys.keys:
        candidates = [keys.keys[keyid]]
    else:
        raise ValueError(
            f"signature: bad (signed by key {keyid[:16]!r}, which {keys.what} does not "
            f"list; trusted: {', '.join(keys.ids)}; a key removed there is revoked)"
        )
    try:
        body = canonical(doc)
    except ValueError as exc:  # NaN or Infinity in the document
        raise ValueError(f"cannot check the signature: {exc}") from None
    for key in candidates:
        try:
            key.verify(raw, body)
            return
        except InvalidSignature:
            continue
    raise ValueError(
        f"signature: bad (signed by another key than {keys.what}, or changed after signing)"
    )


def parse_desired(
    payload: bytes,
    source: str,
    *,
    target: str | None = None,
    key: KeyRing | None = None,
    refuse: tuple[str, ...] = (),
) -> Desired | None:
    """The desired state in ``payload``; None for an empty (cleared) one.

    ``target`` is what a ``target`` field must say (checked whenever the field is
    there); with ``key`` (the trusted deploy keys), a valid signature by one of them
    and the ``target`` field are required. A field named in ``refuse`` (another kind
    of document's: :data:`SHADOW_FIELDS`) makes the document unusable.
    Raises ValueError naming the field that is wrong (DocumentError, one, for bytes
    that are not a JSON object by :func:`agent.strictjson.parse_object`'s rules).
    """
    if not payload:
        return None
    doc = parse_object(payload, what="desired state", max_bytes=MAX_PAYLOAD)
    for name in refuse:
        if name in doc:
            raise ValueError(f"{name}: a shadow instruction's field; this is not a desired state")
    if key is not None:
        _check_signature(doc, key)
        if "target" not in doc:
            raise ValueError("target: missing, and a signed desired state must name it")
    if "target" in doc and target is not None and doc["target"] != target:
        raise ValueError(f"target: {doc['target']!r} is not this topic's ({target!r})")
    for name in ("model", "version", "issued_at"):
        if name not in doc:
            raise ValueError(f"{name}: missing")
    model, version = doc["model"], doc["version"]
    if not isinstance(model, str) or not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise ValueError(f"model: {model!r} is not a model name")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version: {version!r} is not a positive integer")
    return Desired(model, version, _issued_at(doc["issued_at"]), source)


def _target_base(prefix: str, target: str) -> str:
    kind, _, name = target.partition(":")
    return f"{prefix}/{name}" if kind == "device" else f"{prefix}/groups/{name}"


def desired_topic(prefix: str, target: str, model: str | None = None) -> str:
    """The topic of the desired state for ``device:ID`` or ``group:NAME``: of one model
    (``…/desired/MODEL``), or without ``model`` the one topic older fleets use."""
    base = f"{_target_base(prefix, target)}/desired"
    return base if model is None else f"{base}/{model}"


def shadow_topic(prefix: str, target: str, model: str) -> str:
    """The topic of a shadow run of ``model`` for ``device:ID`` or ``group:NAME``."""
    return f"{_target_base(prefix, target)}/shadow/{model}"


def desired_topics(
    prefix: str, device: str, groups: list[str], model: str | None = None
) -> dict[str, str]:
    """Topic -> source (``device``, ``group:NAME``) of every desired state to follow:
    the one topic older fleets use of the device and of each group, or with ``model``
    those of that model."""
    return {
        desired_topic(prefix, f"device:{device}", model): "device",
        **{desired_topic(prefix, f"group:{g}", model): f"group:{g}" for g in groups},
    }


class DesiredState:
    """The latest desired state from each source; safe to use from any thread."""

    def __init__(
        self,
        prefix: str,
        device: str,
        groups: list[str],
        key: KeyRing | None = None,
        *,
        max_skew_s: float | None = None,
        clock: Callable[[], float] = time.time,
        model: str | None = None,
        only_model: bool = False,
    ) -> None:
        """``model``: also follow its own topics (``…/desired/MODEL``), where a state of
        another model is refused; ``only_model``: a state of another model on the one
        topic older fleets use is :class:`NotServedHere` (another model's, several
        models on this device), else it is followed as before."""
        self._topics = desired_topics(prefix, device, groups)
        self._model_topics: set[str] = set()
        if model is not None:
            own = desired_topics(prefix, device, groups, model)
            self._model_topics = set(own)
            self._topics.update(own)
        self._model = model
        self._only_model = only_model
        self._device = device
        self._key = key
        self._max_skew_s = max_skew_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_topic: dict[str, Desired] = {}

    @property
    def topics(self) -> list[str]:
        return list(self._topics)

    def shared(self, topic: str) -> bool:
        """``topic`` is one of the topics older fleets use (not a model's own)."""
        return topic in self._topics and topic not in self._model_topics

    def update(self, topic: str, payload: bytes) -> Desired | None:
        """Take a message from ``topic``; returns what it says (None: cleared).

        Raises ValueError for a payload that cannot be used (unsigned, badly signed,
        malformed, for another target) or one issued too far ahead of the device's clock
        (with ``max_skew_s``); what was in force stays in force then: a refused message
        changes nothing, so whoever can publish to the broker without the deploy key
        cannot unpin a device or hand it to an older group state.
        """
        source = self._topics.get(topic)
        if source is None:
            raise ValueError(f"{topic}: not a desired-state topic of this device")
        desired = parse_desired(
            payload,
            source,
            target=target_of(source, self._device),
            key=self._key,
            refuse=SHADOW_FIELDS,
        )
        if desired is not None and self._max_skew_s is not None:
            check_clock(desired, self._clock(), self._max_skew_s)
        foreign = desired is not None and self._model is not None and desired.model != self._model
        if foreign and topic in self._model_topics:
            assert desired is not None
            raise ValueError(
                f"model: {desired.model!r} on the desired-state topic of model {self._model!r}"
            )
        with self._lock:
            if desired is None or (foreign and self._only_model):
                self._by_topic.pop(topic, None)
            else:
                self._by_topic[topic] = desired
        if foreign and self._only_model:
            assert desired is not None
            raise NotServedHere(desired)
        return desired

    def winner(self) -> Desired | None:
        """The device's own desired state (of its topics, the most recently issued),
        else its groups' most recently issued one."""
        with self._lock:
            held = list(self._by_topic.values())
        return prevailing(held)


class _Issued(Protocol):
    @property
    def source(self) -> str: ...

    @property
    def issued_at(self) -> float: ...


IssuedT = TypeVar("IssuedT", bound=_Issued)


def prevailing(held: Iterable[IssuedT]) -> IssuedT | None:
    """Of instructions in force (desired states, shadow runs): the device's own (the most
    recently issued of them), else its groups' most recently issued one."""
    held = list(held)
    own = [d for d in held if d.source == "device"]
    return max(own or held, key=lambda d: (d.issued_at, d.source), default=None)


class NotServedHere(ValueError):
    """A desired state on the one topic older fleets use, for a model this unit does not
    serve (with several models: another unit's, or no model of this device)."""

    def __init__(self, desired: Desired) -> None:
        super().__init__(f"model {desired.model!r} is not this unit's")
        self.desired = desired


# -- progress reports while a desired state downloads ---------------------------------------


class ProgressPace:
    """When a progress report is due: ``every_s`` after the last one (or the start), and
    only when the work moved since. Pure apart from the clock it is given."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last_at = clock()
        self._moved = False

    def due(self, moved: bool) -> bool:
        """Note one step (``moved``: it got further); True when it is time to report."""
        self._moved = self._moved or moved
        now = self._clock()
        if not self._moved or now - self._last_at < self.every_s:
            return False
        self._last_at, self._moved = now, False
        return True


def download_progress(
    *,
    update_id: str,
    model: str,
    version: int,
    issued_at: float | None,
    every_s: float,
    event: Callable[[EventName, Mapping[str, Any]], None],
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[FileEntry], Progress]:
    """The ``progress`` of an Updater: an ``update_progress`` event (update_id, model,
    version, issued_at, phase, file, done, size) at most every ``every_s`` while bytes
    arrive; nothing while a transfer stalls."""
    pace = ProgressPace(every_s, clock)
    last: dict[str, int] = {}

    def for_file(entry: FileEntry) -> Progress:
        def progress(done: int, size: int) -> None:
            moved = done > last.get(entry.name, 0)
            last[entry.name] = max(done, last.get(entry.name, 0))
            if pace.due(moved):
                event(
                    "update_progress",
                    {
                        "update_id": update_id,
                        "model": model,
                        "version": version,
                        "issued_at": issued_at,
                        "phase": "downloading",
                        "file": entry.name,
                        "done": done,
                        "size": size,
                    },
                )

        return progress

    return for_file
