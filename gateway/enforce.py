"""Fast-loop enforcement: the envelope and device limits applied to the setpoints written.

Pure maths, one call per control cycle. It closes the loop on the meter (cf. OpenEMS,
open-dynamic-export): the household load is *estimated* from what was just measured,

    load_w = site_w + pv_w - battery_w          (site + import / - export, battery + charge)

assumed unchanged over the next cycle, and the new setpoints are chosen so that the *predicted*
site power ``load_w + battery_w' - pv_w'`` stays inside the limits.

Priorities (the DSO limit is the outer bound of everything):

1. device ratings and the DER limits (``generation_w``: PV AC + battery discharge;
   ``load_w``: battery charge) are always respected -- they are never traded for site compliance;
2. the site limits: export first by charging the battery (or discharging less), then by
   curtailing PV (``WMaxLimPct``, target PV = load + battery + export limit, as in
   open-dynamic-export); import by discharging the battery (or charging less) and by lifting PV
   curtailment. What remains (a load larger than import limit + PV + battery discharge, or PV that
   cannot go below the floor) is reported as ``compliant=False`` with the reason, never hidden;
3. the plan's battery setpoint (or, without a plan, self-consumption: battery = PV - load), moved
   by at most ``battery_step_pct`` of its rating per cycle.

Step bounds: loosening the inverter limit is bounded (``max_step_pct`` points per cycle);
tightening, and any change that a limit requires (battery moving to hold a limit, PV curtailment
lifted to hold the import limit), applies at once.

Prediction model (also what ``compliant`` means): the battery follows its setpoint; PV stays at
its measured output ``ac_w`` capped by the new limit. When the inverter is *clipped* -- a limit
below 100 % is in force and ``ac_w >= limit_w - tolerance_w`` -- PV may rise to the new cap, so
the export side is predicted with PV at the cap (``predicted_site_min_w``) and the import side
with PV at its current output (``predicted_site_w``).

Without a meter the loop cannot close: :func:`meter_loss_failsafe` gives the setpoints for the
worst case (zero load) under the export limit, and :func:`resume_limit_pct` lifts that
curtailment at the envelope's ramp rate once the meter is back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivers.natures import BatteryReading, InverterReading
from gateway.envelope import Limits

_EPS = 1e-3  # W: below this, a difference is float noise, not an exceedance


class EnforceInputError(ValueError):
    """A reading cannot be used (non-finite, or a rating <= 0). The message names the field.
    The caller keeps the previous setpoints (the devices' revert timers bound the risk)."""


@dataclass(frozen=True, slots=True)
class EnforceConfig:
    """Fast-loop settings."""

    min_limit_pct: float = 2.0  # WMaxLimPct floor: some inverters go to standby at 0 %
    max_step_pct: float = 20.0  # loosening step of WMaxLimPct per cycle, percentage points
    battery_step_pct: float = 20.0  # plan-driven battery change per cycle, % of its larger rating
    tolerance_w: float = 50.0  # measurement tolerance: PV within this of its limit is "clipped"
    soc_full_pct: float = 100.0  # no charging at or above

    def __post_init__(self) -> None:
        if not (0 < self.min_limit_pct <= 100):
            raise ValueError(
                f"EnforceConfig.min_limit_pct must be in (0, 100], got {self.min_limit_pct}"
            )
        if not (0 < self.max_step_pct <= 100):
            raise ValueError(
                f"EnforceConfig.max_step_pct must be in (0, 100], got {self.max_step_pct}"
            )
        if not (0 < self.battery_step_pct <= 200):
            raise ValueError(
                f"EnforceConfig.battery_step_pct must be in (0, 200], got {self.battery_step_pct}"
            )
        if not (math.isfinite(self.tolerance_w) and self.tolerance_w >= 0):
            raise ValueError(f"EnforceConfig.tolerance_w must be >= 0, got {self.tolerance_w}")


@dataclass(frozen=True, slots=True)
class Setpoints:
    """What to write this cycle, and what it is expected to do.

    ``inverter_limit_pct`` is % of the inverter's ``max_w`` (None: no inverter); ``battery_w`` is
    + charge / - discharge (None: no battery). ``predicted_site_w`` is the site power expected
    with PV at its current output (import side), ``predicted_site_min_w`` the lowest site power
    possible if clipped PV rises to the new cap (export side); they are equal when not clipped.
    ``compliant`` is True iff the prediction is inside every limit; otherwise ``reason`` says
    which limit and why. ``exceedance_w`` is the *measured* exceedance this cycle, before the new
    setpoints (for the compliance record)."""

    inverter_limit_pct: float | None
    battery_w: float | None
    predicted_site_w: float
    predicted_site_min_w: float
    compliant: bool
    reason: str
    load_w: float
    exceedance_w: float


def _finite(name: str, v: float) -> float:
    if not math.isfinite(v):
        raise EnforceInputError(f"{name} is not finite ({v})")
    return float(v)


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


def is_clipped(inverter: InverterReading, tolerance_w: float) -> bool:
    """True if a limit below 100 % is in force and PV sits at it (so more PV is available)."""
    if not inverter.limit_enabled or inverter.limit_pct is None or inverter.limit_pct >= 100:
        return False
    return inverter.ac_w >= inverter.limit_pct / 100.0 * inverter.max_w - tolerance_w


def battery_range(
    battery: BatteryReading | None, limits: Limits, config: EnforceConfig
) -> tuple[float, float]:
    """(lowest, highest) battery setpoint allowed by ratings, SoC/reserve and the DER limits."""
    if battery is None:
        return 0.0, 0.0
    cmax = max(0.0, battery.max_charge_w) if battery.soc_pct < config.soc_full_pct else 0.0
    reserve = battery.reserve_pct if battery.reserve_pct is not None else 0.0
    dmax = max(0.0, battery.max_discharge_w) if battery.soc_pct > reserve else 0.0
    if limits.load_w is not None:
        cmax = min(cmax, limits.load_w)
    if limits.generation_w is not None:
        dmax = min(dmax, limits.generation_w)
    return -dmax, cmax


def enforce(
    site_w: float,
    inverter: InverterReading | None,
    battery: BatteryReading | None,
    limits: Limits,
    desired_battery_w: float | None = None,
    prev: Setpoints | None = None,
    config: EnforceConfig | None = None,
) -> Setpoints:
    """Setpoints for this cycle (see the module docstring for the rules).

    ``site_w`` is the measured (optionally averaged) site power, + import / - export.
    ``desired_battery_w`` is the plan's setpoint, or None for the self-consumption rule.
    ``prev`` is the previous cycle's result (step bounds); None on the first cycle.
    Raises :class:`EnforceInputError` on unusable readings."""
    cfg = config or EnforceConfig()
    s = _finite("site_w", site_w)
    # Short names keep the maths readable: E export, I import, G generation limit.
    E, I, G = limits.export_w, limits.import_w, limits.generation_w  # noqa: E741

    p = 0.0
    max_w = 0.0
    clipped = False
    if inverter is not None:
        p = _finite("inverter.ac_w", inverter.ac_w)
        max_w = _finite("inverter.max_w", inverter.max_w)
        if max_w <= 0:
            raise EnforceInputError(f"inverter.max_w must be > 0, got {max_w}")
        clipped = is_clipped(inverter, cfg.tolerance_w)
    b_meas = 0.0
    if battery is not None:
        b_meas = _finite("battery.w", battery.w)
        for name in ("soc_pct", "max_charge_w", "max_discharge_w"):
            _finite(f"battery.{name}", getattr(battery, name))
        if battery.reserve_pct is not None:
            _finite("battery.reserve_pct", battery.reserve_pct)
    if desired_battery_w is not None:
        _finite("desired_battery_w", desired_battery_w)

    load = s + p - b_meas
    exceedance = max(0.0, s - I if I is not None else 0.0, -s - E if E is not None else 0.0)
    bmin, bmax = battery_range(battery, limits, cfg)

    # 1. What the plan (or self-consumption) wants, moved by a bounded step.
    b = (p - load) if desired_battery_w is None else desired_battery_w
    if battery is not None and prev is not None and prev.battery_w is not None:
        step = (
            cfg.battery_step_pct / 100.0 * max(battery.max_charge_w, battery.max_discharge_w, 0.0)
        )
        b = _clamp(b, prev.battery_w - step, prev.battery_w + step)
    b = _clamp(b, bmin, bmax)

    # 2. Battery first: hold the site limits with PV at its present output (jumps allowed).
    if I is not None:
        b = min(b, I - load + p)
    if E is not None:
        b = max(b, p - load - E)
    if G is not None:
        b = max(b, min(0.0, max(p, 0.0) - G))  # discharge only within what PV leaves
    b = _clamp(b, bmin, bmax)

    # 3. PV curtailment next.
    pct: float | None = None
    cap = p
    if inverter is not None:
        cap = max_w
        if E is not None:
            cap = min(cap, load + b + E)
        if G is not None:
            cap = min(cap, G - max(0.0, -b))
        target_pct = cap / max_w * 100.0
        if prev is not None and prev.inverter_limit_pct is not None:
            prev_pct = prev.inverter_limit_pct
        elif inverter.limit_enabled and inverter.limit_pct is not None:
            prev_pct = inverter.limit_pct
        else:
            prev_pct = 100.0
        if target_pct > prev_pct:
            # Loosening is bounded, except as far as the import limit needs more PV.
            need_import = (load + b - I) / max_w * 100.0 if I is not None else -math.inf
            target_pct = min(target_pct, max(prev_pct + cfg.max_step_pct, need_import))
        pct = _clamp(target_pct, cfg.min_limit_pct, 100.0)
        cap = pct / 100.0 * max_w
    p_lo = min(p, cap)
    p_hi = cap if clipped else p_lo

    # 4. With PV fixed, put the battery where the limits need it (floor, step effects).
    if I is not None:
        b = min(b, I - load + p_lo)
    if E is not None:
        b = max(b, p_hi - load - E)
    if G is not None:
        b = max(b, min(0.0, max(p_hi, 0.0) - G))
    b = _clamp(b, bmin, bmax)

    site_hi = load + b - p_lo
    site_lo = load + b - p_hi
    problems: list[str] = []
    if I is not None and site_hi > I + _EPS:
        problems.append(
            f"import {site_hi:.0f} W > limit {I:.0f} W: load {load:.0f} W exceeds PV {p_lo:.0f} W "
            f"+ battery discharge {-bmin:.0f} W available + the limit"
            + (
                f" (PV limit lifted to {cap:.0f} W; more PV may come)"
                if clipped and cap > p
                else ""
            )
        )
    if E is not None and site_lo < -E - _EPS:
        problems.append(
            f"export {-site_lo:.0f} W > limit {E:.0f} W: PV cannot go below {p_hi:.0f} W "
            f"(floor {cfg.min_limit_pct:g} %) and the battery can absorb only {bmax:.0f} W"
        )
    gen = max(p_hi, 0.0) + max(0.0, -b)
    if G is not None and gen > G + _EPS:
        problems.append(
            f"generation {gen:.0f} W > limit {G:.0f} W: PV cannot go below {p_hi:.0f} W "
            f"(floor {cfg.min_limit_pct:g} %)"
        )
    if problems:
        reason = "; ".join(problems)
    else:
        notes = []
        if pct is not None and pct < 100.0 and cap < p + _EPS:
            notes.append(f"PV curtailed to {cap:.0f} W")
        if E is not None and site_lo <= -E + 1.0:
            notes.append("export limit binding")
        if I is not None and site_hi >= I - 1.0:
            notes.append("import limit binding")
        reason = "within limits" + (": " + ", ".join(notes) if notes else "")
    return Setpoints(
        inverter_limit_pct=pct,
        battery_w=b if battery is not None else None,
        predicted_site_w=site_hi,
        predicted_site_min_w=site_lo,
        compliant=not problems,
        reason=reason,
        load_w=load,
        exceedance_w=exceedance,
    )


# --------------------------------------------------------------------------------------------
# Without a meter: the failsafe


@dataclass(frozen=True, slots=True)
class Failsafe:
    """What to write while the meter is lost (see :func:`meter_loss_failsafe`).

    ``inverter_limit_pct``: % of the inverter's ``max_w`` (None: no inverter reading, nothing to
    write); ``battery_w``: + charge / - discharge (None: the battery cannot be commanded this
    cycle). ``pv_cap_w`` is the PV output the limit allows; ``charge_credit_w`` (>= 0) the
    battery charge counted as absorbing PV, ``discharge_w`` (>= 0) the battery discharge that may
    go on (commanded, or a battery we cannot reach still running its last command).
    ``compliant`` is False when even PV at 0 cannot hold the limit (a discharge we cannot stop
    exceeds it); ``reason`` says what was assumed."""

    inverter_limit_pct: float | None
    battery_w: float | None
    pv_cap_w: float
    charge_credit_w: float
    discharge_w: float
    compliant: bool
    reason: str


def meter_loss_failsafe(
    inverter: InverterReading | None,
    battery: BatteryReading | None,
    limits: Limits,
    held_battery_w: float | None,
    held_limit_pct: float | None,
    config: EnforceConfig | None = None,
) -> Failsafe | None:
    """Setpoints that keep the site inside the export limit whatever the household load does,
    for a fast loop that has lost its meter. ``None`` when there is no export limit (nothing
    to protect: the held setpoints stay).

    Without a meter the load is unknown, and a load switching off turns everything it consumed
    into export. So the worst case -- zero load -- is assumed: the site then exports
    ``PV + discharge - charge``, and the PV limit is set so that it cannot exceed the export
    limit (nor the generation limit, ``PV + discharge``):

    * battery readable (``battery`` given): it is commanded at its held setpoint
      (``held_battery_w``; None = idle at 0 W), clamped to :func:`battery_range`. A charge is
      credited only as far as the battery *measures* it (a full battery charging nothing absorbs
      nothing): ``charge_credit_w = min(commanded, measured)``. A discharge goes on up to the
      export (and generation) limit -- it serves a load the gateway cannot see, and stopping it
      could push the import over an import limit -- and PV gets what it leaves;
    * battery not readable: it cannot be commanded and is credited no charge; a discharge it was
      last commanded counts as going on (until its own revert timer ends it);
    * PV limit = ``export limit + charge credit - discharge`` (and ``generation - discharge``),
      in ``[0, max_w]``, never looser than ``held_limit_pct``. No floor (``min_limit_pct``)
      applies: the DSO limit outranks an inverter going to standby at 0 %.

    Property: ``pv_cap_w + discharge_w - charge_credit_w <= export limit`` and
    ``pv_cap_w + discharge_w <= generation limit`` unless ``compliant`` is False (then
    ``pv_cap_w`` is 0). Raises :class:`EnforceInputError` on unusable readings."""
    cfg = config or EnforceConfig()
    E, G = limits.export_w, limits.generation_w
    if E is None:
        return None
    _finite("limits.export_w", E)
    if G is not None:
        _finite("limits.generation_w", G)
    max_w = math.inf
    if inverter is not None:
        _finite("inverter.ac_w", inverter.ac_w)
        max_w = _finite("inverter.max_w", inverter.max_w)
        if max_w <= 0:
            raise EnforceInputError(f"inverter.max_w must be > 0, got {max_w}")
    if held_battery_w is not None:
        _finite("held_battery_w", held_battery_w)
    if held_limit_pct is not None:
        _finite("held_limit_pct", held_limit_pct)

    total = E if G is None else min(E, G)  # PV + discharge may not exceed this at zero load
    credit = 0.0
    discharge = 0.0
    b_out: float | None = None
    if battery is not None:
        b_meas = _finite("battery.w", battery.w)
        for name in ("soc_pct", "max_charge_w", "max_discharge_w"):
            _finite(f"battery.{name}", getattr(battery, name))
        bmin, bmax = battery_range(battery, limits, cfg)
        b = _clamp(held_battery_w if held_battery_w is not None else 0.0, bmin, bmax)
        if b >= 0.0:
            credit = min(b, max(0.0, b_meas))
            total = E + credit if G is None else min(E + credit, G)
        else:
            # It serves a load we cannot see (stopping it could push the import over an import
            # limit): it keeps discharging up to what the limit allows on its own, and PV is
            # limited to what is left (little in the evening, when batteries discharge).
            discharge = min(-b, max(0.0, total))
            b = -discharge
        b_out = b
    elif held_battery_w is not None and held_battery_w < 0.0:
        discharge = -held_battery_w  # out of reach: assume its last command still runs
    cap = max(0.0, min(max_w, total - discharge))
    compliant = discharge <= total + _EPS
    pct: float | None = None
    if inverter is not None:
        pct = _clamp(cap / max_w * 100.0, 0.0, 100.0)
        if held_limit_pct is not None and held_limit_pct < pct:
            pct = max(0.0, held_limit_pct)
        cap = pct / 100.0 * max_w
    reason = (
        f"meter lost: zero load assumed; PV limited to {cap:.0f} W = export limit {E:.0f} W"
        + (f" + battery charge {credit:.0f} W" if credit > 0 else "")
        + (f" - battery discharge {discharge:.0f} W" if discharge > 0 else "")
        + (f" (generation limit {G:.0f} W)" if G is not None else "")
    )
    if not compliant:
        reason += (f"; a discharge of {discharge:.0f} W that cannot be stopped exceeds the "
                   f"limit")
    return Failsafe(
        inverter_limit_pct=pct,
        battery_w=b_out,
        pv_cap_w=cap,
        charge_credit_w=credit,
        discharge_w=discharge,
        compliant=compliant,
        reason=reason,
    )


def resume_limit_pct(
    target_pct: float,
    from_pct: float,
    dt_s: float,
    ramp_pct_per_min: float,
    need_pct: float = -math.inf,
) -> float:
    """The inverter limit (%) one cycle after the failsafe ended: ``target_pct`` (what
    :func:`enforce` wants now), reached from ``from_pct`` at no more than ``ramp_pct_per_min``
    percentage points per minute of domain time (the envelope's AS/NZS 4777.2 ramp, applied to
    the failsafe's curtailment being lifted). Tightening is never delayed; ``need_pct`` is how
    far the import limit needs PV now, which is not delayed either (as in :func:`enforce`)."""
    if target_pct <= from_pct:
        return target_pct
    step = max(0.0, ramp_pct_per_min) * max(0.0, dt_s) / 60.0
    return min(target_pct, max(from_pct + step, need_pct))
