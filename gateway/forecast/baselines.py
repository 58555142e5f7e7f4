"""Naive load forecasts, the yardsticks of ``metrics.skill``: persistence (same time yesterday),
same time last week, and the mean / median profile of the last 7 days.

Each is a ``metrics.LoadForecaster``: ``(timestamps, watts, issue_time, step_s) -> 24 h of W``.
Slots with no history fall back to the mean of whatever the window has (0 if nothing).
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike

from gateway.forecast.load import FloatArray, bin_history


def _window(t: ArrayLike, w: ArrayLike, issue_time: float, step_s: int, days: int) -> FloatArray:
    hist = bin_history(t, w, step_s=step_s, until=issue_time, days=days)
    return hist.grid[:-1]  # the last row is the (empty) issue day when issued at midnight


def _fill(p: FloatArray, window: FloatArray) -> FloatArray:
    fin = np.isfinite(window)
    fallback = float(window[fin].mean()) if fin.any() else 0.0
    return np.where(np.isfinite(p), p, fallback)


def persistence(t: ArrayLike, w: ArrayLike, issue_time: float, step_s: int) -> FloatArray:
    """Same time yesterday."""
    g = _window(t, w, issue_time, step_s, 7)
    return _fill(g[-1], g)


def last_week(t: ArrayLike, w: ArrayLike, issue_time: float, step_s: int) -> FloatArray:
    """Same time on the same weekday last week."""
    g = _window(t, w, issue_time, step_s, 7)
    return _fill(g[0], g)


def mean_7d(t: ArrayLike, w: ArrayLike, issue_time: float, step_s: int) -> FloatArray:
    """Mean of the last 7 days per slot."""
    g = _window(t, w, issue_time, step_s, 7)
    fin = np.isfinite(g)
    n = fin.sum(axis=0)
    s = np.where(fin, g, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _fill(np.where(n > 0, s / n, np.nan), g)


def median_7d(t: ArrayLike, w: ArrayLike, issue_time: float, step_s: int) -> FloatArray:
    """Median of the last 7 days per slot."""
    g = _window(t, w, issue_time, step_s, 7)
    if not np.isfinite(g).any():
        return np.zeros(g.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slots are filled below
        return _fill(np.nanmedian(g, axis=0), g)


BASELINES = {
    "persistence": persistence,
    "last_week": last_week,
    "mean_7d": mean_7d,
    "median_7d": median_7d,
}
