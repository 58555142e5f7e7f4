"""The slow loop: forecast -> optimize every planning interval, and the plan the fast loop follows.

:func:`planner_loop` is the daemon's ``slow_loop`` (``[planner] enabled = true``). At every
``step_s`` boundary of domain time (and once at start) it

1. reads the telemetry history added since the last round from the store (on the store's thread:
   only new rows, the last ``HISTORY_DAYS`` kept in memory, ~2 MB at 1-minute rows);
2. takes the battery from the latest reading (capacity, SoC, rates; reserve = the larger of the
   commanded reserve and the device's own), prices from the tariff, and the envelope per step
   from :meth:`gateway.daemon.Gateway.limits_for_horizon` (unlimited until the envelope is wired);
3. on the ONE planning thread of the process (cvxpy's compiled problems are shared and not
   thread-safe): load forecast (cold start: the standard profile), PV forecast (clear-sky model
   plus the PV history; on the steps it covers, the newest usable external forecast: the
   ``pv_forecast_file`` or the one held from MQTT ``forecast/pv``, see :func:`compute_plan`),
   :func:`gateway.optimize.plan_or_fallback` within ``budget_ms``;
4. installs the result as :class:`ActivePlan`, stores it (kv ``plan``: a restart follows it at
   once while it is fresh) and counts it (:class:`PlannerStats`).

The fast loop never waits for any of this. Each cycle it asks
:meth:`Planner.desired_battery_w` (via ``Gateway.plan_setpoint``) for the plan's battery power
followed on the measured load and PV (:func:`gateway.optimize.follow.follow_plan`). A missing plan,
a plan older than two intervals (``STALE_STEPS``), a mode other than ``auto`` or a cycle without
meter/battery readings give ``None``: the fast loop then uses the rule (self-consumption).

Importing this module imports cvxpy (~1 s, ~60 MB); the daemon imports it only when the planner
is enabled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

import numpy as np

from gateway.commands import ModeState, Setpoints, SiteState
from gateway.config import Config, PlannerConfig
from gateway.forecast.load import LoadConfig, forecast_load
from gateway.forecast.pv import (
    ExternalForecast,
    ExternalForecastError,
    forecast_pv,
    load_external,
    pick_external,
)
from gateway.forecast.solar import PvArray
from gateway.market_agent import site_fraction
from gateway.optimize import Battery, Plan, PlanInputs, StepLimits, plan_or_fallback
from gateway.optimize.fallback import Solver
from gateway.optimize.follow import follow_plan
from gateway.optimize.inputs import NO_BATTERY, FloatArray
from gateway.optimize.problem import compiled, solve_plan
from gateway.store import Store, StoreError

if TYPE_CHECKING:
    from gateway.daemon import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")

STALE_STEPS = 2  # a plan is followed for at most this many intervals after its first step starts
HISTORY_DAYS = LoadConfig().window_days + 2  # what forecast_load reads (it ignores older data)
KV_KEY = "plan"
MAX_READING_AGE_STEPS = 1.0  # battery reading older than this many intervals: do not plan on it


# ---------------------------------------------------------------------------- the planning thread

_executor: Executor | None = None
_busy_lock = threading.Lock()
_running = 0
_peak = 0
# (nice, steps, step_s) once :func:`use_plan_process` chose a child process over the thread
_process: tuple[int, int, float] | None = None


def _plan_thread() -> Executor:
    # One worker for the whole process: several gateways in one process (demo, tests) must not
    # solve at once either, since the compiled cvxpy problems are shared module state.
    global _executor
    if _executor is None:
        if _process is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hems-plan")
        else:
            _executor = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init, initargs=(os.getpid(), *_process))
    return _executor


def use_plan_process(nice: int, steps: int, step_s: float) -> None:
    """Plan in one child process of this process instead of on a thread of it.

    For a process that runs many gateways' fast loops (the community demo's workers): the
    planning thread's long Python stretches (forecasts, LP set-up and unpacking) hold the
    interpreter lock the fast loops need, so every plan stalls them for about half its length.
    In a child the plans share only the CPU, and at ``nice`` (0-19) the fast loops win it when
    both want it. The child imports the planner and compiles the LP of ``steps`` x ``step_s``
    at normal priority, then lowers its own; it exits when this process does (it watches its
    parent), and :func:`close_plan_executor` ends it earlier. Jobs and their results travel by
    pickle (a day's history is ~35 kB a plan). Call before the first job; a daemon running
    one household keeps the thread.
    """
    global _process
    if _executor is not None:
        raise RuntimeError("use_plan_process must be called before the first planning job")
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be in [0, 19], got {nice}")
    _process = (nice, steps, step_s)


def close_plan_executor() -> None:
    """End the planning thread or child (queued jobs are cancelled); the next job starts anew."""
    global _executor
    ex, _executor = _executor, None
    if ex is not None:
        ex.shutdown(wait=True, cancel_futures=True)


def _child_init(parent: int, nice: int, steps: int, step_s: float) -> None:
    # A child left behind by a killed parent would wait for jobs forever (it holds both ends of
    # its queue): leave as soon as the parent is gone.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="hems-plan-parent", daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warm_up(steps, step_s)
    if nice:
        os.nice(nice)


def solver_for(name: str) -> Solver:
    """The LP solve of ``[planner] solver``: "cvxpy" (reference) or "highs" (direct)."""
    if name == "highs":
        from gateway.optimize.highs_lp import solve_plan_highs

        return solve_plan_highs
    if name != "cvxpy":
        raise ValueError(f"planner solver must be 'cvxpy' or 'highs', got {name!r}")
    return solve_plan


def warm_up(steps: int, step_s: float) -> None:
    """Compile the LP of this shape (in whichever process plans)."""
    compiled(steps, step_s)


def _counted(fn: Callable[..., T], *args: Any) -> T:
    global _running, _peak
    with _busy_lock:
        _running += 1
        _peak = max(_peak, _running)
    try:
        return fn(*args)
    finally:
        with _busy_lock:
            _running -= 1


def planning_threads_peak() -> int:
    """The most planning jobs that ever ran at the same time on this process's planning thread
    (should be 1; a planning child counts its own)."""
    return _peak


async def in_plan_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on the process's single planning thread (or its planning child, see
    :func:`use_plan_process`: then ``fn``, its arguments and its result must pickle).

    A planning child that died (killed, out of memory) raises ``BrokenExecutor`` for the jobs
    it had; the next job starts a new child.
    """
    ex = _plan_thread()
    try:
        return await asyncio.get_running_loop().run_in_executor(ex, _counted, fn, *args)
    except BrokenExecutor:
        global _executor
        if _executor is ex:
            _executor = None
            log.error("planner: the planning process died; starting a new one")
        raise


# ---------------------------------------------------------------------------- the plan in use


@dataclass(frozen=True)
class ActivePlan:
    """A plan on absolute time: step ``k`` covers ``[start + k*step_s, start + (k+1)*step_s)``."""

    start: float
    step_s: float
    battery_w: FloatArray  # + charge / - discharge, per step
    site_w: FloatArray  # + import / - export, per step
    soc_wh: FloatArray  # steps + 1 values
    source: str  # "lp" | "fallback"
    reason: str
    made_at: float

    @classmethod
    def from_plan(cls, plan: Plan, start: float, made_at: float) -> ActivePlan:
        return cls(start, plan.step_s, plan.battery_w.copy(), plan.site_w.copy(),
                   plan.soc_wh.copy(), plan.source, plan.reason, made_at)

    def step_at(self, now: float) -> int | None:
        """Index of the step containing ``now``; None before the plan or once it is stale."""
        k = math.floor((now - self.start) / self.step_s)
        if k < 0 or k >= min(STALE_STEPS, self.battery_w.size):
            return None
        return k

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "start": self.start, "step_s": self.step_s, "source": self.source,
                "reason": self.reason[:300], "made_at": round(self.made_at, 3),
                "battery_w": [round(float(x), 1) for x in self.battery_w],
                "site_w": [round(float(x), 1) for x in self.site_w],
                "soc_wh": [round(float(x), 1) for x in self.soc_wh]}

    @classmethod
    def from_json(cls, d: Any) -> ActivePlan | None:
        """The stored plan, or None if it is not one (a bad kv value is ignored, not fatal)."""
        try:
            b = np.asarray(d["battery_w"], dtype=np.float64)
            s = np.asarray(d["site_w"], dtype=np.float64)
            soc = np.asarray(d["soc_wh"], dtype=np.float64)
            p = cls(float(d["start"]), float(d["step_s"]), b, s, soc, str(d["source"]),
                    str(d.get("reason", "")), float(d["made_at"]))
        except (KeyError, TypeError, ValueError):
            return None
        ok = (b.ndim == 1 and b.shape == s.shape and b.size > 0 and p.step_s > 0
              and np.all(np.isfinite(b)) and np.all(np.isfinite(s)) and math.isfinite(p.start))
        return p if ok else None


@dataclass
class PlannerStats:
    """What the slow loop did. ``lp`` + ``fallbacks`` = ``plans``; ``errors`` made no plan."""

    plans: int = 0
    lp: int = 0
    fallbacks: int = 0
    errors: int = 0
    timeouts: int = 0
    busy_skips: int = 0  # rounds skipped because a timed-out job still held the thread
    late: int = 0  # rounds that started more than one interval late (a boundary was missed)
    solve_ms_last: float = 0.0
    solve_ms_max: float = 0.0
    solve_ms_sum: float = 0.0  # LP solves only
    round_ms_last: float = 0.0  # history read + forecasts + solve, real time
    history_rows: int = 0
    load_reused: int = 0  # rounds given the load forecast made earlier in the same step
    load_source: str = ""
    pv_source: str = ""  # model | external | external+model | none, last plan
    pv_external: str = ""  # which external forecast the last plan used: file | mqtt | ""
    last_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("solve_ms_last", "solve_ms_max", "solve_ms_sum", "round_ms_last"):
            d[k] = round(d[k], 2)
        return d


@dataclass(frozen=True)
class PlanJob:
    """Everything the planning thread needs; built on the event loop from a snapshot."""

    now: float
    start: float
    step_s: int
    horizon_s: int
    hist_t: FloatArray
    hist_load: FloatArray
    hist_pv: FloatArray
    import_price: FloatArray
    export_price: FloatArray
    battery: Battery
    limits: StepLimits
    tz: tzinfo | None
    array: PvArray | None
    budget_ms: float
    award_w: FloatArray | None = None  # market commitments per step (+ sold), W
    pv_forecast_file: str | None = None  # an external PV forecast, re-read every plan
    pv_mqtt: ExternalForecast | None = None  # the one held from MQTT forecast/pv (read-only)
    # The load forecast made earlier in this planning step (source, history days, watts):
    # used as is instead of forecasting again from the history.
    load: tuple[str, int, FloatArray] | None = None


@dataclass(frozen=True)
class PlanResult:
    """What one planning job produced."""

    plan: Plan
    inputs: PlanInputs
    load_source: str
    history_days: int
    pv_source: str
    forecast_ms: float
    start: float = math.nan  # domain time of step 0 (the market agent bids from these inputs)
    pv_external: str = ""  # the external forecast used: "file", "mqtt" or "" (none)
    pv_notes: tuple[str, ...] = ()  # why external forecasts were passed over


def compute_plan(job: PlanJob, solver: Solver = solve_plan) -> PlanResult:
    """Forecast and optimize (CPU-bound, blocking: run on the planning thread).

    Raises ``ValueError`` for inputs that describe no household (see :func:`validate`).

    PV: of the external forecasts at hand (``pv_forecast_file``, read now, and ``pv_mqtt``) the
    newest usable one by ``issued`` (:func:`gateway.forecast.pv.pick_external`; a tie goes to
    the file) replaces the own forecast on the steps it covers; stale (12 h), expired (ending
    before the horizon starts) or short (under half the horizon) ones are passed over.
    """
    t0 = time.perf_counter()
    n = job.horizon_s // job.step_s
    if job.load is not None and job.load[2].shape == (n,):
        load_source, history_days, load_w = job.load
    else:
        lf = forecast_load(job.hist_t, job.hist_load, job.now, step_s=job.step_s,
                           horizon_s=job.horizon_s, tz=job.tz, quantiles=False)  # the point
        if lf.start != job.start:
            raise ValueError(f"the time zone's UTC offset at {job.start:.0f} is not a multiple "
                             f"of planner.step_s ({job.step_s} s): local and UTC steps do not "
                             "align")
        load_source, history_days, load_w = lf.source, lf.history_days, lf.watts
    pv_source = "none"
    pv: FloatArray = np.zeros(n)
    used = ""
    pv_notes: list[str] = []
    if job.array is not None:
        cands: list[tuple[str, ExternalForecast]] = []
        if job.pv_forecast_file:
            try:
                cands.append(("file", load_external(job.pv_forecast_file)))
            except (ExternalForecastError, OSError, ValueError) as e:  # incl. undecodable
                # The own forecast still plans; the reason is in the log (once per plan).
                log.warning("planner: %s; using the own PV forecast", e)
        if job.pv_mqtt is not None:
            cands.append(("mqtt", job.pv_mqtt))
        chosen, pv_notes = pick_external(cands, job.start, n, job.step_s, job.now)
        pf = forecast_pv(job.hist_t, job.hist_pv, job.now, job.array, step_s=job.step_s,
                         horizon_s=job.horizon_s,
                         external=chosen[1] if chosen is not None else None)
        pv, pv_source = pf.watts, pf.source
        used = chosen[0] if chosen is not None and pf.source != "model" else ""
    forecast_ms = (time.perf_counter() - t0) * 1e3
    inputs = PlanInputs(step_s=job.step_s, load_w=load_w, pv_w=pv,
                        import_price=job.import_price, export_price=job.export_price,
                        battery=job.battery, limits=job.limits, award_w=job.award_w)
    plan = plan_or_fallback(inputs, budget_ms=job.budget_ms, solver=solver)
    return PlanResult(plan, inputs, load_source, history_days, pv_source, forecast_ms,
                      start=job.start, pv_external=used, pv_notes=tuple(pv_notes))


def planned_setpoints(state: SiteState, mode: ModeState, battery_w: float) -> Setpoints:
    """The plan's battery power within the battery's ratings and the reserve (auto mode).

    The same device clamps as :func:`gateway.commands.rule_setpoints`; the DSO envelope is the
    caller's to apply on top.
    """
    b = state.battery
    if b is None:
        return Setpoints(None)
    target = min(max(battery_w, -b.max_discharge_w), b.max_charge_w)
    if target < 0 and b.soc_pct <= mode.reserve_soc_pct:
        target = 0.0
    return Setpoints(battery_w=round(target, 1))


def _history_rows(store: Store, since: float, after_seq: int) -> tuple[int, FloatArray | None]:
    # On the store's thread, conversion included: the first read is ~80k rows at 1/min.
    top, rows = store.power_history(since, after_seq)
    if not rows:
        return top, None
    arr = np.array(rows, dtype=np.float64)  # None -> nan
    return top, arr


# ---------------------------------------------------------------------------- the planner


class Planner:
    """The slow loop's state for one gateway: history cache, the plan in use, counters."""

    def __init__(self, config: Config, *, solver: Solver | None = None) -> None:
        self.cfg: PlannerConfig = config.planner
        self.tariff = config.tariff.tariff
        self.solver: Solver = solver or solver_for(self.cfg.solver)
        self.tz: tzinfo | None = None if self.cfg.timezone == "UTC" else ZoneInfo(
            self.cfg.timezone)
        c = self.cfg
        self.array = (PvArray(lat=c.lat, lon=c.lon, kwp=c.pv_kwp, tilt_deg=c.pv_tilt_deg,
                              azimuth_deg=c.pv_azimuth_deg, ac_limit_w=c.pv_ac_limit_w)
                      if c.pv_kwp > 0 else None)
        self.plan: ActivePlan | None = None
        self.last: PlanResult | None = None  # the latest solve's plan and inputs (inspection)
        self.stats = PlannerStats()
        self._hist_seq = 0
        self._hist = np.empty((0, 3))  # rows (t, load_w, pv_w), NaN = not read
        self._busy: asyncio.Future[PlanResult] | None = None
        self._last_error = ""
        self._was_fallback = False
        self._pv_said: tuple[str, tuple[str, ...]] = ("", ())
        self.waiting_for_battery = False

    @property
    def steps(self) -> int:
        return self.cfg.horizon_s // self.cfg.step_s

    # ------------------------------------------------------------------ fast-loop side

    def desired_battery_w(self, now: float, measured: SiteState) -> float | None:
        """Battery power (W, + charge) the plan wants now on the measured load and PV.

        None without a fresh plan or without this cycle's meter and battery readings.
        """
        p = self.plan
        if p is None or measured.meter is None or measured.battery is None:
            return None
        k = p.step_at(now)
        if k is None:
            return None
        pv = measured.inverter.ac_w if measured.inverter is not None else 0.0
        load = measured.meter.site_w + pv - measured.battery.w  # site = load - pv + battery
        return follow_plan(float(p.battery_w[k]), float(p.site_w[k]), load, pv)

    @staticmethod
    def setpoints(state: SiteState, mode: ModeState, battery_w: float) -> Setpoints:
        """What the fast loop writes for ``battery_w`` (see :func:`planned_setpoints`)."""
        return planned_setpoints(state, mode, battery_w)

    # ------------------------------------------------------------------ slow-loop side

    async def restore(self, gw: Gateway) -> None:
        """Take over the stored plan if it is still fresh (a restart within two intervals)."""
        if gw.store is None:
            return
        p = ActivePlan.from_json(await gw._in_db(gw.store.kv_json, KV_KEY))
        if p is not None and p.step_at(gw.clock.now()) is not None:
            self.plan = p
            log.info("planner: following the stored plan made at %.0f", p.made_at)

    async def _read_history(self, gw: Gateway, now: float) -> None:
        since = now - HISTORY_DAYS * 86400.0
        if gw.store is not None:
            try:
                top, new = await gw._in_db(_history_rows, gw.store, since, self._hist_seq)
            except (StoreError, sqlite3.Error, OSError) as e:
                # Plan on what is cached (or the prior) rather than not at all.
                self._fail(gw, f"history not read: {e}")
                top, new = self._hist_seq, None
            if new is not None:
                self._hist = np.concatenate([self._hist, new])
            self._hist_seq = top
        self._hist = self._hist[self._hist[:, 0] >= since]
        self.stats.history_rows = int(self._hist.shape[0])

    def _battery(self, gw: Gateway, now: float) -> Battery | None:
        if "battery" not in gw.slots:
            return NO_BATTERY
        live = gw.live
        b = live.battery if live is not None else None
        if b is None or now - b.ts > MAX_READING_AGE_STEPS * self.cfg.step_s:
            return None
        cap = b.capacity_wh if b.capacity_wh > 0 else (self.cfg.battery_capacity_wh or 0.0)
        mode = gw.mode.current(now)
        reserve_pct = max(mode.reserve_soc_pct, b.reserve_pct or 0.0)
        eta = self.cfg.battery_efficiency
        return Battery(capacity_wh=cap, soc0_wh=min(max(b.soc_pct, 0.0), 100.0) / 100.0 * cap,
                       max_charge_w=max(b.max_charge_w, 0.0),
                       max_discharge_w=max(b.max_discharge_w, 0.0),
                       soc_min_wh=min(reserve_pct, 100.0) / 100.0 * cap,
                       eta_charge=eta, eta_discharge=eta,
                       degradation_per_kwh=self.cfg.degradation_per_kwh)

    def _fail(self, gw: Gateway, msg: str) -> None:
        self.stats.last_reason = msg
        if msg != self._last_error:
            log.error("planner: %s", msg)
            gw.event("error", "planner", msg[:500])
            self._last_error = msg

    async def plan_once(self, gw: Gateway) -> bool:
        """One planning round. Returns False when it made no plan (and says why once)."""
        c = self.cfg
        now = gw.clock.now()
        if self._busy is not None and not self._busy.done():
            self.stats.busy_skips += 1
            return False
        t0 = time.perf_counter()
        battery = self._battery(gw, now)
        self.waiting_for_battery = battery is None
        if battery is None:
            return False  # no battery reading yet (or none for a long time): nothing to plan
        start = math.floor(now / c.step_s) * c.step_s
        n = self.steps
        await self._read_history(gw, now)
        try:
            off = 0.0
            if self.tz is not None:
                delta = datetime.fromtimestamp(start, tz=UTC).astimezone(self.tz).utcoffset()
                off = delta.total_seconds() if delta is not None else 0.0
            imp, exp = self.tariff.prices(start, n, c.step_s, tz_offset_s=off)
            tv = c.terminal_value_per_kwh
            battery = replace(battery, terminal_value_per_kwh=float(np.min(imp)) if tv is None
                              else tv)
            limits = gw.limits_for_horizon(start, n, float(c.step_s))
            award = gw.awards_for_horizon(start, n, float(c.step_s))
        except Exception as e:  # the envelope hook or the tariff: no plan this round
            self.stats.errors += 1
            self._fail(gw, f"no plan: {e}")
            return False
        h = self._hist
        mqtt_pv = gw.mqtt.pv_forecast.current if gw.mqtt is not None else None
        # Within one planning step (a replan for a market award, a retry) the step's load
        # forecast stands: the history has grown by a few minutes of today, which moves a
        # forecast of slot means by next to nothing, and the load forecast is about a third
        # of a plan's CPU (half of a community's plans are award replans at gate closure).
        # PV is forecast again (an external forecast may have arrived).
        prev = self.last
        load = ((prev.load_source, prev.history_days, prev.inputs.load_w)
                if prev is not None and prev.start == start else None)
        if load is not None:
            self.stats.load_reused += 1
        job = PlanJob(now=now, start=start, step_s=c.step_s, horizon_s=c.horizon_s,
                      hist_t=h[:, 0].copy(), hist_load=h[:, 1].copy(), hist_pv=h[:, 2].copy(),
                      import_price=imp, export_price=exp, battery=battery,
                      limits=limits if limits is not None else StepLimits.unlimited(n),
                      tz=self.tz, array=self.array, budget_ms=c.budget_ms, award_w=award,
                      pv_forecast_file=c.pv_forecast_file,
                      pv_mqtt=mqtt_pv, load=load)
        fut = asyncio.ensure_future(in_plan_thread(compute_plan, job, self.solver))
        self._busy = fut
        # Real seconds: bounds a solver that ignores its own time limit (HiGHS honours it).
        timeout = 60.0 + 5.0 * c.budget_ms / 1000.0
        try:
            res = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self.stats.timeouts += 1
            self.stats.errors += 1
            self._fail(gw, f"planning took longer than {timeout:.0f} s; the thread is still busy")
            return False
        except ValueError as e:  # inputs that describe no household (named in the message)
            self.stats.errors += 1
            self._fail(gw, f"no plan: {e}")
            return False
        except Exception as e:  # a bug: count and say it, but never take the daemon down
            self.stats.errors += 1
            log.exception("planner: planning failed")
            self._fail(gw, f"no plan: planning failed: {e!r}")
            return False
        self._install(gw, res, start, now)
        self.stats.round_ms_last = (time.perf_counter() - t0) * 1e3
        return True

    def _install(self, gw: Gateway, res: PlanResult, start: float, now: float) -> None:
        plan = res.plan
        s = self.stats
        s.plans += 1
        s.load_source = res.load_source
        s.pv_source, s.pv_external = res.pv_source, res.pv_external
        # Once per change of what is used and why, not once per plan (ages and shares move).
        said = (res.pv_external, tuple(re.sub(r"[\d.]+", "#", n) for n in res.pv_notes))
        if said != self._pv_said:
            self._pv_said = said
            log.info("planner: PV from %s%s", f"the {res.pv_external} forecast"
                     if res.pv_external else "the own forecast",
                     f" ({'; '.join(res.pv_notes)})" if res.pv_notes else "")
        s.solve_ms_last = plan.solve_ms
        s.solve_ms_max = max(s.solve_ms_max, plan.solve_ms)
        if plan.source == "lp":
            s.lp += 1
            s.solve_ms_sum += plan.solve_ms
            if self._was_fallback:
                gw.event("info", "planner", "optimizer plans again")
            self._was_fallback = False
            self._last_error = ""
        else:
            s.fallbacks += 1
            s.last_reason = plan.reason
            if not self._was_fallback:
                log.warning("planner: using the self-consumption rule: %s", plan.reason)
                gw.event("warning", "planner", f"fallback: {plan.reason[:400]}")
            self._was_fallback = True
        self.last = res
        self.plan = ActivePlan.from_plan(plan, start, now)
        gw.pending.kv[KV_KEY] = json.dumps(self.plan.to_json(), separators=(",", ":"))
        log.debug("planner: %s plan for %.0f, first step battery %.0f W site %.0f W (%.1f ms)",
                  plan.source, start, plan.setpoint.battery_w, plan.setpoint.site_w,
                  plan.solve_ms)


async def planner_loop(gw: Gateway) -> None:
    """The daemon's slow loop: plan at start and at every ``planner.step_s`` boundary.

    Returns when ``gw.stop`` is set. Never raises for a bad round (it is counted and the
    previous plan ages out, so the fast loop falls back to self-consumption).
    """
    planner = gw.planner if isinstance(gw.planner, Planner) else Planner(gw.cfg)
    gw.planner = planner
    c = planner.cfg
    clock = gw.clock
    if "battery" not in gw.slots:
        # Still plan: the plan prices the site's load and PV (and any envelope curtailment),
        # which is what the market agent bids from; the fast loop has no battery to steer.
        log.info("planner: no battery configured; planning load and PV only")
    await planner.restore(gw)
    # Compile the LP once, untimed, so the first solve is judged by its solve time only.
    await in_plan_thread(warm_up, planner.steps, float(c.step_s))
    retry_s = max(2.0 * gw.cfg.control.cycle_s, 1.0)
    while not gw.stop.is_set():
        due = clock.now()
        gw.replan.clear()
        if not await planner.plan_once(gw) and planner.waiting_for_battery:
            await gw._sleep_until(clock.now() + retry_s)  # no battery reading (yet)
            continue
        if clock.now() - due > c.step_s:
            planner.stats.late += 1  # the round outlasted an interval: a boundary was missed
        # Or sooner when a market award (a new commitment) arrives; this site's share of
        # ``spread_s`` after either.
        offset = site_fraction(gw.cfg.site_id) * c.spread_s
        nxt = math.floor((clock.now() - offset) / c.step_s + 1) * c.step_s + offset
        await gw._sleep_until(nxt, gw.replan)
        if gw.replan.is_set() and offset > 0 and not gw.stop.is_set():
            await gw._sleep_until(clock.now() + offset)
