"""Frozen inverter and battery registers, judged by the reading guard (pure, no I/O).

A frozen device answers promptly with stale values. The guard must notice it when the values
*should* have moved (energy produced, SoC charged) and never call a genuinely idle or steady
device frozen."""

from __future__ import annotations

import pytest

from drivers.natures import BatteryReading, InverterReading
from gateway.plausibility import ReadingGuard

pytestmark = pytest.mark.fault

T = 1_750_000_000.0


def inverter(ac: float = 2200.0, wh: float | None = 1e6, dc: float | None = None
             ) -> InverterReading:
    return InverterReading(T, ac, dc, 5000.0, 5000.0, 44.0, True, 120.0, wh)


def battery(w: float = 1000.0, soc: float = 50.0) -> BatteryReading:
    return BatteryReading(T, w, soc, 10000.0, 1000.0, 1000.0, 10.0, 3, None, None, 120.0)


def feed_live_inverter(g: ReadingGuard, ac: float, seconds: int, wh0: float = 1e6) -> float:
    """A healthy inverter read every second, its 1 Wh counter moving with the output."""
    wh = wh0
    for k in range(seconds):
        wh = wh0 + int(ac * k / 3600.0)
        v = g.check("inverter", inverter(ac, wh), T + k)
        assert v.reject is None, (k, v)
    return wh


def test_inverter_counter_stopped_while_producing_is_frozen() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    wh = feed_live_inverter(g, 2200.0, 60)  # learns the 1 Wh step
    t0 = T + 60
    verdicts = [g.check("inverter", inverter(2200.0, wh), t0 + k) for k in range(0, 40)]
    first = next(k for k, v in enumerate(verdicts) if v.reject is not None)
    # 30 s (the window) and 3 Wh (3 counter steps) must both have passed, no more.
    assert 28 <= first <= 31, first
    v = verdicts[first]
    assert v.frozen and v.reject is not None and "frozen" in v.reject
    assert "energy counter" in v.reject
    # Values moving again: accepted at once.
    assert g.check("inverter", inverter(2150.0, wh + 1), t0 + 41).reject is None


def test_idle_inverter_and_a_coarse_counter_are_not_frozen() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 3600, 5):  # night: 0 W, counter still, for an hour
        assert g.check("inverter", inverter(0.0, 1e6), T + k).reject is None
    # Morning: a few hundred W, the (1 Wh) counter not moved yet: expected energy is counted
    # from the power read since, not from the night's stillness.
    for k in range(3600, 3610):
        assert g.check("inverter", inverter(300.0, 1e6), T + k).reject is None
    # A 0.1 kWh counter: at 1.5 kW it moves every 240 s; never judged frozen in between.
    g2 = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 1800, 2):
        wh = 1e6 + 100.0 * int(1500.0 * k / 3600.0 / 100.0)
        assert g2.check("inverter", inverter(1500.0, wh), T + k).reject is None, k


def test_inverter_read_gap_restarts_the_judgement() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    wh = feed_live_inverter(g, 2200.0, 20)
    g.after_io("inverter", object(), None)  # a failed read (device rebooting, say)
    for k in range(25, 50):  # same counter for 25 s after the gap: not long enough
        assert g.check("inverter", inverter(2200.0, wh), T + k).reject is None
    # ... but the learnt 1 Wh step survives the gap: frozen 30 s after it, not 100 Wh later.
    rej = [k for k in range(50, 70)
           if g.check("inverter", inverter(2200.0, wh), T + k).reject is not None]
    assert rej and rej[0] <= 56, rej


def test_inverter_without_counter_needs_ac_and_dc_identical_for_twice_the_window() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    # AC held exactly at its limit (a curtailed inverter) while DC dithers: not frozen.
    for k in range(0, 300):
        r = inverter(2200.0, None, dc=2300.0 + (k % 3))
        assert g.check("inverter", r, T + k).reject is None
    # No DC power either: cannot be judged.
    for k in range(300, 600):
        assert g.check("inverter", inverter(2200.0, None), T + k).reject is None
    # AC and DC bit-identical while producing: frozen after 60 s.
    g2 = ReadingGuard(frozen_after_s=30.0)
    rej = [k for k in range(0, 90)
           if g2.check("inverter", inverter(2200.0, None, dc=2300.0), T + k).reject]
    assert rej and 59 <= rej[0] <= 61, rej[:3]


def test_battery_soc_stuck_under_power_is_frozen() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    # Healthy: 1 kW into 10 kWh moves SoC 0.1 % every 36 s (0.1 % register steps).
    soc = 50.0
    for k in range(0, 200):
        soc = round(50.0 + int(k * 1000.0 / 10000.0 * 100.0 / 3600.0 / 0.1) * 0.1, 1)
        assert g.check("battery", battery(1000.0, soc), T + k).reject is None, k
    t0 = T + 200
    rej = [k for k in range(0, 200)
           if g.check("battery", battery(1000.0, soc), t0 + k).reject is not None]
    # 3 SoC steps (0.3 %) = 108 s at 1 kW, counted from the last change (at 180 s, 20 s
    # before t0): judged frozen at 288 s, not before.
    assert rej and 106 <= rej[0] + 20 <= 110, rej[:3]
    v = g.check("battery", battery(1000.0, soc), t0 + 201)
    assert v.frozen and v.reject is not None and "state of charge" in v.reject


def test_idle_full_or_unlearnt_battery_is_not_frozen() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 7200, 10):  # idle for two hours
        assert g.check("battery", battery(0.0, 60.0), T + k).reject is None
    g2 = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 7200, 10):  # full, balancing at 150 W with SoC at 100 %
        assert g2.check("battery", battery(150.0, 100.0), T + k).reject is None
    # SoC step not learnt yet (integer SoC assumed): 3 % at 1 kW into 10 kWh is 18 min.
    g3 = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 1000, 5):
        assert g3.check("battery", battery(1000.0, 50.0), T + k).reject is None
    assert g3.check("battery", battery(1000.0, 50.0), T + 1100).reject is not None
