"""Load forecaster: grid, gaps, cold start, bad history, energy unbiasedness."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.forecast.load import (
    LoadConfig,
    forecast_load,
    is_weekend,
    smooth_slots,
    weighted_quantiles,
)

T0 = datetime(2021, 3, 1, tzinfo=UTC).timestamp()  # a Monday, UTC midnight
DAY = 86400.0


def periodic_load(days: int, step_s: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic household: weekday/weekend shapes + multiplicative noise, history before T0."""
    rng = np.random.default_rng(seed)
    t = T0 - days * DAY + step_s * np.arange(days * 86400 // step_s)
    hour = (t % DAY) / 3600.0
    day = np.floor(t / DAY).astype(np.int64)
    we = is_weekend(day)
    base = 150.0 + 600.0 * np.exp(-0.5 * ((hour - 19.0) / 2.0) ** 2)
    base += np.where(we, 400.0 * np.exp(-0.5 * ((hour - 12.0) / 2.0) ** 2), 0.0)
    w = base * rng.lognormal(-0.125, 0.5, size=t.size)  # mean of the noise factor = 1
    return t, w


def true_mean(times: np.ndarray) -> np.ndarray:
    hour = (times % DAY) / 3600.0
    we = is_weekend(np.floor(times / DAY).astype(np.int64))
    m = 150.0 + 600.0 * np.exp(-0.5 * ((hour - 19.0) / 2.0) ** 2)
    return m + np.where(we, 400.0 * np.exp(-0.5 * ((hour - 12.0) / 2.0) ** 2), 0.0)


@pytest.mark.parametrize("step_s", [300, 900, 1800])
def test_grid_shape_resolution_and_alignment(step_s: int) -> None:
    t, w = periodic_load(21)
    fc = forecast_load(t, w, T0 + 1234.0, step_s=step_s)
    assert fc.step_s == step_s
    assert fc.watts.shape == (86400 // step_s,)
    assert fc.start == T0 + (1234 // step_s) * step_s  # the slot containing the issue time
    assert fc.times[1] - fc.times[0] == step_s
    assert fc.source == "history"
    for q in (fc.p10, fc.p50, fc.p90, fc.watts):
        assert q.shape == fc.watts.shape and np.all(np.isfinite(q)) and np.all(q >= 0)
    assert np.all(fc.p10 <= fc.p50) and np.all(fc.p50 <= fc.p90)


def test_horizon_and_bad_grid() -> None:
    t, w = periodic_load(7)
    assert forecast_load(t, w, T0, step_s=900, horizon_s=2 * 86400).watts.size == 192
    with pytest.raises(ValueError, match="step_s"):
        forecast_load(t, w, T0, step_s=700)
    with pytest.raises(ValueError, match="horizon_s"):
        forecast_load(t, w, T0, step_s=900, horizon_s=1000)
    with pytest.raises(ValueError, match="differ in length"):
        forecast_load(t, w[:-1], T0)


def test_daily_energy_unbiased_on_periodic_load() -> None:
    t, w = periodic_load(56, seed=1)
    fc = forecast_load(t, w, T0, step_s=1800)
    truth = true_mean(fc.times + 900.0)
    rel = fc.watts.sum() / truth.sum() - 1.0
    assert abs(rel) < 0.05, rel
    # and the shape is right: the evening peak is where it should be
    assert 18.0 <= (np.argmax(fc.watts) * 0.5) <= 20.0


def test_weekend_gets_weekend_profile() -> None:
    t, w = periodic_load(56, seed=2)
    sat = T0 + 5 * DAY
    fc = forecast_load(t, w, sat, step_s=1800)
    noon = fc.watts[24]
    assert noon > 350.0  # the weekend midday bump (true mean 550 W), absent on weekdays
    weekday = forecast_load(t, w, T0, step_s=1800)
    assert weekday.watts[24] < 250.0


def test_nan_and_gaps_are_dropped_and_counted() -> None:
    t, w = periodic_load(28, seed=3)
    clean = forecast_load(t, w, T0, step_s=1800)
    w2 = w.copy()
    w2[::7] = np.nan
    keep = ~((t > T0 - 10 * DAY) & (t < T0 - 6 * DAY))  # a 4-day outage
    fc = forecast_load(t[keep], w2[keep], T0, step_s=1800)
    assert fc.dropped["nan"] == int(np.isnan(w2[keep]).sum()) > 0
    assert np.all(np.isfinite(fc.watts))
    assert abs(fc.energy_kwh() / clean.energy_kwh() - 1.0) < 0.1
    # a slot that never has data (meter off every night 02:00-03:00) still gets a value
    hour = (t % DAY) / 3600.0
    gap = (hour >= 2.0) & (hour < 3.0)
    fc3 = forecast_load(t[~gap], w[~gap], T0, step_s=1800)
    assert fc3.source == "history+prior"
    assert np.all(fc3.watts[4:6] > 0)


def test_unsorted_history_and_future_samples_ignored() -> None:
    t, w = periodic_load(14, seed=4)
    perm = np.random.default_rng(0).permutation(t.size)
    a = forecast_load(t[perm], w[perm], T0, step_s=1800)
    b = forecast_load(t, w, T0, step_s=1800)
    np.testing.assert_allclose(a.watts, b.watts)
    # samples at/after the issue time must not leak in
    t_f = np.concatenate([t, T0 + np.arange(0, 86400, 300.0)])
    w_f = np.concatenate([w, np.full(288, 9000.0)])
    c = forecast_load(t_f, w_f, T0, step_s=1800)
    np.testing.assert_allclose(c.watts, b.watts)


def test_cold_start_no_history_is_the_scaled_prior() -> None:
    fc = forecast_load(np.array([]), np.array([]), T0, step_s=900)
    assert fc.source == "prior" and fc.history_days == 0
    kwh_day = fc.energy_kwh()
    # LoadConfig.prior_annual_kwh = 3500 -> ~9.6 kWh/day (weekday slightly below the mean)
    assert 8.0 < kwh_day < 11.0
    assert fc.watts[19 * 4] > fc.watts[3 * 4]  # evening above the small hours
    assert np.all(fc.p10 < fc.p90)


def test_cold_start_one_day_sets_the_level() -> None:
    t, w = periodic_load(1, seed=5)
    fc = forecast_load(t, 3.0 * w, T0, step_s=1800)  # a big household: 3x the synthetic one
    assert fc.history_days == 1
    observed_kwh = float((3.0 * w).mean()) * 24 / 1000
    assert 0.6 < fc.energy_kwh() / observed_kwh < 1.4
    # half a day of history (issued at noon) also works
    t2, w2 = t + DAY / 2, w
    fc2 = forecast_load(t2[t2 < T0 + DAY / 2], w2[t2 < T0 + DAY / 2], T0 + DAY / 2)
    assert np.all(np.isfinite(fc2.watts)) and fc2.energy_kwh() > 0


def test_flat_history_is_a_stuck_sensor_and_falls_back_to_prior() -> None:
    t = T0 - 14 * DAY + 60.0 * np.arange(14 * 1440)
    for level in (0.0, 500.0):
        fc = forecast_load(t, np.full(t.size, level), T0, step_s=1800)
        assert fc.dropped["flat_days"] == 14
        assert fc.source == "prior"
        assert fc.watts.max() > fc.watts.min()  # the prior's shape, not a flat line
        assert 8.0 < fc.energy_kwh() < 11.0


def test_absurd_values_clipped_or_dropped() -> None:
    t, w = periodic_load(28, seed=6)
    clean = forecast_load(t, w, T0, step_s=1800)
    bad = w.copy()
    bad[::50] = 1e9  # glitches far above any household
    bad[1::50] = -5.0  # small negatives: meter timing skew
    bad[2::50] = -1e6  # absurd negatives
    fc = forecast_load(t, bad, T0, step_s=1800)
    assert fc.dropped["absurd"] == int(((bad > 45_000) | (bad < -200)).sum())
    assert fc.dropped["negative_clipped"] == int(((bad < 0) & (bad >= -200)).sum())
    assert np.all(fc.watts >= 0) and fc.watts.max() < 5000
    assert abs(fc.energy_kwh() / clean.energy_kwh() - 1.0) < 0.05


def test_all_absurd_history_gives_prior() -> None:
    t = T0 - 3 * DAY + 60.0 * np.arange(3 * 1440)
    fc = forecast_load(t, np.full(t.size, np.inf), T0)
    assert fc.source == "prior" and np.all(np.isfinite(fc.watts)) and np.all(fc.watts > 0)


def test_timezone_sets_local_midnight_and_dst() -> None:
    tz = ZoneInfo("Europe/Berlin")
    # issue at local midnight of the spring-forward day (23 h long)
    local_mid = datetime(2021, 3, 28, tzinfo=tz)
    issue = local_mid.timestamp()
    t, w = periodic_load(28, seed=7)
    fc = forecast_load(t, w, issue, step_s=3600, tz=tz)
    assert fc.start == issue
    assert fc.watts.size == 24
    # fixed offset: slots align to local, not UTC, boundaries
    tz2 = timezone(timedelta(hours=5, minutes=45))
    fc2 = forecast_load(t, w, T0 + 600.0, step_s=1800, tz=tz2)
    assert (fc2.start + 5.75 * 3600) % 1800 == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="mean_weight"):
        LoadConfig(mean_weight=1.5)
    with pytest.raises(ValueError, match="window_days"):
        LoadConfig(window_days=0)


def test_weighted_quantiles_hand_checked() -> None:
    x = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, np.nan]])
    q = weighted_quantiles(x, np.ones(4), [0.5])
    assert q[0, 0] == pytest.approx(2.5)
    assert q[0, 1] == pytest.approx(20.0)
    # a heavy weight pulls the median onto its value
    # (Hazen positions (cum - w/2)/total: 1.5/13 for 2.0, 7/13 for 3.0)
    q2 = weighted_quantiles(x[:, :1], np.array([1.0, 1.0, 10.0, 1.0]), [0.5])
    assert q2[0, 0] == pytest.approx(2.0 + (6.5 - 1.5) / 5.5)
    allnan = weighted_quantiles(np.full((3, 2), np.nan), np.ones(3), [0.5])
    assert np.all(np.isnan(allnan))


@pytest.mark.parametrize("mean_weight", [1.0, 0.6])
@pytest.mark.parametrize("days", [0, 3, 21])
def test_point_forecast_without_quantiles_is_the_same(mean_weight: float, days: int) -> None:
    """The planner's cheaper call (no quantiles) plans on exactly the same point forecast."""
    t, w = periodic_load(days, seed=3) if days else (np.array([]), np.array([]))
    issue = T0 + 7 * 3600.0 + 111.0
    tz = ZoneInfo("Europe/Berlin")
    cfg = LoadConfig(mean_weight=mean_weight)
    full = forecast_load(t, w, issue, step_s=900, tz=tz, config=cfg)
    lean = forecast_load(t, w, issue, step_s=900, tz=tz, config=cfg, quantiles=False)
    assert full.p10 is not None and lean.p10 is None and lean.p50 is None and lean.p90 is None
    np.testing.assert_array_equal(lean.watts, full.watts)
    assert (lean.start, lean.source, lean.history_days) == (full.start, full.source,
                                                           full.history_days)


def _smooth_by_taps(p: np.ndarray, sigma_slots: float) -> np.ndarray:
    """The definition: a weighted sum of shifted copies, one per Gaussian tap."""
    n = p.shape[-1]
    half = min(math.ceil(3 * sigma_slots), n // 2)
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma_slots) ** 2)
    fin = np.isfinite(p)
    val, wt = np.where(fin, p, 0.0), fin.astype(np.float64)
    num, den = np.zeros_like(val), np.zeros_like(val)
    for j, kj in zip(range(-half, half + 1), taps, strict=True):
        num += kj * np.roll(val, j, axis=-1)
        den += kj * np.roll(wt, j, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-9, num / den, np.nan)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), rows=st.integers(1, 3), sigma=st.floats(0.05, 200.0),
       seed=st.integers(0, 2**32 - 1), nan_share=st.floats(0.0, 1.0))
def test_smoothing_equals_the_sum_over_taps(n: int, rows: int, sigma: float, seed: int,
                                            nan_share: float) -> None:
    rng = np.random.default_rng(seed)
    p = rng.normal(500.0, 300.0, (rows, n))
    p[rng.random((rows, n)) < nan_share] = np.nan
    got, want = smooth_slots(p, sigma), _smooth_by_taps(p, sigma)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(smooth_slots(p[0], sigma), want[0], rtol=1e-9, atol=1e-9)
