"""Solar geometry and a clear-sky PV model in numpy, for the gateway at run time.

Accuracy target is "good enough to shape a forecast" (sun position within ~0.5 degrees, clear-sky
irradiance within ~10 %); the PV forecaster learns the site's own scale from its history, which
absorbs the model's bias, the array's losses and any shading that is constant in time.

- Sun position: NOAA's general solar position equations (Spencer's Fourier series for the
  declination and the equation of time), https://gml.noaa.gov/grad/solcalc/solareqns.PDF
- Clear-sky global horizontal irradiance: Haurwitz (1945), GHI = 1098 cos z exp(-0.057 / cos z),
  the simplest model that holds up in Reno & Hansen's comparison (Sandia SAND2012-2389).
- Clear-sky beam: Meinel & Meinel (1976), DNI = 1353 * 0.7 ** (AM ** 0.678), with the
  Kasten & Young (1989) air mass; diffuse = GHI - DNI cos z (floored at 0).
- Plane of array: isotropic sky (Liu & Jordan) + ground reflection with albedo 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class PvArray:
    """A PV array's geometry and size.

    ``azimuth_deg`` is the compass direction the panels face (180 = south, 90 = east);
    ``ac_limit_w`` caps the output (the inverter's AC rating), ``None`` for no cap.
    """

    lat: float
    lon: float
    kwp: float = 1.0
    tilt_deg: float = 30.0
    azimuth_deg: float = 180.0
    # DC->AC derate at clear-sky irradiance: PVWatts' 14 % system losses, 96 % inverter,
    # ~5 % for cell temperature above 25 C on a clear day.
    derate: float = 0.86 * 0.96 * 0.95
    ac_limit_w: float | None = None
    albedo: float = 0.2

    def __post_init__(self) -> None:
        if not -90.0 <= self.lat <= 90.0 or not -180.0 <= self.lon <= 360.0:
            raise ValueError(f"PvArray: latitude/longitude out of range: {self.lat}, {self.lon}")
        if not 0.0 <= self.tilt_deg <= 90.0:
            raise ValueError(f"PvArray: tilt_deg must be in [0, 90], got {self.tilt_deg}")
        if not self.kwp >= 0.0 or not 0.0 < self.derate <= 1.0:
            raise ValueError(
                f"PvArray: kwp must be >= 0 and derate in (0, 1]: {self.kwp}, {self.derate}"
            )


def solar_position(t_utc: ArrayLike, lat: float, lon: float) -> tuple[FloatArray, FloatArray]:
    """Sun zenith and azimuth (degrees, azimuth clockwise from north) at epoch seconds ``t_utc``."""
    t = np.asarray(t_utc, dtype=np.float64)
    days = t / 86400.0
    # day of the (UTC) year, 0-based, via numpy's calendar arithmetic
    secs = np.floor(t).astype("int64").astype("datetime64[s]")
    year_start = secs.astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    doy = days - year_start
    hour = np.mod(t, 86400.0) / 3600.0
    g = 2.0 * np.pi / 365.0 * (doy - 0.5)
    eqtime = 229.18 * (
        0.000075
        + 0.001868 * np.cos(g)
        - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2 * g)
        - 0.040849 * np.sin(2 * g)
    )
    decl = (
        0.006918
        - 0.399912 * np.cos(g)
        + 0.070257 * np.sin(g)
        - 0.006758 * np.cos(2 * g)
        + 0.000907 * np.sin(2 * g)
        - 0.002697 * np.cos(3 * g)
        + 0.00148 * np.sin(3 * g)
    )
    true_solar_min = hour * 60.0 + eqtime + 4.0 * lon
    ha = np.deg2rad(true_solar_min / 4.0 - 180.0)
    phi = np.deg2rad(lat)
    cos_z = np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(ha)
    cos_z = np.clip(cos_z, -1.0, 1.0)
    zen = np.arccos(cos_z)
    # azimuth from north, clockwise; atan2 form avoids the quadrant bookkeeping
    az = np.arctan2(np.sin(ha), np.cos(ha) * np.sin(phi) - np.tan(decl) * np.cos(phi))
    az_deg = np.mod(np.rad2deg(az) + 180.0, 360.0)
    return np.rad2deg(zen), az_deg


def clear_sky(zenith_deg: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Clear-sky (GHI, DNI, DHI) in W/m2 for a sun zenith angle (0 below the horizon)."""
    z = np.asarray(zenith_deg, dtype=np.float64)
    cos_z = np.cos(np.deg2rad(z))
    up = cos_z > 0.01
    safe = np.where(up, cos_z, 1.0)
    ghi = np.where(up, 1098.0 * safe * np.exp(-0.057 / safe), 0.0)
    zc = np.minimum(z, 89.9)
    am = 1.0 / (np.cos(np.deg2rad(zc)) + 0.50572 * (96.07995 - zc) ** -1.6364)
    dni = np.where(up, 1353.0 * 0.7 ** (am**0.678), 0.0)
    dni = np.minimum(dni, np.where(up, ghi / safe, 0.0))
    dhi = np.maximum(ghi - dni * np.where(up, cos_z, 0.0), 0.0)
    return ghi, dni, dhi


def plane_of_array(
    ghi: ArrayLike,
    dni: ArrayLike,
    dhi: ArrayLike,
    zenith_deg: ArrayLike,
    azimuth_deg: ArrayLike,
    tilt_deg: float,
    surface_azimuth_deg: float,
    albedo: float = 0.2,
) -> FloatArray:
    """Irradiance on a tilted plane (W/m2): beam on the plane + isotropic sky + ground."""
    z = np.deg2rad(np.asarray(zenith_deg, dtype=np.float64))
    a = np.deg2rad(np.asarray(azimuth_deg, dtype=np.float64))
    b = np.deg2rad(tilt_deg)
    g = np.deg2rad(surface_azimuth_deg)
    cos_aoi = np.cos(z) * np.cos(b) + np.sin(z) * np.sin(b) * np.cos(a - g)
    beam = np.asarray(dni, dtype=np.float64) * np.maximum(cos_aoi, 0.0)
    sky = np.asarray(dhi, dtype=np.float64) * (1.0 + np.cos(b)) / 2.0
    ground = np.asarray(ghi, dtype=np.float64) * albedo * (1.0 - np.cos(b)) / 2.0
    return np.maximum(beam + sky + ground, 0.0)


def clear_sky_power(t_utc: ArrayLike, array: PvArray, *, step_s: float = 0.0) -> FloatArray:
    """Clear-sky AC power (W) of ``array`` at epoch seconds ``t_utc``.

    With ``step_s > 0`` each value is the mean over ``[t, t + step_s)`` (sampled at 5-min points),
    which is what an interval's energy needs around sunrise and sunset.
    """
    t = np.asarray(t_utc, dtype=np.float64)
    if step_s > 0:
        n_sub = max(1, int(np.ceil(step_s / 300.0)))
        offs = (np.arange(n_sub) + 0.5) * (step_s / n_sub)
        tt = t[..., None] + offs
        return _power(tt, array).mean(axis=-1)
    return _power(t, array)


def _power(t: FloatArray, array: PvArray) -> FloatArray:
    zen, az = solar_position(t, array.lat, array.lon)
    ghi, dni, dhi = clear_sky(zen)
    poa = plane_of_array(ghi, dni, dhi, zen, az, array.tilt_deg, array.azimuth_deg, array.albedo)
    p = poa / 1000.0 * array.kwp * 1000.0 * array.derate
    if array.ac_limit_w is not None:
        p = np.minimum(p, array.ac_limit_w)
    return p
