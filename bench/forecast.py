"""Forecast benchmark: load forecasters on held-out households, PV forecaster on the shipped sites.

Usage (from the repository root)::

    .venv/bin/python bench/forecast.py                 # held-out Richardson 10-19, synPRO, PV
    .venv/bin/python bench/forecast.py --homes 0-9     # the homes the defaults were tuned on
    .venv/bin/python bench/forecast.py --step 900 --days 120

Every load forecast is issued at midnight for the next 24 h from the history before it
(``gateway.forecast.metrics.evaluate_load``), for days ``--start`` .. ``--start + --days - 1``.
Skills are ``1 - error / error_of_persistence`` with errors averaged over homes first.
``oracle`` knows each home's true mean weekday/weekend profile over the whole year (a ceiling on
Richardson data, whose days are near-independent draws), it is not a forecaster.
The last line of stdout is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware_sim.profiles import load_households, pv_profile, resample_mean
from gateway.forecast import baselines
from gateway.forecast.load import LoadConfig, forecast_load, is_weekend
from gateway.forecast.metrics import LoadEvaluation, evaluate_load, mae, rmse
from gateway.forecast.pv import PvConfig, forecast_pv
from gateway.forecast.solar import PvArray

Forecaster = Callable[[np.ndarray, np.ndarray, float, int], np.ndarray]


def profile_forecaster(cfg: LoadConfig) -> Forecaster:
    def f(t: np.ndarray, w: np.ndarray, issue: float, step_s: int) -> np.ndarray:
        return forecast_load(t, w, issue, step_s=step_s, config=cfg).watts

    return f


def oracle_forecaster(x: np.ndarray, step_s: int, t0: float) -> Forecaster:
    per_day = 86400 // step_s
    days = x.reshape(-1, per_day)
    day_no = np.floor(t0 / 86400).astype(np.int64) + np.arange(days.shape[0])
    we = is_weekend(day_no)
    prof = {True: days[we].mean(axis=0), False: days[~we].mean(axis=0)}

    def f(t: np.ndarray, w: np.ndarray, issue: float, step: int) -> np.ndarray:
        return prof[bool(is_weekend(np.array([int(issue // 86400)]))[0])]

    return f


def run_load_set(
    name: str, watts: np.ndarray, src_step: int, step_s: int, start: int, days: int, t0: float
) -> dict[str, dict[str, float]]:
    x_all = resample_mean(np.asarray(watts, dtype=np.float64), step_s // src_step)
    methods: dict[str, Callable[[np.ndarray], Forecaster]] = {
        "persistence": lambda x: baselines.persistence,
        "last_week": lambda x: baselines.last_week,
        "mean_7d": lambda x: baselines.mean_7d,
        "median_7d": lambda x: baselines.median_7d,
        "oracle": lambda x: oracle_forecaster(x, step_s, t0),
        "profile": lambda x: profile_forecaster(LoadConfig()),
        "profile_mix06": lambda x: profile_forecaster(LoadConfig(mean_weight=0.6)),
    }
    evs: dict[str, list[LoadEvaluation]] = {}
    for m, make in methods.items():
        t1 = time.perf_counter()
        evs[m] = [evaluate_load(make(x), x, step_s, start, days, t0=t0) for x in x_all]
        ms = (time.perf_counter() - t1) / (len(x_all) * days) * 1000
        print(f"  {name} {m}: {ms:.1f} ms per forecast", file=sys.stderr)
    ref_mae = float(np.mean([e.mae for e in evs["persistence"]]))
    ref_rmse = float(np.mean([e.rmse for e in evs["persistence"]]))
    out: dict[str, dict[str, float]] = {}
    print(f"\n{name}: {x_all.shape[0]} homes, days {start}-{start + days - 1}, step {step_s} s")
    print(
        f"{'method':15s} {'MAE kW':>7s} {'MAE-sk':>7s} {'RMSE-sk':>7s} {'dayE err':>8s} "
        f"{'E bias':>7s}"
    )
    for m, ev in evs.items():
        mae_w = float(np.mean([e.mae for e in ev]))
        rmse_w = float(np.mean([e.rmse for e in ev]))
        r = {
            "mae_kw": round(mae_w / 1000, 4),
            "mae_skill": round(1 - mae_w / ref_mae, 4),
            "rmse_skill": round(1 - rmse_w / ref_rmse, 4),
            "daily_energy_error": round(float(np.mean([e.daily_energy_error for e in ev])), 4),
            "energy_bias": round(float(np.mean([e.energy_bias for e in ev])), 4),
        }
        out[m] = r
        print(
            f"{m:15s} {r['mae_kw']:7.3f} {r['mae_skill']:7.3f} {r['rmse_skill']:7.3f} "
            f"{r['daily_energy_error'] * 100:7.1f}% {r['energy_bias'] * 100:+6.1f}%"
        )
    return out


def run_pv(site: str, step_s: int, start: int, days: int) -> dict[str, dict[str, float]]:
    pv = pv_profile(site, step_s=60, seed=0)
    x = resample_mean(pv.w_per_kwp.astype(np.float64), step_s // 60)
    t0 = datetime(pv.year, 1, 1, tzinfo=UTC).timestamp() - pv.tz_hours * 3600  # local std midnight
    t = t0 + step_s * np.arange(x.size, dtype=np.float64)
    arr = PvArray(pv.lat, pv.lon, kwp=1.0, tilt_deg=30.0, azimuth_deg=180.0, ac_limit_w=960.0)
    per = 86400 // step_s
    cfg = PvConfig()
    act = x[start * per : (start + days) * per].reshape(days, per)
    pers = x[(start - 1) * per : (start + days - 1) * per].reshape(days, per)
    fcs = []
    for d in range(start, start + days):
        lo, hi = max(0, (d - cfg.scale_days - 1) * per), d * per
        fcs.append(forecast_pv(t[lo:hi], x[lo:hi], t0 + d * 86400.0, arr, step_s=step_s).watts)
    model = np.array(fcs)
    out = {}
    for m, f in (("persistence", pers), ("clear_sky_kt", model)):
        out[m] = {
            "mae_w_per_kwp": round(mae(f, act), 2),
            "mae_skill": round(1 - mae(f, act) / mae(pers, act), 4),
            "rmse_skill": round(1 - rmse(f, act) / rmse(pers, act), 4),
            "energy_bias": round(float(f.sum() / act.sum() - 1), 4),
        }
    return out


def _homes(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--homes", default="10-19", help="Richardson homes, e.g. 10-19 (held out)")
    ap.add_argument("--step", type=int, default=1800, help="planning step, s (1800, 900, 300)")
    ap.add_argument("--start", type=int, default=60, help="first forecast day (history before)")
    ap.add_argument("--days", type=int, default=300, help="forecast days per household")
    args = ap.parse_args()
    result: dict[str, object] = {"step_s": args.step, "start_day": args.start, "days": args.days}

    rich = load_households("richardson")
    homes = [h for h in _homes(args.homes) if h < rich.homes]
    t0 = datetime(rich.year, 1, 1, tzinfo=UTC).timestamp()
    result["richardson_homes"] = homes
    result["richardson"] = run_load_set(
        "richardson", rich.watts[homes], rich.step_s, args.step, args.start, args.days, t0
    )
    syn = load_households("synpro")
    t0s = datetime(syn.year, 1, 1, tzinfo=UTC).timestamp()
    result["synpro"] = run_load_set(
        "synpro", syn.watts, syn.step_s, args.step, args.start, args.days, t0s
    )

    pv_res: dict[str, object] = {}
    print("\npv (W per kWp, issued at local midnight; tuned on greensboro only)")
    print(f"{'site':12s} {'method':13s} {'MAE':>6s} {'MAE-sk':>7s} {'RMSE-sk':>7s} {'E bias':>7s}")
    for site in ("greensboro", "sand_point", "miami"):
        r = run_pv(site, args.step, args.start, args.days)
        pv_res[site] = r
        for m, v in r.items():
            print(
                f"{site:12s} {m:13s} {v['mae_w_per_kwp']:6.1f} {v['mae_skill']:7.3f} "
                f"{v['rmse_skill']:7.3f} {v['energy_bias'] * 100:+6.1f}%"
            )
    result["pv"] = pv_res
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
