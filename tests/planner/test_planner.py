"""The slow loop on a real SQLite store with real cvxpy solves (no devices, no broker)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from drivers.clock import SimClock
from gateway.commands import ModeState
from gateway.config import ConfigError
from gateway.daemon import Gateway
from gateway.optimize import Plan, PlanInputs, check_plan, solve_plan
from gateway.planner import (
    KV_KEY,
    ActivePlan,
    Planner,
    planner_loop,
    planning_threads_peak,
)

from .helpers import DAY, PEAK, STEP, T0, ManualClock, planner_config, seed_history, site_state


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    seed_history(str(tmp_path / "gw.db"), T0 - 7 * DAY, T0)
    g = Gateway(planner_config(str(tmp_path / "gw.db")), ManualClock(T0))
    await g.open()
    g.live = site_state(T0, 1500.0)
    g.planner = Planner(g.cfg)
    yield g
    g.close()


def at(g: Gateway, t: float) -> None:
    assert isinstance(g.clock, ManualClock)
    g.clock.t = t


async def test_plan_holds_the_battery_for_the_evening_peak(gw: Gateway) -> None:
    p = gw.planner
    assert p is not None
    assert await p.plan_once(gw)
    assert p.last is not None
    plan, inputs = p.last.plan, p.last.inputs
    assert plan.source == "lp", plan.reason
    assert check_plan(plan, inputs) == []
    assert p.last.load_source == "history"
    # The forecast learned the household: ~1.5 kW on average over the next day.
    assert abs(float(np.mean(inputs.load_w)) - 1500.0) < 150.0
    k_peak = int((PEAK - (T0 - T0 % STEP)) // STEP)
    assert np.all(plan.battery_w[:k_peak] > -1.0), plan.battery_w[:k_peak]  # afternoon: hold
    assert plan.battery_w[k_peak] < -1000.0  # 17:00: discharge into the dearest hour
    assert p.stats.plans == p.stats.lp == 1 and p.stats.fallbacks == 0
    # The fast loop's accessor: hold now (within the forecast error of the step), ...
    want = gw.plan_setpoint(T0 + 60, site_state(T0 + 60, 1500.0))
    assert want is not None and abs(want) < 150.0
    # ... while the rule would discharge at once.
    sp = gw.policy(site_state(T0 + 60, 1500.0), gw.mode)
    assert sp.battery_w is not None and sp.battery_w < -1000.0


async def test_stale_plan_or_other_mode_gives_no_setpoint(gw: Gateway) -> None:
    p = gw.planner
    assert p is not None and await p.plan_once(gw)
    start = T0 - T0 % STEP
    assert gw.plan_setpoint(start + STEP + 1, site_state(start + STEP + 1, 1500.0)) is not None
    # Two intervals after the plan's first step began it is stale: the rule takes over.
    assert gw.plan_setpoint(start + 2 * STEP, site_state(start + 2 * STEP, 1500.0)) is None
    assert gw.plan_setpoint(start - 1, site_state(start - 1, 1500.0)) is None
    # Modes other than auto never follow the plan.
    gw.mode = ModeState(mode="self_consumption")
    assert gw.plan_setpoint(T0 + 60, site_state(T0 + 60, 1500.0)) is None
    gw.mode = ModeState(mode="auto")
    # A cycle without a meter reading follows nothing.
    s = site_state(T0 + 60, 1500.0)
    assert gw.plan_setpoint(T0 + 60, type(s)(s.ts, None, None, s.battery)) is None


async def test_cold_start_plans_with_the_prior(tmp_path: Path) -> None:
    g = Gateway(planner_config(str(tmp_path / "new.db")), ManualClock(T0))
    await g.open()
    try:
        g.live = site_state(T0, 1500.0)
        p = g.planner = Planner(g.cfg)
        assert await p.plan_once(g)
        assert p.last is not None and p.last.load_source == "prior"
        assert p.last.history_days == 0
        assert check_plan(p.last.plan, p.last.inputs) == []
        assert float(np.min(p.last.inputs.load_w)) > 0.0
        # Stored with the next commit, and a restart within two intervals follows it again.
        assert await g.commit()
        assert g.store is not None
        stored = ActivePlan.from_json(g.store.kv_json(KV_KEY))
        assert stored is not None and stored.start == T0 - T0 % STEP
        q = Planner(g.cfg)
        await q.restore(g)
        assert q.plan is not None and p.plan is not None
        assert np.allclose(q.plan.battery_w, p.plan.battery_w, atol=0.1)
        at(g, T0 + 2 * STEP)
        r = Planner(g.cfg)
        await r.restore(g)
        assert r.plan is None  # too old by now
    finally:
        g.close()


async def test_no_battery_reading_no_plan(gw: Gateway) -> None:
    gw.live = None
    p = gw.planner
    assert p is not None
    assert not await p.plan_once(gw)
    assert p.waiting_for_battery and p.plan is None and p.stats.plans == 0


async def test_zero_budget_falls_back_and_carries_on(tmp_path: Path) -> None:
    seed_history(str(tmp_path / "gw.db"), T0 - 2 * DAY, T0)
    cfg = planner_config(str(tmp_path / "gw.db"), budget_ms=0.0)
    # Fast domain time: 15 min per 0.05 s real, so the loop goes through several intervals.
    clock = SimClock(start=T0, speed=STEP / 0.05)
    g = Gateway(cfg, clock)
    await g.open()
    try:
        g.live = site_state(T0, 1500.0)
        task = asyncio.create_task(planner_loop(g))
        deadline = time.monotonic() + 30
        while (g.planner is None or g.planner.stats.plans < 3) and time.monotonic() < deadline:
            g.live = site_state(clock.now(), 1500.0)
            await asyncio.sleep(0.01)
        g.stop.set()
        await asyncio.wait_for(task, 30)
        p = g.planner
        assert p is not None
        s = p.stats
        assert s.plans >= 3 and s.fallbacks == s.plans and s.lp == 0, s
        assert "budget" in s.last_reason or "solver failed" in s.last_reason
        assert p.plan is not None and p.plan.source == "fallback"
        assert p.last is not None and check_plan(p.last.plan, p.last.inputs) == []
        # The fallback is self-consumption: it discharges now, into the afternoon load.
        assert p.plan.battery_w[0] < -1000.0
        assert [e for e in g.pending.events if e.kind == "planner" and e.level == "warning"]
    finally:
        g.close()


async def test_a_crashing_solver_is_counted_not_fatal(gw: Gateway) -> None:
    def broken(inputs: PlanInputs, /, *, time_limit_s: float | None = None) -> Plan:
        raise RuntimeError("solver exploded")

    p = gw.planner = Planner(gw.cfg, solver=broken)
    assert not await p.plan_once(gw)
    assert p.stats.errors == 1 and p.plan is None and "exploded" in p.stats.last_reason
    assert not await p.plan_once(gw)
    assert p.stats.errors == 2
    assert len([e for e in gw.pending.events if e.kind == "planner"]) == 1  # said once


async def test_one_planning_thread_at_a_time(tmp_path: Path) -> None:
    lock = threading.Lock()
    running = 0
    seen: list[int] = []

    def slow(inputs: PlanInputs, /, *, time_limit_s: float | None = None) -> Plan:
        nonlocal running
        with lock:
            running += 1
            seen.append(running)
        try:
            time.sleep(0.15)  # long enough for the other gateway's job to be due meanwhile
            return solve_plan(inputs, time_limit_s=time_limit_s)
        finally:
            with lock:
                running -= 1

    gws = []
    for i in range(3):
        g = Gateway(planner_config(str(tmp_path / f"g{i}.db")), ManualClock(T0))
        await g.open()
        g.live = site_state(T0, 1500.0)
        g.planner = Planner(g.cfg, solver=slow)
        gws.append(g)
    try:
        done = await asyncio.gather(*(g.planner.plan_once(g) for g in gws if g.planner))
        assert done == [True, True, True]
        assert seen == [1, 1, 1]
        assert planning_threads_peak() == 1
    finally:
        for g in gws:
            g.close()


async def test_history_is_read_incrementally(gw: Gateway) -> None:
    p = gw.planner
    assert p is not None and await p.plan_once(gw)
    rows = p.stats.history_rows
    assert rows == 7 * 288
    assert await p.plan_once(gw)
    assert p.stats.history_rows == rows  # nothing new: nothing duplicated


def test_planner_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"planner\.step_s"):
        planner_config(str(tmp_path / "x.db"), step_s=700)
    with pytest.raises(ConfigError, match=r"planner\.horizon_s"):
        planner_config(str(tmp_path / "x.db"), horizon_s=4000)
    with pytest.raises(ConfigError, match=r"planner\.lat"):
        planner_config(str(tmp_path / "x.db"), pv_kwp=5.0)
    with pytest.raises(ConfigError, match=r"planner\.timezone"):
        planner_config(str(tmp_path / "x.db"), timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match=r"planner\.budget_sm"):
        planner_config(str(tmp_path / "x.db"), budget_sm=5)
    c = planner_config(str(tmp_path / "x.db"), pv_kwp=5.0, lat=52.5, lon=13.4,
                       timezone="Europe/Berlin", terminal_value_per_kwh=0.1)
    assert c.planner.enabled and c.planner.pv_kwp == 5.0 and c.planner.terminal_value_per_kwh == 0.1


async def test_the_load_forecast_is_made_once_per_planning_step(gw: Gateway) -> None:
    """A replan within the step (a market award, a retry) solves on the step's load forecast;
    the next step forecasts again from the history as it then stands."""
    p = gw.planner
    assert p is not None and await p.plan_once(gw)
    assert p.last is not None and p.stats.load_reused == 0
    first = p.last.inputs.load_w.copy()
    # The cached history now says the household uses twice as much: a fresh forecast would.
    p._hist[:, 1] *= 2.0
    at(gw, T0 + 120.0)
    assert await p.plan_once(gw)
    assert p.stats.load_reused == 1 and p.stats.plans == 2
    assert np.array_equal(p.last.inputs.load_w, first)
    at(gw, T0 - T0 % STEP + STEP + 5.0)  # the next step
    gw.live = site_state(T0 + STEP, 1500.0)
    assert await p.plan_once(gw)
    assert p.stats.load_reused == 1
    assert float(np.mean(p.last.inputs.load_w)) > 1.6 * float(np.mean(first))
