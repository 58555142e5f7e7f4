"""The closed-loop backtest on the shipped data (small: 2 households x 3 days)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from community.backtest import (
    BacktestOptions,
    ForecastIssue,
    plant_step,
    read_forecast_csv,
    run_backtest,
    run_home,
    synthetic_day_ahead,
    write_forecast_csv,
)
from firmware_sim.profiles import load_households


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
    used = report["forecasts_used"]
    assert isinstance(used, dict) and used["pv"].startswith("own") and used["load"] == "own history"
    pv = report["pv_forecast"]
    assert isinstance(pv, dict) and pv["daily_kwh_mean"] > 0 and pv["daily_rmse_pct"] > 0


# ------------------------------------------------------------------ forecast modes, external PV


def _day_grid(days: int = 3, step_s: int = 1800) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    per = 86400 // step_s
    t = 1_700_006_400.0 + step_s * np.arange(days * per)  # a UTC midnight
    hour = (t % 86400) / 3600.0
    clear = np.clip(np.sin((hour - 6.0) / 12.0 * np.pi), 0.0, None) * 3000.0
    kt = np.repeat([0.9, 0.2, 0.6][:days], per)
    return t, clear * kt, clear


def test_synthetic_forecast_without_error_keeps_each_days_energy() -> None:
    t, pv, clear = _day_grid()
    issues = synthetic_day_ahead(t, pv, clear, 1800, sigma=0.0, seed=1)
    # an issue every 6 h from the first midnight, each reaching 48 h ahead (or the data's end)
    assert [f.issued_at - t[0] for f in issues] == [h * 3600.0 for h in range(0, 72, 6)]
    assert issues[0].times.size == 96 and issues[-1].times[-1] == t[-1]
    fc = issues[0].watts
    for d in range(2):
        day = slice(48 * d, 48 * (d + 1))
        assert fc[day].sum() == pytest.approx(pv[day].sum(), rel=0.02)
    assert np.all(fc <= 1.05 * clear[:96] + 1e-9) and np.all(fc[clear[:96] == 0] == 0)


def test_synthetic_forecast_error_is_per_day_seeded_and_bounded() -> None:
    t, pv, clear = _day_grid()
    a = synthetic_day_ahead(t, pv, clear, 1800, sigma=0.3, seed=7)
    b = synthetic_day_ahead(t, pv, clear, 1800, sigma=0.3, seed=7)
    assert np.array_equal(a[0].watts, b[0].watts)
    e = [a[0].watts[48 * d : 48 * (d + 1)].sum() / pv[48 * d : 48 * (d + 1)].sum() for d in (0, 1)]
    assert e != pytest.approx([1.0, 1.0], rel=1e-3)  # the days are forecast with an error
    assert np.all(a[0].watts >= 0) and np.all(a[0].watts <= 1.05 * clear[:96] + 1e-9)


def test_forecast_file_round_trip_and_errors(tmp_path: Path) -> None:
    t, pv, clear = _day_grid(2)
    issues = synthetic_day_ahead(t, pv, clear, 1800, sigma=0.2, seed=3)
    path = str(tmp_path / "pv.csv")
    write_forecast_csv(path, issues)
    back = read_forecast_csv(path)
    assert [f.issued_at for f in back] == [f.issued_at for f in issues]
    assert np.allclose(back[3].watts, issues[3].watts, atol=0.06)
    assert np.array_equal(back[3].times, issues[3].times)
    bad = tmp_path / "bad.csv"
    bad.write_text("issued_at,timestamp,watts\n1,2,3\n1,2\n")
    with pytest.raises(ValueError, match="line 3"):
        read_forecast_csv(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        read_forecast_csv(str(tmp_path / "missing.csv"))


def test_options_reject_unknown_forecast_modes() -> None:
    with pytest.raises(ValueError, match="pv_forecast"):
        BacktestOptions(pv_forecast="weather").validate()
    with pytest.raises(ValueError, match="load_forecast"):
        BacktestOptions(load_forecast="external").validate()
    with pytest.raises(ValueError, match="pv_forecast_file"):
        BacktestOptions(pv_forecast_file="x.csv").validate()
    assert "ORACLE" in BacktestOptions(pv_forecast="perfect").forecasts_label()["pv"]
    assert "SYNTHETIC" in BacktestOptions(pv_forecast="external").forecasts_label()["pv"]


def test_oracle_forecasts_bring_the_mpc_close_to_perfect_foresight() -> None:
    o = BacktestOptions(days=2, homes=1, first_home=0, start_day=330, workers=1,
                        load_forecast="perfect", pv_forecast="perfect")
    r = run_home(0, o)
    assert r.forecast["pv_day_abs_err_kwh"] == 0.0
    gain = r.cost["self_consumption"] - r.cost["perfect_foresight"]
    assert gain > 0.05
    assert r.cost["self_consumption"] - r.cost["mpc"] >= 0.8 * gain


def test_an_external_forecast_file_is_what_the_mpc_plans_with(tmp_path: Path) -> None:
    # a file that says "no sun" all day: the PV forecast the mpc planned with is 0
    path = str(tmp_path / "dark.csv")
    year0 = datetime(load_households("richardson").year, 1, 1, tzinfo=UTC).timestamp()
    day0 = year0 + 330 * 86400.0
    dark = [ForecastIssue(day0 + i * 21600.0, day0 + i * 21600.0 + 1800.0 * np.arange(96),
                          np.zeros(96)) for i in range(8)]
    write_forecast_csv(path, dark)
    o = BacktestOptions(days=1, homes=1, first_home=0, start_day=330, workers=1,
                        pv_forecast="external", pv_forecast_file=path)
    r = run_home(0, o)
    assert r.forecast["pv_day_fc_kwh"] == 0.0 and r.forecast["pv_day_kwh"] > 0.5
