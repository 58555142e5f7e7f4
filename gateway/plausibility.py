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
* inverter: AC output within ``[-10 % - 100 W, 125 % + 100 W]`` of its rating, limit 0-100 %;
* battery: SoC and reserve 0-100 %, ``|W|`` within 125 % (+ 100 W) of its larger rate.

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


@dataclass(frozen=True, slots=True)
class Verdict:
    """``reject``: why the reading must not be used (None: use it); ``note``: something to
    record (ratings changed) even though the reading is used."""

    reject: str | None = None
    note: str | None = None


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
        if isinstance(reading, MeterReading):
            why = meter_problem(reading) or self._frozen(reading, now)
        elif isinstance(reading, InverterReading):
            why = inverter_problem(reading)
        elif isinstance(reading, BatteryReading):
            why = battery_problem(reading)
        if why is not None:
            self.rejected += 1
            return Verdict(reject=f"implausible reading: {why}")
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
