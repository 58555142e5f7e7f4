"""The reading guard on its own (pure, no I/O): what it rejects, what it lets through, and why
it matters: fed to the enforcement, the saturated meter reading the simulator serves under an
``out_of_range`` fault would lift the PV curtailment that holds the export limit."""

from __future__ import annotations

import pytest

from drivers.natures import BatteryReading, InverterReading, MeterReading
from gateway.enforce import enforce
from gateway.envelope import Limits
from gateway.plausibility import ReadingGuard, battery_problem, inverter_problem, meter_problem

pytestmark = pytest.mark.fault

T = 1_750_000_000.0


def meter(t: float = T, w: float = -500.0, imp: float = 3e6, exp: float = 1e6,
          phases: tuple[float | None, float | None, float | None] | None = None) -> MeterReading:
    ph = phases if phases is not None else (w * 0.4, w * 0.35, w * 0.25)
    return MeterReading(t, w, ph, imp, exp, 230.0, 50.0)


def inverter(ac: float = 2200.0, rated: float = 5000.0, pct: float | None = 44.0,
             enabled: bool = True) -> InverterReading:
    return InverterReading(T, ac, None, rated, rated, pct, enabled, 120.0, None)


def battery(w: float = 1000.0, soc: float = 50.0) -> BatteryReading:
    return BatteryReading(T, w, soc, 10000.0, 1000.0, 1000.0, 10.0, 3, None, None, 120.0)


def test_saturated_meter_would_loosen_the_export_limit_and_is_rejected() -> None:
    limits = Limits(export_w=500.0)
    truth = enforce(-500.0, inverter(), battery(), limits)
    lie = enforce(32767.0, inverter(), battery(), limits, prev=truth)
    assert lie.inverter_limit_pct is not None and truth.inverter_limit_pct is not None
    assert lie.inverter_limit_pct > truth.inverter_limit_pct  # the hazard the guard prevents
    bad = meter(w=32767.0, phases=(-200.0, -175.0, -125.0))
    assert "disagrees with its phases" in (meter_problem(bad) or "")
    assert "beyond" in (meter_problem(meter(w=400_000.0, phases=(None, None, None))) or "")
    assert meter_problem(meter()) is None
    assert meter_problem(meter(phases=(None, None, None))) is None


def test_inverter_and_battery_bounds() -> None:
    assert inverter_problem(inverter()) is None
    assert "impossible" in (inverter_problem(inverter(ac=32767.0)) or "")
    assert "non-finite" in (inverter_problem(inverter(ac=float("nan"))) or "")
    assert "rating" in (inverter_problem(inverter(rated=0.0)) or "")
    assert battery_problem(battery()) is None
    assert "state of charge" in (battery_problem(battery(soc=250.0)) or "")
    assert "impossible" in (battery_problem(battery(w=20000.0)) or "")


def test_frozen_meter_needs_stopped_counters_while_power_flows() -> None:
    g = ReadingGuard(frozen_after_s=30.0)
    assert g.check("meter", meter(T), T).reject is None
    assert g.check("meter", meter(T + 20), T + 20).reject is None  # not long enough
    v = g.check("meter", meter(T + 40), T + 40)  # 500 W for 40 s: ~5.6 Wh should show
    assert v.reject is not None and "frozen" in v.reject
    assert g.check("meter", meter(T + 41, imp=3e6, exp=1e6 + 6), T + 41).reject is None
    # a balanced site (0 W) legitimately reads the same for a long time
    g2 = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 600, 10):
        assert g2.check("meter", meter(T + k, w=0.0), T + k).reject is None
    # without energy counters a meter cannot be judged frozen
    g3 = ReadingGuard(frozen_after_s=30.0)
    for k in range(0, 600, 10):
        r = MeterReading(T + k, -500.0, (None, None, None), None, None)
        assert g3.check("meter", r, T + k).reject is None


class _Dev:
    def __init__(self) -> None:
        self.invalidated = 0

    def invalidate_static(self) -> None:
        self.invalidated += 1


def test_ratings_change_is_a_note_and_a_stale_wmax_triggers_a_nameplate_read() -> None:
    g = ReadingGuard()
    assert g.check("inverter", inverter(), T).note is None
    v = g.check("inverter", inverter(rated=3000.0, ac=1300.0, pct=43.0), T + 1)
    assert v.reject is None and v.note is not None and "5000 -> 3000" in v.note
    dev = _Dev()
    g.after_io("inverter", dev, inverter(ac=2200.0, pct=44.0))  # at the limit: fine
    assert dev.invalidated == 0
    g.after_io("inverter", dev, inverter(ac=3500.0, pct=44.0))  # above what 44 % allows
    assert dev.invalidated == 1
    g.after_io("inverter", dev, None)  # a failed read: it may be rebooting
    assert dev.invalidated == 2
