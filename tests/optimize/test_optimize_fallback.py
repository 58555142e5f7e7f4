"""The self-consumption fallback: physical, inside the envelope whenever physics allows it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings

from gateway.optimize import (
    Battery,
    PlanInputs,
    StepLimits,
    check_plan,
    idle,
    plan_or_fallback,
    self_consumption,
    solve_plan,
    validate,
)
from gateway.optimize.plan import Plan

from .strategies import plan_inputs

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(plan_inputs())
def test_rule_plans_satisfy_invariants(x: PlanInputs) -> None:
    for plan in (self_consumption(x, reason="test"), idle(x)):
        assert plan.source == "fallback"
        assert check_plan(plan, x) == []


@FAST
@given(plan_inputs())
def test_fallback_meets_envelope_when_physically_possible(x: PlanInputs) -> None:
    v = validate(x)
    lim, b = v.limits, v.battery
    assert lim is not None
    plan = self_consumption(v)
    assert np.all(plan.export_w <= lim.export_w + 1e-6)
    pv_used = v.pv_w - plan.curtail_w
    assert np.all(pv_used + plan.discharge_w <= lim.generation_w + 1e-6)
    assert np.all(plan.charge_w <= np.minimum(lim.load_w, b.max_charge_w) + 1e-6)
    # Where import still exceeds its limit, nothing more could have been done in that step:
    # PV used up to the generation limit and the battery giving all that rating, generation limit
    # and stored energy allow.
    over = plan.import_w > lim.import_w + 1e-6
    for t in np.flatnonzero(over):
        assert plan.charge_w[t] == 0.0
        assert pv_used[t] >= min(v.pv_w[t], lim.generation_w[t]) - 1e-6
        stored_w = plan.soc_wh[t] * b.eta_discharge / v.dt_h
        can_give = min(b.max_discharge_w, lim.generation_w[t] - pv_used[t], stored_w)
        assert plan.discharge_w[t] >= can_give - 1e-6


def test_self_consumption_charges_from_surplus_and_covers_the_evening() -> None:
    x = PlanInputs(
        3600.0,
        np.array([500.0, 500.0, 1500.0]),
        np.array([2500.0, 0.0, 0.0]),
        np.full(3, 0.3),
        np.full(3, 0.05),
        battery=Battery(10_000, 0.0, 1500, 1000, eta_charge=1.0, eta_discharge=1.0),
    )
    plan = self_consumption(x)
    assert np.allclose(plan.charge_w, [1500, 0, 0])
    assert np.allclose(plan.export_w, [500, 0, 0])
    assert np.allclose(plan.discharge_w, [0, 500, 1000])
    assert np.allclose(plan.import_w, [0, 0, 500])


def _day(n: int = 8) -> PlanInputs:
    t = np.arange(n)
    return PlanInputs(
        3600.0,
        np.full(n, 800.0),
        3000.0 * (t % 4 == 1),
        np.full(n, 0.3),
        np.full(n, 0.05),
        battery=Battery(5000, 2500, 2000, 2000),
    )


def _is_fallback(plan: Plan, reason: str) -> bool:
    return plan.source == "fallback" and plan.reason.startswith(reason)


def test_over_budget_returns_the_rule_with_a_reason() -> None:
    # A real solve whose measured time is reported as 5 s: wall-clock speed is not asserted here,
    # only what the guard does with a solve that took too long.
    def slow(x: PlanInputs, *, time_limit_s: float | None = None) -> Plan:
        return replace(solve_plan(x, time_limit_s=time_limit_s), solve_ms=5000.0)

    x = _day()
    plan = plan_or_fallback(x, budget_ms=1000.0, solver=slow)
    assert _is_fallback(plan, "over budget: 5000.0 ms > 1000.0 ms")
    assert check_plan(plan, x) == []


def test_solver_failure_returns_the_rule_with_a_reason() -> None:
    # A time limit of a nanosecond makes both HiGHS and Clarabel stop without a solution.
    x = _day(24)
    plan = plan_or_fallback(x, budget_ms=1e-6)
    assert _is_fallback(plan, "solver failed: HIGHS")
    assert check_plan(plan, x) == []


def test_plan_violating_invariants_is_replaced_by_the_rule() -> None:
    def loopy(x: PlanInputs, *, time_limit_s: float | None = None) -> Plan:
        plan = solve_plan(x, time_limit_s=time_limit_s)
        return replace(plan, charge_w=plan.charge_w + 300, discharge_w=plan.discharge_w + 300)

    x = _day()
    plan = plan_or_fallback(x, solver=loopy)
    assert _is_fallback(plan, "invariants violated: ")
    assert "simultaneous charge and discharge" in plan.reason
    assert check_plan(plan, x) == []


def test_within_budget_the_lp_plan_is_used() -> None:
    plan = plan_or_fallback(_day(), budget_ms=60_000.0)
    assert plan.source == "lp" and plan.reason == ""


def test_check_plan_rejects_corrupted_plans() -> None:
    x = _day()
    good = solve_plan(x)
    assert check_plan(good, x) == []
    loop = replace(good, charge_w=good.charge_w + 500, discharge_w=good.discharge_w + 500)
    assert any("simultaneous charge" in p for p in check_plan(loop, x))
    unbalanced = replace(good, import_w=good.import_w + 100)
    assert any("energy balance" in p for p in check_plan(unbalanced, x))
    soc = good.soc_wh.copy()
    soc[3] = 6000.0
    assert any("capacity" in p for p in check_plan(replace(good, soc_wh=soc), x))
    limited = replace(
        x,
        limits=StepLimits(
            np.full(8, 100.0), np.full(8, np.inf), np.full(8, np.inf), np.full(8, np.inf)
        ),
    )
    assert any("export <= envelope" in p for p in check_plan(idle(x), limited))
    nan = good.export_w.copy()
    nan[0] = np.nan
    assert any("not finite" in p for p in check_plan(replace(good, export_w=nan), x))
