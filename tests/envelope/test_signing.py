"""Ed25519 envelope signatures: round trip, tampering, wrong key, key files."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.envelope import Schedule, parse_control
from gateway.signing import (
    SignatureInvalid,
    canonical,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_from_b64,
    public_key_to_b64,
    save_private_key,
    sign,
    verify,
)

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
OTHER = Ed25519PrivateKey.generate().public_key()
NOW = 1_767_225_600.0
PAYLOAD: dict[str, Any] = {
    "id": "c1",
    "site": "home-1",
    "created": NOW - 60,
    "start": NOW,
    "duration_s": 3600.0,
    "export_w": 1500.0,
}


def wire(msg: dict[str, Any]) -> dict[str, Any]:
    """Through JSON text and back, as over MQTT."""
    out: dict[str, Any] = json.loads(json.dumps(msg).encode("utf-8"))
    return out


def test_canonical_form_is_sorted_compact_utf8_without_sig() -> None:
    assert canonical({"b": 1, "a": "é", "sig": "x"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical({"a": float("nan")})


def test_sign_verify_round_trip_over_the_wire_then_parse() -> None:
    msg = sign(PAYLOAD, KEY)
    assert set(msg) == {*PAYLOAD, "sig"}
    assert len(base64.b64decode(msg["sig"])) == 64
    got = verify(wire(msg), PUB)
    assert got == PAYLOAD
    s = Schedule("home-1")
    s.add(parse_control(got, "home-1", NOW))
    assert s.active(NOW).limits.export_w == 1500.0


def test_resigning_replaces_an_old_signature() -> None:
    msg = sign({**PAYLOAD, "sig": "stale"}, KEY)
    assert verify(msg, PUB) == PAYLOAD


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.update(export_w=15000.0),  # loosen the limit
        lambda m: m.update(export_w=1500),  # same number, different JSON: 1500 vs 1500.0
        lambda m: m.update(extra=1),
        lambda m: m.pop("export_w"),
        lambda m: m.update(site="home-2"),
    ],
    ids=["value", "number-form", "added-field", "removed-field", "site"],
)
def test_tampered_payload_rejected(tamper: Any) -> None:
    msg = wire(sign(PAYLOAD, KEY))
    tamper(msg)
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify(msg, PUB)


def test_wrong_key_rejected() -> None:
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify(sign(PAYLOAD, KEY), OTHER)


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (["not", "a", "dict"], "JSON object"),
        (dict(PAYLOAD), "not signed"),
        ({**PAYLOAD, "sig": 5}, "base64 string"),
        ({**PAYLOAD, "sig": "!!!not base64!!!"}, "not valid base64"),
        ({**PAYLOAD, "sig": base64.b64encode(b"short").decode()}, "64"),
        ({**PAYLOAD, "sig": "é"}, "not valid base64"),
    ],
)
def test_malformed_signatures_rejected_with_a_reason(msg: object, words: str) -> None:
    with pytest.raises(SignatureInvalid, match=words):
        verify(msg, PUB)


@pytest.mark.parametrize("bad", [float("inf"), "\ud800", {1, 2}], ids=["inf", "surrogate", "set"])
def test_non_canonicalisable_payload_rejected(bad: object) -> None:
    msg = sign(PAYLOAD, KEY)
    msg["export_w"] = bad
    with pytest.raises(SignatureInvalid, match="canonicalised"):
        verify(msg, PUB)


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)  # JSON-encodable
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(text.filter(lambda k: k != "sig"), json_value, max_size=6))
def test_any_json_payload_round_trips_and_any_change_breaks_it(payload: dict[str, Any]) -> None:
    msg = wire(sign(payload, KEY))
    assert verify(msg, PUB) == wire(payload)
    msg["\x00tamper"] = 1
    with pytest.raises(SignatureInvalid):
        verify(msg, PUB)


# --- key files ---------------------------------------------------------------------------------


def test_generate_keypair_writes_usable_files_with_safe_modes(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    key, public = load_private_key(priv), load_public_key(pub)
    assert verify(sign(PAYLOAD, key), public) == PAYLOAD
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "keys")


def test_save_private_key_tightens_an_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "k.pem"
    p.write_text("old")
    p.chmod(0o644)
    save_private_key(KEY, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert public_key_to_b64(load_private_key(p).public_key()) == public_key_to_b64(PUB)


def test_wrong_key_types_and_garbage_rejected(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p = tmp_path / "ec.pem"
    p.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not Ed25519"):
        load_private_key(p)
    q = tmp_path / "ec.pub"
    q.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ValueError, match="not Ed25519"):
        load_public_key(q)
    g = tmp_path / "garbage.pem"
    g.write_text("hello")
    with pytest.raises(ValueError, match=r"garbage\.pem"):
        load_public_key(g)
    with pytest.raises(ValueError, match=r"garbage\.pem"):
        load_private_key(g)


def test_public_key_b64_round_trip() -> None:
    text = public_key_to_b64(PUB)
    assert verify(sign(PAYLOAD, KEY), public_key_from_b64(text)) == PAYLOAD
    with pytest.raises(ValueError, match="32"):
        public_key_from_b64(base64.b64encode(b"x" * 31).decode())
    with pytest.raises(ValueError, match="base64"):
        public_key_from_b64("not base64!")
