"""Closed-loop backtest of the household planner (``hems backtest``).

For each household of the shipped data set and each planning step of the test period:
forecast (load from the household's own history, PV from its own history and a clear-sky model)
-> plan (the cvxpy LP, with the rule fallback) -> apply the plan's first battery setpoint -> the
plant moves on the *real* data, and the battery's state of charge carries over. Four strategies
run on the same data and tariff:

* ``idle``: battery unused;
* ``self_consumption``: charge from surplus, discharge to cover the load (an inverter's default);
* ``mpc``: this planner, re-planned every step on forecasts;
* ``perfect_foresight``: the same LP over the whole period fed the true load and PV: the lower
  bound of what any strategy could reach on these prices.

Costs are grid bills at the retail prices, minus the value of the energy left in the battery at
the end relative to the start (at ``terminal_value`` per kWh, the same for every strategy), so a
strategy cannot look cheap by emptying the battery. Everything runs at the planning resolution:
the plant sees step means, not the minute-by-minute variation within a step (see the notes in
docs/architecture.md).

This lives in ``community/`` because it wires the shipped simulation data to the gateway's pure
maths; ``gateway`` itself never imports ``firmware_sim``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from firmware_sim.profiles import load_households, pv_profile, resample_mean
from gateway.forecast.load import forecast_load
from gateway.forecast.metrics import daily_energy_error, mae, rmse
from gateway.forecast.pv import forecast_pv
from gateway.forecast.solar import PvArray
from gateway.optimize import Battery, PlanInputs, plan_or_fallback, solve_plan
from gateway.optimize.follow import follow_plan
from gateway.tariff import DEFAULT_TOU, Tariff, flat

FloatArray = np.ndarray
TARIFFS: dict[str, Tariff] = {
    "tou": DEFAULT_TOU,
    "flat": flat("flat", 0.30, 0.08),
}


@dataclass(frozen=True)
class BacktestOptions:
    """What to backtest. Defaults: 10 held-out Richardson homes x 28 summer days, 30-min steps."""

    days: int = 28
    homes: int = 10
    first_home: int = 10  # the load forecaster was tuned on homes 0-9: test on others
    source: str = "richardson"
    start_day: int = 152  # day of the profile year of the first test day (152 = June 1)
    warmup_days: int = 28  # history the forecasters see before the first test day
    step_s: int = 1800
    horizon_s: int = 86400
    tariff: str = "tou"
    pv_site: str = "greensboro"
    pv_kwp: float = 5.0
    battery_kwh: float = 10.0
    battery_kw: float = 5.0
    eta: float = 0.95
    reserve_pct: float = 10.0
    soc0_pct: float = 50.0
    terminal_value: float | None = None  # per kWh; None: the cheapest import price
    budget_ms: float = 1000.0
    seed: int = 0
    workers: int = 0  # 0: one per core (at most 2 on a Pi-class box)

    def validate(self) -> None:
        if self.days < 1 or self.homes < 1 or self.warmup_days < 1:
            raise ValueError("days, homes and warmup_days must be >= 1")
        if self.tariff not in TARIFFS:
            raise ValueError(f"unknown tariff {self.tariff!r}; valid: {', '.join(TARIFFS)}")
        if self.step_s < 300 or 86400 % self.step_s or self.horizon_s % self.step_s:
            raise ValueError("step_s must be >= 300 s and divide a day; horizon a multiple of it")
        if min(self.pv_kwp, self.battery_kwh, self.battery_kw) < 0:
            raise ValueError("pv_kwp, battery_kwh and battery_kw must be >= 0")
        if not 0 < self.eta <= 1 or not 0 <= self.reserve_pct < 100:
            raise ValueError("eta must be in (0, 1], reserve_pct in [0, 100)")


@dataclass
class HomeResult:
    """One household's figures."""

    home: int
    cost: dict[str, float]
    load_kwh: float
    pv_kwh: float
    solve_ms: list[float] = field(default_factory=list)
    fallbacks: int = 0
    forecast: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the plant


def plant_step(
    soc_wh: float, battery_w: float, load_w: float, pv_w: float, step_s: float,
    capacity_wh: float, max_charge_w: float, max_discharge_w: float, eta: float,
    reserve_wh: float = 0.0,
) -> tuple[float, float, float, float]:
    """Move the battery and the meter one step on the real load/PV.

    The commanded battery power is clamped to the ratings and to what the state of charge
    allows above ``reserve_wh`` (the gateway's reserve, as the fast loop enforces it) and below
    the capacity. Returns (battery_w, new_soc_wh, import_w, export_w).
    """
    h = step_s / 3600.0
    if battery_w > 0:
        room = max(0.0, capacity_wh - soc_wh) / (eta * h) if h > 0 else 0.0
        b = min(battery_w, max_charge_w, room)
        soc = soc_wh + b * eta * h
    else:
        avail = max(0.0, soc_wh - reserve_wh) * eta / h if h > 0 else 0.0
        b = -min(-battery_w, max_discharge_w, avail)
        soc = soc_wh + b / eta * h
    soc = min(max(soc, 0.0), capacity_wh)
    site = load_w - pv_w + b
    return b, soc, max(site, 0.0), max(-site, 0.0)


def _run_rule(
    load: FloatArray, pv: FloatArray, o: BacktestOptions, use_battery: bool
) -> tuple[FloatArray, FloatArray, float]:
    cap = o.battery_kwh * 1000.0
    soc = cap * o.soc0_pct / 100.0
    reserve = cap * o.reserve_pct / 100.0
    imp = np.zeros_like(load)
    exp = np.zeros_like(load)
    for k in range(load.size):
        want = pv[k] - load[k] if use_battery else 0.0
        _, soc, imp[k], exp[k] = plant_step(
            soc, want, load[k], pv[k], o.step_s, cap, o.battery_kw * 1000, o.battery_kw * 1000,
            o.eta, reserve,
        )
    return imp, exp, soc


def _bill(imp: FloatArray, exp: FloatArray, pi: FloatArray, pe: FloatArray, step_s: float) -> float:
    h = step_s / 3600.0 / 1000.0
    return float(np.sum(imp * pi * h) - np.sum(exp * pe * h))


# ------------------------------------------------------------------------------------ one home


def _battery(o: BacktestOptions, soc_wh: float, terminal_value: float) -> Battery:
    cap = o.battery_kwh * 1000.0
    return Battery(
        capacity_wh=cap,
        soc0_wh=min(max(soc_wh, 0.0), cap),
        max_charge_w=o.battery_kw * 1000.0,
        max_discharge_w=o.battery_kw * 1000.0,
        soc_min_wh=cap * o.reserve_pct / 100.0,
        eta_charge=o.eta,
        eta_discharge=o.eta,
        terminal_value_per_kwh=terminal_value,
    )


def run_home(home: int, o: BacktestOptions) -> HomeResult:
    """Backtest one household: the four strategies on the same data."""
    ls = load_households(o.source)
    if not 0 <= home < ls.homes:
        raise ValueError(f"home {home} not in the {o.source} data set (0..{ls.homes - 1})")
    pvp = pv_profile(o.pv_site, step_s=60, seed=o.seed + home)
    k_load = o.step_s // ls.step_s
    k_pv = o.step_s // pvp.step_s
    per_day = 86400 // o.step_s
    d0 = o.start_day - o.warmup_days
    if d0 < 0 or o.start_day + o.days + o.horizon_s // 86400 > 365:
        raise ValueError("the test window (with warm-up and horizon) must fit in the profile year")
    first, last = d0 * per_day, (o.start_day + o.days) * per_day + o.horizon_s // o.step_s
    load_all = resample_mean(np.asarray(ls.watts[home], dtype=np.float64), k_load)[first:last]
    pv_all = o.pv_kwp * resample_mean(np.asarray(pvp.w_per_kwp, dtype=np.float64), k_pv)
    pv_all = pv_all[first:last]
    # Real timestamps of the profile year, so that weekdays (tariff, forecaster) match the data.
    year0 = datetime(ls.year, 1, 1, tzinfo=UTC).timestamp()
    t_all = year0 + (first + np.arange(load_all.size)) * float(o.step_s)

    n_warm = o.warmup_days * per_day
    n = o.days * per_day
    h_steps = o.horizon_s // o.step_s
    load, pv, t = load_all[n_warm : n_warm + n], pv_all[n_warm : n_warm + n], t_all[n_warm:]
    tariff = TARIFFS[o.tariff]
    pi_all, pe_all = tariff.prices(float(t_all[n_warm]), n + h_steps, o.step_s)
    pi, pe = pi_all[:n], pe_all[:n]
    tv = o.terminal_value if o.terminal_value is not None else float(np.min(pi_all))
    cap = o.battery_kwh * 1000.0
    soc0 = cap * o.soc0_pct / 100.0

    def total(imp: FloatArray, exp: FloatArray, soc_end: float) -> float:
        return _bill(imp, exp, pi, pe, o.step_s) - (soc_end - soc0) / 1000.0 * tv

    costs: dict[str, float] = {}
    imp, exp, _ = _run_rule(load, pv, o, use_battery=False)
    costs["idle"] = total(imp, exp, soc0)
    imp, exp, soc_end = _run_rule(load, pv, o, use_battery=True)
    costs["self_consumption"] = total(imp, exp, soc_end)

    # perfect foresight: one LP over the whole period on the true data
    pf = solve_plan(
        PlanInputs(
            step_s=o.step_s, load_w=load, pv_w=pv, import_price=pi, export_price=pe,
            battery=_battery(o, soc0, tv),
        )
    )
    costs["perfect_foresight"] = total(pf.import_w, pf.export_w, float(pf.soc_wh[-1]))

    # MPC: forecast -> plan -> first step -> plant, every step
    array = PvArray(
        lat=pvp.lat, lon=pvp.lon - 15.0 * pvp.tz_hours, kwp=o.pv_kwp,
        ac_limit_w=o.pv_kwp * 960.0,
    )
    soc = soc0
    imp = np.zeros(n)
    exp = np.zeros(n)
    res = HomeResult(home=home, cost=costs, load_kwh=0.0, pv_kwh=0.0)
    hist_n = (o.warmup_days) * per_day  # history window handed to the forecasters
    fc_days: list[tuple[FloatArray, FloatArray, FloatArray]] = []
    for k in range(n):
        now = float(t[k])
        lo = max(0, n_warm + k - hist_n)
        ht, hl, hp = t_all[lo : n_warm + k], load_all[lo : n_warm + k], pv_all[lo : n_warm + k]
        lf = forecast_load(ht, hl, now, step_s=o.step_s, horizon_s=o.horizon_s)
        pf_ = forecast_pv(ht, hp, now, array, step_s=o.step_s, horizon_s=o.horizon_s)
        if k % per_day == 0:
            actual = load_all[n_warm + k : n_warm + k + per_day]
            persist = load_all[n_warm + k - per_day : n_warm + k]
            fc_days.append((lf.watts[:per_day], actual, persist))
        plan = plan_or_fallback(
            PlanInputs(
                step_s=o.step_s, load_w=lf.watts, pv_w=pf_.watts,
                import_price=pi_all[k : k + h_steps], export_price=pe_all[k : k + h_steps],
                battery=_battery(o, soc, tv),
            ),
            budget_ms=o.budget_ms,
        )
        res.solve_ms.append(plan.solve_ms)
        if plan.source != "lp":
            res.fallbacks += 1
        want = follow_plan(plan.setpoint.battery_w, plan.setpoint.site_w, load[k], pv[k])
        _, soc, imp[k], exp[k] = plant_step(
            soc, want, load[k], pv[k], o.step_s, cap,
            o.battery_kw * 1000, o.battery_kw * 1000, o.eta, cap * o.reserve_pct / 100.0,
        )
    costs["mpc"] = total(imp, exp, soc)
    res.load_kwh = float(load.sum() * o.step_s / 3.6e6)
    res.pv_kwh = float(pv.sum() * o.step_s / 3.6e6)
    f = np.concatenate([d[0] for d in fc_days])
    a = np.concatenate([d[1] for d in fc_days])
    p = np.concatenate([d[2] for d in fc_days])
    res.forecast = {
        "mae": mae(f, a), "rmse": rmse(f, a), "mae_persistence": mae(p, a),
        "rmse_persistence": rmse(p, a),
        "daily_energy_error": daily_energy_error(f, a, per_day),
    }
    return res


def _run_home_star(args: tuple[int, BacktestOptions]) -> HomeResult:
    return run_home(*args)


# ------------------------------------------------------------------------------------ report


def run_backtest(o: BacktestOptions) -> dict[str, Any]:
    """Backtest ``o.homes`` households and return the report (``hems backtest --json``)."""
    o.validate()
    homes = list(range(o.first_home, o.first_home + o.homes))
    workers = o.workers or min(2, os.cpu_count() or 1, len(homes))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_run_home_star, [(h, o) for h in homes]))
    else:
        results = [run_home(h, o) for h in homes]
    strategies = ("idle", "self_consumption", "mpc", "perfect_foresight")
    cost = {s: round(math.fsum(r.cost[s] for r in results), 2) for s in strategies}
    denom = cost["self_consumption"] - cost["perfect_foresight"]
    capture = (cost["self_consumption"] - cost["mpc"]) / denom if denom > 1e-9 else float("nan")
    solve = np.concatenate([np.asarray(r.solve_ms) for r in results])
    mae_v = float(np.mean([r.forecast["mae"] for r in results]))
    mae_p = float(np.mean([r.forecast["mae_persistence"] for r in results]))
    rmse_v = float(np.mean([r.forecast["rmse"] for r in results]))
    rmse_p = float(np.mean([r.forecast["rmse_persistence"] for r in results]))
    return {
        "days": o.days,
        "homes": o.homes,
        "tariff": o.tariff,
        "cost": cost,
        "capture": round(capture, 4),
        "forecast": {
            "mae_kw": round(mae_v / 1000.0, 4),
            "skill_vs_persistence": round(1.0 - mae_v / mae_p, 4),
            "rmse_skill": round(1.0 - rmse_v / rmse_p, 4),
            "daily_energy_error": round(
                float(np.mean([r.forecast["daily_energy_error"] for r in results])), 4
            ),
        },
        "solve_ms": {
            "p50": round(float(np.percentile(solve, 50)), 2),
            "p99": round(float(np.percentile(solve, 99)), 2),
        },
        "fallbacks": int(sum(r.fallbacks for r in results)),
        "options": asdict(o),
        "per_home": [
            {"home": r.home, "load_kwh": round(r.load_kwh, 1), "pv_kwh": round(r.pv_kwh, 1),
             **{s: round(r.cost[s], 2) for s in strategies}}
            for r in results
        ],
    }


def format_report(r: dict[str, Any]) -> str:
    c, f = r["cost"], r["forecast"]
    lines = [
        f"hems backtest: {r['homes']} homes x {r['days']} days, tariff {r['tariff']}",
        "  cost (sum over homes): " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()),
        f"  capture of the perfect-foresight saving over self-consumption: {r['capture']:.3f}",
        f"  load forecast: MAE {f['mae_kw']:.3f} kW, MAE-skill {f['skill_vs_persistence']:.3f}, "
        f"RMSE-skill {f['rmse_skill']:.3f}, "
        f"daily-energy error {100 * f['daily_energy_error']:.1f} %",
        f"  solve ms p50 {r['solve_ms']['p50']}, p99 {r['solve_ms']['p99']}, "
        f"fallbacks {r['fallbacks']}",
    ]
    return "\n".join(lines)
