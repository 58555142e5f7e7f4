"""The planner inside the running daemon: simulated devices over real Modbus TCP, a real
Mosquitto, a real SQLite file with a week of history, real cvxpy solves, on an accelerated clock.
What is asserted is measured at the simulated battery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from drivers.clock import SimClock
from firmware_sim.server import SimulatedHome, run_home
from gateway.daemon import Gateway, GatewayStats, run_gateway
from gateway.optimize.problem import compiled
from gateway.planner import Planner

from .helpers import (
    DAY,
    HOME,
    PEAK,
    STEP,
    T0,
    home_profiles,
    planner_config,
    seed_history,
    wait_until,
)

Mosquitto = Any  # tests/conftest.py fixture type (conftest is not importable as a package)
SPEED = 600.0  # 10 s cycles: 60 cycles per real second; one domain hour is 6 s real


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, broker: Mosquitto,
                 slow_loop: Callable[[Gateway], Awaitable[None]] | None = None
                 ) -> AsyncIterator[tuple[SimClock, SimulatedHome, Gateway,
                                          asyncio.Task[GatewayStats]]]:
    db = str(tmp_path / "gw.db")
    seed_history(db, T0 - 7 * DAY, T0)
    compiled(96, float(STEP))  # compile the LP before the clock runs (~1 s, 10 domain minutes)
    clock = SimClock(start=T0, speed=SPEED)
    load, pv = home_profiles()
    async with run_home(clock, HOME, load=load, pv=pv) as sim:
        cfg = planner_config(db, broker.url, endpoints=sim.endpoints)
        stop = asyncio.Event()
        box: list[Gateway] = []
        task = asyncio.create_task(run_gateway(cfg, clock, stop=stop, on_ready=box.append,
                                               slow_loop=slow_loop))
        await wait_until(lambda: bool(box) or task.done(), 10, "gateway start")
        try:
            yield clock, sim, box[0], task
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def battery_between(clock: SimClock, sim: SimulatedHome, t0: float, t1: float
                          ) -> list[float]:
    """The simulated battery's AC power, sampled every ~domain minute within [t0, t1]."""
    await clock.sleep_until(t0)
    out = []
    while clock.now() < t1:
        out.append(sim.physics.state().battery_w)
        await asyncio.sleep(0.1)
    return out


async def test_auto_mode_follows_the_plan_through_the_evening_peak(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with daemon(tmp_path, mosquitto) as (clock, sim, gw, task):
        hold = await battery_between(clock, sim, T0 + 10 * 60, PEAK - 2 * 60)
        peak = await battery_between(clock, sim, PEAK + 3 * 60, PEAK + 25 * 60)
        assert isinstance(gw.planner, Planner)
        plan = gw.planner.plan
        assert plan is not None and plan.source == "lp"
        stats = gw.planner.stats
    final = task.result()
    # Afternoon (0.30/kWh): the plan holds the battery; self-consumption would take ~1.5 kW.
    assert hold and max(hold) < 50.0 and sum(hold) / len(hold) > -200.0, hold
    # Dearest hour (0.40/kWh): it discharges to cover the household.
    assert peak and max(peak) < -1000.0, peak
    # Re-planned at every 15-minute boundary: 16:15 (start), 16:30, 16:45, 17:00, 17:15.
    assert stats.lp >= 5 and stats.fallbacks == 0 and stats.errors == 0, stats
    assert final.planner["lp"] >= 5 and final.task_restarts == 0


async def test_a_stale_plan_falls_back_to_self_consumption(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    async def plan_once_then_stop(gw: Gateway) -> None:
        planner = gw.planner = Planner(gw.cfg)
        await wait_until(lambda: gw.live is not None and gw.live.battery is not None, 10,
                         "a battery reading")
        assert await planner.plan_once(gw)
        await gw.stop.wait()

    async with daemon(tmp_path, mosquitto, plan_once_then_stop) as (clock, sim, gw, _):
        start = T0 - T0 % STEP  # 16:15: the plan's first step; stale from 16:45
        hold = await battery_between(clock, sim, T0 + 5 * 60, start + 2 * STEP - 60)
        stale = await battery_between(clock, sim, start + 2 * STEP + 60, PEAK - 60)
        assert gw.planner is not None and gw.planner.stats.plans == 1
    assert hold and sum(hold) / len(hold) > -200.0, hold
    # No fresh plan: the fast loop's rule (self-consumption) covers the load from the battery.
    assert stale and max(stale) < -1000.0, stale

