"""Metrics on hand-checkable arrays and the rolling-origin evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.forecast import baselines
from gateway.forecast.metrics import (
    daily_energy_error,
    energy_bias,
    evaluate_load,
    mae,
    rmse,
    skill,
)


def test_hand_checked_values() -> None:
    f = np.array([1.0, 2.0, 3.0, 4.0])
    a = np.array([1.0, 0.0, 3.0, 8.0])
    assert mae(f, a) == pytest.approx((0 + 2 + 0 + 4) / 4)
    assert rmse(f, a) == pytest.approx(np.sqrt((4 + 16) / 4))
    # two "days" of two steps: energies f = 3, 7; a = 1, 11 -> |2|/1, |4|/11
    assert daily_energy_error(f, a, 2) == pytest.approx((2.0 + 4.0 / 11.0) / 2)
    assert energy_bias(f, a) == pytest.approx(10 / 12 - 1)
    assert skill(0.5, 2.0) == pytest.approx(0.75)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        mae([1, 2], [1])
    with pytest.raises(ValueError, match="whole days"):
        daily_energy_error([1, 2, 3], [1, 2, 3], 2)
    with pytest.raises(ValueError, match="reference"):
        skill(1.0, 0.0)
    with pytest.raises(ValueError, match="positive actual"):
        daily_energy_error([1, 1], [0, 0], 2)


def test_evaluate_load_uses_only_the_past() -> None:
    per_day = 4
    # day d has load 100 (d + 1) plus a small in-day pattern (a constant day would be "stuck")
    w = (100.0 * np.arange(1.0, 11.0)[:, None] + np.array([0.0, 10.0, 20.0, 30.0])).ravel()
    ev = evaluate_load(baselines.persistence, w, 21600, start_day=2, days=5)
    assert ev.forecast.shape == (5, per_day)
    # persistence: the forecast for day d is day d - 1's value
    np.testing.assert_allclose(ev.forecast[:, 0], [200, 300, 400, 500, 600])
    np.testing.assert_allclose(ev.actual[:, 0], [300, 400, 500, 600, 700])
    assert ev.mae == pytest.approx(100.0)
    week = evaluate_load(baselines.mean_7d, w, 21600, start_day=8, days=2)
    np.testing.assert_allclose(week.forecast[:, 0], [500.0, 600.0])  # mean of days 1..7, 2..8

    def peeking(t: np.ndarray, x: np.ndarray, issue: float, step: int) -> np.ndarray:
        assert t.max() < issue
        return np.zeros(86400 // step)

    evaluate_load(peeking, w, 21600, start_day=3, days=3)
    with pytest.raises(ValueError, match="need history"):
        evaluate_load(baselines.persistence, w, 21600, start_day=0, days=3)
