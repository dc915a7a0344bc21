"""The pure rules of signatures, key rings and the signed index, by table.

agent/verify.py (signature files, key ids, key rings) and agent/signed_index.py
(``check_index``) take bytes and give a verdict: no network, no disk. The I/O around
them is tested through the real registry in tests/test_signed_index.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.desired import parse_desired, sign_desired
from agent.errors import VerificationError
from agent.signed_index import Seen, check_index, rfc3339
from agent.verify import (
    KeyRing,
    Signature,
    add_signatures,
    dump_signatures,
    key_id,
    parse_signatures,
    sign,
    verify_signatures,
)

OLD, NEW, EVIL = (Ed25519PrivateKey.generate() for _ in range(3))
DATA = b'{"some": "manifest"}\n'
NOW = 1_800_000_000.0


def ring(*keys: Ed25519PrivateKey) -> KeyRing:
    return KeyRing.of([k.public_key() for k in keys], "registry.public_key(s)")


def bare(key: Ed25519PrivateKey, data: bytes = DATA) -> bytes:
    return base64.b64encode(key.sign(data)) + b"\n"


def test_key_id_is_16_hex_digits_of_the_raw_public_key_and_the_same_for_both_halves() -> None:
    assert key_id(OLD) == key_id(OLD.public_key())
    assert len(key_id(OLD)) == 16 and int(key_id(OLD), 16) >= 0
    assert key_id(OLD) != key_id(NEW)


VERDICTS: list[tuple[str, tuple[Ed25519PrivateKey, ...], bytes | None, str | None]] = [
    # (case, trusted keys, signature file, error expected or None for accepted)
    ("new format, trusted key", (OLD,), sign(OLD, DATA), None),
    ("old bare format, trusted key", (OLD,), bare(OLD), None),
    ("old bare format, second key of the ring", (OLD, NEW), bare(NEW), None),
    (
        "signed by both, device trusts the new one",
        (NEW,),
        add_signatures(None, [OLD, NEW], DATA, "s"),
        None,
    ),
    (
        "signed by both, device trusts the old one",
        (OLD,),
        add_signatures(None, [OLD, NEW], DATA, "s"),
        None,
    ),
    ("unsigned", (OLD,), None, "unsigned, and registry.public_key(s) requires a signature"),
    ("signed only by a dropped key", (NEW,), sign(OLD, DATA), "not signed by a trusted key"),
    ("old bare format by an untrusted key", (OLD,), bare(EVIL), "bad signature"),
    ("trusted key id, other bytes signed", (OLD,), sign(OLD, b"other"), "bad signature"),
    (
        "a forged entry under a trusted key id",
        (OLD,),
        dump_signatures([Signature(key_id(OLD), EVIL.sign(DATA))]),
        "bad signature",
    ),
    ("not base64", (OLD,), b"%%%\n", "not base64"),
    ("a short signature", (OLD,), base64.b64encode(b"x" * 10), "an Ed25519 signature has 64"),
    ("JSON of another shape", (OLD,), b'{"sig": "x"}', 'must be {"signatures": [...]}'),
    ("no signatures", (OLD,), b'{"signatures": []}', "a list of at least one"),
    ("bad key id", (OLD,), b'{"signatures": [{"keyid": "XY", "sig": "AA=="}]}', "keyid: not 16"),
    ("extra field", (OLD,), b'{"signatures": [{"keyid": "0", "sig": "", "x": 1}]}', "must be"),
    ("deep JSON", (OLD,), b'{"signatures":' + b"[" * 2000 + b"]" * 2000 + b"}", "limit of 3"),
    ("too long", (OLD,), b"{" + b" " * 5000 + b"}", "over 4096 bytes"),
    ("a key twice", (OLD,), b'{"signatures": [], "signatures": []}', "twice"),
]


@pytest.mark.parametrize(
    ("trusted", "sig_file", "error"),
    [v[1:] for v in VERDICTS],
    ids=[v[0] for v in VERDICTS],
)
def test_signature_verdicts(
    trusted: tuple[Ed25519PrivateKey, ...], sig_file: bytes | None, error: str | None
) -> None:
    if error is None:
        assert verify_signatures(ring(*trusted), DATA, sig_file, "m") in {
            key_id(k) for k in trusted
        }
    else:
        with pytest.raises(VerificationError, match=r"^m") as info:
            verify_signatures(ring(*trusted), DATA, sig_file, "m")
        assert error in str(info.value)


def test_adding_a_signature_keeps_the_others_and_replaces_the_same_key() -> None:
    first = sign(OLD, DATA)
    both = add_signatures(first, [NEW], DATA, "s")
    assert sorted(s.keyid or "" for s in parse_signatures(both, "s")) == sorted(
        [key_id(OLD), key_id(NEW)]
    )
    assert add_signatures(both, [NEW], DATA, "s") == both  # Ed25519 is deterministic
    assert add_signatures(both, [OLD, NEW], DATA, "s") == both


def test_adding_to_an_old_bare_signature_names_it_when_its_key_is_given() -> None:
    both = add_signatures(bare(OLD), [OLD, NEW], DATA, "s")
    assert {s.keyid for s in parse_signatures(both, "s")} == {key_id(OLD), key_id(NEW)}
    with pytest.raises(VerificationError, match=r"old format \(no key id\) by a key not given"):
        add_signatures(bare(OLD), [NEW], DATA, "s")


@given(st.binary(max_size=600))
def test_any_signature_file_gives_a_verdict_or_a_verification_error(sig_file: bytes) -> None:
    with contextlib.suppress(VerificationError):
        verify_signatures(ring(OLD), DATA, sig_file, "m")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
)
def test_any_json_signature_file_is_refused_with_one_error(doc: Any) -> None:
    with pytest.raises(VerificationError):
        verify_signatures(ring(OLD), DATA, json.dumps({"signatures": doc}).encode(), "m")


# ----- the signed index -----


def index_bytes(version: int | None = 5, expires: float | None = NOW + 86400, **more: Any) -> bytes:
    doc: dict[str, Any] = {"schema": 1, "model": "m", "versions": [1, 2], "channels": {}}
    if version is not None:
        doc["version"] = version
    if expires is not None:
        doc["expires"] = rfc3339(expires)
    return json.dumps({**doc, **more}).encode()


def judge(raw: bytes, *, sig: bytes | None = None, seen: Seen | None = None, now: float = NOW):  # type: ignore[no-untyped-def]
    return check_index(
        raw,
        sign(OLD, raw) if sig is None else sig,
        model="m",
        keys=ring(OLD),
        now=now,
        skew_s=300,
        seen=seen,
        where="m/index.json",
    )


def test_a_fresh_signed_index_is_accepted_and_gives_the_record_to_keep() -> None:
    raw = index_bytes()
    index, seen = judge(raw)
    assert index.version == 5 and seen.version == 5
    assert judge(raw, seen=seen)[1] == seen  # the same bytes again: fine
    assert judge(index_bytes(6), seen=seen)[1].version == 6


INDEX_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("expired", {"raw": index_bytes(expires=NOW - 301)}, "expired at"),
    ("older than seen", {"raw": index_bytes(4), "seen": Seen(5, "x")}, "older than version 5"),
    ("same version, other bytes", {"raw": index_bytes(5), "seen": Seen(5, "x")}, "other bytes"),
    ("no version", {"raw": index_bytes(version=None)}, "signed but has no version"),
    ("no expiry", {"raw": index_bytes(expires=None)}, "signed but has no expires"),
    ("another model", {"raw": index_bytes(model="n")}, "model is 'n'"),
    ("unsigned", {"raw": index_bytes(), "sig": b""}, "sig: empty"),
    ("signed by another key", {"raw": index_bytes(), "sig": sign(EVIL, index_bytes())}, "trusted"),
    ("expiry not UTC", {"raw": index_bytes(expires=None, expires_="x")}, "unknown field"),
]


@pytest.mark.parametrize(
    ("given_", "error"), [r[1:] for r in INDEX_REFUSALS], ids=[r[0] for r in INDEX_REFUSALS]
)
def test_index_refusals(given_: dict[str, Any], error: str) -> None:
    with pytest.raises(VerificationError, match=r"^m/index.json") as info:
        judge(**given_)
    assert error in str(info.value)


def test_expiry_allows_the_clock_skew_and_no_more() -> None:
    raw = index_bytes(expires=NOW - 299)
    assert judge(raw)[0].version == 5
    with pytest.raises(VerificationError, match="expired"):
        judge(raw, now=NOW + 2)


def test_an_unsigned_index_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(VerificationError, match=r"unsigned, and registry.public_key\(s\)"):
        check_index(
            b"not json at all",
            None,
            model="m",
            keys=ring(OLD),
            now=NOW,
            skew_s=0,
            seen=None,
            where="m/index.json",
        )


# ----- desired state: key ids -----


def desired(key: Ed25519PrivateKey, **more: Any) -> bytes:
    doc = {"model": "m", "version": 1, "issued_at": 1.0, "target": "device:d", **more}
    return json.dumps(sign_desired(doc, key)).encode()


def deploy_ring(*keys: Ed25519PrivateKey) -> KeyRing:
    return KeyRing.of([k.public_key() for k in keys], "update.desired_public_key(s)")


def test_desired_state_names_its_key_and_any_key_of_the_ring_is_accepted() -> None:
    doc = json.loads(desired(NEW))
    assert doc["keyid"] == key_id(NEW)
    for trusted in ((NEW,), (OLD, NEW)):
        assert parse_desired(desired(NEW), "device", target="device:d", key=deploy_ring(*trusted))


def test_desired_state_by_a_dropped_deploy_key_is_refused_naming_the_key() -> None:
    with pytest.raises(
        ValueError, match=rf"signature: bad \(signed by key '{key_id(OLD)}'.*does not list"
    ):
        parse_desired(desired(OLD), "device", target="device:d", key=deploy_ring(NEW))


def test_desired_state_without_keyid_from_older_tools_is_checked_against_every_key() -> None:
    doc = {"model": "m", "version": 1, "issued_at": 1.0, "target": "device:d"}
    from agent.desired import canonical

    old_style = {**doc, "signature": base64.b64encode(NEW.sign(canonical(doc))).decode()}
    payload = json.dumps(old_style).encode()
    assert parse_desired(payload, "device", target="device:d", key=deploy_ring(OLD, NEW))
    with pytest.raises(ValueError, match="signature: bad"):
        parse_desired(payload, "device", target="device:d", key=deploy_ring(OLD))


def test_desired_state_with_a_keyid_changed_after_signing_is_refused() -> None:
    doc = json.loads(desired(NEW))
    doc["keyid"] = key_id(OLD)
    with pytest.raises(ValueError, match="signature: bad"):
        parse_desired(
            json.dumps(doc).encode(), "device", target="device:d", key=deploy_ring(OLD, NEW)
        )


@given(
    st.binary(max_size=400)
    | st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["schema", "model", "versions", "channels", "version", "expires", "x"]),
            st.none() | st.integers() | st.text(max_size=25) | st.lists(st.integers(), max_size=3),
        ),
    )
)
def test_any_signed_index_bytes_give_an_index_or_one_verification_error(raw: bytes) -> None:
    try:
        judge(raw)
    except VerificationError as exc:
        assert str(exc).startswith("m/index.json")
