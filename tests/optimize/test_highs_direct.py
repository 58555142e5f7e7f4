"""The LP held directly in HiGHS (gateway.optimize.highs_lp) is the cvxpy LP: same optimum,
same physics, on any input; re-solves in place stay right when the matrix must change."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.optimize import PlanInputs, bid_curve, check_plan, solve_plan
from gateway.optimize.highs_lp import solve_plan_highs
from gateway.planner import Planner, solver_for

from .strategies import plan_inputs

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _same_optimum(a: float, b: float) -> bool:
    # Within 1e-5 (relative, or absolute near 0): both are optima at the solvers' default
    # tolerances, reached from different starting points. ci23 drew an objective of ~0 (24 W of
    # surplus worth 1.2e-7/kWh) that cvxpy, after solving other problems, returned as 6e-7 here
    # and beyond 1e-6 on the runner. A stale matrix or basis, what these tests look for, is off
    # by whole percent.
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


@FAST
@given(plan_inputs())
def test_same_optimum_as_cvxpy_and_a_physical_plan(x: PlanInputs) -> None:
    ref = solve_plan(x)
    got = solve_plan_highs(x)
    assert _same_optimum(got.objective, ref.objective), (got.objective, ref.objective)
    assert got.source == "lp"
    assert check_plan(got, x) == []


@FAST
@given(plan_inputs(), st.integers(0, 10_000))
def test_re_solving_in_place_after_other_inputs_is_still_right(x: PlanInputs, seed: int) -> None:
    """A held model re-solved after other costs, bounds, awards and efficiencies: the same
    optimum as solving each afresh (a stale matrix or basis would show here)."""
    rng = np.random.default_rng(seed)
    n = x.steps
    award = rng.choice([0.0, 1.0, -1.0], n) * rng.uniform(0, 4000, n)
    other = replace(x, load_w=x.load_w[::-1].copy(), import_price=x.import_price * 1.5,
                    award_w=award,
                    market_price=None if x.market_price is None else x.market_price[::-1].copy(),
                    battery=replace(x.battery, eta_charge=0.9, eta_discharge=0.85))
    awarded = replace(x, award_w=award)  # only the award rows' coefficients change
    for y in (x, awarded, x, other, awarded, x):
        assert _same_optimum(solve_plan_highs(y).objective, solve_plan(y).objective)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_inputs(), st.integers(0, 23))
def test_bid_curves_solve_the_same_problems_with_either_solver(x: PlanInputs, k: int) -> None:
    """Each price point of a bid curve is the same LP optimum either way (where the optimum is
    not unique the traded energy may differ; the cost may not), and the curve is monotone."""
    k = k % x.steps
    prices = [0.01, 0.05, 0.1, 0.2, 0.3]
    for p in prices:
        mp = np.zeros(x.steps) if x.market_price is None else x.market_price.copy()
        mw = np.zeros(x.steps) if x.market_weight is None else x.market_weight.copy()
        mp[k], mw[k] = p, 1.0
        y = x.with_market(mp, mw)
        assert _same_optimum(solve_plan_highs(y).objective, solve_plan(y).objective), p
    b = bid_curve(x, k, prices, solver=solve_plan_highs)
    assert np.all(np.diff(b.net_export_wh) >= -1e-9)


def test_a_solver_failure_is_solve_failed_and_the_next_solve_starts_afresh() -> None:
    from gateway.optimize import Battery
    from gateway.optimize.problem import SolveFailed

    n = 96
    x = PlanInputs(step_s=900, load_w=np.full(n, 800.0), pv_w=np.zeros(n),
                   import_price=np.full(n, 0.3), export_price=np.full(n, 0.08),
                   battery=Battery(capacity_wh=10_000, max_charge_w=3000, max_discharge_w=3000,
                                   soc0_wh=5000))
    with pytest.raises(SolveFailed, match="highs"):
        solve_plan_highs(x, time_limit_s=1e-9)
    assert _same_optimum(solve_plan_highs(x).objective, solve_plan(x).objective)


def test_the_time_limit_is_per_solve_not_per_held_model() -> None:
    """HiGHS counts run time over the life of a Highs object: a held model re-solved many times
    must not run out of a per-solve budget (seen in a 50-home day: plans fell back)."""
    rng = np.random.default_rng(3)
    n = 48
    budget = 0.02
    for _ in range(300):  # new loads each time (real pivots): together far more than a budget
        x = PlanInputs(step_s=1800, load_w=rng.uniform(200, 3000, n),
                       pv_w=rng.uniform(0, 4000, n), import_price=rng.uniform(0.1, 0.4, n),
                       export_price=np.full(n, 0.08), battery=_battery())
        solve_plan_highs(x, time_limit_s=budget)  # raises SolveFailed once over the total


def _battery() -> Any:
    from gateway.optimize import Battery

    return Battery(capacity_wh=10_000, max_charge_w=3000, max_discharge_w=3000, soc0_wh=5000)


def test_the_planner_uses_the_configured_solver() -> None:
    base = {"site_id": "s1", "devices": [{"kind": "meter", "host": "127.0.0.1"}],
            "broker": {"url": "mqtt://127.0.0.1:1883"}}
    cfg = parse_config({**base, "planner": {"enabled": True, "solver": "highs"}})
    assert Planner(cfg).solver is solve_plan_highs
    assert Planner(parse_config(base)).solver is solve_plan
    with pytest.raises(ValueError, match=r"planner\.solver"):
        parse_config({**base, "planner": {"solver": "gurobi"}})
    with pytest.raises(ValueError, match="must be 'cvxpy' or 'highs'"):
        solver_for("gurobi")
