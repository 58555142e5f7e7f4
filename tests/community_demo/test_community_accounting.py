"""The community demo's accounting: pure functions checked by hand and by properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from community.community_demo import (
    STALL_S,
    CommunityOptions,
    _edges,
    auto_speed,
    award_shortfall_kwh,
    bill,
    fit_only_net_export_kwh,
    home_mix,
    interval_net_export_kwh,
)

FLOOR, CAP = 0.08, 0.30


def test_home_mix_is_heterogeneous_and_deterministic() -> None:
    homes = home_mix(10)
    assert [h.site for h in homes] == [f"home-{i:02d}" for i in range(10)]
    kinds = [h.kind for h in homes]
    assert kinds.count("pv+battery") == 4 and kinds.count("pv") == 3 and kinds.count("none") == 3
    for h in homes:
        assert h.config.has_pv == (h.kind != "none")
        assert h.config.has_battery == (h.kind == "pv+battery")
    assert len({h.config.home_index for h in homes}) == 10  # ten distinct households
    assert len({h.config.pv_kwp for h in homes if h.config.has_pv}) > 1
    assert len({h.config.battery_wh for h in homes if h.config.has_battery}) > 1
    assert home_mix(10) == homes
    assert len({(h.config.home_index, h.config.load_scale) for h in home_mix(50)}) == 50


def test_options_refuse_a_community_of_one_and_bad_intervals() -> None:
    with pytest.raises(ValueError, match="at least 2 homes"):
        CommunityOptions(homes=1)
    with pytest.raises(ValueError, match="interval_s"):
        CommunityOptions(interval_s=700)
    with pytest.raises(ValueError, match="price_floor"):
        CommunityOptions(price_floor=0.4, price_cap=0.3)


def test_auto_speed_slows_down_for_more_homes_and_faster_cycles() -> None:
    for devices in ("tcp", "inproc"):  # (the elastic default is mostly at its stall cap)
        s10 = auto_speed(CommunityOptions(homes=10, devices=devices, elastic=False))
        s50 = auto_speed(CommunityOptions(homes=50, devices=devices, elastic=False))
        s10_slow = auto_speed(CommunityOptions(homes=10, devices=devices, elastic=False,
                                               cycle_s=30.0))
        assert s50 < s10 < s10_slow
        assert s50 >= 20.0 and s10_slow <= 1440.0
    big = auto_speed(CommunityOptions(homes=400, devices="inproc"))
    assert big < auto_speed(CommunityOptions(homes=50, devices="inproc"))


def test_auto_speed_follows_the_cost_model_and_caps_elastic_stalls() -> None:
    rigid = {d: auto_speed(CommunityOptions(homes=40, devices=d, elastic=False))
             for d in ("tcp", "inproc")}
    assert rigid["inproc"] > rigid["tcp"]  # the wire costs CPU
    cvx = auto_speed(CommunityOptions(homes=40, devices="inproc", elastic=False, solver="cvxpy"))
    assert cvx < rigid["inproc"]
    for homes in (2, 10, 50):
        o = CommunityOptions(homes=homes)
        # a stall stays under one cycle; the wire stalls longer than the in-process devices
        assert auto_speed(o) <= o.cycle_s / STALL_S[o.transport] + 5.0  # (rounded to tens)
    assert STALL_S["tcp"] > STALL_S["inproc"]
    assert CommunityOptions(homes=10).transport == "tcp"
    assert CommunityOptions(homes=11).transport == "inproc"
    assert CommunityOptions(homes=50, devices="tcp").transport == "tcp"
    with pytest.raises(ValueError, match="devices"):
        CommunityOptions(devices="serial")
    with pytest.raises(ValueError, match="solver"):
        CommunityOptions(solver="gurobi")


def test_interval_net_export_interpolates_cumulative_counters() -> None:
    t = [0.0, 60.0, 120.0, 180.0]
    imp = [0.0, 10.0, 10.0, 10.0]  # 10 Wh imported in the first minute
    exp = [0.0, 0.0, 30.0, 90.0]  # then exports 30 Wh, 60 Wh
    net = interval_net_export_kwh(t, imp, exp, [0.0, 90.0, 180.0])
    # to t=90: -10 Wh + 15 Wh (half of the second minute's 30) = +5 Wh; rest: 15 + 60 = 75 Wh
    assert net == pytest.approx([0.005, 0.075])


def test_fit_only_curtails_export_to_the_limit_and_keeps_imports() -> None:
    t = [0.0, 3600.0, 7200.0]
    load = [0.0, 1000.0, 1500.0]  # 1 kWh, then 0.5 kWh
    pv = [0.0, 0.0, 4500.0]  # nothing, then 4.5 kWh
    limit = [math.nan, 2000.0, 2000.0]  # 2 kW export limit in the second hour
    net = fit_only_net_export_kwh(t, load, pv, limit, [0.0, 3600.0, 7200.0])
    assert net == pytest.approx([-1.0, 2.0])  # 4.0 kWh surplus curtailed to 2 kWh
    no_limit = fit_only_net_export_kwh(t, load, pv, [math.nan] * 3, [0.0, 3600.0, 7200.0])
    assert no_limit == pytest.approx([-1.0, 4.0])


def test_bill_prices_the_retailer_and_awards_by_hand() -> None:
    # import 1 kWh at retail, export 2 kWh at feed-in: 0.30 - 0.16
    assert bill([-1.0, 2.0], FLOOR, CAP) == pytest.approx(0.30 - 0.16)
    # sold 1.5 kWh at 0.20 in the second interval, exported 2: 1.5*0.2 + 0.5*0.08 credited
    assert bill([-1.0, 2.0], FLOOR, CAP, [None, (1.5, 0.30)]) == pytest.approx(
        0.30 - 0.30 - 0.04)
    # bought 1 kWh at 0.20, imported 1.2: pays 0.20 + 0.2 kWh at retail
    assert bill([-1.2], FLOOR, CAP, [(-1.0, -0.20)]) == pytest.approx(0.20 + 0.06)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=8),
       st.lists(st.tuples(st.floats(-3, 3), st.floats(FLOOR, CAP)), min_size=8, max_size=8))
def test_awards_honoured_in_their_direction_never_cost_more(net: list[float],
                                                            aw: list[tuple[float, float]]) -> None:
    """A home whose metered exchange goes beyond its award in the award's direction (a seller
    exports at least what it sold, a buyer imports at least what it bought) pays no more than
    with the retailer alone (award prices lie between feed-in and retail)."""
    awards: list[tuple[float, float] | None] = []
    for m, (a, p) in zip(net, aw, strict=False):
        if a > 0:
            a = min(a, max(m, 0.0))  # a seller exports at least what it sold
        elif a < 0:
            a = max(a, min(m, 0.0))  # a buyer imports at least what it bought
        awards.append((a, a * p) if a else None)
    assert bill(net, FLOOR, CAP, awards) <= bill(net, FLOOR, CAP) + 1e-9


def test_award_shortfall_counts_only_what_an_award_missed_in_its_direction() -> None:
    net = [1.5, 0.2, -0.3, -2.0, 0.7, -0.4]  # kWh per interval, + exported
    awards = [(0.5, 0.06),   # sold 0.5, exported 1.5: the rest is no shortfall
              (0.5, 0.06),   # sold 0.5, exported 0.2: 0.3 short
              (0.4, 0.05),   # sold 0.4, imported 0.3: 0.7 short
              (-1.0, -0.2),  # bought 1.0, imported 2.0: none
              (-0.5, -0.1),  # bought 0.5, exported 0.7: 1.2 short
              None]          # no award: nothing to miss
    assert award_shortfall_kwh(net, awards) == pytest.approx(0.3 + 0.7 + 1.2)
    assert award_shortfall_kwh(net, [None] * len(net)) == 0.0
    with pytest.raises(ValueError):
        award_shortfall_kwh(net, awards[:-1])  # one award per interval


def test_edges_cover_the_day_on_interval_boundaries() -> None:
    e = _edges(1000.0, 1000.0 + 3 * 900.0, 900)
    assert e[0] == 1000.0 and e[-1] == 1000.0 + 2700.0
    assert all(x % 900 == 0 for x in e[1:-1])
    assert np.all(np.diff(e) > 0)


def test_the_dso_constrains_only_what_a_home_can_control() -> None:
    from community.community_demo import site_day

    day0 = 1_782_000_000.0 - 1_782_000_000.0 % 86400
    noon, evening = day0 + 12 * 3600, day0 + 18.5 * 3600
    none = site_day("h0", "none", day0)
    pv = site_day("h1", "pv", day0)
    bat = site_day("h2", "pv+battery", day0)
    assert none.limits_at(noon).export_w == 5000.0 and none.limits_at(evening).import_w is None
    assert pv.limits_at(noon).export_w == 1500.0 and pv.limits_at(evening).import_w is None
    assert bat.limits_at(noon).export_w == 1500.0 and bat.limits_at(evening).import_w == 2500.0
