"""Plausibility of device readings, checked before control uses them.

A device can answer promptly and still lie: registers saturated at their type's maximum, a
state of charge of 250 %, a meter whose registers stopped updating while power still flows.
Such a reading fed to :func:`gateway.enforce.enforce` can *loosen* a DSO limit (an absurd import
on the meter lifts the PV curtailment), so the fast loop treats an implausible reading like a
failed read: the device is marked failing with the reason (one event), the last setpoints are
held (the devices' revert timers bound that), and the next plausible reading recovers it.

Checks (each bound is far outside any healthy reading, so a real device never trips them):

* every number finite; ratings > 0 and at most :data:`MAX_RATING_W`;
* meter: ``|W|`` <= :data:`MAX_SITE_W`; with all three phase powers present, ``W`` agrees with
  their sum (a saturated or stale total next to live phases);
* meter *frozen*: the whole reading (power, phases, energy counters, voltage, frequency) unchanged
  for ``frozen_after_s`` domain seconds although the power flowing should have moved an energy
  counter by :data:`FROZEN_MIN_WH` Wh (meters without counters cannot be judged this way);
* inverter *frozen*: the lifetime energy counter has not moved for ``frozen_after_s`` although
  the AC power it reported since should have moved it by three counter steps (at least
  :data:`FROZEN_MIN_WH`); the step is learnt from the counter itself (coarse counters are common
  on inverters; :data:`COARSE_COUNTER_WH` until a step was seen). Without a counter: AC *and* DC
  power bit-identical for twice ``frozen_after_s`` while producing (no DC power: not judged);
* battery *frozen*: SoC and power bit-identical for ``frozen_after_s`` although the reported
  power should have moved the SoC by three of its steps (at least :data:`FROZEN_MIN_SOC_PCT`,
  given the capacity; :data:`COARSE_SOC_PCT` until a step was seen). Not judged charging at a
  full or discharging at an empty SoC (it cannot move that way);
* inverter: AC output within ``[-10 % - 100 W, 125 % + 100 W]`` of its rating, limit 0-100 %;
* battery: SoC and reserve 0-100 %, ``|W|`` within 125 % (+ 100 W) of its larger rate.

The expected energy is integrated from the reported power reading by reading (the lower of two
consecutive readings), so an idle device (0 W) is never judged frozen, and a gap in the readings
(a failed read) starts the judgement afresh.

Ratings that change between two plausible readings (a device replaced or reconfigured) are not
an error but are reported once as a note (:meth:`ReadingGuard.check` returns it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from drivers.natures import BatteryReading, InverterReading, MeterReading

MAX_SITE_W = 250_000.0  # above any household connection (3 x 400 A x 230 V is 276 kW)
MAX_RATING_W = 1_000_000.0
FROZEN_MIN_WH = 3.0  # counters have 1 Wh resolution or better: 3 Wh must show
COARSE_COUNTER_WH = 100.0  # assumed step of an inverter counter until one is seen (0.1 kWh)
FROZEN_MIN_SOC_PCT = 0.3  # SoC points that must show (3 steps of the usual 0.1 %)
COARSE_SOC_PCT = 1.0  # assumed SoC step until one is seen (integer SoC registers)


@dataclass(frozen=True, slots=True)
class Verdict:
    """``reject``: why the reading must not be used (None: use it); ``note``: something to
    record (ratings changed) even though the reading is used."""

    reject: str | None = None
    note: str | None = None
    frozen: bool = False  # rejected because the values froze (the device still answers)


def _bad_numbers(values: dict[str, float | None]) -> str | None:
    bad = [f"{k}={v!r}" for k, v in values.items() if v is not None and not math.isfinite(v)]
    return f"non-finite {', '.join(bad)}" if bad else None


def meter_problem(r: MeterReading) -> str | None:
    """Why this meter reading is implausible on its own, or None."""
    nums = {"W": r.site_w, "WphA": r.phases_w[0], "WphB": r.phases_w[1], "WphC": r.phases_w[2]}
    if (why := _bad_numbers(nums)) is not None:
        return why
    if abs(r.site_w) > MAX_SITE_W:
        return f"site power {r.site_w:.0f} W beyond {MAX_SITE_W:.0f} W"
    ph = r.phases_w
    if ph[0] is not None and ph[1] is not None and ph[2] is not None:
        total = ph[0] + ph[1] + ph[2]
        if abs(r.site_w - total) > max(200.0, 0.1 * max(abs(r.site_w), abs(total))):
            return f"site power {r.site_w:.0f} W disagrees with its phases (sum {total:.0f} W)"
    return None


def inverter_problem(r: InverterReading) -> str | None:
    """Why this inverter reading is implausible on its own, or None."""
    why = _bad_numbers({"W": r.ac_w, "WRtg": r.rated_w, "WMax": r.max_w,
                        "WMaxLimPct": r.limit_pct})
    if why is not None:
        return why
    for name, v in (("WRtg", r.rated_w), ("WMax", r.max_w)):
        if not 0.0 < v <= MAX_RATING_W:
            return f"rating {name} {v:.0f} W outside (0, {MAX_RATING_W:.0f}] W"
    top = max(r.rated_w, r.max_w)
    if not -0.1 * top - 100.0 <= r.ac_w <= 1.25 * top + 100.0:
        return f"AC power {r.ac_w:.0f} W impossible for a {top:.0f} W inverter"
    if r.limit_pct is not None and not 0.0 <= r.limit_pct <= 101.0:
        return f"power limit {r.limit_pct:g} % outside 0-100 %"
    return None


def battery_problem(r: BatteryReading) -> str | None:
    """Why this battery reading is implausible on its own, or None."""
    why = _bad_numbers({"W": r.w, "SoC": r.soc_pct, "capacity": r.capacity_wh,
                        "max charge": r.max_charge_w, "max discharge": r.max_discharge_w,
                        "reserve": r.reserve_pct})
    if why is not None:
        return why
    if not -0.5 <= r.soc_pct <= 100.5:
        return f"state of charge {r.soc_pct:g} % outside 0-100 %"
    if r.reserve_pct is not None and not 0.0 <= r.reserve_pct <= 100.0:
        return f"reserve {r.reserve_pct:g} % outside 0-100 %"
    if not 0.0 < r.capacity_wh <= 100 * MAX_RATING_W:
        return f"capacity {r.capacity_wh:.0f} Wh implausible"
    for name, v in (("max charge", r.max_charge_w), ("max discharge", r.max_discharge_w)):
        if not 0.0 <= v <= MAX_RATING_W:
            return f"{name} rate {v:.0f} W outside [0, {MAX_RATING_W:.0f}] W"
    top = max(r.max_charge_w, r.max_discharge_w)
    if abs(r.w) > 1.25 * top + 100.0:
        return f"power {r.w:.0f} W impossible for a {top:.0f} W battery"
    return None


@dataclass(slots=True)
class _Stillness:
    """How long a device's live values have not moved, and how much they should have."""

    key: tuple[Any, ...]
    since: float  # domain time of the last change
    t: float  # domain time of the last reading
    rate: float  # |power| of the last reading (W)
    expected: float = 0.0  # Wh (inverter) or SoC points (battery) that should have shown
    step: float | None = None  # smallest change of the counter / SoC seen (its resolution)
    gap: bool = False  # a read failed since: the next reading starts a new window


def _still(prev: _Stillness | None, key: tuple[Any, ...], rate: float, now: float,
           scale: float, changed_by: float | None) -> _Stillness:
    """Advance the tracker by one reading. ``changed_by``: how much the judged quantity moved
    (counter Wh / SoC points) when ``key`` changed; ``scale`` turns W*s into that unit."""
    if prev is None:
        return _Stillness(key, now, now, rate)
    if prev.gap:
        return _Stillness(key, now, now, rate, 0.0, prev.step)
    if key != prev.key:
        step = prev.step
        if changed_by is not None and changed_by > 0:
            step = changed_by if step is None else min(step, changed_by)
        return _Stillness(key, now, now, rate, 0.0, step)
    dt = max(0.0, now - prev.t)
    prev.expected += min(prev.rate, rate) * dt * scale
    prev.t, prev.rate = now, rate
    return prev


def _ratings(kind: str, r: Any) -> tuple[tuple[str, float], ...] | None:
    if kind == "inverter" and isinstance(r, InverterReading):
        return (("rated", r.rated_w), ("max", r.max_w))
    if kind == "battery" and isinstance(r, BatteryReading):
        return (("capacity Wh", r.capacity_wh), ("max charge", r.max_charge_w),
                ("max discharge", r.max_discharge_w))
    return None


class ReadingGuard:
    """Per-device plausibility, frozen-meter and ratings-change tracking for one gateway."""

    def __init__(self, frozen_after_s: float = 30.0) -> None:
        self.frozen_after_s = frozen_after_s
        self._meter_key: tuple[Any, ...] | None = None
        self._meter_since = 0.0
        self._ratings: dict[str, tuple[tuple[str, float], ...]] = {}
        self._still: dict[str, _Stillness] = {}  # inverter, battery
        self._reconnects: dict[str, int] = {}
        self.rejected = 0

    def after_io(self, kind: str, device: Any, reading: Any) -> None:
        """After a read of ``device`` (``reading`` None: it failed). The device may have other
        ratings than the cached nameplate says (a reboot, or WMax reconfigured at runtime): then
        its nameplate is re-read at the next poll rather than at the periodic refresh, since a
        WMaxLimPct computed on a stale, smaller WMax is a looser limit. Signs: the read failed,
        the link reconnected, or the inverter produces more than its limit allows."""
        link = getattr(device, "link", None)
        n = getattr(link, "reconnects", None)
        seen = self._reconnects.get(kind)
        if isinstance(n, int):
            self._reconnects[kind] = n
        stale = reading is None or (isinstance(n, int) and seen is not None and n != seen)
        st = self._still.get(kind)
        if reading is None and st is not None:
            st.gap = True  # judge stillness over consecutive readings only (keep the step)
        if isinstance(reading, InverterReading) and reading.limit_enabled \
                and reading.limit_pct is not None and math.isfinite(reading.ac_w):
            allowed = reading.limit_pct / 100.0 * reading.max_w
            # A false alarm (output still ramping down to a new limit) costs one extra read.
            stale = stale or reading.ac_w > allowed + max(100.0, 0.02 * reading.max_w)
        if stale:
            invalidate = getattr(device, "invalidate_static", None)
            if callable(invalidate):
                invalidate()

    def check(self, kind: str, reading: Any, now: float) -> Verdict:
        """Judge one reading of device ``kind`` taken at domain time ``now``."""
        why: str | None = None
        frozen: str | None = None
        if isinstance(reading, MeterReading):
            why = meter_problem(reading)
            frozen = None if why else self._frozen(reading, now)
        elif isinstance(reading, InverterReading):
            why = inverter_problem(reading)
            frozen = None if why else self._inverter_frozen(kind, reading, now)
        elif isinstance(reading, BatteryReading):
            why = battery_problem(reading)
            frozen = None if why else self._battery_frozen(kind, reading, now)
        if why is not None or frozen is not None:
            self.rejected += 1
            return Verdict(reject=f"implausible reading: {why or frozen}",
                           frozen=why is None)
        note = None
        rt = _ratings(kind, reading)
        if rt is not None:
            old = self._ratings.get(kind)
            if old is not None and old != rt:
                note = f"{kind} ratings changed: " + ", ".join(
                    f"{n} {a:.0f} -> {b:.0f}" for (n, a), (_, b) in zip(old, rt, strict=True)
                    if a != b)
            self._ratings[kind] = rt
        return Verdict(note=note)

    def _inverter_frozen(self, kind: str, r: InverterReading, now: float) -> str | None:
        prev = self._still.get(kind)
        rate = max(0.0, r.ac_w)
        if r.energy_wh is not None:
            moved = None
            if prev is not None and not prev.gap and prev.key[0] is not None:
                moved = r.energy_wh - prev.key[0]  # < 0: a counter reset, not a step
            st = _still(prev, (r.energy_wh,), rate, now, 1.0 / 3600.0, moved)
            self._still[kind] = st
            step = st.step if st.step is not None else COARSE_COUNTER_WH
            if (now - st.since >= self.frozen_after_s
                    and st.expected >= max(FROZEN_MIN_WH, 3.0 * step)):
                return (f"values frozen: energy counter stopped for over {self.frozen_after_s:g} "
                        f"s although AC power flows")
            return None
        if r.dc_w is None:
            self._still.pop(kind, None)
            return None
        st = _still(prev, (None, r.ac_w, r.dc_w), rate, now, 1.0 / 3600.0, None)
        self._still[kind] = st
        if now - st.since >= 2 * self.frozen_after_s and st.expected >= FROZEN_MIN_WH:
            return (f"values frozen: AC and DC power unchanged for over "
                    f"{2 * self.frozen_after_s:g} s while producing")
        return None

    def _battery_frozen(self, kind: str, r: BatteryReading, now: float) -> str | None:
        prev = self._still.get(kind)
        # It cannot move that way: full and charging, empty and discharging (trickle/balancing).
        blocked = (r.w > 0 and r.soc_pct >= 99.5) or (r.w < 0 and r.soc_pct <= 0.5)
        rate = 0.0 if blocked else abs(r.w)
        moved = abs(r.soc_pct - prev.key[1]) if prev is not None and not prev.gap else None
        st = _still(prev, (r.w, r.soc_pct), rate, now, 100.0 / 3600.0 / r.capacity_wh, moved)
        self._still[kind] = st
        step = st.step if st.step is not None else COARSE_SOC_PCT
        if (now - st.since >= self.frozen_after_s
                and st.expected >= max(FROZEN_MIN_SOC_PCT, 3.0 * step)):
            return (f"values frozen: state of charge and power unchanged for over "
                    f"{self.frozen_after_s:g} s although the power should have moved the SoC")
        return None

    def _frozen(self, r: MeterReading, now: float) -> str | None:
        key = (r.site_w, r.phases_w, r.import_wh, r.export_wh, r.voltage_v, r.freq_hz)
        if key != self._meter_key:
            self._meter_key, self._meter_since = key, now
            return None
        dt = now - self._meter_since
        if dt < self.frozen_after_s or r.import_wh is None or r.export_wh is None:
            return None
        expected_wh = abs(r.site_w) * dt / 3600.0
        if expected_wh < FROZEN_MIN_WH:
            return None
        # A stable message: the daemon logs a device's error again only when it changes.
        return (f"values frozen: unchanged for over {self.frozen_after_s:g} s although power "
                f"flows (energy counters stopped)")
