"""The DSO heartbeat on the agent, without I/O: with ``dso_heartbeat_timeout_s`` > 0 contact is a
valid signed DSO message within the timeout, not the broker session alone; silence behind a live
broker leads to the fallback after ``contact_timeout_s``, a heartbeat again ramps back; invalid
heartbeats are rejected with a reason, never count as contact and never loosen a limit."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from community.dso import validate_payload
from drivers.natures import BatteryReading, InverterReading, MeterReading
from gateway.commands import Setpoints as Commanded
from gateway.commands import SiteState
from gateway.envelope import Limits
from gateway.envelope_agent import AgentSettings, EnvelopeAgent
from gateway.signing import sign

from .helpers import (
    KEY,
    NOW,
    OTHER_KEY,
    ROOT,
    SITE,
    T_CONTROLS,
    T_DEFAULT,
    acks,
    control,
    controls_doc,
    default,
    default_doc,
    make_agent,
)

Event = tuple[str, str, str]

T_HEARTBEAT = f"{ROOT}/{SITE}/dso/heartbeat"
HB_S = 60.0  # dso_heartbeat_timeout_s of these tests
CT_S = 120.0  # contact_timeout_s
DEFAULT_W = 3000.0
FALLBACK_W = 1000.0


def heartbeat(issued: float, *, site: str = SITE, key: Any = KEY, **extra: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "site": site, "issued": float(issued), **extra}
    return json.dumps(body if key is None else sign(body, key)).encode()


def hb_agent(events: list[Event] | None = None) -> EnvelopeAgent:
    """Heartbeat on; the DSO's default (3000 W) held, received at NOW from a document issued a
    long time ago (a retained one: it proves nothing about the DSO now)."""
    settings = AgentSettings(public_key=KEY.public_key(), fallback=Limits(export_w=FALLBACK_W),
                             contact_timeout_s=CT_S, flood_burst=100_000,
                             dso_heartbeat_timeout_s=HB_S)
    a = EnvelopeAgent(SITE, settings, root=ROOT, on_event=None if events is None else
                      lambda lvl, kind, msg, _d: events.append((lvl, kind, msg)))
    a.on_message(T_DEFAULT, default_doc(default("d", NOW - 9000, export_w=DEFAULT_W),
                                        NOW - 8000), NOW)
    acks(a)
    return a


def source(a: EnvelopeAgent, t: float, connected: bool = True) -> tuple[str, float | None, bool]:
    """One cycle at ``t``: (source, effective export limit, contact lost)."""
    lim = a.limits_at(t, connected)
    assert a.target is not None
    return a.target.source, lim.limits.export_w, a.target.contact_lost


def cycles(a: EnvelopeAgent, t0: float, t1: float, connected: bool = True
           ) -> dict[float, tuple[str, float | None, bool]]:
    """A cycle every domain second from ``t0`` to ``t1`` (both included)."""
    return {t: source(a, t, connected) for t in [t0 + k for k in range(int(t1 - t0) + 1)]}


def _state(t: float, site_w: float, pv_w: float) -> SiteState:
    return SiteState(
        t, MeterReading(t, site_w, (None, None, None), None, None),
        InverterReading(t, pv_w, None, 5000.0, 5000.0, 100.0, False, None, None),
        BatteryReading(t, 0.0, 100.0, 10000.0, 5000.0, 5000.0, 10.0, 0, None, None, None))


def test_schema_of_the_heartbeat_and_the_subscription() -> None:
    assert validate_payload("dso_heartbeat", json.loads(heartbeat(NOW))) == []
    assert validate_payload("dso_heartbeat", json.loads(heartbeat(NOW, key=None)))  # no sig
    assert validate_payload("dso_heartbeat", json.loads(heartbeat(NOW, extra=1)))
    assert T_HEARTBEAT in hb_agent().subscriptions and hb_agent().wants(T_HEARTBEAT)
    # off (the default): today's subscriptions, and a heartbeat is not even looked at
    off = make_agent(contact_timeout_s=CT_S)
    assert off.subscriptions == (T_CONTROLS, T_DEFAULT) and not off.wants(T_HEARTBEAT)
    off.on_message(T_HEARTBEAT, b"junk", NOW)
    assert off.stats.messages == 0 and not off.stats.rejected


def test_heartbeats_keep_contact_with_the_broker_up() -> None:
    a = hb_agent()
    seen = []
    for k in range(0, 100):  # 1000 s, a heartbeat every 30 s
        t = NOW + 10 * k
        if k % 3 == 0:
            a.on_message(T_HEARTBEAT, heartbeat(t - 1.0), t)
        seen.append(source(a, t))
    assert set(seen) == {("default", DEFAULT_W, False)}
    assert a.stats.heartbeats == 34 and not a.stats.rejected and a.stats.dso_silences == 0
    assert acks(a) == []  # accepted heartbeats are counted, not acknowledged


def test_silence_with_the_broker_up_is_lost_contact_then_the_fallback() -> None:
    events: list[Event] = []
    a = hb_agent(events)
    a.on_message(T_HEARTBEAT, heartbeat(NOW), NOW)
    # The last heartbeat was issued at NOW; contact holds for HB_S, then lasts CT_S as lost.
    got = {dt: source(a, NOW + dt, connected=True) for dt in range(0, 400, 5)}
    for dt, (src, w, lost) in got.items():
        if dt <= HB_S + CT_S:
            assert (src, w, lost) == ("default", DEFAULT_W, False), dt
        else:
            assert (src, w, lost) == ("fallback", FALLBACK_W, True), dt
    silent = [m for lvl, k, m in events if lvl == "warning" and k == "envelope"]
    assert len(silent) == 1 and "no valid signed DSO message" in silent[0], events
    assert a.stats.dso_silences == 1
    # Off (the default), the same silence keeps the DSO's default forever (CSIP-AUS as before).
    off = make_agent(fallback=Limits(export_w=FALLBACK_W), contact_timeout_s=CT_S)
    off.on_message(T_DEFAULT, default_doc(default("d", NOW - 9000, export_w=DEFAULT_W),
                                          NOW - 8000), NOW)
    assert source(off, NOW + 5000) == ("default", DEFAULT_W, False)


def test_a_fresh_document_is_contact_a_retained_redelivery_is_not() -> None:
    a = hb_agent()
    assert source(a, NOW) == ("fallback", FALLBACK_W, True)  # an old retained default: no
    doc = controls_doc([control("c1", NOW + 9000, 60, NOW - 5, export_w=500)], NOW)
    a.on_message(T_CONTROLS, doc, NOW)
    assert a.dso_seen == NOW
    got = cycles(a, NOW, NOW + 99)
    # The same document again (the broker re-sends retained messages on every subscribe)
    a.on_message(T_CONTROLS, doc, NOW + 100)
    assert a.dso_seen == NOW and a.stats.duplicates == 1
    got.update(cycles(a, NOW + 100, NOW + 200))
    assert got[NOW + HB_S + CT_S] == ("default", DEFAULT_W, False)
    assert got[NOW + HB_S + CT_S + 1] == ("fallback", FALLBACK_W, True)
    # A delayed message is dated by its `issued`: it covers only what is left of its window.
    b = hb_agent()
    b.on_message(T_HEARTBEAT, heartbeat(NOW - 50), NOW)
    assert b.dso_seen == NOW - 50
    got = cycles(b, NOW, NOW + 200)
    assert got[NOW + 10 + CT_S] == ("default", DEFAULT_W, False)
    assert got[NOW + 10 + CT_S + 1][0] == "fallback"


def test_the_broker_down_is_lost_contact_even_with_fresh_heartbeats_before() -> None:
    a = hb_agent()
    a.on_message(T_HEARTBEAT, heartbeat(NOW), NOW)
    assert source(a, NOW + 1, connected=False)[0] == "default"
    assert source(a, NOW + 1 + CT_S + 1, connected=False) == ("fallback", FALLBACK_W, True)


def test_a_valid_heartbeat_again_ramps_back_at_16_pct_per_min() -> None:
    events: list[Event] = []
    a = hb_agent(events)
    a.on_message(T_HEARTBEAT, heartbeat(NOW), NOW)
    effs: list[float] = []
    t = NOW
    for k in range(400):  # silent from NOW, heartbeats again from NOW + 250 (every 30 s)
        t = NOW + k
        if k >= 250 and k % 30 == 10:
            a.on_message(T_HEARTBEAT, heartbeat(t), t)
        a.step(_state(t, -900.0, 1500.0), Commanded(0.0), connected=True)
        assert a.active is not None and a.active.limits.export_w is not None
        effs.append(a.active.limits.export_w)
    assert effs[180] == DEFAULT_W and effs[181] == FALLBACK_W and effs[249] == FALLBACK_W
    assert a.target is not None and a.target.source == "default" and not a.target.contact_lost
    # rating = 5000 inverter + 5000 battery: 16 %/min = 1600 W/min
    steps = [b - c for c, b in itertools.pairwise(effs[249:])]
    assert max(steps) <= 10000 * 0.16 / 60 + 1e-6 and min(steps) >= 0
    assert FALLBACK_W < effs[251] < DEFAULT_W and effs[-1] == DEFAULT_W
    assert [m for _, _, m in events if "heard again" in m], events


def _base() -> EnvelopeAgent:
    """A heartbeat issued and accepted at NOW; the hostile one arrives at AT = NOW + 100."""
    a = hb_agent()
    a.on_message(T_HEARTBEAT, heartbeat(NOW), NOW)
    assert a.stats.heartbeats == 1
    return a


AT = NOW + 100


def _tampered() -> bytes:
    d = json.loads(heartbeat(AT - 1))
    d["issued"] = AT
    return json.dumps(d).encode()


BAD: list[tuple[str, bytes, str]] = [
    ("unsigned", heartbeat(AT, key=None), "signature"),
    ("wrong key", heartbeat(AT, key=OTHER_KEY), "signature"),
    ("tampered issued", _tampered(), "signature"),
    ("bad sig text", json.dumps({**json.loads(heartbeat(AT)), "sig": "!!"}).encode(),
     "signature"),
    ("NaN issued", heartbeat(AT).replace(str(AT).encode(), b"NaN"), "signature"),
    ("not an object", b"[1]", "signature"),
    ("other site (a genuine heartbeat of home-2)", heartbeat(AT, site="home-2"), "site"),
    ("replayed (older than the last accepted)", heartbeat(NOW - 1), "replay"),
    ("issued in the future", heartbeat(AT + 301), "issued"),
    ("issued zero", heartbeat(0), "issued"),
    ("issued a string", json.dumps(sign({"v": 1, "site": SITE, "issued": "soon"}, KEY)).encode(),
     "issued"),
    ("too old to prove contact", heartbeat(AT - HB_S - 10), "stale"),
    ("unknown field", heartbeat(AT, export_w=9000.0), "unknown_field"),
    ("wrong version", json.dumps(sign({"v": 2, "site": SITE, "issued": AT}, KEY)).encode(),
     "version"),
    ("junk", b"{beat", "json"),
    ("empty", b"", "json"),
    ("not UTF-8", b"\xff\xfe", "json"),
    ("oversize", heartbeat(AT, pad="x" * 2000), "oversize"),
]


@pytest.mark.parametrize(("name", "payload", "code"), BAD, ids=[b[0] for b in BAD])
def test_invalid_heartbeats_are_rejected_and_keep_no_contact(name: str, payload: bytes,
                                                              code: str) -> None:
    a = _base()
    got = cycles(a, NOW, AT - 1)
    a.on_message(T_HEARTBEAT, payload, AT)
    assert a.stats.rejected == {code: 1}, (name, a.stats.rejected)
    rej = acks(a)
    assert [x["status"] for x in rej] == ["rejected"] and rej[0]["reason"].startswith(code)
    assert rej[0]["control_id"] is None and validate_payload("dso_ack", rej[0]) == []
    assert a.dso_seen == NOW and a.stats.heartbeats == 1
    # Contact ends HB_S after the valid heartbeat, the fallback CT_S later: had the hostile
    # one counted, contact would last until AT + HB_S at least.
    got.update(cycles(a, AT, AT + 150))
    assert got[NOW + HB_S + CT_S] == ("default", DEFAULT_W, False), name
    assert got[NOW + HB_S + CT_S + 1] == ("fallback", FALLBACK_W, True), name


def test_a_duplicate_heartbeat_is_silent_and_proves_nothing_new() -> None:
    a = _base()
    a.on_message(T_HEARTBEAT, heartbeat(NOW), NOW + 40)
    assert a.stats.duplicates == 1 and not a.stats.rejected and acks(a) == []
    assert a.dso_seen == NOW


# ---------------------------------------------------------------- property


@st.composite
def _hostile(draw: Any, t: float, accepted: list[float]) -> bytes:
    """A heartbeat that must be refused at ``t``: every class of the parametrized test, plus
    replays of what was accepted and random bytes."""
    kind = draw(st.sampled_from(["unsigned", "wrong_key", "tamper", "site", "replay", "future",
                                 "stale", "junk", "oversize", "field", "version"]))
    issued = t - draw(st.floats(0, 50))
    if kind == "unsigned":
        return heartbeat(issued, key=None)
    if kind == "wrong_key":
        return heartbeat(issued, key=OTHER_KEY)
    if kind == "tamper":
        d = json.loads(heartbeat(issued - 500))
        d["issued"] = issued
        return json.dumps(d).encode()
    if kind == "site":
        return heartbeat(issued, site="home-2")
    if kind == "replay" and accepted:
        return heartbeat(draw(st.sampled_from(accepted)))
    if kind == "future":
        return heartbeat(t + 300.5 + draw(st.floats(0, 1e6)))
    if kind == "stale":
        return heartbeat(t - HB_S - 0.5 - draw(st.floats(0, 1e6)))
    if kind == "oversize":
        return heartbeat(issued, pad="x" * 1100)
    if kind == "field":
        return heartbeat(issued, export_w=1e6)
    if kind == "version":
        return json.dumps(sign({"v": 0, "site": SITE, "issued": issued}, KEY)).encode()
    return draw(st.binary(max_size=60))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_property_hostile_heartbeats_never_loosen_the_limits(data: Any, genuine: bool) -> None:
    """Two agents see the same broker session, the same DSO documents and (``genuine``) the
    same valid heartbeats; one also gets a stream of hostile heartbeats. Its limits and its
    contact are the same at every step: without genuine heartbeats that is "no heartbeats at
    all", and hostile ones never keep a silent DSO in contact."""
    hostile, clean = hb_agent(), hb_agent()
    accepted: list[float] = []
    t = NOW
    for _ in range(data.draw(st.integers(1, 40))):
        t += data.draw(st.sampled_from([0.0, 1.0, 7.5, 30.0, 61.0, 125.0]))
        what = data.draw(st.sampled_from(["hostile", "hostile", "valid", "doc", "none"]))
        if what == "hostile":
            hostile.on_message(T_HEARTBEAT, data.draw(_hostile(t, accepted)), t)
        elif what == "valid" and genuine:
            issued = t - data.draw(st.sampled_from([0.0, 5.0, 59.0]))
            if not accepted or issued > accepted[-1]:
                for a in (hostile, clean):
                    a.on_message(T_HEARTBEAT, heartbeat(issued), t)
                accepted.append(issued)
        elif what == "doc":
            doc = default_doc(default("d", t - 1, export_w=DEFAULT_W - 1 - len(accepted)), t)
            for a in (hostile, clean):
                a.on_message(T_DEFAULT, doc, t)
        connected = data.draw(st.booleans())
        got, want = source(hostile, t, connected), source(clean, t, connected)
        assert got == want, (t - NOW, got, want)
        assert hostile.dso_seen == clean.dso_seen
    assert hostile.stats.heartbeats == clean.stats.heartbeats == len(accepted)


def test_a_heartbeat_received_during_a_cycle_is_no_silence() -> None:
    """The cycle's time stamp is taken before the messages that arrive while it runs: a
    heartbeat stamped 0.4 s after the cycle's time is not a clock that went back (seen in CI as
    a live DSO called silent for "-0 s"); a clock back by minutes still is."""
    events: list[Event] = []
    a = hb_agent(events)
    a.on_message(T_HEARTBEAT, heartbeat(NOW + 0.4), NOW + 0.4)
    assert source(a, NOW) == ("default", DEFAULT_W, False)
    assert a.stats.dso_silences == 0 and not [e for e in events if e[0] == "warning"]
    source(a, NOW - 300.0)  # the clock stepped back five minutes: silence, the safe side
    assert a.stats.dso_silences == 1
