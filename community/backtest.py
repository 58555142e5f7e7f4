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

What the mpc is fed (``load_forecast``, ``pv_forecast``; the report's ``forecasts_used`` says
which): ``own`` is the gateway's forecasters on the home's own history, the only figure a real
gateway reaches without a weather service, and the default. ``perfect`` feeds the true future: an
oracle, to measure what each forecast costs, never a result. PV ``external`` goes through the
gateway's external-forecast path (``forecast_pv(external=...)``) with either a forecast file
(``pv_forecast_file``) or, without one, :func:`synthetic_day_ahead`: a forecast faked from the
truth with a stated error model, standing in for a weather service (none is available offline).

This lives in ``community/`` because it wires the shipped simulation data to the gateway's pure
maths; ``gateway`` itself never imports ``firmware_sim``.
"""

from __future__ import annotations

import bisect
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
from gateway.forecast.pv import ExternalForecast, forecast_pv
from gateway.forecast.solar import PvArray
from gateway.optimize import Battery, PlanInputs, plan_or_fallback, solve_plan
from gateway.optimize.follow import follow_plan
from gateway.tariff import DEFAULT_TOU, Tariff, flat

FloatArray = np.ndarray
LOAD_FORECASTS = ("own", "perfect")
PV_FORECASTS = ("own", "external", "perfect")
TARIFFS: dict[str, Tariff] = {
    "tou": DEFAULT_TOU,
    "flat": flat("flat", 0.30, 0.08),
}


@dataclass(frozen=True)
class BacktestOptions:
    """What to backtest. Defaults (those of ``hems backtest``): 10 held-out Richardson homes x 28
    November days, 4 kWp, 10 kWh, time-of-use tariff, 30-min steps, the gateway's own forecasts."""

    days: int = 28
    homes: int = 10
    first_home: int = 10  # the load forecaster was tuned on homes 0-9: test on others
    source: str = "richardson"
    start_day: int = 305  # day of the profile year of the first test day (305 = Nov 1)
    warmup_days: int = 28  # history the forecasters see before the first test day
    step_s: int = 1800
    horizon_s: int = 86400
    tariff: str = "tou"
    pv_site: str = "greensboro"
    pv_kwp: float = 4.0
    battery_kwh: float = 10.0
    battery_kw: float = 5.0
    eta: float = 0.95
    reserve_pct: float = 10.0
    soc0_pct: float = 50.0
    terminal_value: float | None = None  # per kWh; None: the cheapest import price
    # what the mpc's plans value a stored kWh at the horizon's end (the gateway's
    # planner.terminal_value_per_kwh); None: the same as ``terminal_value``
    plan_terminal_value: float | None = None
    budget_ms: float = 1000.0
    seed: int = 0
    workers: int = 0  # 0: one per core (at most 2 on a Pi-class box)
    # What the mpc is fed. "own": the gateway's forecasters on the home's own history (the
    # default and the only figure a real gateway can reach); "perfect": the true future
    # (an oracle, for diagnosis only); PV also "external" (see module docstring).
    load_forecast: str = "own"
    pv_forecast: str = "own"
    # pv_forecast "external": a forecast file (``issued_at,timestamp,watts`` rows, see
    # read_forecast_csv), or, without one, the labelled synthetic day-ahead forecast
    # (synthetic_day_ahead) with this daily clear-sky-index error (standard deviation)
    pv_forecast_file: str | None = None
    pv_forecast_sigma: float = 0.3

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
        if self.load_forecast not in LOAD_FORECASTS:
            raise ValueError(f"load_forecast must be one of {', '.join(LOAD_FORECASTS)}")
        if self.pv_forecast not in PV_FORECASTS:
            raise ValueError(f"pv_forecast must be one of {', '.join(PV_FORECASTS)}")
        if self.pv_forecast_file is not None and self.pv_forecast != "external":
            raise ValueError("pv_forecast_file needs pv_forecast 'external'")
        if not 0.0 <= self.pv_forecast_sigma <= 1.0:
            raise ValueError("pv_forecast_sigma must be in [0, 1] (clear-sky index units)")

    def forecasts_label(self) -> dict[str, str]:
        """Which forecasts the mpc was fed, for the report (oracles are labelled as such)."""
        pv = {
            "own": "own history + clear-sky model",
            "perfect": "ORACLE: the true future (diagnosis only)",
            "external": (
                f"external file {self.pv_forecast_file}" if self.pv_forecast_file else
                "SYNTHETIC day-ahead forecast made from the truth with a daily clear-sky-index "
                f"error of sd {self.pv_forecast_sigma} (stands in for a weather service)"
            ),
        }[self.pv_forecast]
        load = ("own history" if self.load_forecast == "own"
                else "ORACLE: the true future (diagnosis only)")
        return {"load": load, "pv": pv}


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
    # per-step series for diagnosis (not in the report): load, pv, prices, each strategy's
    # battery power and state of charge
    trace: dict[str, FloatArray] = field(default_factory=dict)
    # per test day: mpc cost minus perfect-foresight cost, and the day's clear-sky index (PV
    # energy / clear-sky energy); ``kt_before`` is the index of the day before the first one
    day_gap: FloatArray = field(default_factory=lambda: np.zeros(0))
    day_kt: FloatArray = field(default_factory=lambda: np.zeros(0))
    kt_before: float = float("nan")


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


def daily_costs(
    imp: FloatArray, exp: FloatArray, soc: FloatArray, pi: FloatArray, pe: FloatArray,
    step_s: int, terminal_value: float,
) -> FloatArray:
    """Each day's bill minus the value (at ``terminal_value``) of the energy the battery gained
    that day; ``soc`` has one entry more than the steps. The days sum to the strategy's cost."""
    per_day = 86400 // step_s
    days = imp.size // per_day
    h = step_s / 3600.0 / 1000.0
    bill = ((imp * pi - exp * pe) * h)[: days * per_day].reshape(days, per_day).sum(axis=1)
    gained = (soc[per_day : (days + 1) * per_day : per_day] - soc[: days * per_day : per_day])
    return np.asarray(bill - gained / 1000.0 * terminal_value, dtype=np.float64)


OVERCAST_KT = 0.5  # a day whose PV gave less than half its clear-sky energy


def gap_by_weather(
    day_gap: FloatArray, day_kt: FloatArray, kt_before: float
) -> dict[str, float]:
    """Where the mpc loses against perfect foresight, by the day's weather (diagnosis).

    ``overcast`` days have a clear-sky index below OVERCAST_KT; ``overcast_after_clear`` are
    those that follow a day that was not overcast: a forecaster that only sees the home's own
    history (persistence, climatology) has no sign of them, so the planner cannot have charged
    from the grid the night before (measured: most of the gap, docs/planning-under-uncertainty.md).
    """
    prev = np.concatenate(([kt_before], day_kt[:-1]))
    over = day_kt < OVERCAST_KT
    surprise = over & ~(prev < OVERCAST_KT)
    return {
        "total": float(day_gap.sum()),
        "overcast": float(day_gap[over].sum()),
        "overcast_after_clear": float(day_gap[surprise].sum()),
        "other": float(day_gap[~over].sum()),
        "days": float(day_gap.size),
        "days_overcast": float(over.sum()),
        "days_overcast_after_clear": float(surprise.sum()),
    }


def _bill(imp: FloatArray, exp: FloatArray, pi: FloatArray, pe: FloatArray, step_s: float) -> float:
    h = step_s / 3600.0 / 1000.0
    return float(np.sum(imp * pi * h) - np.sum(exp * pe * h))


# ------------------------------------------------------------------------ external PV forecasts

ISSUE_EVERY_S = 6 * 3600  # a weather service's update cycle (NWP runs every 6 h)
ISSUE_SPAN_S = 48 * 3600  # how far ahead each issue reaches
SHAPE_WINDOW_S = 3 * 3600  # timing detail a day-ahead forecast keeps of the truth


@dataclass(frozen=True)
class ForecastIssue:
    """One issue of an external PV forecast: mean W of slot ``i`` is ``watts[i]``, the slot
    starting at ``times[i]`` (epoch s of the profile year)."""

    issued_at: float
    times: FloatArray
    watts: FloatArray


def synthetic_day_ahead(
    t: FloatArray, pv: FloatArray, clear: FloatArray, step_s: int, sigma: float, seed: int
) -> list[ForecastIssue]:
    """A SYNTHETIC stand-in for a weather service's PV forecast, made from the truth.

    No numerical weather prediction is available offline, so this fakes one with a stated error
    model, for "how well would the planner do with a real forecast" only:

    * each day's clear-sky index (PV energy / clear-sky energy) is forecast with an additive
      error ``sigma * N(0, 1)``, one draw per day (seeded; the same for every issue, so forecasts
      do not improve as the day approaches), clipped to [0.02, 1];
    * the shape within the day is half the day's mean index, half the truth's index smoothed
      over 3 h (a forecast knows "cloudy morning, sunny afternoon", not when each cloud passes);
    * an issue every 6 h from ``t[0]``, reaching 48 h ahead.

    ``t`` are slot starts from a midnight, whole days; ``clear`` the array's clear-sky output.
    With ``sigma`` 0.3 the daily-energy RMSE in November at Greensboro is ~24 % of the mean (the
    report's ``pv_forecast`` gives the figure measured), within the 20-30 % of published
    day-ahead forecasts for winter at mid-latitudes; the own-history forecaster's is ~40 %.
    """
    per_day = 86400 // step_s
    days = t.size // per_day
    m = days * per_day
    pv, clear, t = pv[:m], clear[:m], t[:m]
    w = max(1, SHAPE_WINDOW_S // step_s)
    kernel = np.ones(w)
    pv_s = np.convolve(pv, kernel, "same")
    cl_s = np.convolve(clear, kernel, "same")
    ks = np.clip(np.divide(pv_s, cl_s, out=np.zeros(m), where=cl_s > 1e-6), 0.0, 1.2)
    pvd = pv.reshape(days, per_day).sum(axis=1)
    cld = clear.reshape(days, per_day).sum(axis=1)
    kd = np.divide(pvd, cld, out=np.zeros(days), where=cld > 1e-6)
    eps = np.random.default_rng(seed).standard_normal(days)
    k_fc = np.clip(kd + sigma * eps, 0.02, 1.0)
    shape = 0.5 * ks + 0.5 * np.repeat(kd, per_day) + np.repeat(k_fc - kd, per_day)
    fc = clear * np.clip(shape, 0.0, 1.05)
    issues = []
    every, span = ISSUE_EVERY_S // step_s, ISSUE_SPAN_S // step_s
    for i in range(0, m, every):
        sl = slice(i, min(m, i + span))
        issues.append(ForecastIssue(float(t[i]), t[sl].copy(), fc[sl].copy()))
    return issues


def write_forecast_csv(path: str, issues: list[ForecastIssue]) -> None:
    """Write issues as ``issued_at,timestamp,watts`` rows (epoch s, slot start, mean W)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("issued_at,timestamp,watts\n")
        for f in issues:
            for ti, wi in zip(f.times, f.watts, strict=True):
                fh.write(f"{f.issued_at:.0f},{ti:.0f},{wi:.1f}\n")


def read_forecast_csv(path: str) -> list[ForecastIssue]:
    """Read a forecast file written by :func:`write_forecast_csv` (or by hand in that form);
    raise ValueError naming the first bad line."""
    rows: dict[float, list[tuple[float, float]]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise ValueError(f"PV forecast file {path}: cannot read ({e.strerror})") from e
    for no, line in enumerate(lines, 1):
        if not line.strip() or (no == 1 and line.startswith("issued_at")):
            continue
        parts = line.split(",")
        try:
            a, b, c = (float(x) for x in parts)
        except ValueError:
            raise ValueError(f"PV forecast file {path} line {no}: need 3 numbers "
                             f"(issued_at,timestamp,watts), got {line!r}") from None
        if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
            raise ValueError(f"PV forecast file {path} line {no}: not finite")
        rows.setdefault(a, []).append((b, c))
    if not rows:
        raise ValueError(f"PV forecast file {path}: no forecasts")
    out = []
    for issued in sorted(rows):
        pts = np.array(sorted(rows[issued]))
        out.append(ForecastIssue(issued, pts[:, 0], pts[:, 1]))
    return out


def _external_at(issues: list[ForecastIssue], now: float, step_s: int) -> ExternalForecast | None:
    """The latest issue at ``now`` as the gateway receives it (power at slot mid-points)."""
    i = bisect.bisect_right([f.issued_at for f in issues], now) - 1
    if i < 0:
        return None
    f = issues[i]
    return ExternalForecast(f.times + step_s / 2.0, f.watts, f.issued_at)


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
    plan_tv = tv if o.plan_terminal_value is None else o.plan_terminal_value
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
    mpc_b = np.zeros(n)
    mpc_soc = np.zeros(n + 1)
    res = HomeResult(home=home, cost=costs, load_kwh=0.0, pv_kwh=0.0)
    hist_n = (o.warmup_days) * per_day  # history window handed to the forecasters
    fc_days: list[tuple[FloatArray, FloatArray, FloatArray]] = []
    pv_days: list[tuple[float, float]] = []
    issues: list[ForecastIssue] = []
    if o.pv_forecast == "external":
        if o.pv_forecast_file:
            issues = read_forecast_csv(o.pv_forecast_file)
        else:
            clear_all = o.pv_kwp * resample_mean(
                np.asarray(pvp.clearsky_w_per_kwp, dtype=np.float64), k_pv)[first:last]
            issues = synthetic_day_ahead(t_all, pv_all, clear_all, o.step_s,
                                         o.pv_forecast_sigma, o.seed)
    for k in range(n):
        now = float(t[k])
        lo = max(0, n_warm + k - hist_n)
        ht, hl, hp = t_all[lo : n_warm + k], load_all[lo : n_warm + k], pv_all[lo : n_warm + k]
        lf = forecast_load(ht, hl, now, step_s=o.step_s, horizon_s=o.horizon_s)
        load_fc = lf.watts
        if o.load_forecast == "perfect":
            load_fc = load_all[n_warm + k : n_warm + k + h_steps]
        if o.pv_forecast == "perfect":
            pv_fc = pv_all[n_warm + k : n_warm + k + h_steps]
        else:
            ext = _external_at(issues, now, o.step_s) if issues else None
            pv_fc = forecast_pv(ht, hp, now, array, step_s=o.step_s, horizon_s=o.horizon_s,
                                external=ext).watts
        if k % per_day == 0:
            actual = load_all[n_warm + k : n_warm + k + per_day]
            persist = load_all[n_warm + k - per_day : n_warm + k]
            fc_days.append((lf.watts[:per_day], actual, persist))
            pv_days.append((float(pv_fc[:per_day].sum()),
                            float(pv_all[n_warm + k : n_warm + k + per_day].sum())))
        plan = plan_or_fallback(
            PlanInputs(
                step_s=o.step_s, load_w=load_fc, pv_w=pv_fc,
                import_price=pi_all[k : k + h_steps], export_price=pe_all[k : k + h_steps],
                battery=_battery(o, soc, plan_tv),
            ),
            budget_ms=o.budget_ms,
        )
        res.solve_ms.append(plan.solve_ms)
        if plan.source != "lp":
            res.fallbacks += 1
        want = follow_plan(plan.setpoint.battery_w, plan.setpoint.site_w, load[k], pv[k])
        mpc_soc[k] = soc
        mpc_b[k], soc, imp[k], exp[k] = plant_step(
            soc, want, load[k], pv[k], o.step_s, cap,
            o.battery_kw * 1000, o.battery_kw * 1000, o.eta, cap * o.reserve_pct / 100.0,
        )
    mpc_soc[n] = soc
    costs["mpc"] = total(imp, exp, soc)
    res.trace = {"load": load, "pv": pv, "pi": pi, "pf_b": pf.battery_w, "pf_soc": pf.soc_wh,
                 "mpc_b": mpc_b, "mpc_soc": mpc_soc, "mpc_imp": imp.copy(), "pf_imp": pf.import_w}
    res.day_gap = (daily_costs(imp, exp, mpc_soc, pi, pe, o.step_s, tv)
                   - daily_costs(pf.import_w, pf.export_w, pf.soc_wh, pi, pe, o.step_s, tv))
    clear = o.pv_kwp * resample_mean(np.asarray(pvp.clearsky_w_per_kwp, dtype=np.float64), k_pv)
    days_pv = pv_all[n_warm - per_day : n_warm + n].reshape(o.days + 1, per_day).sum(axis=1)
    days_clear = clear[first + n_warm - per_day : first + n_warm + n]
    days_clear = days_clear.reshape(o.days + 1, per_day).sum(axis=1)
    kts = np.divide(days_pv, days_clear, out=np.zeros(o.days + 1), where=days_clear > 1e-6)
    res.kt_before, res.day_kt = float(kts[0]), kts[1:]
    res.load_kwh = float(load.sum() * o.step_s / 3.6e6)
    res.pv_kwh = float(pv.sum() * o.step_s / 3.6e6)
    f = np.concatenate([d[0] for d in fc_days])
    a = np.concatenate([d[1] for d in fc_days])
    p = np.concatenate([d[2] for d in fc_days])
    res.forecast = {
        "mae": mae(f, a), "rmse": rmse(f, a), "mae_persistence": mae(p, a),
        "rmse_persistence": rmse(p, a),
        "daily_energy_error": daily_energy_error(f, a, per_day),
        "pv_day_fc_kwh": float(sum(d[0] for d in pv_days) * o.step_s / 3.6e6),
        "pv_day_abs_err_kwh": float(sum(abs(d[0] - d[1]) for d in pv_days) * o.step_s / 3.6e6),
        "pv_day_sq_err": float(sum((d[0] - d[1]) ** 2 for d in pv_days) * (o.step_s / 3.6e6) ** 2),
        "pv_day_kwh": float(sum(d[1] for d in pv_days) * o.step_s / 3.6e6),
        "pv_days": float(len(pv_days)),
        "load_fc_kwh": float(f.sum() * o.step_s / 3.6e6),
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
        "forecasts_used": o.forecasts_label(),
        "load_energy_bias": round(
            math.fsum(r.forecast["load_fc_kwh"] for r in results)
            / max(math.fsum(r.load_kwh for r in results), 1e-9) - 1.0, 4),
        "pv_forecast": _pv_figures(results),
        "solve_ms": {
            "p50": round(float(np.percentile(solve, 50)), 2),
            "p99": round(float(np.percentile(solve, 99)), 2),
        },
        "fallbacks": int(sum(r.fallbacks for r in results)),
        "mpc_gap": _gap_figures(results),
        "options": asdict(o),
        "per_home": [
            {"home": r.home, "load_kwh": round(r.load_kwh, 1), "pv_kwh": round(r.pv_kwh, 1),
             **{s: round(r.cost[s], 2) for s in strategies}}
            for r in results
        ],
    }


def _pv_figures(results: list[HomeResult]) -> dict[str, float]:
    """Daily PV energy of the forecast issued at each midnight against the truth (all homes)."""
    f = [r.forecast for r in results]
    true = math.fsum(x["pv_day_kwh"] for x in f)
    count = sum(x["pv_days"] for x in f)
    mean = true / max(count, 1)
    return {
        "daily_kwh_mean": round(mean, 2),
        "daily_mae_pct": round(100 * math.fsum(x["pv_day_abs_err_kwh"] for x in f)
                               / max(true, 1e-9), 1),
        "daily_rmse_pct": round(100 * math.sqrt(math.fsum(x["pv_day_sq_err"] for x in f)
                                                / max(count, 1)) / max(mean, 1e-9), 1),
        "bias_pct": round(100 * (math.fsum(x["pv_day_fc_kwh"] for x in f) / max(true, 1e-9) - 1),
                          1),
    }


def _gap_figures(results: list[HomeResult]) -> dict[str, float]:
    """mpc minus perfect foresight (sum over homes) by the days' weather, see gap_by_weather."""
    per = [gap_by_weather(r.day_gap, r.day_kt, r.kt_before) for r in results]
    out = {k: round(math.fsum(p[k] for p in per), 2) for k in per[0]} if per else {}
    for k in ("days", "days_overcast", "days_overcast_after_clear"):
        if k in out:  # weather is shared by the homes: count days once
            out[k] = per[0][k]
    return out


def format_report(r: dict[str, Any]) -> str:
    c, f, p = r["cost"], r["forecast"], r["pv_forecast"]
    lines = [
        f"hems backtest: {r['homes']} homes x {r['days']} days, tariff {r['tariff']}",
        "  cost (sum over homes): " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()),
        f"  capture of the perfect-foresight saving over self-consumption: {r['capture']:.3f}",
        f"  load forecast: MAE {f['mae_kw']:.3f} kW, MAE-skill {f['skill_vs_persistence']:.3f}, "
        f"RMSE-skill {f['rmse_skill']:.3f}, "
        f"daily-energy error {100 * f['daily_energy_error']:.1f} %",
        f"  PV forecast (issued at midnight, daily energy): MAE {p['daily_mae_pct']} %, "
        f"RMSE {p['daily_rmse_pct']} %, bias {p['bias_pct']} %; load energy bias "
        f"{100 * r['load_energy_bias']:.1f} %",
        f"  forecasts: load {r['forecasts_used']['load']}; PV {r['forecasts_used']['pv']}",
        f"  solve ms p50 {r['solve_ms']['p50']}, p99 {r['solve_ms']['p99']}, "
        f"fallbacks {r['fallbacks']}",
    ]
    g = r.get("mpc_gap")
    if g:
        lines.append(
            f"  mpc - perfect foresight {g['total']:.2f}: {g['overcast']:.2f} on "
            f"{g['days_overcast']:.0f} overcast days (of which {g['overcast_after_clear']:.2f} on "
            f"{g['days_overcast_after_clear']:.0f} that followed a clear day), "
            f"{g['other']:.2f} on the other {g['days'] - g['days_overcast']:.0f}")
    return "\n".join(lines)
