"""The plan (result of a solve or of the fallback rule), its costs, and how raw flows become one.

A plan's arrays are per step, W averages (``soc_wh`` has ``steps + 1`` entries: the state at the
start of each step and at the end of the horizon). :func:`assemble` is the only way a plan is built:
it turns raw flows into physical ones (one battery direction, one grid direction per step, SoC
integrated exactly from the flows) and recomputes the slacks from those final flows, so the slacks
reported are the plan's real envelope and reserve excursions, not solver internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.optimize.inputs import FloatArray, PlanInputs

SLACK_KEYS = ("export_w", "import_w", "soc_low_wh", "soc_high_wh")


@dataclass(frozen=True)
class Setpoint:
    """What the fast loop should aim for in the first step (it still clamps to the envelope)."""

    battery_w: float  # + charge, - discharge
    site_w: float  # + import, - export
    curtail_w: float
    soc_end_wh: float


@dataclass(frozen=True)
class Plan:
    """A battery/grid schedule over the horizon. ``source`` is "lp" or "fallback"."""

    step_s: float
    charge_w: FloatArray
    discharge_w: FloatArray
    import_w: FloatArray
    export_w: FloatArray
    curtail_w: FloatArray
    soc_wh: FloatArray
    slacks: dict[str, FloatArray]
    objective: float
    cost: float
    status: str
    solve_ms: float
    source: str
    reason: str = ""

    @property
    def battery_w(self) -> FloatArray:
        return self.charge_w - self.discharge_w

    @property
    def site_w(self) -> FloatArray:
        return self.import_w - self.export_w

    @property
    def setpoint(self) -> Setpoint:
        return Setpoint(
            float(self.battery_w[0]),
            float(self.site_w[0]),
            float(self.curtail_w[0]),
            float(self.soc_wh[1]),
        )

    @property
    def max_slack(self) -> float:
        """Largest envelope or SoC-bound excursion (W or Wh); 0 when every soft bound holds."""
        return max(float(np.max(self.slacks[k], initial=0.0)) for k in SLACK_KEYS)


def plan_cost(
    import_w: FloatArray, export_w: FloatArray, prices: tuple[FloatArray, FloatArray], step_s: float
) -> float:
    """Money paid to the grid over the horizon: import at the import price minus export revenue.

    ``prices`` is ``(import_price, export_price)`` per kWh, per step.
    """
    imp_price, exp_price = prices
    kwh = step_s / 3600.0 / 1000.0
    return float(kwh * (np.dot(imp_price, import_w) - np.dot(exp_price, export_w)))


def economic_cost(plan: Plan, inputs: PlanInputs) -> float:
    """Grid cost at the retail prices, plus degradation, minus the terminal value of stored energy.

    This is the yardstick to compare strategies on the same inputs: the LP minimises exactly this
    (plus penalties, which are zero when no limit binds) when there is no market term.
    """
    b = inputs.battery
    kwh = inputs.step_s / 3600.0 / 1000.0
    grid = plan_cost(
        plan.import_w, plan.export_w, (inputs.import_price, inputs.export_price), inputs.step_s
    )
    wear = b.degradation_per_kwh * kwh * float(np.sum(plan.charge_w + plan.discharge_w))
    stored = b.terminal_value_per_kwh * (plan.soc_wh[-1] - plan.soc_wh[0]) / 1000.0
    return grid + wear - stored


def integrate_soc(
    soc0_wh: float,
    charge_w: FloatArray,
    discharge_w: FloatArray,
    eta_c: float,
    eta_d: float,
    step_s: float,
) -> FloatArray:
    """SoC at each step boundary (``steps + 1`` values) from AC-side charge/discharge power."""
    dt_h = step_s / 3600.0
    delta = (eta_c * charge_w - discharge_w / eta_d) * dt_h
    return np.concatenate(([soc0_wh], soc0_wh + np.cumsum(delta)))


def _excess(value: FloatArray | float, bound: FloatArray | float) -> FloatArray:
    # Excursions below a milliwatt (milli-Wh) are float noise, not something to report.
    over = np.maximum(np.asarray(value, dtype=np.float64) - bound, 0.0)
    return np.where(over > 1e-3, over, 0.0)


def assemble(
    inputs: PlanInputs,
    charge_w: FloatArray,
    discharge_w: FloatArray,
    curtail_w: FloatArray,
    *,
    objective: float,
    status: str,
    solve_ms: float,
    source: str,
    reason: str = "",
) -> Plan:
    """Build a physical plan from (validated) inputs and raw battery/curtailment flows.

    An LP may charge and discharge in the same step: with eta < 1 that burns energy, which is worth
    it to a relaxation whenever energy has negative value (negative prices, a binding export limit)
    and is a tie when nothing is lost. A battery cannot do both, so each step is replaced by the
    single direction that gives the same SoC change. The AC power the loop used to absorb is then
    shed by curtailing PV where the step would otherwise export more than before; grid import and
    export follow from the energy balance, so at most one of them is non-zero.
    """
    b = inputs.battery
    assert inputs.limits is not None
    load, pv = inputs.load_w, inputs.pv_w
    # Solver noise can leave -1e-9; physical flows are non-negative and curtailment is <= PV.
    c = np.maximum(charge_w, 0.0)
    d = np.maximum(discharge_w, 0.0)
    curt = np.clip(curtail_w, 0.0, pv)
    site_before = load + c - d - pv + curt

    dc = b.eta_charge * c - d / b.eta_discharge
    c2 = np.where(dc > 0, dc / b.eta_charge, 0.0)
    d2 = np.where(dc < 0, -dc * b.eta_discharge, 0.0)
    site = load + c2 - d2 - pv + curt
    # Removing a loop lowers site power; where that would add export, curtail instead.
    added_export = np.maximum(-site, 0.0) - np.maximum(-site_before, 0.0)
    extra = np.clip(added_export, 0.0, pv - curt)
    curt = curt + extra
    site = site + extra

    imp = np.maximum(site, 0.0)
    exp = np.maximum(-site, 0.0)
    soc = integrate_soc(b.soc0_wh, c2, d2, b.eta_charge, b.eta_discharge, inputs.step_s)
    lim = inputs.limits
    slacks = {
        "export_w": _excess(exp, lim.export_w),
        "import_w": _excess(imp, lim.import_w),
        "soc_low_wh": _excess(b.soc_min_wh, soc[1:]),
        "soc_high_wh": _excess(soc[1:], b.soc_max),
    }
    if inputs.award_w is not None:
        # Not a slack but reported alongside: how far the plan departs from awarded trades.
        awarded = inputs.award_w != 0
        slacks["award_dev_w"] = np.where(awarded, exp - imp - inputs.award_w, 0.0)
    cost = plan_cost(imp, exp, (inputs.import_price, inputs.export_price), inputs.step_s)
    return Plan(
        inputs.step_s,
        c2,
        d2,
        imp,
        exp,
        curt,
        soc,
        slacks,
        objective,
        cost,
        status,
        solve_ms,
        source,
        reason,
    )
