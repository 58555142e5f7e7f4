"""The shipped load/PV profiles and their numpy loader (firmware_sim.profiles)."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim import profiles
from firmware_sim.profiles import (
    load_households,
    pv_profile,
    resample_mean,
    value_at,
)

YEAR_MIN = 365 * 1440


@pytest.fixture(scope="module")
def pv_npz() -> dict[str, np.ndarray]:
    return profiles._pv_data()


def _hourly(site: str, pv_npz: dict[str, np.ndarray], kind: str = "ac") -> np.ndarray:
    return pv_npz[f"{site}__{kind}_dw"].astype(np.float64) / 10.0


# ------------------------------------------------------------------------------------- loads


def test_richardson_shape_step_and_mix() -> None:
    ls = load_households("richardson")
    assert ls.source == "richardson"
    assert ls.step_s == 60
    assert ls.year == 2021
    assert ls.watts.dtype == np.float32
    assert ls.watts.shape[0] >= 20
    assert ls.watts.shape[1] == YEAR_MIN
    assert len(ls.occupants) == ls.watts.shape[0]
    assert set(ls.occupants) == {1, 2, 3, 4, 5}


def test_richardson_annual_energy_in_documented_range_and_grows_with_occupants() -> None:
    ls = load_households("richardson")
    kwh = ls.annual_kwh()
    # README: target = (1,500 + 700 * occupants) kWh x lognormal spread clipped to 0.65..1.5
    assert kwh.min() >= 0.65 * 2200 - 5
    assert kwh.max() <= 1.5 * 5000 + 5
    occ = np.array(ls.occupants)
    small = np.median(kwh[occ <= 2])
    large = np.median(kwh[occ >= 4])
    assert large > small * 1.3


def test_richardson_base_load_and_peaks_plausible() -> None:
    ls = load_households("richardson")
    w = ls.watts
    assert float(w.min()) >= 0.0
    hourly = resample_mean(w, 60)
    base = np.percentile(hourly, 5, axis=1)
    assert np.all(base > 15) and np.all(base < 400), base
    peaks = w.max(axis=1)
    # kettles, hobs and dryers: a home peaks at several kW, never at a utility-size value
    assert np.all(peaks > 2500) and np.all(peaks < 16000), peaks
    # nights are quieter than evenings (occupancy-driven model, not noise)
    by_hour = hourly.reshape(w.shape[0], 365, 24).mean(axis=(0, 1))
    assert by_hour[19] > 1.5 * by_hour[3]


def test_richardson_lighting_follows_daylight() -> None:
    # The pitfall: stock richardsonpy saw only 24 minutes of irradiance per day (dark all day).
    # Richardson appliances have no season, so the Dec-vs-June difference at 17-18 h (dark in
    # December, bright in June at Greensboro) is lighting that responds to daylight.
    w = load_households("richardson").watts.astype(np.float64)
    days = w.reshape(w.shape[0], 365, 1440)
    dusk = slice(17 * 60, 18 * 60)
    december = days[:, 334:365, dusk].mean()
    june = days[:, 151:181, dusk].mean()
    assert december > 1.15 * june


def test_synpro_shape_and_energy() -> None:
    ls = load_households("synpro")
    assert (ls.step_s, ls.year) == (900, 2021)
    assert ls.watts.shape == (4, 35040)
    kwh = ls.annual_kwh()
    assert np.all((kwh > 1000) & (kwh < 5000)), kwh
    assert ls.occupants[0] == 1


def test_loaded_arrays_are_cached_and_read_only() -> None:
    a = load_households("richardson")
    assert load_households("richardson") is a
    with pytest.raises(ValueError):
        a.watts[0, 0] = 1.0


def test_unknown_names_are_rejected_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="richardson, synpro"):
        load_households("smartmeter")
    with pytest.raises(ValueError, match="greensboro"):
        pv_profile("atlantis")
    with pytest.raises(ValueError, match="divisor of 3600"):
        pv_profile("greensboro", step_s=7)


# ---------------------------------------------------------------------------------------- PV


def test_pv_shape_zero_at_night_and_within_ac_rating(pv_npz: dict[str, np.ndarray]) -> None:
    p = pv_profile("greensboro", 60, 0)
    assert p.step_s == 60 and p.year == 2021
    assert p.w_per_kwp.shape == p.clearsky_w_per_kwp.shape == (YEAR_MIN,)
    assert (p.lat, p.lon) == pytest.approx((36.1, -79.95))
    assert float(p.w_per_kwp.min()) >= 0.0
    assert float(p.w_per_kwp.max()) <= profiles.AC_CAP_W_PER_KWP + 1e-3
    ac_h = _hourly("greensboro", pv_npz)
    night = np.repeat(ac_h == 0, 60)
    assert night.mean() > 0.4
    assert np.all(p.w_per_kwp[night] == 0)
    # local midnight to 04:00 every day: dark
    day_minutes = p.w_per_kwp.reshape(365, 1440)
    assert np.all(day_minutes[:, : 4 * 60] == 0)


@pytest.mark.parametrize("site", ["greensboro", "miami"])
def test_pv_is_energy_preserving_per_hour(site: str, pv_npz: dict[str, np.ndarray]) -> None:
    p = pv_profile(site, 60, 0)
    ac_h = _hourly(site, pv_npz)
    got = resample_mean(p.w_per_kwp.astype(np.float64), 60)
    np.testing.assert_allclose(got, ac_h, rtol=0.01, atol=0.05)
    clear = resample_mean(p.clearsky_w_per_kwp.astype(np.float64), 60)
    np.testing.assert_allclose(clear, _hourly(site, pv_npz, "clear"), rtol=0.01, atol=0.05)


@pytest.mark.parametrize(
    ("site", "lo", "hi"),
    [("greensboro", 1300, 1450), ("miami", 1350, 1600), ("sand_point", 650, 1000)],
)
def test_pv_annual_yield_plausible(site: str, lo: float, hi: float) -> None:
    p = pv_profile(site, 900, 0)  # coarse step: the yield does not depend on it
    kwh_per_kwp = float(p.w_per_kwp.sum(dtype=np.float64)) * 900 / 3.6e6
    assert lo < kwh_per_kwp < hi
    clear = float(p.clearsky_w_per_kwp.sum(dtype=np.float64)) * 900 / 3.6e6
    assert clear > kwh_per_kwp * 1.15


def test_pv_same_seed_reproduces_other_seed_differs_only_within_hours() -> None:
    build = pv_profile.__wrapped__  # bypass the cache: really recompute
    a = build("greensboro", 300, 7)
    b = build("greensboro", 300, 7)
    c = build("greensboro", 300, 8)
    np.testing.assert_array_equal(a.w_per_kwp, b.w_per_kwp)
    assert not np.array_equal(a.w_per_kwp, c.w_per_kwp)
    np.testing.assert_allclose(
        resample_mean(a.w_per_kwp.astype(np.float64), 12),
        resample_mean(c.w_per_kwp.astype(np.float64), 12),
        rtol=0.01,
        atol=0.05,
    )


def test_pv_variability_follows_clear_sky_index(pv_npz: dict[str, np.ndarray]) -> None:
    p = pv_profile("greensboro", 60, 0)
    ac_h = _hourly("greensboro", pv_npz)
    kt = pv_npz["greensboro__kt_pct"] / 100.0
    minutes = p.w_per_kwp.astype(np.float64).reshape(-1, 60)
    bright = ac_h > 300
    # roughness: mean absolute minute-to-minute change relative to the hour's mean
    rough = np.abs(np.diff(minutes, axis=1)).mean(axis=1) / np.maximum(ac_h, 1.0)
    clear = bright & (kt >= 0.95)
    broken = bright & (kt > 0.5) & (kt < 0.75)
    assert clear.sum() > 100 and broken.sum() > 50
    assert np.median(rough[clear]) < 0.01
    assert np.median(rough[broken]) > 0.05


def test_numpy_clearsky_close_to_stored_pvlib_clearsky(pv_npz: dict[str, np.ndarray]) -> None:
    t = (np.arange(8760 * 12) + 0.5) * 300
    cs = resample_mean(profiles.clearsky_w_per_kwp(36.1, -79.95, -5.0, t), 12)
    ref = _hourly("greensboro", pv_npz, "clear")
    annual_ratio = cs.sum() / ref.sum()
    assert 0.9 < annual_ratio < 1.1
    strong = ref > 400
    assert np.median(np.abs(cs[strong] / ref[strong] - 1)) < 0.1
    assert np.all(cs[ref == 0][:100] < 50)


# -------------------------------------------------------------------------------- utilities


def test_resample_mean_truly_averages() -> None:
    x = np.array([0.0, 10.0, 0.0, 0.0, 4.0, 4.0, 1.0, 3.0])
    np.testing.assert_array_equal(resample_mean(x, 2), [5.0, 0.0, 4.0, 2.0])
    np.testing.assert_array_equal(resample_mean(x, 4), [2.5, 3.0])
    m = np.arange(24, dtype=np.float32).reshape(2, 12)
    np.testing.assert_allclose(resample_mean(m, 3), m.reshape(2, 4, 3).mean(axis=2))
    assert resample_mean(m, 3).dtype == np.float32
    with pytest.raises(ValueError, match="multiple"):
        resample_mean(x, 3)


def test_value_at_holds_steps_and_wraps() -> None:
    s = np.array([1.0, 2.0, 3.0])
    assert value_at(s, 60, 0) == 1.0
    assert value_at(s, 60, 59.9) == 1.0
    assert value_at(s, 60, 60) == 2.0
    assert value_at(s, 60, 180) == 1.0  # wraps after the profile's length
    assert value_at(s, 60, -1) == 3.0
    assert value_at(s, 60, 3 * 60 * 1000 + 125) == 3.0
