"""The envelope agent without I/O: verification, validation, replay, floods, persistence, acks,
contact loss and the property that hostile messages never loosen the limits."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from community.dso import validate_payload
from drivers.natures import BatteryReading, InverterReading, MeterReading
from gateway import messages
from gateway.commands import Setpoints as Commanded
from gateway.commands import SiteState
from gateway.envelope import Limits

from .helpers import (
    NOW,
    OTHER_KEY,
    T_CONTROLS,
    T_DEFAULT,
    acks,
    control,
    controls_doc,
    default,
    default_doc,
    make_agent,
)


def export_now(agent: Any, t: float = NOW) -> float | None:
    lim: float | None = agent.limits_at(t, True).limits.export_w
    return lim


def held_agent() -> Any:
    """An agent holding a 1000 W export limit for the next hour (default 4000 W)."""
    a = make_agent()
    a.on_message(T_DEFAULT, default_doc(default("d1", NOW - 100, export_w=4000), NOW - 50), NOW)
    a.on_message(T_CONTROLS, controls_doc(
        [control("c1", NOW - 10, 3600, NOW - 20, export_w=1000)], NOW - 5), NOW)
    assert export_now(a) == 1000.0
    acks(a)
    return a


def test_signed_controls_are_held_and_acknowledged_received_then_started_completed() -> None:
    a = make_agent()
    a.on_message(T_CONTROLS, controls_doc(
        [control("c1", NOW + 60, 120, NOW - 1, export_w=800)], NOW), NOW)
    got = acks(a)
    assert [(x["control_id"], x["status"]) for x in got] == [("c1", "received")]
    assert export_now(a, NOW) == 1500.0  # not started: the fallback
    assert export_now(a, NOW + 60) == 800.0
    assert [(x["control_id"], x["status"]) for x in acks(a)] == [("c1", "started")]
    assert export_now(a, NOW + 180) == 1500.0
    assert [(x["control_id"], x["status"]) for x in acks(a)] == [("c1", "completed")]
    for x in got:
        assert validate_payload("dso_ack", x) == []
    assert a.stats.accepted == 1 and not a.stats.rejected


def _tamper(doc: bytes) -> bytes:
    d = json.loads(doc)
    d["controls"][0]["export_w"] = 99999.0
    return json.dumps(d).encode()


def _nan(doc: bytes) -> bytes:
    return doc.replace(b'"export_w": 100.0', b'"export_w": NaN')


def _inf(doc: bytes) -> bytes:
    return doc.replace(b'"export_w": 100.0', b'"export_w": 1e999')


# A genuine update of c1 (tighter, 100 W): hostile variants of it try 9000 W and more.
LOOSE = [control("c1", NOW - 10, 3600, NOW - 1, export_w=100)]
LOOSER = [control("c1", NOW - 10, 3600, NOW - 1, export_w=9000)]


@pytest.mark.parametrize(("name", "topic", "payload", "code"), [
    ("unsigned", T_CONTROLS, controls_doc(LOOSER, NOW, key=None), "signature"),
    ("wrong key", T_CONTROLS, controls_doc(LOOSER, NOW, key=OTHER_KEY), "signature"),
    ("tampered", T_CONTROLS, _tamper(controls_doc(LOOSE, NOW)), "signature"),
    ("NaN", T_CONTROLS, _nan(controls_doc(LOOSE, NOW)), "signature"),
    ("infinity", T_CONTROLS, _inf(controls_doc(LOOSE, NOW)), "signature"),
    ("not JSON", T_CONTROLS, b"{export_w: 9000", "json"),
    ("not UTF-8", T_CONTROLS, b"\xff\xfe\x00", "json"),
    ("not an object", T_CONTROLS, b"[1, 2]", "signature"),
    ("replayed document", T_CONTROLS, controls_doc(LOOSER, NOW - 6), "replay"),
    ("replayed control", T_CONTROLS,
     controls_doc([control("c1", NOW - 10, 3600, NOW - 30, export_w=9000)], NOW), "replay"),
    ("other site document", T_CONTROLS,
     controls_doc([control("c1", NOW - 10, 3600, NOW - 1, site="home-2", export_w=9000)], NOW,
                  site="home-2"), "site"),
    ("other site control", T_CONTROLS,
     controls_doc([control("x1", NOW - 10, 3600, NOW - 1, site="home-2", export_w=9000)], NOW),
     "site"),
    ("negative", T_CONTROLS,
     controls_doc([control("c2", NOW - 10, 3600, NOW - 1, export_w=-5)], NOW), "negative"),
    ("absurd", T_CONTROLS,
     controls_doc([control("c2", NOW - 10, 3600, NOW - 1, export_w=5e9)], NOW), "absurd"),
    ("expired", T_CONTROLS,
     controls_doc([control("c2", NOW - 7200, 3600, NOW - 1, export_w=5)], NOW), "expired"),
    ("zero duration", T_CONTROLS,
     controls_doc([control("c2", NOW, 0, NOW - 1, export_w=5)], NOW), "duration"),
    ("created in the future", T_CONTROLS,
     controls_doc([control("c1", NOW - 10, 3600, NOW + 86400, export_w=9000)], NOW), "created"),
    ("unknown field (kW typo)", T_CONTROLS,
     controls_doc([{**control("c1", NOW - 10, 3600, NOW - 1), "export_kw": 1.0}], NOW),
     "unknown_field"),
    ("string limit", T_CONTROLS,
     controls_doc([{**control("c1", NOW - 10, 3600, NOW - 1), "export_w": "9000"}], NOW),
     "type"),
    ("no limit", T_CONTROLS, controls_doc([control("c2", NOW, 60, NOW - 1)], NOW), "no_limit"),
    ("controls not a list", T_CONTROLS,
     json.dumps({"x": 1}).encode(), "signature"),
    ("replayed default", T_DEFAULT,
     default_doc(default("d1", NOW - 200, export_w=9000), NOW), "replay"),
    ("default wrong key", T_DEFAULT,
     default_doc(default("d2", NOW, export_w=9000), NOW, key=OTHER_KEY), "signature"),
])
def test_hostile_or_bad_envelopes_are_rejected_and_never_loosen(
        name: str, topic: str, payload: bytes, code: str) -> None:
    a = held_agent()
    before = a.limits_at(NOW, True).limits
    a.on_message(topic, payload, NOW)
    assert a.stats.rejected.get(code) == 1, (name, a.stats.rejected)
    after = a.limits_at(NOW, True).limits
    assert after == before, name
    # ... and later too: the default must still be the DSO's, not a forged one
    assert export_now(a, NOW + 4000) == 4000.0
    rej = [x for x in acks(a) if x["status"] == "rejected"]
    assert len(rej) == 1 and rej[0]["reason"].startswith(code)
    assert validate_payload("dso_ack", rej[0]) == []


def test_one_bad_control_does_not_cost_the_good_ones_of_a_signed_document() -> None:
    a = held_agent()
    a.on_message(T_CONTROLS, controls_doc([
        control("bad", NOW, 60, NOW - 1, export_w=-1),
        control("c9", NOW - 1, 600, NOW - 1, export_w=300)], NOW), NOW)
    assert a.stats.rejected == {"negative": 1}
    assert export_now(a) == 300.0


def test_retained_redelivery_is_a_silent_duplicate() -> None:
    a = make_agent()
    doc = controls_doc([control("c1", NOW - 10, 3600, NOW - 20, export_w=1000)], NOW - 5)
    a.on_message(T_CONTROLS, doc, NOW)
    acks(a)
    for _ in range(3):
        a.on_message(T_CONTROLS, doc, NOW + 1)
    assert acks(a) == [] and not a.stats.rejected and a.stats.duplicates == 3


def test_flood_is_rate_limited_then_retained_documents_are_re_read() -> None:
    clock = [0.0]
    a = make_agent(burst=5, flood_per_min=60, monotonic=lambda: clock[0])
    junk = controls_doc(LOOSER, NOW, key=OTHER_KEY)
    for _ in range(50):
        a.on_message(T_CONTROLS, junk, NOW)
    assert a.stats.rejected == {"signature": 5}
    assert a.stats.rate_limited == 45
    assert len(acks(a)) == 5  # no ack amplification
    assert not a.resubscribe_due()  # bucket still empty
    clock[0] += 10.0
    assert a.resubscribe_due() and not a.resubscribe_due()
    # the DSO's genuine document still gets through afterwards
    a.on_message(T_CONTROLS, controls_doc(
        [control("c1", NOW - 10, 3600, NOW - 20, export_w=700)], NOW), NOW)
    assert export_now(a) == 700.0


def test_snapshot_restore_resumes_limits_and_replay_protection() -> None:
    a = held_agent()
    b = make_agent()
    b.restore(a.snapshot(), NOW + 1)
    assert b.limits_at(NOW + 1, True).limits == a.limits_at(NOW + 1, True).limits
    assert export_now(b, NOW + 1) == 1000.0
    # the old document replayed after the restart is refused
    b.on_message(T_CONTROLS, controls_doc(LOOSER, NOW - 6), NOW + 2)
    assert b.stats.rejected == {"replay": 1}
    # a corrupt snapshot is refused: the fallback applies (never looser than nothing)
    c = make_agent()
    assert not c.restore('{"format": 1, "schedule": "{]"}', NOW)
    assert export_now(c) == 1500.0


def test_contact_loss_keeps_control_then_default_then_fallback() -> None:
    a = make_agent(fallback=Limits(export_w=2000.0), contact_timeout_s=600.0)
    a.on_message(T_DEFAULT, default_doc(default("d", NOW - 10, export_w=3000), NOW - 1), NOW)
    a.on_message(T_CONTROLS, controls_doc(
        [control("c", NOW - 10, 310, NOW - 5, export_w=1200)], NOW), NOW)
    seq = []
    for dt in range(0, 900, 10):  # contact lost at NOW (no connected cycles after)
        lim = a.limits_at(NOW + dt, connected=(dt == 0))
        assert a.target is not None
        seq.append((dt, a.target.source, lim.limits.export_w))
    assert [s for s in seq if s[0] < 300] == [(d, "control", 1200.0) for d in range(0, 300, 10)]
    assert all(s[1:] == ("default", 3000.0) for s in seq if 300 <= s[0] <= 600)
    assert all(s[1:] == ("fallback", 2000.0) for s in seq if s[0] > 600)


def _state(t: float, site_w: float, pv_w: float, soc: float = 100.0) -> SiteState:
    return SiteState(
        t, MeterReading(t, site_w, (None, None, None), None, None),
        InverterReading(t, pv_w, None, 5000.0, 5000.0, 100.0, False, None, None),
        BatteryReading(t, 0.0, soc, 10000.0, 5000.0, 5000.0, 10.0, 0, None, None, None))


def test_contact_return_ramps_up_at_16_pct_per_min_and_status_validates() -> None:
    a = make_agent(fallback=Limits(export_w=1000.0), contact_timeout_s=60.0)
    a.on_message(T_DEFAULT, default_doc(default("d", NOW - 10, export_w=5000), NOW - 1), NOW)
    t = NOW
    effs = []
    for k in range(200):  # 100 s disconnected, then connected again
        t = NOW + k
        a.step(_state(t, -900.0, 1500.0), Commanded(0.0), connected=(k == 0 or k >= 100))
        assert a.active is not None and a.active.limits.export_w is not None
        effs.append(a.active.limits.export_w)
    assert a.target is not None and a.active is not None
    assert effs[90] == 1000.0 and a.target.limits.export_w == 5000.0
    # rating = 5000 inverter + 5000 battery: 16 %/min = 1600 W/min = 26.7 W/s
    steps = [b - c for c, b in itertools.pairwise(effs[100:])]
    assert max(steps) <= 10000 * 0.16 / 60 + 1e-6 and min(steps) >= 0
    assert effs[-1] < 5000.0 and a.active.ramping
    status = json.loads(a.status_payload(t) or b"")
    assert messages.validate("envelope_status", status) == []
    assert status["limits"]["export_w"] == 5000.0 and status["effective"]["export_w"] < 5000


def test_step_curtails_pv_and_never_writes_zero_percent() -> None:
    a = make_agent(fallback=Limits(export_w=0.0))
    out = a.step(_state(NOW, -3000.0, 3500.0, soc=100.0), None, connected=True)
    assert out.inverter_limit_pct is not None and out.inverter_limit_pct >= 2.0
    assert out.inverter_limit_pct < 100.0


# ---------------------------------------------------------------- property


_IDS = ["c1", "c2", "c3"]


@st.composite
def _valid(draw: Any, i: int) -> tuple[str, bytes]:
    issued = NOW - 1000 + i  # strictly increasing per generated message
    if draw(st.booleans()):
        items = []
        for _ in range(draw(st.integers(0, 3))):
            lim = draw(st.sampled_from(["export_w", "import_w"]))
            limits: dict[str, Any] = {lim: float(draw(st.integers(0, 8000)))}
            items.append(control(draw(st.sampled_from(_IDS)),
                                 NOW + draw(st.integers(-600, 600)), draw(st.integers(1, 1200)),
                                 NOW - 900 + draw(st.integers(0, 800)), **limits))
        return T_CONTROLS, controls_doc(items, issued)
    return T_DEFAULT, default_doc(default("d", NOW - 900 + draw(st.integers(0, 800)),
                                          export_w=float(draw(st.integers(0, 8000)))), issued)


@st.composite
def _hostile(draw: Any, sent: list[bytes]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["unsigned", "wrong_key", "tamper", "replay", "junk", "site"]))
    topic = draw(st.sampled_from([T_CONTROLS, T_DEFAULT]))
    looser = [control(draw(st.sampled_from(_IDS)), NOW - 600, 2000, NOW + 200,
                      export_w=50000.0, import_w=50000.0)]
    if kind == "unsigned":
        return topic, controls_doc(looser, NOW + 10_000, key=None)
    if kind == "wrong_key":
        return topic, (controls_doc(looser, NOW + 10_000, key=OTHER_KEY) if topic == T_CONTROLS
                       else default_doc(default("d", NOW, export_w=50000), NOW + 10_000,
                                        key=OTHER_KEY))
    if kind == "tamper":
        return T_CONTROLS, _tamper(controls_doc(looser, NOW + 10_000))
    if kind == "replay" and sent:
        return T_CONTROLS, draw(st.sampled_from(sent))
    if kind == "site":
        return T_CONTROLS, controls_doc([control("c1", NOW - 600, 2000, NOW, site="home-2",
                                                 export_w=50000)], NOW + 10_000, site="home-2")
    return topic, draw(st.binary(max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_hostile_messages_never_loosen_what_valid_messages_imply(data: Any) -> None:
    everything = make_agent(fallback=Limits(export_w=1500.0))
    valid_only = make_agent(fallback=Limits(export_w=1500.0))
    sent: list[bytes] = []
    n = data.draw(st.integers(1, 25))
    for i in range(n):
        if data.draw(st.booleans()):
            topic, payload = data.draw(_valid(i))
            valid_only.on_message(topic, payload, NOW)
            everything.on_message(topic, payload, NOW)
            if topic == T_CONTROLS:
                sent.append(payload)
        else:
            topic, payload = data.draw(_hostile(sent))
            everything.on_message(topic, payload, NOW)
    for dt in (-300, 0, 1, 59, 300, 599, 900, 1900):
        got = everything.limits_at(NOW + dt, True).limits
        want = valid_only.limits_at(NOW + dt, True).limits
        for name in ("export_w", "import_w"):
            g, w = got.get(name), want.get(name)
            # never looser: unlimited only if valid messages leave it unlimited, else <= it
            assert w is None or (g is not None and g <= w), (dt, name, g, w)
        assert got == want  # in fact hostile messages change nothing at all


def test_a_tightening_applies_lead_s_before_its_start_a_loosening_does_not() -> None:
    """Compliant *at* the start of a control: a cycle and the inverter's response must already
    be behind us when it begins. Its end (a loosening) is not anticipated."""
    a = make_agent()  # lead_s = 10 domain s
    a.on_message(T_DEFAULT, default_doc(default("d1", NOW - 100, export_w=4000), NOW - 50), NOW)
    a.on_message(T_CONTROLS, controls_doc(
        [control("c1", NOW + 60, 120, NOW - 1, export_w=0)], NOW), NOW)
    assert export_now(a, NOW + 45) == 4000.0  # 15 s before: not yet
    assert export_now(a, NOW + 52) == 0.0  # 8 s before: tightened already
    assert a.target is not None and a.target.source == "default"  # the DSO's view unchanged
    assert all(x["status"] != "started" for x in acks(a) if x["control_id"] == "c1")
    assert export_now(a, NOW + 60) == 0.0
    assert export_now(a, NOW + 175) == 0.0  # 5 s before the end: still held
    assert export_now(a, NOW + 180) == 4000.0


def test_a_loop_seen_to_stall_anticipates_a_tightening_by_twice_the_stall() -> None:
    """A cycle gap of 40 s (the loop stalled) stretches the anticipation to 80 s: the next
    stall may land on the step. Regular 1 s cycles keep it at lead_s; it is capped."""
    a = make_agent()  # lead_s = 10 domain s
    a.on_message(T_DEFAULT, default_doc(default("d1", NOW - 100, export_w=4000), NOW - 50), NOW)
    a.on_message(T_CONTROLS, controls_doc(
        [control("c1", NOW + 300, 120, NOW - 1, export_w=0)], NOW), NOW)
    for k in range(5):  # regular cycles: the plain lead
        out = a.step(_state(NOW + k, -1000.0, 3000.0), None, connected=True)
    assert a.lead_s() == 10.0 and out.inverter_limit_pct == 100.0  # not curtailed yet
    a.step(_state(NOW + 44, -1000.0, 3000.0), None, connected=True)  # a 40 s stall
    assert a.lead_s() == 80.0
    assert export_now(a, NOW + 210) == 4000.0  # 90 s before the start: not yet
    assert export_now(a, NOW + 230) == 0.0  # 70 s before: tightened already
    assert a.stats.max_lead_s == 80.0
    a.step(_state(NOW + 2000, -1000.0, 3000.0), None, connected=True)  # a clock jump
    assert a.lead_s() == a.settings.lead_max_s
    # a window of regular cycles later the stalls are forgotten: the plain lead again
    t = NOW + 2000
    for k in range(1, a.settings.lead_window + 1):
        a.step(_state(t + k, -1000.0, 3000.0), None, connected=True)
        if k == a.settings.lead_window - 1:
            assert a.lead_s() == a.settings.lead_max_s  # the jump is still in the window
    assert a.lead_s() == 10.0


def _curtailed(t: float, site_w: float, pv_w: float, pct: float) -> SiteState:
    return SiteState(
        t, MeterReading(t, site_w, (None, None, None), None, None),
        InverterReading(t, pv_w, None, 5000.0, 5000.0, pct, True, None, None), None)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_repeated_meter_reading_never_raises_the_pv_limit(frozen: bool) -> None:
    """A meter stuck just inside the export limit shows room that is not there: the PV limit
    must not wind up on it (only a reading that changed is evidence)."""
    a = make_agent(fallback=Limits(export_w=500.0))
    pct = 20.0
    first: float | None = None
    for k in range(10):
        site = -445.0 if frozen else -445.0 + 0.5 * (k % 2)
        out = a.step(_curtailed(NOW + k, site, 50.0 * pct, pct), None, connected=True)
        assert out.inverter_limit_pct is not None
        first = out.inverter_limit_pct if first is None else first
        pct = out.inverter_limit_pct
    assert first is not None
    if frozen:
        assert pct == first and a.stats.repeated_meter_holds == 9
    else:
        assert pct > first and a.stats.repeated_meter_holds == 0
