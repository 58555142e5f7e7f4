"""Forecast error metrics and a rolling-origin evaluator for load forecasters.

Conventions: errors are in the unit of the inputs (W); ``daily_energy_error`` is the mean over
days of |forecast kWh - actual kWh| / actual kWh (days with no actual energy are skipped);
``skill = 1 - error / error_of_reference`` (reference: persistence, i.e. the same time yesterday).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# A load forecaster as the evaluator calls it: (history timestamps, history W, issue time,
# step_s) -> 24 h of W at step_s from the issue time (which is a midnight).
LoadForecaster = Callable[[FloatArray, FloatArray, float, int], ArrayLike]


def _pair(forecast: ArrayLike, actual: ArrayLike) -> tuple[FloatArray, FloatArray]:
    f = np.asarray(forecast, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if f.shape != a.shape:
        raise ValueError(f"forecast and actual differ in shape: {f.shape} vs {a.shape}")
    if f.size == 0:
        raise ValueError("forecast and actual are empty")
    return f, a


def mae(forecast: ArrayLike, actual: ArrayLike) -> float:
    """Mean absolute error."""
    f, a = _pair(forecast, actual)
    return float(np.mean(np.abs(f - a)))


def rmse(forecast: ArrayLike, actual: ArrayLike) -> float:
    """Root mean squared error."""
    f, a = _pair(forecast, actual)
    return float(np.sqrt(np.mean((f - a) ** 2)))


def daily_energies(x: ArrayLike, steps_per_day: int) -> FloatArray:
    """Sum per whole day (the unit is W x steps; only ratios are used here)."""
    v = np.asarray(x, dtype=np.float64).ravel()
    if steps_per_day < 1 or v.size % steps_per_day:
        raise ValueError(f"length {v.size} is not whole days of {steps_per_day} steps")
    return v.reshape(-1, steps_per_day).sum(axis=1)


def daily_energy_error(forecast: ArrayLike, actual: ArrayLike, steps_per_day: int) -> float:
    """Mean absolute relative error of daily energy (0.25 = 25 %), days with zero actual skipped."""
    f, a = _pair(forecast, actual)
    ef, ea = daily_energies(f, steps_per_day), daily_energies(a, steps_per_day)
    ok = ea > 0
    if not ok.any():
        raise ValueError("no day with positive actual energy")
    return float(np.mean(np.abs(ef[ok] - ea[ok]) / ea[ok]))


def energy_bias(forecast: ArrayLike, actual: ArrayLike) -> float:
    """Total forecast energy over total actual energy, minus 1 (0 = unbiased)."""
    f, a = _pair(forecast, actual)
    total = float(a.sum())
    if total <= 0:
        raise ValueError("actual energy is not positive")
    return float(f.sum()) / total - 1.0


def skill(error: float, reference_error: float) -> float:
    """1 - error / reference_error (1 = perfect, 0 = as good as the reference)."""
    if not reference_error > 0:
        raise ValueError(f"reference error must be > 0, got {reference_error}")
    return 1.0 - error / reference_error


@dataclass(frozen=True)
class LoadEvaluation:
    """Forecasts and actuals of a rolling-origin evaluation, shape (days, steps_per_day)."""

    forecast: FloatArray
    actual: FloatArray
    step_s: int

    @property
    def mae(self) -> float:
        return mae(self.forecast, self.actual)

    @property
    def rmse(self) -> float:
        return rmse(self.forecast, self.actual)

    @property
    def daily_energy_error(self) -> float:
        return daily_energy_error(self.forecast, self.actual, self.forecast.shape[1])

    @property
    def energy_bias(self) -> float:
        return energy_bias(self.forecast, self.actual)


def evaluate_load(
    forecaster: LoadForecaster,
    watts: ArrayLike,
    step_s: int,
    start_day: int,
    days: int,
    *,
    t0: float = 0.0,
    history_days: int = 63,
) -> LoadEvaluation:
    """Issue a 24 h forecast at each midnight of days ``start_day .. start_day + days - 1``.

    ``watts`` is one household's series at ``step_s`` starting at midnight ``t0`` (epoch s, UTC
    midnight so that local time == UTC). The forecaster gets the ``history_days`` days before
    the issue time (timestamps = slot starts), never anything after it.
    """
    w = np.asarray(watts, dtype=np.float64).ravel()
    per_day = 86400 // step_s
    if step_s <= 0 or 86400 % step_s:
        raise ValueError(f"step_s must divide 86400, got {step_s}")
    if start_day < 1 or days < 1 or (start_day + days) * per_day > w.size:
        raise ValueError(
            f"days {start_day}..{start_day + days - 1} need history before and data for each "
            f"day; the series has {w.size // per_day} days"
        )
    t = t0 + step_s * np.arange(w.size, dtype=np.float64)
    fc = np.empty((days, per_day))
    for i in range(days):
        d = start_day + i
        lo = max(0, (d - history_days) * per_day)
        hi = d * per_day
        out = np.asarray(forecaster(t[lo:hi], w[lo:hi], t0 + d * 86400.0, step_s), np.float64)
        if out.shape != (per_day,):
            raise ValueError(f"forecaster returned shape {out.shape}, expected ({per_day},)")
        fc[i] = out
    actual = w[start_day * per_day : (start_day + days) * per_day].reshape(days, per_day)
    return LoadEvaluation(fc, actual, step_s)
