"""One parsing discipline for JSON from outside, and strict JSON out.

The parser (``agent.strictjson.parse_object``) is driven with a table of hostile
documents and fuzzed with hypothesis; so is every caller that takes JSON from the
network: manifest and index, desired state, MQTT commands, the control socket and the
fleet tools' view of device reports. Each may only fail with its documented error, in
one line. What we emit (outbox payloads, CLI ``--json``) never holds NaN or Infinity.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import logs
from agent.commands import Commands
from agent.control import ControlServer
from agent.desired import parse_desired
from agent.errors import DocumentError, VerificationError
from agent.fleet.broker import Message
from agent.fleet.render import describe, devices_table
from agent.fleet.status import model_status, status_text
from agent.fleet.view import FleetView
from agent.manifest import parse_index, parse_manifest
from agent.mqtt import Incoming
from agent.outbox import Outbox, Record
from agent.pipeline import Result
from agent.runtime.adapters import Output
from agent.strictjson import dumps, nesting_depth, parse_object

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _strict(data: bytes | str) -> Any:
    """json.loads that refuses NaN and Infinity (what a strict consumer does)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in emitted JSON")

    return json.loads(data, parse_constant=refuse)


def _one_line(error: BaseException, prefix: str = "") -> None:
    text = str(error)
    assert "\n" not in text and text.startswith(prefix), text


# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[" * 100_000, "nested 100000 deep, over the limit of 32"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested 41 deep, over the limit of 32"),
        (b'{"n": ' + b"9" * 5000 + b"}", "integer of 5000 digits is beyond 64 bits"),
        (b'{"n": -' + b"9" * 20 + b"}", "integer of 20 digits is beyond 64 bits"),
        (b'{"n": 9223372036854775808}', "integer 9223372036854775808 is beyond 64 bits"),
        (b'{"n": NaN}', "NaN is not a JSON number"),
        (b'{"n": Infinity}', "Infinity is not a JSON number"),
        (b'{"n": [-Infinity]}', "-Infinity is not a JSON number"),
        (b'{"n": 1e400}', "number 1e400 is out of range"),
        (b'{"n": -1E+999}', "number -1E+999 is out of range"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "starts with a byte order mark"),
        (b'{"a": 1, "a": 2}', "key 'a' appears twice in one object"),
        (b'{"x": {"k\\u001b": 1, "k\\u001b": 2}}', "key 'k\\x1b' appears twice"),
        (b"[1, 2]", "not a JSON object but an array"),
        (b'"text"', "not a JSON object but a string"),
        (b"3", "not a JSON object but a number"),
        (b"null", "not a JSON object but null"),
        (b"", "not valid JSON: Expecting value"),
        (b"{", "not valid JSON"),
        (b'{"a": 1} {"b": 2}', "not valid JSON: Extra data"),
        (b"x" * 300_000, "300000 bytes, over the limit of 200000"),
    ],
)
def test_hostile_documents_are_refused_in_one_line_naming_what(data: bytes, why: str) -> None:
    with pytest.raises(DocumentError) as caught:
        parse_object(data, what="edge/dev1/desired", max_bytes=200_000)
    _one_line(caught.value, "edge/dev1/desired: ")
    assert why in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError keep working


def test_well_formed_documents_parse_and_brackets_inside_strings_are_not_nesting() -> None:
    text = '{"a": "' + "[{" * 500 + '", "b": [[[1.5, -2, true, null]]], "c": "\\"]"}'
    assert nesting_depth(text) == 4
    doc = parse_object(text.encode(), what="doc", max_bytes=10_000)
    assert doc["b"] == [[[1.5, -2, True, None]]] and doc["c"] == '"]'
    deep = b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert parse_object(deep, what="doc", max_bytes=1000) == {"a": _nest(30)}
    edge = {"big": 2**63 - 1, "small": -(2**63) + 1, "f": 1.7976931348623157e308}
    assert parse_object(json.dumps(edge).encode(), what="doc", max_bytes=1000) == edge


def _nest(n: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(n):
        value = [value]
    return value


def test_callers_turn_a_refusal_into_their_own_error_family_naming_the_document() -> None:
    deep = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(VerificationError, match=r"^m/1/manifest.json: nested 5001 deep"):
        parse_manifest(deep, "m/1/manifest.json")
    with pytest.raises(VerificationError, match=r"^m/index.json: not valid JSON: NaN"):
        parse_index(b'{"schema": 1, "model": "m", "versions": [NaN]}', "m/index.json")
    # Two readings of one document (which "version" wins?) are refused, not resolved.
    twice = b'{"model": "m", "version": 1, "version": 2, "issued_at": 1}'
    with pytest.raises(ValueError, match=r"^desired state: .*key 'version' appears twice"):
        parse_desired(twice, "device")
    with pytest.raises(ValueError, match=r"^desired state: not valid JSON: number 1e400"):
        parse_desired(b'{"model": "m", "version": 1, "issued_at": 1e400}', "device")


# Token soup: brackets, literals JSON does not have, huge numbers, odd strings.
_TOKENS = st.sampled_from(
    [
        "{", "}", "[", "]", ":", ",", '"k"', '"v"', "1", "-0", "1.5e3", "true", "null",
        "NaN", "Infinity", "-Infinity", "1e400", "9" * 30, "9" * 5000, '"\\ud800"',
        '"\x1b[2J"', '"\\u001b]0;x\\u0007"', '"\u202e"', "\ufeff", '"\\"', " ",
    ]
)  # fmt: skip
_SOUP = st.lists(_TOKENS, max_size=60).map(lambda t: "".join(t).encode())
_DEEP = st.integers(1, 3000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}")
_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
_DOCS = st.dictionaries(st.text(max_size=10), _VALUE, max_size=6).map(
    lambda d: json.dumps(d, ensure_ascii=False).encode(errors="surrogatepass")
)
HOSTILE = st.binary(max_size=400) | _SOUP | _DEEP | _DOCS


@FUZZ
@given(HOSTILE)
def test_fuzzed_bytes_give_an_object_or_one_document_error(data: bytes) -> None:
    try:
        doc = parse_object(data, what="fuzz", max_bytes=64 * 1024)
    except DocumentError as exc:
        _one_line(exc, "fuzz: ")
        return
    assert isinstance(doc, dict)
    _strict(json.dumps(doc, allow_nan=False))  # what it returns is strict JSON again


# -- its callers -------------------------------------------------------------------------------


def _manifest_like(data: bytes) -> list[bytes]:
    """``data``, and ``data`` inside a manifest that is otherwise plausible."""
    head = b'{"schema": 1, "model": "m", "version": 1, "created": "x", "task": "raw", "files": '
    return [data, head + data + b"}", head + b"[" + data + b"]}"]


@FUZZ
@given(HOSTILE)
def test_fuzzed_manifests_and_indexes_fail_only_with_a_verification_error(data: bytes) -> None:
    for raw in _manifest_like(data):
        for parse in (parse_manifest, parse_index):
            try:
                parse(raw, "m/1/manifest.json")
            except VerificationError as exc:
                _one_line(exc, "m/1/manifest.json")


@FUZZ
@given(HOSTILE)
def test_fuzzed_desired_states_fail_only_with_a_value_error(data: bytes) -> None:
    for raw in (data, b'{"model": "m", "version": 1, "issued_at": ' + data + b"}"):
        try:
            parse_desired(raw[:4096], "device", target="device:d")
        except ValueError as exc:
            _one_line(exc)


@FUZZ
@given(HOSTILE)
def test_fuzzed_commands_each_get_one_reply_and_never_an_internal_error(data: bytes) -> None:
    replies: list[dict[str, Any]] = []
    commands = Commands(
        {"ping": lambda args: {"pong": True}},
        lambda topic, body, corr: replies.append(dict(body)),
        reply_topic="edge/d/reply",
        max_bytes=64 * 1024,
    )
    commands.submit(Incoming("edge/d/cmd/ping", data, None, None))
    for reply in replies:  # none when it was queued (the worker is not started)
        assert not reply["error"].startswith("internal error"), reply
        _one_line(Exception(reply["error"]))
        _strict(dumps(reply))


@FUZZ
@given(HOSTILE)
def test_fuzzed_control_requests_are_answered_and_never_an_internal_error(data: bytes) -> None:
    server = ControlServer(Path("/nonexistent/control.sock"), {"ping": lambda args: {"pong": 1}})
    reply = server.answer(data)
    assert reply["ok"] is True or not reply["error"].startswith("internal error"), reply
    _strict(dumps(reply))


def _printable(value: Any) -> None:
    if isinstance(value, str):
        assert value.isprintable(), value
    elif isinstance(value, dict):
        for key, item in value.items():
            _printable(key)
            _printable(item)
    elif isinstance(value, list):
        for item in value:
            _printable(item)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["status", "state", "telemetry", "desired", "events", "results"]),
            st.sampled_from(["good", "dev-2", "x y", "a\u202eb", "groups"]),
            HOSTILE,
        ),
        max_size=6,
    )
)
def test_fuzzed_device_reports_never_break_the_fleet_view_or_reach_the_terminal_raw(
    messages: list[tuple[str, str, bytes]],
) -> None:
    warnings: list[str] = []
    view = FleetView("edge", warn=warnings.append)
    good = {"ts": 1.0, "state": "online", "groups": ["yard"]}
    view.take(Message("edge/good/status", json.dumps(good).encode(), True))
    view.take(Message("edge/good/state", b'{"model": "m", "version": 1}', True))
    reports = []
    for stream, device, data in messages:
        topic = f"edge/{device}/{stream}" if device != "groups" else "edge/groups/yard/desired"
        reports.append(view.take(Message(topic, data, True)))
    for report in reports:
        if report is not None:
            _printable(report.doc)
            _printable(describe(report))
    for device in view.devices.values():
        _printable(device.row())
    text = "\n".join(
        [devices_table(view), status_text(model_status(view, "m")), *warnings]
    ).replace("\n", "")
    assert text.isprintable(), text
    assert len({w.split(":")[0] for w in warnings}) == len(warnings)  # once per device
    _strict(dumps([d.row() for d in view.reporting()]))
    if not any(device == "good" for _, device, _ in messages):
        assert "good" in view.members("yard")


# -- strict JSON out -------------------------------------------------------------------------


def test_outbox_payloads_are_strict_json_with_a_models_nan_output_as_null(tmp_path: Path) -> None:
    # A float model can answer NaN (0/0 inside it); regression values go out as they come.
    output = Output("regression", values=[round(float(v), 6) for v in (math.nan, 0.5)])
    result = Result(0, 1.0, "m", 1, "cpu", math.inf, 2.0, output)
    outbox = Outbox(tmp_path / "outbox.sqlite", 10**7).open()
    body = {"ts": 1.0, "inference": {"fps": math.nan, "p95": -math.inf}, "load": [math.nan]}
    messages, _ = outbox.write(
        [
            Record("results", "edge/d/results", {"ts": 1.0, **result.to_dict()}),
            Record("telemetry", "edge/d/telemetry", body),
            Record("status", "edge/d/status", {"ts": math.nan}, keep=False),
        ]
    )
    docs = [_strict(m.payload) for m in messages]
    assert docs[0]["values"] == [None, 0.5] and docs[0]["latency_ms"] is None
    assert docs[1]["inference"] == {"fps": None, "p95": None} and docs[1]["load"] == [None]
    assert docs[2]["ts"] is None
    stored = [_strict(m.payload) for m in outbox.pending(0, 10)]
    assert stored[0]["values"] == [None, 0.5]


def test_dumps_writes_non_finite_floats_as_null_at_any_depth() -> None:
    value = {"a": math.nan, "b": [1.0, (math.inf, {"c": -math.inf})], "d": "NaN"}
    assert _strict(dumps(value)) == {"a": None, "b": [1.0, [None, {"c": None}]], "d": "NaN"}


def test_json_log_lines_are_strict_json_with_non_finite_fields_as_null() -> None:
    event = logs.Event("model_swapped", {"fps": math.nan, "p95": [math.inf]})
    record = logging.LogRecord("agent.pipeline", logging.INFO, __file__, 1, event, None, None)
    doc = _strict(logs.JsonFormatter().format(record))
    assert doc["event"] == "model_swapped" and doc["fps"] is None and doc["p95"] == [None]
