"""The closed-loop backtest on the shipped data (small: 2 households x 3 days)."""

from __future__ import annotations

import math

import pytest

from community.backtest import BacktestOptions, plant_step, run_backtest


def test_plant_respects_capacity_reserve_and_ratings() -> None:
    # asked to charge 10 kW for an hour into a 10 kWh battery at 9.5 kWh
    b, soc, imp, exp = plant_step(9500.0, 10_000.0, 500.0, 0.0, 3600, 10_000.0, 5000.0, 5000.0,
                                  0.95, reserve_wh=1000.0)
    assert b == pytest.approx(500.0 / 0.95) and soc == pytest.approx(10_000.0)
    assert imp == pytest.approx(500.0 + b) and exp == 0.0
    # asked to discharge 5 kW with 1.2 kWh stored and a 1 kWh reserve
    b, soc, imp, exp = plant_step(1200.0, -5000.0, 3000.0, 0.0, 3600, 10_000.0, 5000.0, 5000.0,
                                  0.95, reserve_wh=1000.0)
    assert soc == pytest.approx(1000.0) and b == pytest.approx(-200.0 * 0.95)
    assert exp == 0.0 and imp == pytest.approx(3000.0 + b)


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    return run_backtest(BacktestOptions(days=3, homes=2, start_day=330, workers=1))


def test_strategies_are_ordered_as_physics_says(report: dict[str, object]) -> None:
    cost = report["cost"]
    assert isinstance(cost, dict)
    # the perfect-foresight LP is a lower bound of every strategy on the same data
    for s in ("idle", "self_consumption", "mpc"):
        assert cost["perfect_foresight"] <= cost[s] + 1e-6, s
    # a battery used sensibly beats an idle one in late November on a time-of-use tariff
    assert cost["self_consumption"] < cost["idle"]
    assert cost["mpc"] < cost["idle"]
    capture = report["capture"]
    assert isinstance(capture, float) and math.isfinite(capture)


def test_report_has_the_documented_keys(report: dict[str, object]) -> None:
    assert {"days", "homes", "tariff", "cost", "capture", "forecast", "solve_ms"} <= set(report)
    assert report["days"] == 3 and report["homes"] == 2
    fc = report["forecast"]
    assert isinstance(fc, dict)
    assert set(fc) == {"mae_kw", "skill_vs_persistence", "rmse_skill", "daily_energy_error"}
    assert 0.0 < fc["mae_kw"] < 2.0
    solve = report["solve_ms"]
    assert isinstance(solve, dict) and 0 < solve["p50"] <= solve["p99"]
    assert report["fallbacks"] == 0
