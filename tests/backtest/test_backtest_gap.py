"""The backtest's diagnosis of where the mpc loses against perfect foresight (``mpc_gap``)."""

from __future__ import annotations

import numpy as np
import pytest

from community.backtest import (
    BacktestOptions,
    daily_costs,
    gap_by_weather,
    run_backtest,
    run_home,
)


def test_daily_costs_sum_to_the_strategys_cost() -> None:
    step_s = 3600
    rng = np.random.default_rng(1)
    imp, exp = rng.uniform(0, 2000, 72), rng.uniform(0, 500, 72)
    pi, pe = rng.uniform(0.1, 0.4, 72), np.full(72, 0.08)
    soc = np.concatenate(([5000.0], rng.uniform(1000, 9000, 72)))
    days = daily_costs(imp, exp, soc, pi, pe, step_s, 0.15)
    assert days.shape == (3,)
    whole = float(np.sum((imp * pi - exp * pe) / 1000.0)) - (soc[-1] - soc[0]) / 1000.0 * 0.15
    assert days.sum() == pytest.approx(whole)
    # the first day alone: its bill and the energy the battery gained in it
    first = float(np.sum((imp[:24] * pi[:24] - exp[:24] * pe[:24]) / 1000.0))
    assert days[0] == pytest.approx(first - (soc[24] - soc[0]) / 1000.0 * 0.15)


def test_gap_by_weather_splits_overcast_days_and_surprises() -> None:
    gap = np.array([0.0, 1.0, 0.5, 0.1, 2.0])
    kt = np.array([0.9, 0.2, 0.3, 0.8, 0.1])
    g = gap_by_weather(gap, kt, kt_before=0.3)
    assert g["total"] == pytest.approx(3.6)
    assert g["overcast"] == pytest.approx(3.5) and g["other"] == pytest.approx(0.1)
    # day 1 follows the clear day 0, day 4 the clear day 3; day 2 follows the overcast day 1
    assert g["overcast_after_clear"] == pytest.approx(3.0)
    assert g["days_overcast"] == 3 and g["days_overcast_after_clear"] == 2 and g["days"] == 5
    # an overcast first day after an overcast day before the window is no surprise
    assert gap_by_weather(gap[1:], kt[1:], kt_before=0.2)["overcast_after_clear"] == 2.0


def test_the_day_gaps_add_up_to_mpc_minus_perfect_foresight() -> None:
    o = BacktestOptions(days=2, homes=1, first_home=0, start_day=330, workers=1)
    r = run_home(0, o)
    assert r.day_gap.shape == (2,) and r.day_kt.shape == (2,)
    assert np.all((r.day_kt >= 0) & (r.day_kt < 1.5)) and 0 <= r.kt_before < 1.5
    assert r.day_gap.sum() == pytest.approx(r.cost["mpc"] - r.cost["perfect_foresight"])


def test_report_carries_the_gap_by_weather() -> None:
    rep = run_backtest(BacktestOptions(days=2, homes=1, first_home=0, start_day=330, workers=1))
    g = rep["mpc_gap"]
    assert g["total"] == pytest.approx(rep["cost"]["mpc"] - rep["cost"]["perfect_foresight"],
                                       abs=0.02)
    assert g["overcast"] + g["other"] == pytest.approx(g["total"], abs=0.02)
