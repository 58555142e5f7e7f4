"""Envelope model: validation, supersede/replay/expiry, default and fallback, contact loss,
persistence, ramp."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.envelope import (
    LIMIT_NAMES,
    ActiveLimits,
    Control,
    DefaultControl,
    EnvelopeConfig,
    EnvelopeRejected,
    LimitRamp,
    Limits,
    Schedule,
    parse_control,
    parse_default,
    ramp_limit,
    ramp_limits,
)

SITE = "home-1"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
H = 3600.0


def body(**over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "id": "c1",
        "site": SITE,
        "created": NOW - 60,
        "start": NOW,
        "duration_s": H,
        "export_w": 5000.0,
    }
    b.update(over)
    return {k: v for k, v in b.items() if v is not ...}


def ctl(cid: str, created: float, start: float, dur: float = H, **limits: float) -> Control:
    return Control(id=cid, site=SITE, created=created, start=start, duration_s=dur, **limits)


def dflt(created: float = NOW - 100, cid: str = "d1", **limits: float) -> DefaultControl:
    return DefaultControl(id=cid, site=SITE, created=created, **limits)


# --- validation --------------------------------------------------------------------------------


def test_valid_control_parses_and_round_trips() -> None:
    c = parse_control(body(import_w=3000, generation_w=None), SITE, NOW)
    assert c == ctl("c1", NOW - 60, NOW, export_w=5000.0, import_w=3000.0)
    assert parse_control(c.to_dict(), SITE, NOW) == c
    assert c.end == NOW + H and c.covers(NOW) and not c.covers(NOW + H)


BAD: list[tuple[str, object, str, str]] = [
    ("not an object", [1, 2], "type", "JSON object"),
    ("typo in a limit name", body(export_kw=5), "unknown_field", "export_kw"),
    ("missing id", body(id=...), "missing", "'id'"),
    ("empty id", body(id=""), "id", "1-64"),
    ("id with a slash", body(id="a/b"), "id", "1-64"),
    ("id too long", body(id="x" * 65), "id", "1-64"),
    ("id not a string", body(id=7), "type", "'id' must be a string"),
    ("other site", body(site="home-2"), "site", "home-2"),
    ("missing site", body(site=...), "missing", "'site'"),
    ("created missing", body(created=...), "missing", "'created'"),
    ("created string", body(created="2026-01-01"), "type", "'created' must be a number"),
    ("created NaN", body(created=math.nan), "non_finite", "'created'"),
    ("created in the future", body(created=NOW + 3600), "created", "in the future"),
    ("created zero", body(created=0), "created", "positive"),
    ("start infinite", body(start=math.inf), "non_finite", "'start'"),
    ("start missing", body(start=...), "missing", "'start'"),
    ("start far future", body(start=NOW + 400 * 86400), "start", "future"),
    ("start far past", body(start=NOW - 400 * 86400, duration_s=300 * 86400), "start", "past"),
    ("duration zero", body(duration_s=0), "duration", "> 0"),
    ("duration negative", body(duration_s=-5), "duration", "> 0"),
    ("duration over a year", body(duration_s=367 * 86400), "duration", "maximum"),
    ("duration bool", body(duration_s=True), "type", "'duration_s' must be a number"),
    ("already ended", body(start=NOW - 2 * H), "expired", "ended"),
    ("negative limit", body(export_w=-1), "negative", "export_w"),
    ("absurd limit", body(import_w=2e6), "absurd", "import_w"),
    ("huge integer", body(export_w=10**400), "absurd", "too large"),
    ("limit as string", body(export_w="5000"), "type", "export_w"),
    ("limit NaN", body(export_w=math.nan), "non_finite", "export_w"),
    ("limit -inf", body(generation_w=-math.inf), "non_finite", "generation_w"),
    ("limit bool", body(load_w=False), "type", "load_w"),
    ("no limit at all", body(export_w=None), "no_limit", "sets none"),
]


@pytest.mark.parametrize(("case", "obj", "code", "words"), BAD, ids=[b[0] for b in BAD])
def test_parse_control_rejects_each_bad_input_class(
    case: str, obj: object, code: str, words: str
) -> None:
    with pytest.raises(EnvelopeRejected) as err:
        parse_control(obj, SITE, NOW)
    assert err.value.code == code, err.value.reason
    assert words in err.value.reason


def test_nan_from_the_wire_is_rejected() -> None:
    obj = json.loads(json.dumps(body()).replace("5000.0", "NaN"))
    with pytest.raises(EnvelopeRejected, match="non_finite"):
        parse_control(obj, SITE, NOW)


def test_absurd_bound_is_configurable() -> None:
    cfg = EnvelopeConfig(max_limit_w=50_000)
    with pytest.raises(EnvelopeRejected, match="absurd"):
        parse_control(body(export_w=60_000), SITE, NOW, cfg)
    assert parse_control(body(export_w=60_000), SITE, NOW).export_w == 60_000


def test_parse_default() -> None:
    d = parse_default({"id": "d", "site": SITE, "created": NOW, "export_w": 1500}, SITE, NOW)
    assert d == dflt(NOW, "d", export_w=1500.0)
    with pytest.raises(EnvelopeRejected) as err:
        parse_default({"id": "d", "site": SITE, "created": NOW, "start": NOW}, SITE, NOW)
    assert err.value.code == "unknown_field"


limit_value = st.none() | st.floats(0, 1_000_000)


@given(
    created=st.floats(1, NOW + 300),
    start=st.floats(NOW - 300 * 86400, NOW + 366 * 86400),
    dur=st.floats(1, 366 * 86400),
    lims=st.tuples(limit_value, limit_value, limit_value, limit_value),
)
def test_any_valid_control_is_accepted_unchanged(
    created: float, start: float, dur: float, lims: tuple[float | None, ...]
) -> None:
    obj = {"id": "x", "site": SITE, "created": created, "start": start, "duration_s": dur}
    obj.update(zip(LIMIT_NAMES, lims, strict=True))
    should_fail = start + dur <= NOW or all(v is None for v in lims)
    if should_fail:
        with pytest.raises(EnvelopeRejected):
            parse_control(obj, SITE, NOW)
    else:
        c = parse_control(obj, SITE, NOW)
        assert c.to_dict() == obj


# --- schedule: supersede, replay, expiry -------------------------------------------------------


def test_newer_overlapping_control_supersedes_the_older_for_its_whole_window() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, 2 * H, export_w=5000))
    s.add(ctl("b", NOW - 50, NOW + H, H, export_w=1500))  # overlaps a's second hour
    # a is superseded entirely (2030.5), not trimmed: its first hour falls to the fallback.
    assert s.superseded("a") == {"export_w"}
    assert s.active(NOW).limits.export_w == 1500.0  # the fallback (default config)
    assert s.active(NOW).source == "fallback"
    at = s.active(NOW + H + 1)
    assert (at.limits.export_w, at.sources[0], at.origins[0]) == (1500.0, "control", "b")


def test_older_control_arriving_late_is_superseded_on_arrival() -> None:
    s = Schedule(SITE)
    s.add(ctl("new", NOW - 50, NOW, H, export_w=2000))
    assert s.add(ctl("old", NOW - 100, NOW, H, export_w=9000)) == "added"
    assert s.superseded("old") == {"export_w"}
    assert s.active(NOW + 1).limits.export_w == 2000


def test_supersede_is_per_limit() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=3000, import_w=4000))
    s.add(ctl("b", NOW - 50, NOW, H, export_w=1000))
    act = s.active(NOW + 1)
    assert act.limits == Limits(export_w=1000, import_w=4000)
    assert act.origins[:2] == ("b", "a")
    assert act.control_ids == ("a", "b")
    assert s.governs("a") == {"import_w"}


def test_equal_created_tie_goes_to_the_tighter_limit() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=1000))
    s.add(ctl("b", NOW - 100, NOW, H, export_w=3000))
    assert s.active(NOW).limits.export_w == 1000


def test_replay_rules() -> None:
    s = Schedule(SITE)
    c = ctl("a", NOW - 100, NOW, H, export_w=3000)
    assert s.add(c) == "added"
    assert s.add(c) == "duplicate"  # retained message re-delivered on reconnect
    with pytest.raises(EnvelopeRejected) as err:
        s.add(ctl("a", NOW - 200, NOW, H, export_w=9000))  # older version: replay
    assert err.value.code == "replay"
    with pytest.raises(EnvelopeRejected, match="replay"):
        s.add(ctl("a", NOW - 100, NOW, H, export_w=9000))  # same version, different content
    assert s.active(NOW).limits.export_w == 3000  # nothing changed
    assert s.add(ctl("a", NOW - 10, NOW, H, export_w=2500)) == "updated"
    assert s.active(NOW).limits.export_w == 2500


def test_replay_of_a_superseded_control_is_still_rejected() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=9000))
    s.add(ctl("b", NOW - 50, NOW, H, export_w=1000))
    with pytest.raises(EnvelopeRejected, match="replay"):
        s.add(ctl("a", NOW - 100, NOW, H, export_w=10000))


def test_expiry_then_default_then_fallback() -> None:
    s = Schedule(SITE, EnvelopeConfig(fallback=Limits(export_w=1500)))
    s.add(ctl("a", NOW - 100, NOW, H, export_w=5000))
    assert s.active(NOW + H - 1).source == "control"
    assert s.active(NOW + H).limits.export_w == 1500 and s.active(NOW + H).source == "fallback"
    s.set_default(dflt(export_w=3000, import_w=8000))
    act = s.active(NOW + H)
    assert (act.limits, act.source) == (Limits(export_w=3000, import_w=8000), "default")
    assert s.active(NOW).sources == ("control", "default", "fallback", "fallback")
    assert [c.id for c in s.expire(NOW + H)] == ["a"]
    assert s.controls == ()
    # The replayed control is now refused by validation: it has ended.
    with pytest.raises(EnvelopeRejected, match="expired"):
        parse_control(body(id="a"), SITE, NOW + H)


def test_default_replay_rules() -> None:
    s = Schedule(SITE)
    assert s.set_default(dflt(NOW - 100, export_w=3000)) == "added"
    assert s.set_default(dflt(NOW - 100, export_w=3000)) == "duplicate"
    with pytest.raises(EnvelopeRejected, match="replay"):
        s.set_default(dflt(NOW - 200, "d0", export_w=9000))
    assert s.set_default(dflt(NOW - 50, "d2", export_w=2000)) == "updated"
    assert s.active(NOW).limits.export_w == 2000
    with pytest.raises(EnvelopeRejected, match="site"):
        s.set_default(DefaultControl("d3", "other", NOW, export_w=1))


def test_wrong_site_and_capacity() -> None:
    s = Schedule(SITE, EnvelopeConfig(max_controls=2))
    with pytest.raises(EnvelopeRejected, match="site"):
        s.add(Control("x", "other", NOW, NOW, H, export_w=1))
    s.add(ctl("a", NOW, NOW, H, export_w=1))
    s.add(ctl("b", NOW, NOW + H, H, export_w=1))
    with pytest.raises(EnvelopeRejected) as err:
        s.add(ctl("c", NOW, NOW + 2 * H, H, export_w=1))
    assert err.value.code == "capacity"


def test_next_change_and_in_force() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW, NOW + 100, 50, export_w=1))
    assert s.active(NOW).next_change == NOW + 100
    assert s.active(NOW + 120).next_change == NOW + 150
    assert [c.id for c in s.in_force(NOW + 120)] == ["a"]
    assert s.in_force(NOW) == ()


# --- contact loss ------------------------------------------------------------------------------


def test_contact_loss_pure_csip_aus_keeps_control_then_default_then_fallback() -> None:
    s = Schedule(SITE, EnvelopeConfig(fallback=Limits(export_w=1500)))
    s.mark_contact(NOW)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=5000))
    s.set_default(dflt(export_w=3000))
    # No contact from NOW on: nothing changes because of it.
    assert s.active(NOW + H - 1).limits.export_w == 5000
    assert not s.active(NOW + H - 1).contact_lost
    assert s.active(NOW + H).limits.export_w == 3000
    assert s.active(NOW + 30 * 86400).source == "default"
    s.default = None
    assert s.active(NOW + H).limits.export_w == 1500


def test_contact_timeout_only_tightens() -> None:
    cfg = EnvelopeConfig(fallback=Limits(export_w=1500, import_w=None), contact_timeout_s=600)
    s = Schedule(SITE, cfg)
    s.mark_contact(NOW)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=5000, import_w=2000))
    act = s.active(NOW + 600)
    assert not act.contact_lost and act.limits.export_w == 5000
    assert act.next_change == NOW + 600  # when the timeout would fire
    act = s.active(NOW + 601)
    assert act.contact_lost
    # Export falls to the safer fallback; import keeps the (tighter than unlimited) control.
    assert act.limits == Limits(export_w=1500, import_w=2000)
    assert act.sources[:2] == ("fallback", "control")
    s2 = Schedule(SITE, cfg)
    s2.add(ctl("a", NOW - 100, NOW, H, export_w=500))
    assert s2.active(NOW).contact_lost  # never had contact
    assert s2.active(NOW).limits.export_w == 500  # already tighter than the fallback
    s.mark_contact(NOW + 700)
    assert s.active(NOW + 701).limits.export_w == 5000


controls_st = st.lists(
    st.builds(
        lambda i, created, start, dur, e, imp: ctl(
            f"c{i}", NOW - created, NOW + start, dur, **_lims(e, imp)
        ),
        st.integers(0, 30),
        st.integers(0, 5).map(float),  # few distinct versions: ties happen
        st.integers(-4, 8).map(lambda k: k * 900.0),
        st.integers(1, 8).map(lambda k: k * 900.0),
        st.none() | st.sampled_from([0.0, 1000.0, 2500.0, 5000.0]),
        st.none() | st.sampled_from([2000.0, 6000.0]),
    ),
    max_size=12,
    unique_by=lambda c: c.id,
)


def _lims(e: float | None, imp: float | None) -> dict[str, float]:
    out = {"export_w": e, "import_w": imp}
    if e is None and imp is None:
        out["export_w"] = 3000.0
    return {k: v for k, v in out.items() if v is not None}


def reference(controls: list[Control], name: str, t: float) -> float | None:
    """Order-free statement of rules 1-2: a control governs a limit iff it beats every other
    control that overlaps it and sets the same limit."""

    def beats(a: Control, b: Control) -> bool:
        if a.created != b.created:
            return a.created > b.created
        va, vb = a.limits.get(name), b.limits.get(name)
        assert va is not None and vb is not None
        return va < vb if va != vb else a.id < b.id

    winners = [
        c
        for c in controls
        if c.limits.get(name) is not None
        and c.covers(t)
        and all(
            beats(c, d)
            for d in controls
            if d is not c and d.limits.get(name) is not None and d.overlaps(c)
        )
    ]
    assert len(winners) <= 1
    return winners[0].limits.get(name) if winners else None


@settings(max_examples=100, deadline=None)
@given(
    controls_st,
    st.randoms(use_true_random=False),
    st.integers(-5, 40).map(lambda k: NOW + k * 450.0),
)
def test_schedule_matches_the_order_free_reference_in_any_arrival_order(
    controls: list[Control], rnd: Any, t: float
) -> None:
    cfg = EnvelopeConfig(fallback=Limits())
    order = list(controls)
    rnd.shuffle(order)
    s = Schedule(SITE, cfg)
    for c in order:
        s.add(c)
    act = s.active(t)
    for n in ("export_w", "import_w"):
        assert act.limits.get(n) == reference(controls, n, t)
    # Persistence: a restored schedule resolves identically.
    r = Schedule.from_json(s.to_json(), cfg)
    assert r.active(t) == act
    assert r.to_json() == s.to_json()


@settings(max_examples=100, deadline=None)
@given(
    controls_st,
    st.lists(st.tuples(st.sampled_from(["ask", "ask", "ask", "add", "expire", "default",
                                        "contact", "view"]),
                       st.integers(-6, 44).map(lambda k: NOW + k * 450.0 - 0.5 * (k % 3))),
             min_size=1, max_size=30),
)
def test_cached_resolution_equals_a_fresh_schedule_after_any_changes(
    controls: list[Control], steps: list[tuple[str, float]]
) -> None:
    """``active`` (and ``in_force``, ``expire``) cache per segment between window bounds
    (and the earliest end): interleaving questions with every
    kind of change (controls held and expired, a new default, contact, a view with another
    config), each answer equals a fresh schedule's (restored from the same state, no cache)."""
    cfg = EnvelopeConfig(fallback=Limits(export_w=1500.0), contact_timeout_s=900.0)
    s = Schedule(SITE, cfg)
    pending = list(controls)
    n_default = 0
    for op, t in steps:
        if op == "add" and pending:
            s.add(pending.pop())
        elif op == "expire":
            want = [c.id for c in Schedule.from_json(s.to_json(), cfg).expire(t)]
            assert [c.id for c in s.expire(t)] == want, ("expire", t)
        elif op == "default":
            n_default += 1
            s.set_default(dflt(created=NOW - 100 + n_default, cid=f"d{n_default}",
                               export_w=4000.0 - 500 * (n_default % 4)))
        elif op == "contact":
            s.mark_contact(t)
        elif op == "view":
            import copy
            v = copy.copy(s)
            v.config = EnvelopeConfig(fallback=Limits(export_w=1200.0, import_w=900.0))
            fresh_v = Schedule.from_json(v.to_json(), v.config)
            assert v.active(t) == fresh_v.active(t)
        fresh = Schedule.from_json(s.to_json(), cfg)
        assert s.active(t) == fresh.active(t), (op, t)
        assert s.in_force(t) == tuple(c for c in s.controls
                                      if c.covers(t) and s.governs(c.id)), ("in_force", t)


@settings(max_examples=100, deadline=None)
@given(controls_st, st.integers(-5, 40).map(lambda k: NOW + k * 450.0))
def test_contact_timeout_never_loosens(controls: list[Control], t: float) -> None:
    fb = Limits(export_w=1500, import_w=None)
    live = Schedule(SITE, EnvelopeConfig(fallback=fb))
    lost = Schedule(SITE, EnvelopeConfig(fallback=fb, contact_timeout_s=60))
    for c in controls:
        live.add(c)
        lost.add(c)
    a, b = live.active(t), lost.active(t)
    assert b.contact_lost
    for n in LIMIT_NAMES:
        va, vb = a.limits.get(n), b.limits.get(n)
        if va is not None:
            assert vb is not None and vb <= va


# --- persistence -------------------------------------------------------------------------------


def test_persistence_round_trip_keeps_default_contact_and_supersession() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, 2 * H, export_w=5000))
    s.add(ctl("b", NOW - 50, NOW + H, H, export_w=1500))
    s.set_default(dflt(export_w=3000))
    s.mark_contact(NOW + 5)
    r = Schedule.from_json(s.to_json())
    assert r.default == s.default and r.last_contact == NOW + 5
    assert r.superseded("a") == {"export_w"}
    assert r.controls == s.controls
    # Replay protection survives the restart.
    with pytest.raises(EnvelopeRejected, match="replay"):
        r.add(ctl("b", NOW - 60, NOW + H, H, export_w=9000))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": 99}',
        '{"format": 1, "site": "home-1", "controls": {}}',
        '{"format": 1, "site": "home-1", "controls": [{"id": "a"}]}',
        '{"format": 1, "site": "home-1", "controls": [], "last_contact": "x"}',
    ],
)
def test_corrupt_persisted_schedule_is_refused(text: str) -> None:
    with pytest.raises(EnvelopeRejected):
        Schedule.from_json(text)


def test_persisted_control_with_negative_limit_is_refused() -> None:
    s = Schedule(SITE)
    s.add(ctl("a", NOW - 100, NOW, H, export_w=5000))
    doc = json.loads(s.to_json())
    doc["controls"][0]["export_w"] = -5
    with pytest.raises(EnvelopeRejected, match="negative"):
        Schedule.from_json(json.dumps(doc))


# --- ramp --------------------------------------------------------------------------------------

opt_w = st.none() | st.floats(0, 20000)


@given(
    prev=opt_w,
    target=opt_w,
    dt=st.floats(-10, 600),
    rating=st.floats(0, 20000),
    pct=st.floats(1, 100),
)
def test_ramp_is_monotone_bounded_and_tightens_at_once(
    prev: float | None, target: float | None, dt: float, rating: float, pct: float
) -> None:
    out = ramp_limit(prev, target, dt, rating, pct)
    inf = math.inf
    p, t, o = (inf if x is None else x for x in (prev, target, out))
    if t <= p:
        assert out == target  # tightening (or equal): immediate
    else:
        step = rating * pct / 100 * max(dt, 0) / 60
        assert p <= o <= t  # moves towards the target, never past it
        assert o - p <= step + 1e-9 or (target is None and out is None and p + step >= rating)


def test_ramp_16_percent_per_minute() -> None:
    # 5 kW rating: 800 W per minute; from 1.5 kW to 5 kW takes 4.375 min.
    assert ramp_limit(1500, 5000, 60, 5000) == pytest.approx(2300)
    assert ramp_limit(1500, 5000, 30, 5000) == pytest.approx(1900)
    assert ramp_limit(1500, 1000, 1, 5000) == 1000
    assert ramp_limit(4900, None, 60, 5000) is None  # reached the rating: unlimited
    assert ramp_limit(1500, None, 60, 5000) == pytest.approx(2300)
    assert ramp_limit(None, 1000, 1, 5000) == 1000
    assert ramp_limit(1500, 5000, math.nan, 5000) == 1500


def test_limit_ramp_after_contact_returns() -> None:
    cfg = EnvelopeConfig(fallback=Limits(export_w=1500), contact_timeout_s=600)
    s = Schedule(SITE, cfg)
    s.set_default(dflt(export_w=5000))
    ramp = LimitRamp(rating_w=5000, pct_per_min=cfg.ramp_pct_per_min)
    t = NOW
    eff = ramp.apply(s.active(t), t)
    assert eff.limits.export_w == 1500 and eff.contact_lost  # no contact yet
    s.mark_contact(t + 10)
    seen: list[float] = []
    for k in range(1, 7):
        now = t + 10 + 60 * k
        s.mark_contact(now)
        got: ActiveLimits = ramp.apply(s.active(now), now)
        assert got.limits.export_w is not None
        seen.append(got.limits.export_w)
    assert seen[0] == pytest.approx(1500 + 800 * 70 / 60)
    assert seen == sorted(seen) and seen[-1] == 5000
    assert not got.ramping
    # Tightening is immediate.
    s.add(ctl("z", t, t + 400, H, export_w=0))
    assert ramp.apply(s.active(t + 500), t + 500).limits.export_w == 0


def test_ramp_limits_per_field() -> None:
    prev = Limits(export_w=1000, import_w=5000)
    out = ramp_limits(prev, Limits(export_w=5000, import_w=2000), 60, 5000)
    assert out == Limits(export_w=1800, import_w=2000)
    assert ramp_limits(None, prev, 60, 5000) == prev
