"""Physical invariants every plan must satisfy before anything acts on it.

:func:`check_plan` returns human-readable violations (empty list: the plan is usable). It checks
physics and the DSO's always-attainable limits as hard facts, and checks that soft excursions
(import over its limit, SoC outside the reserve/maximum) are *reported* in the plan's slacks
rather than hidden: those are allowed, because physics can force them, but never silently.
"""

from __future__ import annotations

import numpy as np

from gateway.optimize.inputs import FloatArray, PlanInputs, validate
from gateway.optimize.plan import Plan

# Solver feasibility tolerances are ~1e-7 in kW; 1 W / 0.1 Wh is far above that and far below
# anything that matters physically.
POWER_TOL_W = 1.0
ENERGY_TOL_WH = 0.1


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _over(name: str, value: FloatArray, bound: FloatArray | float, tol: float) -> list[str]:
    excess = value - bound
    bad = excess > tol
    if not bad.any():
        return []
    t = _first(bad)
    return [
        f"{name}: exceeds its bound by {float(excess[t]):.3g} at step {t} ({int(bad.sum())} steps)"
    ]


def check_plan(plan: Plan, inputs: PlanInputs) -> list[str]:
    """List the invariants ``plan`` violates for ``inputs`` (validated here); [] when none."""
    x = validate(inputs)
    b = x.battery
    lim = x.limits
    assert lim is not None
    n = x.steps
    arrays = {
        "charge_w": plan.charge_w,
        "discharge_w": plan.discharge_w,
        "import_w": plan.import_w,
        "export_w": plan.export_w,
        "curtail_w": plan.curtail_w,
    }
    problems = [
        f"{k}: shape {np.shape(v)} != ({n},)" for k, v in arrays.items() if np.shape(v) != (n,)
    ]
    if np.shape(plan.soc_wh) != (n + 1,):
        problems.append(f"soc_wh: shape {np.shape(plan.soc_wh)} != ({n + 1},)")
    if problems:
        return problems
    for k, v in {**arrays, "soc_wh": plan.soc_wh}.items():
        if not np.all(np.isfinite(v)):
            problems.append(f"{k}: not finite at step {_first(~np.isfinite(v))}")
    if problems:
        return problems
    for k, v in arrays.items():
        problems += _over(f"{k} >= 0", -v, 0.0, POWER_TOL_W)

    c, d, imp, exp, curt, soc = (
        plan.charge_w,
        plan.discharge_w,
        plan.import_w,
        plan.export_w,
        plan.curtail_w,
        plan.soc_wh,
    )
    soc_tol = ENERGY_TOL_WH + 1e-6 * b.capacity_wh
    if abs(soc[0] - b.soc0_wh) > soc_tol:
        problems.append(f"soc_wh[0] = {soc[0]:.6g} differs from soc0 {b.soc0_wh:.6g}")
    problems += _over("soc_wh >= 0", -soc, 0.0, soc_tol)
    problems += _over("soc_wh <= capacity", soc, b.capacity_wh, soc_tol)
    dynamics = soc[:-1] + (b.eta_charge * c - d / b.eta_discharge) * x.dt_h
    problems += _over("soc dynamics", np.abs(soc[1:] - dynamics), 0.0, soc_tol)
    balance = x.pv_w - curt + imp + d - x.load_w - c - exp
    problems += _over("energy balance", np.abs(balance), 0.0, POWER_TOL_W)
    problems += _over("simultaneous charge and discharge", np.minimum(c, d), 0.0, POWER_TOL_W)
    problems += _over("simultaneous import and export", np.minimum(imp, exp), 0.0, POWER_TOL_W)
    problems += _over(
        "charge <= rating and envelope load limit",
        c,
        np.minimum(b.max_charge_w, lim.load_w),
        POWER_TOL_W,
    )
    problems += _over("discharge <= rating", d, b.max_discharge_w, POWER_TOL_W)
    problems += _over("curtailment <= pv", curt, x.pv_w, POWER_TOL_W)
    problems += _over("generation <= envelope", x.pv_w - curt + d, lim.generation_w, POWER_TOL_W)
    # Always attainable (curtail PV, idle the battery): an export excess is never acceptable.
    problems += _over("export <= envelope", exp, lim.export_w, POWER_TOL_W)
    # Soft bounds: excursions are allowed only when reported.
    slacks = plan.slacks
    problems += _over(
        "import over envelope is reported",
        imp - lim.import_w,
        slacks.get("import_w", 0.0),
        POWER_TOL_W,
    )
    problems += _over(
        "SoC under reserve is reported",
        b.soc_min_wh - soc[1:],
        slacks.get("soc_low_wh", 0.0),
        soc_tol,
    )
    problems += _over(
        "SoC over maximum is reported", soc[1:] - b.soc_max, slacks.get("soc_high_wh", 0.0), soc_tol
    )
    return problems
