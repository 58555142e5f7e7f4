"""Plans from the LP (and the guarded entry point) satisfy the physical invariants."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gateway.optimize import (
    Battery,
    PlanInputs,
    StepLimits,
    check_plan,
    plan_or_fallback,
    solve_plan,
)

from .strategies import plan_inputs

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(plan_inputs())
def test_lp_plans_satisfy_invariants(x: PlanInputs) -> None:
    plan = solve_plan(x)
    assert plan.source == "lp"
    assert check_plan(plan, x) == []


@FAST
@given(plan_inputs())
def test_guarded_plan_never_violates(x: PlanInputs) -> None:
    plan = plan_or_fallback(x)
    assert check_plan(plan, x) == []
    # The DSO limits that physics always allows are met exactly, whatever the prices.
    lim = x.limits or StepLimits.unlimited(x.steps)
    assert np.all(plan.export_w <= lim.export_w + 1.0)
    assert np.all(x.pv_w - plan.curtail_w + plan.discharge_w <= lim.generation_w + 1.0)


def _night(n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load, PV, import price, export price of n night steps."""
    return np.full(n, 2000.0), np.zeros(n), np.full(n, 0.3), np.full(n, 0.05)


def test_zero_capacity_battery_plans_like_no_battery() -> None:
    b = Battery(capacity_wh=0.0, soc0_wh=0.0, max_charge_w=5000, max_discharge_w=5000)
    x = PlanInputs(900.0, *_night(), battery=b)
    plan = solve_plan(x)
    assert check_plan(plan, x) == []
    assert np.all(plan.soc_wh == 0.0)
    assert np.allclose(plan.charge_w, 0.0) and np.allclose(plan.discharge_w, 0.0)
    assert np.allclose(plan.import_w, 2000.0)


def test_import_limit_below_load_solves_with_reported_slack() -> None:
    n = 6
    limits = StepLimits(
        np.full(n, np.inf), np.full(n, 500.0), np.full(n, np.inf), np.full(n, np.inf)
    )
    x = PlanInputs(900.0, *_night(n), limits=limits)  # no battery: the load cannot be shed
    plan = solve_plan(x)
    assert plan.status.startswith("optimal")
    assert np.allclose(plan.slacks["import_w"], 1500.0, atol=1e-3)
    assert check_plan(plan, x) == []


def test_import_limit_outranks_the_reserve() -> None:
    n = 4
    limits = StepLimits(
        np.full(n, np.inf), np.full(n, 1000.0), np.full(n, np.inf), np.full(n, np.inf)
    )
    b = Battery(
        capacity_wh=10_000,
        soc0_wh=2100,
        max_charge_w=5000,
        max_discharge_w=5000,
        soc_min_wh=2000,
        eta_charge=1.0,
        eta_discharge=1.0,
    )
    x = PlanInputs(3600.0, *_night(n), battery=b, limits=limits)
    plan = solve_plan(x)
    # The battery covers 1000 W per hour, through the reserve, until it is empty; only then does
    # import exceed the limit (reported), never earlier to spare the reserve.
    assert np.allclose(plan.soc_wh, [2100, 1100, 100, 0, 0], atol=1e-3)
    assert np.allclose(plan.slacks["import_w"], [0, 0, 900, 1000], atol=1e-3)
    assert np.allclose(plan.slacks["soc_low_wh"], [900, 1900, 2000, 2000], atol=1e-3)
    assert check_plan(plan, x) == []


def test_soc_below_reserve_at_start_is_reported_not_infeasible() -> None:
    b = Battery(
        capacity_wh=10_000, soc0_wh=500, max_charge_w=0, max_discharge_w=5000, soc_min_wh=3000
    )
    x = PlanInputs(900.0, *_night(4), battery=b)
    plan = solve_plan(x)
    assert np.all(plan.discharge_w == 0.0)
    assert np.allclose(plan.slacks["soc_low_wh"], 2500.0)
    assert check_plan(plan, x) == []


def test_negative_feed_in_with_zero_export_limit_curtails() -> None:
    n = 4
    limits = StepLimits(np.zeros(n), np.full(n, np.inf), np.full(n, np.inf), np.full(n, np.inf))
    x = PlanInputs(
        900.0,
        np.full(n, 300.0),
        np.full(n, 5000.0),
        np.full(n, 0.2),
        np.full(n, -0.3),
        battery=Battery(5000, 5000, 3000, 3000),
        limits=limits,
    )
    plan = solve_plan(x)
    assert np.allclose(plan.export_w, 0.0, atol=1e-6)
    assert np.allclose(plan.curtail_w, 4700.0, atol=1e-3)  # battery already full
    assert check_plan(plan, x) == []


def test_negative_import_price_yields_no_charge_discharge_loop() -> None:
    # Paid to import: an LP relaxation would burn energy in charge+discharge loops.
    n = 6
    x = PlanInputs(
        900.0,
        np.full(n, 500.0),
        np.zeros(n),
        np.full(n, -0.3),
        np.full(n, -0.3),
        battery=Battery(5000, 5000, 3000, 3000, eta_charge=0.9, eta_discharge=0.9),
    )
    plan = solve_plan(x)
    assert np.all(np.minimum(plan.charge_w, plan.discharge_w) == 0.0)
    assert check_plan(plan, x) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("load_w", np.array([1.0, np.nan, 2.0]), "load_w: not finite at step 1"),
        ("pv_w", np.array([1.0, -1.0, 2.0]), "pv_w: negative at step 1"),
        ("import_price", np.array([0.1, 0.2]), "import_price: expected 3 steps"),
        ("export_price", np.array([0.1, 99.0, 0.1]), "export_price: |price|"),
    ],
)
def test_bad_input_is_one_clear_error(field: str, value: np.ndarray, message: str) -> None:
    bad: dict[str, Any] = {field: value}
    x = replace(PlanInputs(900.0, np.ones(3), np.ones(3), np.full(3, 0.2), np.full(3, 0.05)), **bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        solve_plan(x)


def test_nan_limit_is_an_error_not_no_limit() -> None:
    n = 3
    limits = StepLimits(
        np.array([1.0, np.nan, 1.0]), np.full(n, np.inf), np.full(n, np.inf), np.full(n, np.inf)
    )
    with pytest.raises(ValueError, match=r"limits\.export_w: NaN at step 1"):
        solve_plan(PlanInputs(900.0, *_night(n), limits=limits))


def test_soc0_noise_is_clipped_but_nonsense_rejected() -> None:
    ok = Battery(10_000, 10_001, 1000, 1000)
    assert solve_plan(PlanInputs(900.0, *_night(2), battery=ok)).soc_wh[0] == 10_000
    with pytest.raises(ValueError, match=r"battery\.soc0_wh"):
        solve_plan(PlanInputs(900.0, *_night(2), battery=Battery(10_000, 12_000, 1000, 1000)))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ("steps", "step_s"),
        ("reserve", "battery.soc_max_wh"),
    ],
)
def test_contradictory_configuration_rejected(bad: str, field: str) -> None:
    night = _night(2)
    if bad == "steps":
        x = PlanInputs(0.0, *night)
    else:
        x = PlanInputs(
            900.0,
            *night,
            battery=Battery(10_000, 5000, 1000, 1000, soc_min_wh=6000, soc_max_wh=4000),
        )
    with pytest.raises(ValueError, match=field):
        solve_plan(x)
