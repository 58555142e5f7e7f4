"""The community market operator is down for several delivery intervals, then comes back.

Two simulated homes over real Modbus TCP, a real Mosquitto, real SQLite (gateway stores and the
operator's ledger), real cvxpy solves, one accelerated SimClock (x60: a 300 s interval is 5 s
real), as in ``tests/market_agent/test_market_community.py``. The operator is stopped after the
gateways bid for the interval at T0+600 but before its gate (T0+540) and stays down for three
delivery intervals (gates T0+540, T0+840 and T0+1140 missed); it restarts at T0+1320 with the
same ledger file and instance name (its broker session kept what the gateways sent meanwhile).

What is safe: the gateways keep cycling and planning; no award is invented (the interval whose
gate passed while the operator was down is cleared *void* on its return: its delivery is long
over, so nobody may be held to it; intervals never announced are never traded); meter reports
are retried a bounded number of times, then given up and said once; queues stay bounded; after
the restart the market runs again; nothing is cleared or settled twice.
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
from community.market.schedule import interval_id
from drivers.clock import SimClock
from firmware_sim.server import run_home
from gateway.config import MarketConfig
from gateway.daemon import Gateway, GatewayStats, run_gateway
from gateway.market_agent import _MAX_OUT, MarketStats, overlaps
from gateway.optimize.problem import compiled
from gateway.planner import Planner
from gateway.store import Store

pytestmark = pytest.mark.fault

Mosquitto = Any
SPEED = 60.0  # one 300 s delivery interval = 5 s real
INTERVAL, LEAD = 300, 60
FLOOR, CAP = 0.05, 0.40
C = "c1"
STOP_AT, RESTART_AT = T0 + 420, T0 + 1320  # down for three intervals (900 s)
END = T0 + 1900  # the interval auctioned after the restart (T0+1500) is delivered and settled
BEFORE, VOID, AFTER = T0 + 300, T0 + 600, T0 + 1500  # cleared before / void / after the restart
NEXT, OPEN = T0 + 1800, T0 + 2100  # cleared at T0+1740, delivered after END; open at END
SETTLED = (BEFORE, VOID, AFTER)
SILENT = (T0 + 900, T0 + 1200)  # never announced: their gates passed while the operator was down
METER_TRIES = 20  # MarketSettings.meter_tries


def gw_config(db: str, broker: str, sim: Any, site: str, terminal: float | None) -> Any:
    extra: dict[str, Any] = {"step_s": INTERVAL, "horizon_s": 3600}
    if terminal is not None:
        extra["terminal_value_per_kwh"] = terminal
    cfg = planner_config(db, broker, endpoints=sim.endpoints, **extra)
    return dataclasses.replace(cfg, site_id=site, market=MarketConfig(
        enabled=True, community=C, price_floor=FLOOR, price_cap=CAP, prices=8,
        gate_margin_s=10.0, retry_s=15.0, meter_delay_s=5.0))


def market(g: Gateway) -> Any:
    assert g.market is not None
    return g.market


async def test_gateways_ride_out_an_operator_down_for_three_intervals(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    compiled(12, float(INTERVAL))  # compile the LP before the clock runs
    clock = SimClock(start=T0, speed=SPEED)
    load, pv = home_profiles()
    # The seller starts nearly full and values stored energy at nothing beyond the horizon;
    # the buyer imports its load: their curves cross, so the auctions trade.
    sites = {"seller": (dataclasses.replace(HOME, soc0_pct=95.0), 0.0), "buyer": (HOME, None)}
    ledger = tmp_path / "market.db"
    ops: list[MarketOperator] = []

    def operator() -> MarketOperator:
        ops.append(MarketOperator(mosquitto.url, C, list(sites), clock, ledger, INTERVAL, LEAD,
                                  FLOOR, CAP, instance="op0"))
        return ops[-1]

    gws: dict[str, Gateway] = {}

    def keep(site: str, g: Gateway) -> None:
        gws[site] = g

    plans: dict[str, list[tuple[float, list[float]]]] = {s: [] for s in sites}
    cycles: dict[str, list[tuple[float, int]]] = {s: [] for s in sites}
    out_max = dict.fromkeys(sites, 0)
    snap: dict[str, dict[str, MarketStats]] = {}

    def snapshot(name: str) -> None:
        snap[name] = {s: dataclasses.replace(market(g).stats, rejected=dict(
            market(g).stats.rejected)) for s, g in gws.items()}

    async with contextlib.AsyncExitStack() as stack:
        tasks: list[asyncio.Task[GatewayStats]] = []
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

        async def watch() -> None:
            seen: dict[str, object] = {}
            while True:
                for s, g in gws.items():
                    cycles[s].append((clock.now(), g.stats.cycles))
                    if g.market is not None:
                        out_max[s] = max(out_max[s], len(g.market._out))
                    p = g.planner
                    if isinstance(p, Planner) and p.last is not None and seen.get(s) is not p.last:
                        seen[s] = p.last
                        aw = p.last.inputs.award_w
                        plans[s].append((p.last.start, [] if aw is None else list(aw)))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            # Both gateways have bid for T0+600 (stored by the operator); then it dies, before
            # that auction's gate.
            await wait_until(lambda: len(gws) == 2 and all(
                (st := market(g).intervals.get(interval_id(VOID))) is not None
                and st.bid_code == "ok" for g in gws.values()), 30, "bids for T0+600")
            await wait_until(lambda: clock.now() >= STOP_AT, 30, "T0+420")
            op_stop.set()
            await asyncio.wait_for(op_task, 15)
            assert clock.now() < VOID - LEAD  # stopped before the gate
            snapshot("stop")
            await wait_until(lambda: clock.now() >= RESTART_AT, 30, "T0+1320")
            snapshot("restart")
            op_stop = asyncio.Event()
            op_task = asyncio.create_task(operator().run(op_stop))
            stats = {s: await asyncio.wait_for(t, 60) for s, t in zip(sites, tasks, strict=True)}
        finally:
            watcher.cancel()
            stop.set()
            op_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(op_task, 15)

    ivs = {t: interval_id(t) for t in (BEFORE, VOID, AFTER, NEXT, OPEN, *SILENT)}
    cleared = {ivs[t] for t in (BEFORE, VOID, AFTER, NEXT)}
    held = cleared | {ivs[OPEN]}  # the auctions announced

    # ---- the operator's ledger: each interval cleared at most once, nothing invented
    lg = Ledger(str(ledger))
    try:
        results = lg.results(C)
        assert [r["interval_id"] for r in results] == sorted(cleared)
        assert all(lg.is_cleared(C, iv) for iv in cleared)
        for t in SILENT:  # never announced, so never bid for, cleared or awarded
            assert lg.auction(C, ivs[t]) is None and not lg.is_cleared(C, ivs[t])
            assert not lg.awards(C, ivs[t])
        by_iv = {r["interval_id"]: r for r in results}
        # The interval whose gate passed while the operator was down: both bids were stored
        # before the gate, but it was cleared after its delivery ended: void, no trade.
        void = by_iv[ivs[VOID]]
        assert void["cleared_at"] >= RESTART_AT and void["bids"] == 2
        assert void["volume_wh"] == 0 and void["trades"] == 0
        assert {s: a.net_wh for s, a in lg.awards(C, ivs[VOID]).items()} == dict.fromkeys(sites, 0)
        # After the restart the market works again: both sites bid, both are awarded.
        after = by_iv[ivs[AFTER]]
        assert after["bids"] == 2 and set(lg.awards(C, ivs[AFTER])) == set(sites)
        assert after["trades"] == 2 and after["volume_wh"] > 0  # and they trade again
        assert after["cleared_at"] < AFTER  # at its gate, not late
        # One statement per site and interval although the meter was reported up to 20 times.
        sts = lg.settlements(C)
        keys = [(r["interval_id"], r["site"]) for r in sts]
        assert len(keys) == len(set(keys))
        assert set(keys) == {(ivs[t], s) for t in SETTLED for s in sites}
        for r in sts:
            if r["interval_id"] == ivs[VOID]:  # the retailer alone: no phantom deviation
                assert r["awarded_export_kwh"] == 0
                assert r["total"] == pytest.approx(r["retailer_only"])
        meters = lg.conn.execute("SELECT COUNT(*) FROM inputs WHERE kind = 'meter' AND code = "
                                 "'ok'").fetchone()[0]
        assert meters > len(sts)  # the retries queued at the broker were answered, idempotently
        assert lg.input_counts(C).keys() <= {"ok", "replaced"}  # no rejection, no internal
    finally:
        lg.close()
    # T0+300; then T0+600 (void), T0+1500 and T0+1800
    assert [op.stats.cleared for op in ops] == [1, 3]
    assert [op.stats.voided for op in ops] == [0, 1]
    assert all(not op.stats.rejected for op in ops)

    for site, g in gws.items():
        gs = stats[site]
        # ---- loops recover: no restart, nothing lost, the fast loop cycled every interval
        assert gs.task_restarts == 0 and gs.telemetry_lost == 0, (site, gs)
        for t in range(int(STOP_AT), int(RESTART_AT), INTERVAL):
            n0 = next(c for ts, c in cycles[site] if ts >= t)
            n1 = next(c for ts, c in cycles[site] if ts >= t + INTERVAL)
            assert n1 - n0 >= INTERVAL / 10 / 2, (site, t, n0, n1)  # 30 cycles of 10 s due
        # ---- the slow loop planned at every interval boundary, the operator down or not
        starts = {start for start, _ in plans[site]}
        assert {T0 + k * INTERVAL for k in range(int((END - T0) // INTERVAL))} <= starts, site
        assert gs.planner["errors"] == 0, gs.planner
        # ---- no award invented: every plan has zero award_w over the void and silent intervals
        for start, aw in plans[site]:
            for t in (VOID, *SILENT):
                for k, _ in overlaps(start, len(aw), INTERVAL, t, t + INTERVAL):
                    assert aw[k] == 0.0, (site, start, t, aw)
        ms: MarketStats = market(g).stats
        assert set(market(g).intervals) == held
        # ---- while it was down: no bid (nothing announced), meter reports retried then given
        # up for the two intervals delivered meanwhile, each said once; nothing refused
        s0, s1 = snap["stop"][site], snap["restart"][site]
        assert s1.bids_sent == s0.bids_sent and s1.bids_accepted == s0.bids_accepted
        assert s1.awards == s0.awards and s1.settlements == s0.settlements
        assert 2 * METER_TRIES - 2 <= s1.meters_sent - s0.meters_sent <= 2 * METER_TRIES
        assert s1.meters_unanswered == 2, (site, s1)
        # ---- and over the whole run: one bid per announced auction, all accepted, each
        # interval awarded and settled once, nothing rejected, queues bounded
        assert ms.bids_sent == ms.bids_accepted == 5 and not ms.bids_refused, (site, ms)
        assert ms.awards == 4 and ms.settlements == 3, (site, ms)
        assert not ms.rejected and ms.out_dropped == 0 and ms.persist_errors == 0, (site, ms)
        assert out_max[site] < _MAX_OUT
        store = Store.open(str(tmp_path / f"{site}.db"))
        try:
            rows = {r["interval_id"]: r for r in store.market_rows()}
        finally:
            store.close()
        assert set(rows) == held
        assert rows[ivs[VOID]]["award_export_kwh"] == 0
        for t in SETTLED:
            r = rows[ivs[t]]
            assert r["bid_code"] == "ok" and r["settlement"] is not None, (site, t, r)
            assert r["total"] == pytest.approx(json.loads(r["settlement"])["total"])
        # The award after the restart reached the gateway and its plans (as award_w).
        kwh = rows[ivs[AFTER]]["award_export_kwh"]
        assert kwh, (site, rows[ivs[AFTER]])
        want = kwh * 1000 * 3600 / INTERVAL
        hits = [aw[k] for start, aw in plans[site]
                for k, _ in overlaps(start, len(aw), INTERVAL, AFTER, AFTER + INTERVAL)]
        assert any(np.isclose(h, want) for h in hits), (site, want, hits)
