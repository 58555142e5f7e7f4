"""Helpers for the gateway-side envelope tests: signed DSO documents and a test agent."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.envelope import Limits
from gateway.envelope_agent import AgentSettings, EnvelopeAgent
from gateway.signing import sign

SITE = "home-1"
ROOT = "hems/v1"
T_CONTROLS = f"{ROOT}/{SITE}/dso/controls"
T_DEFAULT = f"{ROOT}/{SITE}/dso/default"
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
NOW = 1_782_000_000.0


def control(cid: str, start: float, duration_s: float, created: float, site: str = SITE,
            **limits: float | None) -> dict[str, Any]:
    d: dict[str, Any] = {"id": cid, "site": site, "created": float(created),
                         "start": float(start), "duration_s": float(duration_s)}
    d.update({k: (None if v is None else float(v)) for k, v in limits.items()})
    return d


def default(cid: str, created: float, site: str = SITE, **limits: float) -> dict[str, Any]:
    d: dict[str, Any] = {"id": cid, "site": site, "created": float(created)}
    d.update({k: float(v) for k, v in limits.items()})
    return d


def controls_doc(items: list[dict[str, Any]], issued: float, *, site: str = SITE,
                 key: Ed25519PrivateKey | None = KEY) -> bytes:
    body = {"v": 1, "site": site, "issued": float(issued), "controls": items}
    return json.dumps(body if key is None else sign(body, key)).encode()


def default_doc(item: dict[str, Any], issued: float, *, site: str = SITE,
                key: Ed25519PrivateKey | None = KEY) -> bytes:
    body = {"v": 1, "site": site, "issued": float(issued), "default": item}
    return json.dumps(body if key is None else sign(body, key)).encode()


def make_agent(*, fallback: Limits | None = None, contact_timeout_s: float | None = None,
               burst: int = 100_000, monotonic: Any = None, **kw: Any) -> EnvelopeAgent:
    settings = AgentSettings(public_key=KEY.public_key(),
                             fallback=fallback if fallback is not None else Limits(1500.0),
                             contact_timeout_s=contact_timeout_s, flood_burst=burst, **kw)
    extra = {} if monotonic is None else {"monotonic": monotonic}
    return EnvelopeAgent(SITE, settings, root=ROOT, **extra)


def acks(agent: EnvelopeAgent) -> list[dict[str, Any]]:
    """Take the queued acks off the agent (as dicts)."""
    out = agent.outgoing()
    return [json.loads(p) for t, p, _ in out if t.endswith("/dso/ack")]
