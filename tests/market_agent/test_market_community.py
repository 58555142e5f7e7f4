"""Gateways bidding into the real market operator: simulated homes over real Modbus TCP, real
Mosquitto, real SQLite (gateway stores and the operator's ledger), real cvxpy solves, all on one
accelerated SimClock. The operator is restarted mid-run.

Two homes with the same battery and household: the "seller" starts nearly full and gives stored
energy no value beyond the 1-hour horizon (it offers from the floor up); the "buyer" imports its
load (it bids up to its retail price). Their curves cross, so the auctions trade.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planner.helpers import DAY, HOME, T0, home_profiles, planner_config, seed_history, wait_until

from community.market import MarketOperator
from community.market.ledger import Ledger
from community.market.messages import Bid, check_curves
from drivers.clock import SimClock
from firmware_sim.server import run_home
from gateway.config import MarketConfig
from gateway.daemon import Gateway, run_gateway
from gateway.optimize.problem import compiled
from gateway.planner import Planner
from gateway.store import Store

Mosquitto = Any
SPEED = 60.0  # one 300 s delivery interval = 5 s real
INTERVAL, LEAD = 300, 60
FLOOR, CAP = 0.05, 0.40
C = "c1"
END = T0 + 1260  # three delivery intervals: T0+300, T0+600, T0+900 (then meters settle)


def gw_config(db: str, broker: str, sim: Any, site: str, terminal: float | None) -> Any:
    extra: dict[str, Any] = {"step_s": INTERVAL, "horizon_s": 3600}
    if terminal is not None:
        extra["terminal_value_per_kwh"] = terminal
    cfg = planner_config(db, broker, endpoints=sim.endpoints, **extra)
    return dataclasses.replace(cfg, site_id=site, market=MarketConfig(
        enabled=True, community=C, price_floor=FLOOR, price_cap=CAP, prices=8,
        gate_margin_s=10.0, retry_s=15.0, meter_delay_s=5.0))


@pytest.mark.slow
async def test_gateways_bid_take_awards_and_settle_through_an_operator_restart(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    compiled(12, float(INTERVAL))  # compile the LP before the clock runs
    clock = SimClock(start=T0, speed=SPEED)
    load, pv = home_profiles()
    sites = {"seller": (dataclasses.replace(HOME, soc0_pct=95.0), 0.0),
             "buyer": (HOME, None)}
    ledger = tmp_path / "market.db"

    def operator() -> MarketOperator:
        return MarketOperator(mosquitto.url, C, list(sites), clock, ledger, INTERVAL, LEAD,
                              FLOOR, CAP, instance="op0")

    gws: dict[str, Gateway] = {}

    def keep(site: str, g: Gateway) -> None:
        gws[site] = g

    plans: dict[str, list[tuple[float, list[float]]]] = {s: [] for s in sites}
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        stop = asyncio.Event()
        for site, (home, terminal) in sites.items():
            db = str(tmp_path / f"{site}.db")
            seed_history(db, T0 - 7 * DAY, T0)
            sim = await stack.enter_async_context(run_home(clock, home, load=load, pv=pv))
            cfg = gw_config(db, mosquitto.url, sim, site, terminal)
            tasks.append(asyncio.create_task(run_gateway(
                cfg, clock, stop=stop, until=END, on_ready=functools.partial(keep, site))))
        op_stop = asyncio.Event()
        op_task = asyncio.create_task(operator().run(op_stop))

        async def watch_plans() -> None:
            seen: dict[str, object] = {}
            while True:
                for s, g in gws.items():
                    p = g.planner
                    if isinstance(p, Planner) and p.last is not None and seen.get(s) is not p.last:
                        seen[s] = p.last
                        aw = p.last.inputs.award_w
                        plans[s].append((p.last.start, [] if aw is None else list(aw)))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_plans())
        try:
            # Operator down across the gate closure of T0+600 (bids for it already stored).
            await wait_until(lambda: clock.now() >= T0 + 500, 30, "T0+500")
            op_stop.set()
            await asyncio.wait_for(op_task, 15)
            await wait_until(lambda: clock.now() >= T0 + 600, 30, "T0+600")
            op_stop = asyncio.Event()
            op_task = asyncio.create_task(operator().run(op_stop))
            for t in tasks:
                await asyncio.wait_for(t, 60)
        finally:
            watcher.cancel()
            stop.set()
            op_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(op_task, 15)

    intervals = ["20250616T162500Z", "20250616T163000Z", "20250616T163500Z"]
    lg = Ledger(str(ledger))
    try:
        for iv in intervals:
            assert lg.is_cleared(C, iv), iv  # cleared exactly once, restart included
    finally:
        lg.close()
    traded = 0
    for site, g in gws.items():
        st = g.market.stats if g.market else None
        assert st is not None
        # Every bid sent arrived before its gate and passed the operator's checks.
        assert st.bids_sent >= len(intervals), (site, st)
        assert st.bids_accepted == st.bids_sent and not st.bids_refused, (site, st)
        assert not st.rejected, (site, st.rejected)
        store = Store.open(str(tmp_path / f"{site}.db"))
        try:
            rows = {r["interval_id"]: r for r in store.market_rows()}
        finally:
            store.close()
        for iv in intervals:
            r = rows[iv]
            bid = json.loads(r["bid"])
            b = Bid(C, iv, site, bid["bid_id"], bid["seq"], tuple(map(tuple, bid["buy"])),
                    tuple(map(tuple, bid["sell"])))
            assert check_curves(b, FLOOR, CAP) is None  # monotone, in bounds, not crossing
            # Never more than the battery can discharge (no PV) over the interval.
            assert sum(q for _, q in bid["sell"]) <= HOME.battery_max_discharge_w * INTERVAL \
                / 3.6e6 + 1e-9
            assert r["bid_code"] in ("ok", "replaced")
            assert r["award_export_kwh"] is not None, (site, iv)  # nothing lost in the restart
            # Settled from what the gateway metered, by the operator.
            assert r["settlement"] is not None, (site, iv, r["meter_code"])
            s = json.loads(r["settlement"])
            assert s["metered_export_kwh"] == pytest.approx(r["metered_export_kwh"])
            assert s["awarded_export_kwh"] == pytest.approx(r["award_export_kwh"])
            assert r["total"] == pytest.approx(s["total"])
            kwh = r["award_export_kwh"]
            if kwh:
                traded += 1
                # The award is in the next plans as award_w over its interval's step.
                ds = r["delivery_start"]
                want = kwh * 1000 * 3600 / INTERVAL
                hits = [aw[int((ds - start) // INTERVAL)] for start, aw in plans[site]
                        if start <= ds < start + 3600 and aw]
                assert any(np.isclose(h, want) for h in hits), (site, iv, want, hits)
                # ... and the plan that honours it delivers it (battery-backed, within 10 %).
                assert abs(r["metered_export_kwh"] - kwh) <= 0.1 * abs(kwh) + 0.01, (site, r)
    assert traded >= 2  # both sides of at least one trade
