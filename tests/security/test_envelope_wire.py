"""Envelopes that get past the broker anyway are still refused by the gateway's verification.

The broker's ACL is the first wall; the DSO's Ed25519 signature is the second. Here the attacker
holds the DSO's *broker* password (stolen, or an ACL mistake) but not its signing key: the
forged, tampered, foreign-key and replayed documents all reach the gateway's subscription on the
real broker, and the gateway's checks (``gateway.signing.verify``, then
``gateway.envelope.parse_control``/``parse_default`` and the schedule's replay rule; and the
daemon's own handler, ``gateway.envelope_agent.EnvelopeAgent``) keep the DSO's real limit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.envelope import EnvelopeRejected, Schedule, parse_control, parse_default
from gateway.signing import SignatureInvalid, sign, verify

from .broker import SecureBroker
from .wire import client, publish_all, read_until

NOW = 1_782_000_000.0
SITE = "home-1"
CONTROLS = f"hems/v1/{SITE}/dso/controls"
DEFAULT = f"hems/v1/{SITE}/dso/default"
DSO_KEY = Ed25519PrivateKey.generate()
ATTACKER_KEY = Ed25519PrivateKey.generate()


def _control(cid: str, created: float, **limits: float) -> dict[str, Any]:
    return {"id": cid, "site": SITE, "created": created, "start": NOW - 60.0,
            "duration_s": 7200.0, **limits}


def _doc(issued: float, controls: list[dict[str, Any]], key: Ed25519PrivateKey | None = DSO_KEY
         ) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "site": SITE, "issued": issued, "controls": controls}
    return sign(body, key) if key is not None else body


def _bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _traffic() -> tuple[list[tuple[str, bytes]], tuple[str, bytes]]:
    """What arrives at the gateway, in order, and the last (legitimate) message."""
    loose = _doc(NOW - 100, [_control("c1", NOW - 100, export_w=5000.0)])  # old, looser
    tight = _doc(NOW - 50, [_control("c1", NOW - 50, export_w=1000.0)])  # the DSO's current one
    tampered = dict(tight, controls=[_control("c1", NOW - 50, export_w=50000.0)])  # old sig kept
    attacks = [
        (CONTROLS, _bytes(_doc(NOW - 5, [_control("c1", NOW - 5, export_w=1e6)], key=None))),
        (CONTROLS, _bytes(tampered)),
        (CONTROLS, _bytes(_doc(NOW - 4, [_control("c1", NOW - 4, export_w=1e6)],
                               key=ATTACKER_KEY))),
        (DEFAULT, _bytes({"v": 1, "site": SITE, "issued": NOW - 3,
                          "default": {"id": "d", "site": SITE, "created": NOW - 3,
                                      "export_w": 1e6}})),
        (CONTROLS, _bytes(loose)),  # replay: a genuine, correctly signed, superseded document
    ]
    marker = (CONTROLS, _bytes(_doc(NOW - 1, [_control("c2", NOW - 1, import_w=2000.0)])))
    return [(CONTROLS, _bytes(tight)), *attacks, marker], marker


async def _delivered(broker: SecureBroker) -> list[tuple[str, bytes]]:
    """Send the traffic through the real broker with the DSO's credentials; what the gateway's
    subscription receives."""
    traffic, marker = _traffic()
    async with client(broker, SITE, ident=f"hems-gw-{SITE}") as gw, \
            client(broker, "dso") as attacker:
        await gw.subscribe(CONTROLS, qos=1)
        await gw.subscribe(DEFAULT, qos=1)
        await publish_all(attacker, traffic)
        got = await read_until(gw, {marker})
    assert got == traffic  # every attack did reach the gateway: the broker did not stop them
    return got


class GatewayChecks:
    """The gateway's receive path, step by step: signature over the whole document first, then
    each control (or the default) validated and added under the supersede/replay rules."""

    def __init__(self) -> None:
        self.schedule = Schedule(SITE)
        self.rejected: list[str] = []

    def receive(self, topic: str, payload: bytes) -> None:
        try:
            body = verify(json.loads(payload), DSO_KEY.public_key())
        except SignatureInvalid as e:
            self.rejected.append(f"signature: {e.reason}")
            return
        try:
            if topic == DEFAULT:
                self.schedule.set_default(parse_default(body["default"], SITE, NOW))
            for item in body.get("controls", []):
                self.schedule.add(parse_control(item, SITE, NOW))
        except EnvelopeRejected as e:
            self.rejected.append(f"{e.code}: {e.reason}")


async def test_unsigned_tampered_foreign_or_replayed_envelopes_are_rejected(
        secure_broker: SecureBroker) -> None:
    got = await _delivered(secure_broker)
    gw = GatewayChecks()
    for topic, payload in got:
        gw.receive(topic, payload)
    assert [r.split(":")[0] for r in gw.rejected] == ["signature"] * 4 + ["replay"]
    assert "not signed" in gw.rejected[0] and "does not match" in gw.rejected[1]
    active = gw.schedule.active(NOW)
    assert active.limits.export_w == 1000.0  # the DSO's current limit, never loosened
    assert active.limits.import_w == 2000.0  # and the genuine document after the attack holds
    assert gw.schedule.default is None


async def test_the_daemons_envelope_handler_rejects_them_too(
        secure_broker: SecureBroker) -> None:
    agent_mod = pytest.importorskip("gateway.envelope_agent")
    got = await _delivered(secure_broker)
    agent = agent_mod.EnvelopeAgent(SITE, agent_mod.AgentSettings(
        public_key=DSO_KEY.public_key()))
    for topic, payload in got:
        agent.on_message(topic, payload, NOW)
    assert agent.stats.rejected == {"signature": 4, "replay": 1}
    limits = agent.schedule.active(NOW).limits
    assert (limits.export_w, limits.import_w) == (1000.0, 2000.0)
    acks = [json.loads(p) for t, p, _ in agent.outgoing() if t.endswith("/dso/ack")]
    assert sum(a["status"] == "rejected" for a in acks) == 5
