"""Realistic household load and PV profiles for the simulated home, numpy only.

The data files in ``firmware_sim/data/`` are produced once by ``build_data.py`` (see the README
there for provenance and licences); at run time nothing but numpy is needed.

Time convention: index 0 of every profile is Jan 1 00:00 of ``year`` in the site's *local
standard time* (no daylight saving). The simulation treats that local standard time as if it were
UTC, so a profile is simply "seconds since the start of the year". Each value is the mean power
over its interval ``[i*step_s, (i+1)*step_s)``; profiles wrap around after one (non-leap) year.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from statistics import NormalDist

import numpy as np

__all__ = [
    "LOAD_SOURCES",
    "PV_SITES",
    "LoadSet",
    "PvProfile",
    "clearsky_w_per_kwp",
    "load_households",
    "pv_profile",
    "resample_mean",
    "value_at",
]

LOAD_SOURCES = ("richardson", "synpro")
PV_SITES = ("greensboro", "sand_point", "miami")
YEAR_S = 365 * 86400

# PV system the data were generated for (build_data.py): 1 kWp DC, 30 deg tilt, due south,
# 1 kW AC inverter with 96 % nominal efficiency.
TILT_DEG, AZIMUTH_DEG = 30.0, 180.0
AC_CAP_W_PER_KWP = 960.0

# Sub-hourly cloud model (see _cloud_factor): clear-sky index of a fully clear / fully overcast
# hour, relative output while a cloud shades the sun, and the time scale of cloud passages.
KT_CLEAR, KT_OVERCAST = 0.9, 0.3
SHADE_LEVEL = 0.3
CLOUD_SMOOTH_S = 120.0


@dataclass(frozen=True)
class LoadSet:
    """Household electricity demand in W, one row per household."""

    source: str  # "richardson" | "synpro"
    step_s: int
    year: int  # index 0 == Jan 1 00:00 of this year, local standard time (== UTC in the sim)
    watts: np.ndarray  # (homes, T) float32, mean W over each step
    occupants: tuple[int | None, ...]

    @property
    def homes(self) -> int:
        return int(self.watts.shape[0])

    def annual_kwh(self) -> np.ndarray:
        """Energy per household over the whole profile, kWh."""
        return self.watts.sum(axis=1, dtype=np.float64) * self.step_s / 3.6e6


@dataclass(frozen=True)
class PvProfile:
    """AC output of 1 kWp (DC) PV at a site, W per kWp; multiply by the plant's kWp."""

    site: str
    lat: float
    lon: float
    step_s: int
    year: int  # index 0 == Jan 1 00:00 local standard time (== UTC in the sim)
    w_per_kwp: np.ndarray  # (T,) float32
    clearsky_w_per_kwp: np.ndarray  # (T,) float32, clear-sky output for the same system
    tz_hours: float = 0.0  # the site's standard-time offset from UTC (e.g. -5 for Greensboro)


def _npz(name: str) -> dict[str, np.ndarray]:
    ref = resources.files("firmware_sim").joinpath("data", name)
    with ref.open("rb") as fh, np.load(fh) as data:
        return {k: data[k] for k in data.files}


@cache
def load_households(source: str = "richardson") -> LoadSet:
    """All households of one data set (cached; treat the array as read-only).

    ``richardson``: 20 Richardson/CREST homes, 1-min. ``synpro``: 4 synPRO homes, 15-min.
    """
    if source not in LOAD_SOURCES:
        raise ValueError(f"unknown load source {source!r}; valid: {', '.join(LOAD_SOURCES)}")
    d = _npz(f"{source}.npz")
    watts = d["watts"].astype(np.float32)
    watts.flags.writeable = False
    occ = tuple(int(o) if o > 0 else None for o in d["occupants"])
    return LoadSet(source, int(d["step_s"]), int(d["year"]), watts, occ)


@lru_cache(maxsize=1)
def _pv_data() -> dict[str, np.ndarray]:
    return _npz("pv.npz")


@lru_cache(maxsize=8)
def pv_profile(site: str = "greensboro", step_s: int = 60, seed: int = 0) -> PvProfile:
    """PV output per kWp at ``step_s`` resolution from the stored hourly TMY simulation.

    Method (an honest approximation, not measured sub-hourly data): within each hour the output
    follows the clear-sky shape of the sun's path (``clearsky_w_per_kwp``) scaled by the hour's
    ratio of simulated to clear-sky output, interpolated between hour centres. It is then
    multiplied by a seeded two-state cloud factor (sun / shade) whose share of shaded time follows
    the hour's clear-sky index: clear hours (kt >= 0.9) and overcast hours (kt <= 0.3) stay smooth,
    broken-cloud hours switch between about clear-sky and ~30 % of it every few minutes. Finally
    every hour is rescaled so its mean equals the stored hourly value (energy-preserving), capped
    at the inverter's AC rating. ``step_s`` must divide 3600. Cost: ~0.5 s and ~80 MB peak at
    60 s; steps below 60 s are built at that step (10 s: ~1.5 s, ~450 MB peak), so prefer 60 s
    and hold values between steps (:func:`value_at`).
    """
    if site not in PV_SITES:
        raise ValueError(f"unknown PV site {site!r}; valid: {', '.join(PV_SITES)}")
    if step_s <= 0 or 3600 % step_s:
        raise ValueError(f"step_s must be a positive divisor of 3600, got {step_s}")
    d = _pv_data()
    ac_h = d[f"{site}__ac_dw"].astype(np.float64) / 10.0
    clear_h = d[f"{site}__clear_dw"].astype(np.float64) / 10.0
    kt_h = d[f"{site}__kt_pct"].astype(np.float64) / 100.0
    lat, lon, tz = (float(v) for v in d[f"{site}__meta"])
    year = int(d["year"])

    # Work at 1-min (or at step_s if that is finer / not a whole number of minutes), then average.
    base = 60 if step_s % 60 == 0 else step_s
    n = 3600 // base
    t_mid = (np.arange(ac_h.size * n) + 0.5) * base
    shape = clearsky_w_per_kwp(lat, lon, tz, t_mid, year)
    clear = _fit_hourly(clear_h, shape, n)
    smooth = _fit_hourly(ac_h, shape, n)
    rng = np.random.default_rng(seed)
    cloudy = smooth * _cloud_factor(kt_h, n, base, rng)
    out = _fit_hourly(ac_h, cloudy, n, interpolate=False)
    out = _cap_hourly(out, ac_h, n, AC_CAP_W_PER_KWP)
    if base != step_s:
        k = step_s // base
        out, clear = resample_mean(out, k), resample_mean(clear, k)
    return PvProfile(site, lat, lon, step_s, year, _frozen(out), _frozen(clear), tz_hours=tz)


def _frozen(x: np.ndarray) -> np.ndarray:
    y = np.asarray(x, dtype=np.float32)
    y.flags.writeable = False
    return y


def _fit_hourly(
    hourly: np.ndarray, shape: np.ndarray, n: int, *, interpolate: bool = True
) -> np.ndarray:
    """Sub-hourly series with the intra-hour form of ``shape`` and exactly ``hourly`` as means.

    With ``interpolate`` the hour's scale factor is linearly interpolated between hour centres
    (so the series has no steps at hour boundaries) before the exact per-hour correction.
    Hours where ``shape`` is ~0 but the data is not (dawn/dusk mismatch) get a flat value.
    """
    sh = shape.reshape(-1, n)
    mean = sh.mean(axis=1)
    ok = mean > 1e-3
    ratio = np.where(ok, hourly / np.where(ok, mean, 1.0), 0.0)
    if interpolate:
        # scale factors at dawn/dusk are noisy: bound them before interpolating
        ratio = np.clip(ratio, 0.0, 3.0)
        t_h = np.arange(hourly.size) + 0.5
        t = (np.arange(hourly.size * n) + 0.5) / n
        x = sh * np.interp(t, t_h, ratio).reshape(-1, n)
    else:
        x = sh * ratio[:, None]
    xm = x.mean(axis=1)
    good = xm > 1e-9
    x = np.where(good[:, None], x * (hourly / np.where(good, xm, 1.0))[:, None], hourly[:, None])
    return x.reshape(-1)


def _cloud_factor(kt_h: np.ndarray, n: int, base_s: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative sub-hourly cloud factor with mean 1 in every hour.

    A Gaussian field smoothed over ~CLOUD_SMOOTH_S is thresholded so that the expected share of
    sunny time in an hour is p = (kt - KT_OVERCAST) / (KT_CLEAR - KT_OVERCAST), clipped to 0..1.
    """
    total = kt_h.size * n
    sigma = max(CLOUD_SMOOTH_S / base_s, 0.5)
    half = math.ceil(4 * sigma)
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k /= math.sqrt(float((k * k).sum()))  # unit variance after smoothing white noise
    g = np.convolve(rng.standard_normal(total + 2 * half), k, mode="valid")
    p = np.clip((kt_h - KT_OVERCAST) / (KT_CLEAR - KT_OVERCAST), 0.0, 1.0)
    inv = NormalDist().inv_cdf
    thr = np.array([inv(min(max(v, 1e-9), 1 - 1e-9)) for v in p])
    sunny = g.reshape(-1, n) < thr[:, None]
    c = np.where(sunny, 1.0, SHADE_LEVEL)
    c /= c.mean(axis=1, keepdims=True)
    return c.reshape(-1)


def _cap_hourly(x: np.ndarray, hourly: np.ndarray, n: int, cap: float) -> np.ndarray:
    """Clip at ``cap`` and give the clipped energy back to the unclipped steps of the same hour."""
    h = x.reshape(-1, n).copy()
    for _ in range(5):
        over = h > cap
        if not over.any():
            break
        h = np.minimum(h, cap)
        deficit = hourly - h.mean(axis=1)
        free = h < cap
        room = np.where(free, h, 0.0).sum(axis=1)
        scale = np.where(room > 0, 1.0 + deficit * n / np.where(room > 0, room, 1.0), 1.0)
        h = np.where(free, h * scale[:, None], h)
    return np.minimum(h, cap).reshape(-1)


def clearsky_w_per_kwp(
    lat: float,
    lon: float,
    tz_hours: float,
    t_s: np.ndarray,
    year: int = 2021,
    tilt_deg: float = TILT_DEG,
    azimuth_deg: float = AZIMUTH_DEG,
) -> np.ndarray:
    """Approximate clear-sky AC output of 1 kWp PV, W, at ``t_s`` seconds of local standard time.

    Numpy-only stand-in for pvlib: Spencer solar geometry, Haurwitz clear-sky GHI, Erbs
    beam/diffuse split, isotropic-sky transposition (albedo 0.2), PVWatts DC with 14 % losses and
    -0.4 %/K at a crude cell temperature (15 degC + 0.03 K per W/m2), PVWatts inverter. Good to
    roughly 10 % of pvlib's Ineichen chain around noon; use the stored clear-sky series
    (``PvProfile.clearsky_w_per_kwp``) where accuracy matters. ``year`` is accepted for API
    symmetry; the geometry is that of a non-leap year.
    """
    del year
    t = np.asarray(t_s, dtype=np.float64) % YEAR_S
    out = np.zeros(t.shape)
    # Day-level terms (declination, equation of time, extraterrestrial irradiance) are taken at
    # each day's noon: they change by < 0.5 deg / 0.5 min per day, and it is 5x faster.
    doy = (t // 86400).astype(np.int64)
    gam = 2 * np.pi / 365 * np.arange(365)
    eot_d = 229.18 * (
        0.000075
        + 0.001868 * np.cos(gam)
        - 0.032077 * np.sin(gam)
        - 0.014615 * np.cos(2 * gam)
        - 0.040849 * np.sin(2 * gam)
    )
    decl_d = (
        0.006918
        - 0.399912 * np.cos(gam)
        + 0.070257 * np.sin(gam)
        - 0.006758 * np.cos(2 * gam)
        + 0.000907 * np.sin(2 * gam)
        - 0.002697 * np.cos(3 * gam)
        + 0.00148 * np.sin(3 * gam)
    )
    e0_d = 1367.0 * (
        1.00011
        + 0.034221 * np.cos(gam)
        + 0.00128 * np.sin(gam)
        + 0.000719 * np.cos(2 * gam)
        + 0.000077 * np.sin(2 * gam)
    )
    phi = math.radians(lat)
    sd, cd = np.sin(decl_d)[doy], np.cos(decl_d)[doy]
    true_solar_min = (t % 86400) / 60.0 + eot_d[doy] + 4 * lon - 60 * tz_hours
    ha = np.radians(true_solar_min / 4 - 180)
    cha = np.cos(ha)
    up = math.sin(phi) * sd + math.cos(phi) * cd * cha
    day = up > 0.01
    if not day.any():
        return out
    # from here on only daylight samples
    up, sd, cd, cha = up[day], sd[day], cd[day], cha[day]
    east = -cd * np.sin(ha[day])
    north = math.cos(phi) * sd - math.sin(phi) * cd * cha
    ghi = 1098.0 * up * np.exp(-0.059 / up)  # Haurwitz
    kt = ghi / (e0_d[doy[day]] * up)
    df = np.where(  # Erbs diffuse fraction
        kt <= 0.22,
        1 - 0.09 * kt,
        np.where(
            kt <= 0.8,
            0.9511 - 0.1604 * kt + 4.388 * kt**2 - 16.638 * kt**3 + 12.336 * kt**4,
            0.165,
        ),
    )
    dhi = df * ghi
    dni = (ghi - dhi) / up
    b, a = math.radians(tilt_deg), math.radians(azimuth_deg)
    cos_aoi = (
        east * math.sin(b) * math.sin(a) + north * math.sin(b) * math.cos(a) + up * math.cos(b)
    )
    poa = (
        dni * np.clip(cos_aoi, 0.0, None)
        + dhi * (1 + math.cos(b)) / 2
        + 0.2 * ghi * (1 - math.cos(b)) / 2
    )
    t_cell = 15.0 + 0.03 * poa
    dc = poa * (1 - 0.004 * (t_cell - 25.0)) * (1 - 0.1408)  # W for 1 kWp at 1000 W/m2
    out[day] = _pvwatts_inverter(dc)
    return out


def _pvwatts_inverter(dc: np.ndarray, pac0: float = 1000.0, eta_nom: float = 0.96) -> np.ndarray:
    pdc0 = pac0 / eta_nom
    z = np.maximum(dc / pdc0, 1e-6)
    eta = eta_nom / 0.9637 * (-0.0162 * z - 0.0059 / z + 0.9858)
    return np.clip(np.where(dc > 0, eta * dc, 0.0), 0.0, pac0)


def resample_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Average consecutive blocks of ``factor`` samples along the last axis (true mean, not
    point picking). The last axis length must be a multiple of ``factor``."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    a = np.asarray(x)
    if a.shape[-1] % factor:
        raise ValueError(f"length {a.shape[-1]} is not a multiple of factor {factor}")
    out = a.reshape(*a.shape[:-1], a.shape[-1] // factor, factor).mean(axis=-1)
    return out.astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else out


def value_at(series: np.ndarray, step_s: int, t_s: float) -> float:
    """The value of the step containing ``t_s`` seconds after the profile start (wraps around
    the profile's length, also for negative ``t_s``)."""
    if series.ndim != 1:
        raise ValueError(f"series must be 1-D, got shape {series.shape}")
    i = math.floor(t_s / step_s) % series.shape[0]
    return float(series[i])
