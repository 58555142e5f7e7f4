"""The perfect-information plan is never worse than the rules it is meant to beat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gateway.optimize import (
    Battery,
    PlanInputs,
    economic_cost,
    idle,
    plan_cost,
    self_consumption,
    solve_plan,
    validate,
)
from gateway.optimize.coefficients import EXPORT_TIE_BREAK
from gateway.optimize.problem import compiled

from .strategies import plan_inputs

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_plan_cost_is_import_cost_minus_export_revenue() -> None:
    # 2 kW import for 30 min at 0.30 = 0.30; 1 kW export for 30 min at -0.10 costs another 0.05.
    cost = plan_cost(
        np.array([2000.0, 0.0]),
        np.array([0.0, 1000.0]),
        (np.array([0.3, 0.3]), np.array([0.05, -0.1])),
        1800.0,
    )
    assert cost == pytest.approx(0.30 + 0.05)


@FAST
@given(
    plan_inputs(
        with_limits=False, with_market=False, fit_below_import=True, soc0_above_reserve=True
    )
)
def test_perfect_foresight_never_worse_than_idle_or_self_consumption(x: PlanInputs) -> None:
    v = validate(x)
    lp = economic_cost(solve_plan(v), v)
    # The LP's export tie-break (charge before exporting) may forgo up to that much per kWh of
    # PV when the feed-in tariff is below it (a hypothesis case: 1e-5/kWh feed-in, 0.1 kWh).
    tol = 1e-6 * (1.0 + abs(lp)) + EXPORT_TIE_BREAK * float(np.sum(v.pv_w)) * v.dt_h / 1000.0
    assert lp <= economic_cost(self_consumption(v), v) + tol
    assert lp <= economic_cost(idle(v), v) + tol


def test_the_lp_uses_the_tariff_spread() -> None:
    # Cheap night, dear evening: the LP buys at night what the rules never would.
    n = 24
    imp = np.where(np.arange(n) < 6, 0.10, 0.40)
    x = PlanInputs(
        3600.0,
        np.full(n, 500.0),
        np.zeros(n),
        imp,
        np.full(n, 0.05),
        battery=Battery(10_000, 0.0, 3000, 3000, degradation_per_kwh=0.02),
    )
    lp = economic_cost(solve_plan(x), x)
    sc = economic_cost(self_consumption(x), x)
    assert lp < sc - 1.0  # ~9 kWh shifted at 0.30 spread, minus losses and wear


def test_compiled_once_per_shape_and_reused_with_new_values() -> None:
    x = PlanInputs(900.0, np.full(4, 500.0), np.zeros(4), np.full(4, 0.3), np.full(4, 0.05))
    a = solve_plan(x)
    problem = compiled(4, 900.0)
    assert problem.problem.is_dpp()
    b = solve_plan(
        PlanInputs(900.0, np.full(4, 900.0), np.zeros(4), np.full(4, 0.3), np.full(4, 0.05))
    )
    assert compiled(4, 900.0) is problem
    assert np.allclose(a.import_w, 500.0) and np.allclose(b.import_w, 900.0)
