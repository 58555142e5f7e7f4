"""The home model, without sockets: energy balance, SoC, inverter ramp/revert, battery window."""

from __future__ import annotations

import random

import pytest

from firmware_sim.home import (
    HomeConfig,
    HomePhysics,
    StepProfile,
    battery_power,
    battery_window,
    inverter_output,
    next_ramp_tick,
    ramp_pct,
    split_phases,
)

from .conftest import DAY0, NOON, ManualClock, day_profiles, flat_profiles


def make(cfg: HomeConfig, t0: float = DAY0, profiles: tuple[StepProfile, StepProfile] | None = None
         ) -> tuple[HomePhysics, ManualClock]:
    clock = ManualClock(t0)
    load, pv = profiles or day_profiles()
    return HomePhysics(cfg, clock, load=load, pv=pv), clock


# ------------------------------------------------------------------------------ pure functions


def test_ramp_moves_in_ticks_and_ends_on_target() -> None:
    assert ramp_pct(0.0, 0.0, 100, 20, 10) == pytest.approx(92.0)  # first tick at t0
    assert ramp_pct(4.5, 0.0, 100, 20, 10) == pytest.approx(60.0)
    assert ramp_pct(9.99, 0.0, 100, 20, 10) == pytest.approx(20.0)
    assert ramp_pct(50, 0.0, 100, 20, 10) == 20
    assert ramp_pct(0.0, 0.0, 100, 20, 0) == 20  # no ramp: immediate
    assert next_ramp_tick(4.5, 0.0, 10) == 5.0
    assert next_ramp_tick(9.5, 0.0, 10) == float("inf")


def test_battery_window_semantics() -> None:
    # no limits: the physical rates
    assert battery_window(0, 100, 100, 5000, 5000, 4000) == (-4000, 5000)
    # charge limit only (bit 0)
    assert battery_window(1, 20, 100, 5000, 5000, 4000) == (-4000, 1000)
    # discharge limit only (bit 1)
    assert battery_window(2, 100, 30, 5000, 5000, 4000) == (-1500, 5000)
    # hold charging at 40 %: InWRte=40, OutWRte=-40
    lo, hi = battery_window(3, 40, -40, 5000, 5000, 4000)
    assert (lo, hi) == (2000, 2000)
    assert battery_power(-3000, lo, hi, 5000, 4000, True, True) == 2000  # charges from the grid
    # hold discharging at 30 %: InWRte=-30, OutWRte=30
    lo, hi = battery_window(3, -30, 30, 5000, 5000, 4000)
    assert battery_power(2500, lo, hi, 5000, 4000, True, True) == -1500
    # crossing window: the charge side wins
    assert battery_power(0, 3000, 1000, 5000, 4000, True, True) == 1000


def test_battery_power_self_consumption_limits() -> None:
    lo, hi = -4000, 5000
    assert battery_power(1200, lo, hi, 5000, 4000, True, True) == 1200
    assert battery_power(-9000, lo, hi, 5000, 4000, True, True) == -4000
    assert battery_power(9000, lo, hi, 5000, 4000, True, True) == 5000
    assert battery_power(1200, lo, hi, 5000, 4000, False, True) == 0  # full
    assert battery_power(-1200, lo, hi, 5000, 4000, True, False) == 0  # at reserve


def test_inverter_output_and_phases() -> None:
    assert inverter_output(4000, 5000, 100) == 4000
    assert inverter_output(4000, 5000, 50) == 2500
    assert inverter_output(6000, 5000, 100) == 5000
    ph = split_phases(1000, 600, 300, (0.5, 0.3, 0.2))
    assert sum(ph) == pytest.approx(1000 - 600 + 300)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="charge_efficiency"):
        HomeConfig(charge_efficiency=1.5)
    with pytest.raises(ValueError, match="reserve_pct"):
        HomeConfig(reserve_pct=120)
    with pytest.raises(ValueError, match="phase_split"):
        HomeConfig(phase_split=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------- energy balance


def test_site_is_load_minus_pv_plus_battery_at_all_times() -> None:
    ph, clock = make(HomeConfig(battery_wh=6000, soc0_pct=30))
    rng = random.Random(1)
    for _ in range(400):
        clock.t += rng.uniform(1, 900)
        s = ph.state()
        assert s.site_w == pytest.approx(s.load_w - s.pv_w + s.battery_w, abs=1e-9)
        assert ph.site_now() == (s.t, pytest.approx(s.site_w), s.load_w)  # the observer's view
        assert sum(s.phases_w) == pytest.approx(s.site_w, abs=1e-6)
        assert 0 <= s.soc_pct <= 100
        assert s.pv_w <= s.pv_avail_w + 1e-9
        # counters: what crossed the meter = what the home did
        assert s.import_wh - s.export_wh == pytest.approx(
            s.load_wh - s.pv_wh + s.charge_wh - s.discharge_wh, rel=1e-9, abs=1e-6
        )


def test_counters_do_not_depend_on_poll_rate() -> None:
    cfg = HomeConfig(battery_wh=8000, soc0_pct=20)
    fine, cf = make(cfg)
    coarse, cc = make(cfg)
    end = DAY0 + 2 * 86400
    while cf.t < end:
        cf.t = min(end, cf.t + 7.3)
        fine.state()
    rng = random.Random(2)
    while cc.t < end:
        cc.t = min(end, cc.t + rng.uniform(100, 20000))
        coarse.state()
    a, b = fine.state(), coarse.state()
    for name in ("import_wh", "export_wh", "pv_wh", "load_wh", "charge_wh", "discharge_wh",
                 "stored_wh"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9, abs=1e-6), name
    assert a.import_wh > 1000 and a.export_wh > 1000  # the day has both directions
    kwh = fine.totals()
    assert kwh["import"] == pytest.approx(a.import_wh / 1000)
    assert kwh["load"] - kwh["pv"] + kwh["battery_charge"] - kwh["battery_discharge"] == (
        pytest.approx(kwh["import"] - kwh["export"])
    )


def test_probes_see_what_a_state_read_at_their_grid_time_sees() -> None:
    """A probe is called at each grid time as the integration passes it, however coarse the
    reads, with what ``state()`` read at that instant would show; commands in between apply
    from their own instant (the probed twin is commanded at the same times)."""
    cfg = HomeConfig(battery_wh=6000, soc0_pct=40)
    probed, cp = make(cfg, t0=NOON - 3600)
    polled, cq = make(cfg, t0=NOON - 3600)
    seen: list[tuple[float, float, float, float]] = []

    def probe(t: float, flows: tuple[float, float, float, float, float]) -> None:
        s = probed.snapshot(t, flows)
        seen.append((t, s.site_w, s.stored_wh, s.import_wh))

    probed.add_probe(5.0, probe, phase_s=1.25)
    commands = {NOON - 1800.0: (40.0, 1), NOON - 600.0: (100.0, 0)}  # inverter limit, battery
    expected: list[tuple[float, float, float, float]] = []
    rng = random.Random(3)
    t = NOON - 3600 + 1.25
    while t < NOON:
        for when, (pct, mode) in commands.items():
            if t - 5.0 < when <= t:
                for ph, c in ((probed, cp), (polled, cq)):
                    c.t = when
                    ph.command_inverter_limit(pct=pct, enabled=pct < 100)
                    ph.command_storage(mode=mode, in_pct=-50, out_pct=50)
        cq.t = t
        s = polled.state()
        expected.append((t, s.site_w, s.stored_wh, s.import_wh))
        if rng.random() < 0.1:  # the probed home is read now and then, at any time
            cp.t = t + rng.uniform(0, 4)
            probed.state()
        t += 5.0
    cp.t = NOON
    probed.advance()
    assert [x[0] for x in seen] == pytest.approx([x[0] for x in expected], abs=1e-9)
    for got, want in zip(seen, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-6)
    assert len({round(x[1]) for x in seen}) > 3  # the site power did move


def test_probe_step_must_be_positive() -> None:
    ph, _ = make(HomeConfig())
    with pytest.raises(ValueError, match="probe step"):
        ph.add_probe(0.0, lambda t, f: None)


def test_counters_equal_the_profile_integral_without_battery() -> None:
    load, pv = day_profiles()
    ph, clock = make(HomeConfig(battery_wh=0), profiles=(load, pv))
    clock.t = DAY0 + 86400
    s = ph.state()
    site = load.values.astype(float) - pv.values.astype(float)
    assert s.import_wh == pytest.approx(site.clip(0).sum() / 60, rel=1e-9)
    assert s.export_wh == pytest.approx((-site).clip(0).sum() / 60, rel=1e-9)
    assert s.load_wh == pytest.approx(load.values.astype(float).sum() / 60, rel=1e-9)


# ------------------------------------------------------------------------------------ battery


def test_soc_stops_at_full_and_efficiency_applies() -> None:
    cfg = HomeConfig(battery_wh=2000, soc0_pct=50, charge_efficiency=0.9, battery_max_charge_w=3000)
    ph, clock = make(cfg, NOON, flat_profiles(200, 3200))  # 3000 W surplus
    clock.t += 3600
    s = ph.state()
    assert s.soc_pct == pytest.approx(100.0)
    assert s.battery_w == 0  # full: stops charging, surplus exported
    assert s.site_w == pytest.approx(200 - 3200)
    # 1000 Wh stored took 1000 / 0.9 Wh of AC
    assert s.charge_wh == pytest.approx(1000 / 0.9, rel=1e-9)


def test_soc_stops_at_reserve_and_discharge_efficiency_applies() -> None:
    cfg = HomeConfig(battery_wh=2000, soc0_pct=50, reserve_pct=20, discharge_efficiency=0.8)
    ph, clock = make(cfg, NOON, flat_profiles(1500, 0))
    clock.t += 3 * 3600
    s = ph.state()
    assert s.soc_pct == pytest.approx(20.0)
    assert s.battery_w == 0
    assert s.site_w == pytest.approx(1500)
    # 600 Wh left the cells, 600 * 0.8 Wh reached the AC side
    assert s.discharge_wh == pytest.approx(600 * 0.8, rel=1e-9)


# ------------------------------------------------------------------------------------ inverter


def test_wmaxlimpct_ramps_down_then_reverts() -> None:
    cfg = HomeConfig(battery_wh=0, inverter_rated_w=5000)
    ph, clock = make(cfg, NOON, flat_profiles(500, 4000))
    ph.command_inverter_limit(pct=20, enabled=True, revert_s=60, ramp_s=10)
    t0 = clock.t
    s = ph.state()
    assert s.limit_pct == pytest.approx(92)  # first tick
    clock.t = t0 + 4.5
    assert ph.state().pv_w == pytest.approx(3000)  # 60 % of 5000
    clock.t = t0 + 30
    s = ph.state()
    assert s.pv_w == pytest.approx(1000)
    assert ph.inverter.enabled
    # exact energy over the ramp: ticks at 92,84,...,20 % for 1 s each, capped by 4000 W avail
    expected = sum(min(4000, 5000 * (100 - 8 * k) / 100) for k in range(1, 11)) / 3600
    expected += 1000 * 20 / 3600
    assert s.pv_wh == pytest.approx(expected, rel=1e-9)
    clock.t = t0 + 60.5  # revert timer expired at t0 + 60
    s = ph.state()
    assert not ph.inverter.enabled and ph.inverter.pct == 100
    assert s.limit_pct == pytest.approx(28)  # ramping back up: first tick after the revert
    clock.t = t0 + 75
    assert ph.state().pv_w == pytest.approx(4000)


def test_resending_the_limit_restarts_the_revert_timer() -> None:
    ph, clock = make(HomeConfig(battery_wh=0), NOON, flat_profiles(500, 4000))
    ph.command_inverter_limit(pct=50, enabled=True, revert_s=60, ramp_s=0)
    for _ in range(5):
        clock.t += 30  # re-sent at half the revert time: never reverts
        ph.command_inverter_limit(pct=50)
        assert ph.state().pv_w == pytest.approx(2500)
    clock.t += 61
    assert ph.state().pv_w == pytest.approx(4000)


# -------------------------------------------------------------------------------- battery window


def test_window_holds_charge_then_reverts_to_self_consumption() -> None:
    cfg = HomeConfig(battery_wh=10000, soc0_pct=50, battery_max_charge_w=5000)
    ph, clock = make(cfg, NOON, flat_profiles(1000, 0))  # no PV: self-consumption discharges
    assert ph.state().battery_w == pytest.approx(-1000)
    ph.command_storage(mode=3, in_pct=40, out_pct=-40, revert_s=120)
    s = ph.state()
    assert s.battery_w == pytest.approx(2000)  # charging at 40 % of WChaMax, from the grid
    assert s.site_w == pytest.approx(3000)
    clock.t += 119
    assert ph.state().battery_w == pytest.approx(2000)
    clock.t += 2
    s = ph.state()
    assert ph.storage.mode == 0
    assert s.battery_w == pytest.approx(-1000)
    # stored energy: 50 % + 119 s at +2000 W (x0.95) + 1 s at +2000 + 1 s at -1000 W (/0.95)
    exp = 5000 + 120 * 2000 * 0.95 / 3600 - 1 * 1000 / 0.95 / 3600
    assert s.stored_wh == pytest.approx(exp, rel=1e-9)


def test_discharge_side_limit_caps_self_consumption() -> None:
    ph, _ = make(HomeConfig(), NOON, flat_profiles(3000, 0))
    ph.command_storage(mode=2, out_pct=10)  # discharge at most 10 % of 5000 W
    assert ph.state().battery_w == pytest.approx(-500)
    with pytest.raises(ValueError, match="StorCtl_Mod"):
        ph.command_storage(mode=4)
    with pytest.raises(ValueError, match="InWRte"):
        ph.command_storage(in_pct=150)


def test_profile_time_is_utc_day_of_year() -> None:
    values = [float(i) for i in range(365 * 24)]  # hourly, one value per hour of the year
    ph, clock = make(HomeConfig(pv_kwp=0, battery_wh=0), DAY0,
                     (StepProfile(values, 3600), StepProfile([0.0], 86400)))
    # 2024-06-03 is day 155 of the year (0-based 154): hour index 154*24
    assert ph.state().load_w == 154 * 24
    clock.t = DAY0 + 5 * 3600 + 1
    assert ph.state().load_w == 154 * 24 + 5


def test_registers_update_every_register_update_s_and_on_commands() -> None:
    """Devices show a snapshot at most ``register_update_s`` old (a real device's refresh
    period); a command makes the next read fresh; 0 (the default) is always fresh."""
    ph, clock = make(HomeConfig(register_update_s=1.0), t0=NOON)
    a = ph.register_state()
    clock.t += 0.9
    assert ph.register_state() is a  # within the period: the same registers
    clock.t += 0.2
    b = ph.register_state()
    assert b is not a and b.t == pytest.approx(NOON + 1.1)
    clock.t += 0.1
    ph.command_storage(mode=3, in_pct=40.0, out_pct=-40.0)  # +2000 W, the next read shows it
    c = ph.register_state()
    assert c is not b and c.battery_w == pytest.approx(2000.0) and b.battery_w != c.battery_w
    exact, clock2 = make(HomeConfig(), t0=NOON)
    first = exact.register_state()
    clock2.t += 0.01
    assert exact.register_state().t == pytest.approx(NOON + 0.01) and first.t == NOON
    with pytest.raises(ValueError, match="register_update_s"):
        HomeConfig(register_update_s=-1.0)


def test_a_new_profile_takes_effect_at_once_and_the_past_keeps_the_old_one() -> None:
    """Flows are kept between change points; replacing a profile is one (a fault test switches
    the household's load off mid-step this way)."""
    cfg = HomeConfig(pv_kwp=0.0, battery_wh=0.0)
    ph, clock = make(cfg, profiles=flat_profiles(load_w=800.0, pv_w=0.0))
    clock.t = DAY0 + 30.0  # inside the profile's step: the flows are cached
    assert ph.state().load_w == 800.0
    ph.load_profile = StepProfile([200.0] * (365 * 24), 3600)
    assert ph.state().load_w == 200.0 and ph.site_now()[2] == 200.0
    clock.t = DAY0 + 90.0
    st = ph.state()
    assert st.load_w == 200.0
    # 30 s at 800 W, then 60 s at 200 W
    assert st.load_wh == pytest.approx((800.0 * 30 + 200.0 * 60) / 3600.0)
