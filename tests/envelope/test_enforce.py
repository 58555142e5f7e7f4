"""Fast-loop enforcement: hand-checked cases, and hypothesis properties against an oracle."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drivers.natures import BatteryReading, InverterReading
from gateway.enforce import (
    EnforceConfig,
    EnforceInputError,
    Setpoints,
    battery_range,
    enforce,
    is_clipped,
)
from gateway.envelope import Limits

CFG = EnforceConfig()
INF = math.inf


def inv(
    ac_w: float, max_w: float = 8000.0, limit_pct: float | None = None, enabled: bool = False
) -> InverterReading:
    return InverterReading(
        ts=0.0,
        ac_w=ac_w,
        dc_w=None,
        rated_w=max_w,
        max_w=max_w,
        limit_pct=limit_pct,
        limit_enabled=enabled,
        limit_revert_s=None,
        energy_wh=None,
    )


def bat(
    w: float = 0.0,
    soc: float = 50.0,
    charge: float = 3000.0,
    discharge: float = 3000.0,
    reserve: float | None = 10.0,
) -> BatteryReading:
    return BatteryReading(
        ts=0.0,
        w=w,
        soc_pct=soc,
        capacity_wh=10000.0,
        max_charge_w=charge,
        max_discharge_w=discharge,
        reserve_pct=reserve,
        ctl_mode=0,
        in_rate_pct=None,
        out_rate_pct=None,
        revert_s=None,
    )


def site_of(load: float, pv: float, battery_w: float) -> float:
    return load - pv + battery_w


# --- hand-checked cases ------------------------------------------------------------------------


def test_export_limit_curtails_pv_without_battery() -> None:
    # load 1 kW, PV 6 kW, export limit 1.5 kW -> PV target = load + export limit = 2.5 kW.
    sp = enforce(site_of(1000, 6000, 0), inv(6000), None, Limits(export_w=1500))
    assert sp.battery_w is None
    assert sp.inverter_limit_pct == pytest.approx(2500 / 8000 * 100)
    assert sp.predicted_site_w == pytest.approx(-1500)
    assert sp.compliant and "curtailed" in sp.reason
    assert sp.load_w == pytest.approx(1000)
    assert sp.exceedance_w == pytest.approx(3500)  # measured: exporting 5 kW against 1.5 kW


def test_battery_absorbs_before_pv_is_curtailed() -> None:
    # Surplus over the limit 3.5 kW; the battery takes 3 kW (its rating), PV is cut by 0.5 kW.
    sp = enforce(site_of(1000, 6000, 0), inv(6000), bat(), Limits(export_w=1500))
    assert sp.battery_w == pytest.approx(3000)
    assert sp.inverter_limit_pct == pytest.approx(5500 / 8000 * 100)
    assert sp.predicted_site_w == pytest.approx(-1500)
    assert sp.compliant


def test_battery_alone_suffices_no_curtailment() -> None:
    sp = enforce(
        site_of(1000, 4000, 0), inv(4000), bat(), Limits(export_w=1500), desired_battery_w=0
    )
    assert sp.battery_w == pytest.approx(1500)  # plan said 0, the limit needs 1.5 kW of charge
    assert sp.inverter_limit_pct == pytest.approx(100 * (1000 + 1500 + 1500) / 8000)
    assert sp.predicted_site_w == pytest.approx(-1500)
    assert sp.compliant


def test_self_consumption_rule_without_plan() -> None:
    sp = enforce(site_of(500, 2000, 0), inv(2000), bat(), Limits())
    assert sp.battery_w == pytest.approx(1500)
    assert sp.inverter_limit_pct == 100.0
    assert sp.predicted_site_w == pytest.approx(0)


def test_full_battery_cannot_charge() -> None:
    sp = enforce(site_of(500, 2000, 0), inv(2000), bat(soc=100), Limits(export_w=0))
    assert sp.battery_w == 0.0
    assert sp.inverter_limit_pct == pytest.approx(500 / 8000 * 100)


def test_import_limit_discharges_battery_then_reports_uncontrollable_load() -> None:
    # The plan wants the battery idle; the import limit needs 2 kW of discharge.
    sp = enforce(site_of(6000, 0, 0), inv(0), bat(), Limits(import_w=4000), desired_battery_w=0)
    assert sp.battery_w == pytest.approx(-2000)
    assert sp.compliant
    sp = enforce(site_of(9000, 0, 0), inv(0), bat(), Limits(import_w=4000))
    assert sp.battery_w == pytest.approx(-3000)
    assert not sp.compliant
    assert "import" in sp.reason and "load 9000 W" in sp.reason
    assert sp.predicted_site_w == pytest.approx(6000)


def test_battery_at_reserve_cannot_discharge() -> None:
    sp = enforce(site_of(6000, 0, 0), inv(0), bat(soc=10, reserve=10), Limits(import_w=4000))
    assert sp.battery_w == 0.0
    assert not sp.compliant


def test_plan_charging_from_grid_is_cut_by_import_limit() -> None:
    sp = enforce(site_of(1000, 0, 0), inv(0), bat(), Limits(import_w=2500), desired_battery_w=3000)
    assert sp.battery_w == pytest.approx(1500)
    assert sp.predicted_site_w == pytest.approx(2500)
    assert sp.compliant


def test_zero_export_floor_never_writes_zero_and_reports_the_rest() -> None:
    # 0 W export, no load, no battery: PV can only go down to the 2 % floor (160 W of 8 kW).
    sp = enforce(site_of(0, 3000, 0), inv(3000), None, Limits(export_w=0))
    assert sp.inverter_limit_pct == CFG.min_limit_pct
    assert not sp.compliant
    assert "floor" in sp.reason and "export" in sp.reason
    assert sp.predicted_site_w == pytest.approx(-160)


def test_floor_excess_is_absorbed_by_battery() -> None:
    # PV clipped at 1 % (80 W) under a zero-export limit; the 2 % floor lets PV rise to 160 W,
    # so the battery must take 160 W, not the 80 W it would need today.
    reading = inv(80, limit_pct=1, enabled=True)
    sp = enforce(site_of(0, 80, 0), reading, bat(), Limits(export_w=0), desired_battery_w=0)
    assert sp.inverter_limit_pct == CFG.min_limit_pct
    assert sp.battery_w == pytest.approx(160)
    assert sp.predicted_site_min_w == pytest.approx(0)
    assert sp.compliant


def test_generation_limit_cuts_discharge_first_then_pv() -> None:
    sp = enforce(
        site_of(5000, 3000, 0), inv(3000), bat(), Limits(generation_w=2000), desired_battery_w=-1500
    )
    assert sp.battery_w == 0.0
    assert sp.inverter_limit_pct == pytest.approx(2000 / 8000 * 100)
    assert sp.compliant
    sp = enforce(
        site_of(5000, 1000, 0), inv(1000), bat(), Limits(generation_w=2000), desired_battery_w=-1500
    )
    assert sp.battery_w == pytest.approx(-1000)  # PV 1 kW + discharge 1 kW = the limit


def test_load_limit_caps_battery_charging() -> None:
    sp = enforce(site_of(0, 0, 0), inv(0), bat(), Limits(load_w=1000), desired_battery_w=3000)
    assert sp.battery_w == pytest.approx(1000)


def test_loosening_is_bounded_tightening_is_immediate() -> None:
    prev = Setpoints(10.0, None, 0, 0, True, "", 0, 0)
    sp = enforce(
        site_of(1000, 800, 0), inv(800, limit_pct=10, enabled=True), None, Limits(), prev=prev
    )
    assert sp.inverter_limit_pct == pytest.approx(30.0)  # 10 % + one 20-point step
    prev = Setpoints(100.0, None, 0, 0, True, "", 0, 0)
    sp = enforce(site_of(0, 8000, 0), inv(8000), None, Limits(export_w=800), prev=prev)
    assert sp.inverter_limit_pct == pytest.approx(10.0)  # straight down in one cycle


def test_lifting_curtailment_for_the_import_limit_is_not_step_bounded() -> None:
    # PV clipped at 10 % (800 W of 8 kW); a 3.5 kW load against a 1 kW import limit needs PV at
    # 2.5 kW = 31.25 %, beyond one 20-point step (30 %): the limit may jump there.
    prev = Setpoints(10.0, None, 0, 0, True, "", 0, 0)
    reading = inv(800, limit_pct=10, enabled=True)
    sp = enforce(site_of(3500, 800, 0), reading, None, Limits(import_w=1000), prev=prev)
    assert sp.inverter_limit_pct == pytest.approx(31.25)
    # Whether that much PV is there is unknown: the prediction keeps PV at 800 W, and says so.
    assert not sp.compliant and "import" in sp.reason
    sp = enforce(site_of(5000, 800, 0), reading, None, Limits(import_w=1000), prev=prev)
    assert sp.inverter_limit_pct == pytest.approx(50.0)  # (5000 - 1000) / 8000, one jump


def test_clipped_pv_may_rise_to_the_new_cap_export_side_predicted_at_the_cap() -> None:
    reading = inv(4000, limit_pct=50, enabled=True)
    assert is_clipped(reading, CFG.tolerance_w)
    sp = enforce(site_of(500, 4000, 0), reading, None, Limits(export_w=5000))
    assert sp.inverter_limit_pct == pytest.approx(5500 / 8000 * 100)
    assert sp.predicted_site_w == pytest.approx(-3500)  # PV stays at 4 kW
    assert sp.predicted_site_min_w == pytest.approx(-5000)  # PV rises to the 5.5 kW cap
    assert sp.compliant


def test_battery_step_is_bounded_unless_a_limit_needs_it() -> None:
    prev = Setpoints(None, 0.0, 0, 0, True, "", 0, 0)
    sp = enforce(site_of(0, 0, 0), None, bat(), Limits(), desired_battery_w=3000, prev=prev)
    assert sp.battery_w == pytest.approx(600)  # 20 % of 3 kW per cycle
    sp = enforce(site_of(4000, 0, 0), None, bat(), Limits(import_w=1000), prev=prev)
    assert sp.battery_w == pytest.approx(-3000)  # the limit jumps past the step bound


def test_non_finite_reading_raises_a_named_error() -> None:
    with pytest.raises(EnforceInputError, match="site_w"):
        enforce(math.nan, inv(0), None, Limits())
    with pytest.raises(EnforceInputError, match=r"inverter\.ac_w"):
        enforce(0, inv(math.inf), None, Limits())
    with pytest.raises(EnforceInputError, match=r"battery\.soc_pct"):
        enforce(0, None, bat(soc=math.nan), Limits())
    with pytest.raises(EnforceInputError, match="max_w"):
        enforce(0, inv(0, max_w=0), None, Limits())


def test_no_devices_reports_import_from_load() -> None:
    sp = enforce(3000, None, None, Limits(import_w=2000))
    assert (sp.inverter_limit_pct, sp.battery_w, sp.compliant) == (None, None, False)


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError, match="min_limit_pct"):
        EnforceConfig(min_limit_pct=0)


# --- properties --------------------------------------------------------------------------------


def pv_band(
    sp: Setpoints, reading: InverterReading | None, cfg: EnforceConfig
) -> tuple[float, float]:
    """The test's own prediction model (module docstring of gateway.enforce)."""
    if reading is None:
        return 0.0, 0.0
    assert sp.inverter_limit_pct is not None
    cap = sp.inverter_limit_pct / 100.0 * reading.max_w
    p_lo = min(reading.ac_w, cap)
    return p_lo, (cap if is_clipped(reading, cfg.tolerance_w) else p_lo)


def feasible(
    load: float,
    reading: InverterReading | None,
    bmin: float,
    bmax: float,
    lim: Limits,
    cfg: EnforceConfig,
    slack: float,
) -> bool:
    """Oracle: is there ANY (battery, inverter cap) within device ranges that keeps the predicted
    site inside the limits shifted by ``slack`` (negative = tighter)? Scans every breakpoint of
    the piecewise-linear constraints plus a grid."""
    E = None if lim.export_w is None else lim.export_w + slack
    I = None if lim.import_w is None else lim.import_w + slack  # noqa: E741
    G = None if lim.generation_w is None else lim.generation_w + slack
    if reading is None:
        p, clipped, caps = 0.0, False, [0.0]
    else:
        p, clipped = reading.ac_w, is_clipped(reading, cfg.tolerance_w)
        lo_c, hi_c = cfg.min_limit_pct / 100 * reading.max_w, reading.max_w
        e, i, g = (x if x is not None else 0.0 for x in (E, I, G))
        consts = [bmin, bmax, 0.0, p - load - e, p - g, i - load + p]
        slopes = [-load - e, -g, i - load]  # terms equal to cap + k
        cands = {lo_c, hi_c, p, g} | {k2 - k1 for k2 in consts for k1 in slopes}
        cands |= {lo_c + (hi_c - lo_c) * j / 100 for j in range(101)}
        caps = [min(max(c, lo_c), hi_c) for c in cands]
    for cap in caps:
        p_lo = min(p, cap)
        p_hi = cap if clipped else p_lo
        if G is not None and max(p_hi, 0.0) > G:
            continue
        lo, hi = bmin, bmax
        if E is not None:
            lo = max(lo, p_hi - load - E)
        if G is not None:
            lo = max(lo, max(p_hi, 0.0) - G)
        if I is not None:
            hi = min(hi, I - load + p_lo)
        if lo <= hi:
            return True
    return False


power = st.floats(0, 15000, allow_nan=False)
opt_limit = st.none() | st.floats(0, 12000, allow_nan=False) | st.sampled_from([0.0, 100.0])


@st.composite
def scenarios(draw: st.DrawFn, inverter: bool = False) -> tuple:
    reading: InverterReading | None = None
    if inverter or draw(st.integers(0, 9)) > 0:  # mostly with an inverter
        max_w = draw(st.floats(500, 12000))
        enabled = draw(st.booleans())
        limit = draw(st.none() | st.floats(0, 100) | st.sampled_from([0.5, 1.0, 2.0, 5.0]))
        ac = draw(st.floats(0, max_w))
        if enabled and limit is not None:
            mode = draw(st.sampled_from(["free", "obeys", "clipped"]))
            if mode == "obeys":
                ac = min(ac, limit / 100 * max_w)
            elif mode == "clipped":  # PV sits at its limit: more may be available
                ac = limit / 100 * max_w
        reading = inv(ac, max_w=max_w, limit_pct=limit, enabled=enabled)
    battery = None
    if draw(st.booleans()):
        battery = bat(
            w=draw(st.floats(-6000, 6000)),
            soc=draw(st.floats(0, 100)),
            charge=draw(st.floats(0, 6000)),
            discharge=draw(st.floats(0, 6000)),
            reserve=draw(st.none() | st.floats(0, 50)),
        )
    # Small loads matter (zero-export at the floor); a slightly negative estimate happens.
    load = draw(st.floats(0, 15000) | st.floats(0, 300) | st.floats(-500, 0))
    pv = reading.ac_w if reading else 0.0
    bw = battery.w if battery else 0.0
    site = site_of(load, pv, bw)
    lim = Limits(draw(opt_limit), draw(opt_limit), draw(opt_limit), draw(opt_limit))
    desired = draw(st.none() | st.floats(-8000, 8000))
    prev = None
    if draw(st.booleans()):
        prev = Setpoints(
            draw(st.none() | st.floats(0, 100)),
            draw(st.none() | st.floats(-6000, 6000)),
            0.0,
            0.0,
            True,
            "",
            0.0,
            0.0,
        )
    cfg = EnforceConfig(
        min_limit_pct=draw(st.sampled_from([1.0, 2.0, 5.0])),
        max_step_pct=draw(st.sampled_from([5.0, 20.0, 100.0])),
        tolerance_w=draw(st.sampled_from([0.0, 50.0, 100.0])),
    )
    return site, reading, battery, lim, desired, prev, cfg


PROP = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(PROP, max_examples=150)
@given(scenarios())
def test_setpoints_respect_ratings_floor_and_der_limits(sc: tuple) -> None:
    site, reading, battery, lim, desired, prev, cfg = sc
    sp = enforce(site, reading, battery, lim, desired, prev, cfg)
    if reading is None:
        assert sp.inverter_limit_pct is None
    else:
        assert sp.inverter_limit_pct is not None
        assert cfg.min_limit_pct <= sp.inverter_limit_pct <= 100.0
    if battery is None:
        assert sp.battery_w is None
    else:
        assert sp.battery_w is not None
        bmin, bmax = battery_range(battery, lim, cfg)
        assert -battery.max_discharge_w <= bmin <= sp.battery_w <= bmax <= battery.max_charge_w
        if lim.load_w is not None:
            assert sp.battery_w <= lim.load_w
        if battery.soc_pct >= cfg.soc_full_pct:
            assert sp.battery_w <= 0
        if battery.soc_pct <= (battery.reserve_pct or 0.0):
            assert sp.battery_w >= 0
        if lim.generation_w is not None:
            # Battery discharge never pushes DER generation over the limit.
            _, p_hi = pv_band(sp, reading, cfg)
            assert max(0.0, -sp.battery_w) <= max(0.0, lim.generation_w - max(p_hi, 0.0)) + 1e-6


FLOOR_CASE = (0.0, inv(80, limit_pct=1, enabled=True), bat(), Limits(export_w=0), 0.0, None, CFG)


@PROP
@given(scenarios())
@example(FLOOR_CASE)
def test_compliance_is_reported_exactly_when_devices_can_comply(sc: tuple) -> None:
    site, reading, battery, lim, desired, prev, cfg = sc
    sp = enforce(site, reading, battery, lim, desired, prev, cfg)
    load = sp.load_w
    bw = sp.battery_w or 0.0
    p_lo, p_hi = pv_band(sp, reading, cfg)
    # The returned prediction is the model's, recomputed independently.
    assert sp.predicted_site_w == pytest.approx(load + bw - p_lo, abs=1e-6)
    assert sp.predicted_site_min_w == pytest.approx(load + bw - p_hi, abs=1e-6)
    inside = (
        (lim.import_w is None or sp.predicted_site_w <= lim.import_w + 1e-3)
        and (lim.export_w is None or sp.predicted_site_min_w >= -lim.export_w - 1e-3)
        and (lim.generation_w is None or max(p_hi, 0) + max(0, -bw) <= lim.generation_w + 1e-3)
    )
    assert sp.compliant == inside, sp.reason
    bmin, bmax = battery_range(battery, lim, cfg)
    if feasible(load, reading, bmin, bmax, lim, cfg, slack=-0.01):
        assert sp.compliant, f"devices could comply but: {sp.reason}"
    if not feasible(load, reading, bmin, bmax, lim, cfg, slack=+0.01):
        assert not sp.compliant
    if not sp.compliant:
        assert sp.reason and "limit" in sp.reason


@settings(PROP, max_examples=150)
@given(scenarios(inverter=True))
def test_inverter_loosening_is_step_bounded(sc: tuple) -> None:
    site, reading, battery, lim, desired, prev, cfg = sc
    lim = replace(lim, import_w=None)  # lifting curtailment for import may jump; tested above
    sp = enforce(site, reading, battery, lim, desired, prev, cfg)
    assert reading is not None and sp.inverter_limit_pct is not None
    if prev is not None and prev.inverter_limit_pct is not None:
        before = prev.inverter_limit_pct
    elif reading.limit_enabled and reading.limit_pct is not None:
        before = reading.limit_pct
    else:
        before = 100.0
    assert sp.inverter_limit_pct <= max(before + cfg.max_step_pct, cfg.min_limit_pct) + 1e-9


@settings(PROP, max_examples=120)
@given(scenarios(inverter=True))
def test_closed_loop_holds_export_on_a_steady_site(sc: tuple) -> None:
    """Feed the setpoints back through a model of the site for 25 cycles (load and available
    PV fixed, devices follow their setpoints): whenever the last cycle reports compliance, the
    site measured after applying it is inside the export limit."""
    site, reading, battery, lim, desired, _, cfg = sc
    assert reading is not None
    load = site + reading.ac_w - (battery.w if battery else 0.0)
    available = reading.ac_w
    r, b, sp = reading, battery, None
    for _ in range(25):
        sp = enforce(site_of(load, r.ac_w, b.w if b else 0.0), r, b, lim, desired, sp, cfg)
        assert sp.inverter_limit_pct is not None
        ac = min(available, sp.inverter_limit_pct / 100 * r.max_w)
        r = replace(r, ac_w=ac, limit_pct=sp.inverter_limit_pct, limit_enabled=True)
        if b is not None:
            b = replace(b, w=sp.battery_w)
    assert sp is not None
    measured = site_of(load, r.ac_w, b.w if b else 0.0)
    if sp.compliant and lim.export_w is not None:
        assert measured >= -lim.export_w - 1e-3
