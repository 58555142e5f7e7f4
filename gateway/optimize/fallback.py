"""Rule-based plans, and the guard that uses one whenever the LP cannot be trusted.

``self_consumption`` is what an inverter does on its own, kept inside the envelope: charge from
PV surplus, discharge to cover the load down to the reserve, never charge from or discharge to the
grid. It curtails PV only as far as the generation and export limits require, and dips into the
reserve only when the DSO import limit would otherwise be exceeded. ``idle`` leaves the battery
alone. Both are greedy, step by step, and physical by construction.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Protocol

import numpy as np

from gateway.optimize.inputs import PlanInputs, validate
from gateway.optimize.invariants import check_plan
from gateway.optimize.plan import Plan, assemble
from gateway.optimize.problem import SolveFailed, solve_plan

DEFAULT_BUDGET_MS = 1000.0


class Solver(Protocol):
    def __call__(self, inputs: PlanInputs, /, *, time_limit_s: float | None = None) -> Plan: ...


def _rule_plan(inputs: PlanInputs, use_battery: bool, reason: str) -> Plan:
    t0 = time.perf_counter()
    x = validate(inputs)
    b = x.battery
    lim = x.limits
    assert lim is not None
    n, dt = x.steps, x.dt_h
    charge, discharge, curtail = np.zeros(n), np.zeros(n), np.zeros(n)
    soc = b.soc0_wh
    cmax = np.minimum(b.max_charge_w, lim.load_w) if use_battery else np.zeros(n)
    dmax = b.max_discharge_w if use_battery else 0.0
    for t in range(n):
        pv_used = min(x.pv_w[t], lim.generation_w[t])  # PV over the generation limit is shed
        surplus = pv_used - x.load_w[t]
        c = d = 0.0
        if surplus > 0:
            room_w = max(b.soc_max - soc, 0.0) / (b.eta_charge * dt)
            c = min(surplus, cmax[t], room_w)
            pv_used -= max(surplus - c - lim.export_w[t], 0.0)
        else:
            deficit = -surplus
            gen_room = lim.generation_w[t] - pv_used
            above_reserve_w = max(soc - b.soc_min_wh, 0.0) * b.eta_discharge / dt
            d = min(deficit, dmax, gen_room, above_reserve_w)
            over_import = deficit - d - lim.import_w[t]
            if over_import > 0:  # the DSO import limit outranks the reserve
                stored_w = max(soc, 0.0) * b.eta_discharge / dt
                d = min(d + over_import, dmax, gen_room, stored_w)
        charge[t], discharge[t] = c, d
        curtail[t] = x.pv_w[t] - pv_used
        soc = min(max(soc + (b.eta_charge * c - d / b.eta_discharge) * dt, 0.0), b.capacity_wh)
    plan = assemble(
        x,
        charge,
        discharge,
        curtail,
        objective=0.0,
        status="fallback" if reason else "rule",
        source="fallback",
        solve_ms=(time.perf_counter() - t0) * 1e3,
        reason=reason,
    )
    return replace(plan, objective=plan.cost)


def self_consumption(inputs: PlanInputs, reason: str = "") -> Plan:
    """Self-consumption within the envelope (the fallback rule); see the module docstring."""
    return _rule_plan(inputs, use_battery=True, reason=reason)


def idle(inputs: PlanInputs, reason: str = "") -> Plan:
    """Battery unused; PV curtailed only as far as the envelope requires."""
    return _rule_plan(inputs, use_battery=False, reason=reason)


def plan_or_fallback(
    inputs: PlanInputs, budget_ms: float = DEFAULT_BUDGET_MS, solver: Solver = solve_plan
) -> Plan:
    """Solve the LP; return the self-consumption rule instead if the LP cannot be used.

    The rule is used (with ``reason`` saying why) when no solver succeeds, when the solve took
    longer than ``budget_ms`` (HiGHS is also given that budget as its time limit, so it cannot run
    far past it), or when the plan violates an invariant. Invalid inputs raise ``ValueError``:
    there is no plan, rule or LP, for inputs that do not describe a household. ``solver`` is
    the LP solve (replaceable so that the guard itself can be tested).
    """
    x = validate(inputs)
    try:
        plan = solver(x, time_limit_s=budget_ms / 1000.0)
    except SolveFailed as exc:
        return _checked_fallback(x, f"solver failed: {exc}")
    if plan.solve_ms > budget_ms:
        return _checked_fallback(x, f"over budget: {plan.solve_ms:.1f} ms > {budget_ms:.1f} ms")
    problems = check_plan(plan, x)
    if problems:
        return _checked_fallback(x, "invariants violated: " + "; ".join(problems[:3]))
    return plan


def _checked_fallback(x: PlanInputs, reason: str) -> Plan:
    plan = self_consumption(x, reason=reason)
    problems = check_plan(plan, x)
    if problems:  # a bug, not an input condition: say so loudly in the plan itself
        plan = replace(plan, reason=f"{reason}; fallback also violates: {'; '.join(problems)}")
    return plan
