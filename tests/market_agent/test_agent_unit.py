"""The market agent without a broker: curve -> steps, awards -> award_w, bad input, restart."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest
from planner.helpers import wait_until

from community.market.messages import Bid, check_curves
from drivers.clock import SimClock
from gateway.market_agent import (
    Announce,
    Curve,
    MarketAgent,
    MarketSettings,
    award_profile,
    curve_to_steps,
    interval_curve,
)
from gateway.optimize.inputs import Battery, PlanInputs, StepLimits

T0 = 1_782_036_000.0  # 2026-06-21T10:00:00Z
SITE, C = "s1", "c1"
BASE = f"hems/v1/market/{C}"


def announce(start: float = T0 + 600, interval: float = 300, lead: float = 60, **kw: Any
             ) -> dict[str, Any]:
    from datetime import UTC, datetime

    iv = datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%SZ")
    return {"v": 1, "community": C, "interval_id": iv, "delivery_start": start,
            "delivery_end": start + interval, "gate_closure": start - lead,
            "price_floor": 0.08, "price_cap": 0.30, "mechanism": "uniform", **kw}


def agent(**kw: Any) -> MarketAgent:
    return MarketAgent(SITE, MarketSettings(community=C), SimClock(start=T0, speed=1.0), **kw)


def as_bid(buy: list[list[float]], sell: list[list[float]]) -> Bid:
    return Bid(C, "x", SITE, "b", None, tuple((p, q) for p, q in buy),
               tuple((p, q) for p, q in sell))


def test_curve_to_steps_is_what_the_operator_accepts() -> None:
    prices = [0.08, 0.12, 0.16, 0.20, 0.24, 0.30]
    e = [-900.4, -500.0, -500.0, 0.0, 250.7, 1200.0]  # Wh: buys when cheap, sells when dear
    buy, sell = curve_to_steps(prices, e)
    assert buy == [[0.16, 0.5], [0.08, 0.4]]  # the last 0.4 Wh are rounded away, not added
    assert sell == [[0.24, 0.25], [0.30, 0.95]]
    assert check_curves(as_bid(buy, sell), 0.08, 0.30) is None
    # Cumulative quantities reproduce the curve at every price (to the Wh, rounded down).
    for p, want in zip(prices, e, strict=True):
        sold = sum(q for bp, q in sell if bp <= p)
        bought = sum(q for bp, q in buy if bp >= p)
        assert math.isclose(sold - bought, math.trunc(want) / 1000, abs_tol=1e-9)


def test_curve_to_steps_repairs_a_wiggle_and_never_crosses() -> None:
    buy, sell = curve_to_steps([0.1, 0.2, 0.3], [100.0, 50.0, 300.0])
    assert buy == [] and sell == [[0.1, 0.1], [0.3, 0.2]]
    assert curve_to_steps([0.1, 0.2], [0.0, 0.0]) == ([], [])
    with pytest.raises(ValueError):
        curve_to_steps([0.1], [math.nan])


def test_award_profile_maps_an_interval_onto_planning_steps() -> None:
    # A 300 s award of 0.5 kWh sold inside the second 900 s step: 2000 W * 300/900.
    w = award_profile([(T0 + 900, T0 + 1200, 0.5)], T0, 4, 900.0)
    assert w == pytest.approx([0.0, 2000.0, 0.0, 0.0])
    # 1.8 kWh bought over [450, 1350): half in step 0, half in step 1 -> -3600 W each.
    w = award_profile([(T0 + 450, T0 + 1350, -1.8)], T0, 3, 900.0)
    assert w == pytest.approx([-3600.0, -3600.0, 0.0])
    assert sum(w) * 900 / 3600 == pytest.approx(-1800.0)


def inputs(n: int = 12, export_w: float = math.inf, import_w: float = math.inf) -> PlanInputs:
    return PlanInputs(step_s=300.0, load_w=np.full(n, 800.0), pv_w=np.full(n, 3000.0),
                      import_price=np.full(n, 0.30), export_price=np.full(n, 0.08),
                      battery=Battery(capacity_wh=5000.0, soc0_wh=2500.0, max_charge_w=3000.0,
                                      max_discharge_w=3000.0),
                      limits=StepLimits(np.full(n, export_w), np.full(n, import_w),
                                        np.full(n, np.inf), np.full(n, np.inf)))


def test_interval_curve_is_monotone_and_within_the_envelope() -> None:
    prices = Announce(C, "x", 0, 1, 0, 0.08, 0.30, "uniform", None).price_grid(6)
    free = interval_curve(inputs(), T0, T0 + 600, T0 + 900, prices, 5.0)
    assert list(free.net_export_wh) == sorted(free.net_export_wh)
    assert free.net_export_wh[-1] > 200.0  # sells PV + battery when the price is high
    capped = interval_curve(inputs(export_w=1200.0), T0, T0 + 600, T0 + 900, prices, 5.0)
    assert max(capped.net_export_wh) <= 1200.0 * 300 / 3600 + 1e-6
    buy, sell = curve_to_steps(capped.prices, capped.net_export_wh)
    assert sum(q for _, q in sell) <= 0.1 + 1e-9
    assert check_curves(as_bid(buy, sell), 0.08, 0.30) is None
    with pytest.raises(ValueError, match="horizon"):
        interval_curve(inputs(), T0, T0 + 3600, T0 + 3900, prices, 5.0)


async def test_bid_is_built_and_queued_from_an_announce() -> None:
    async def bidder(a: Announce) -> Curve:
        return Curve(tuple(a.price_grid(3)), (-100.0, 0.0, 400.0))

    rows: list[dict[str, Any]] = []

    async def persist(row: dict[str, Any]) -> None:
        rows.append(row)

    ag = agent(bidder=bidder, persist=persist)
    doc = announce()
    ag.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)
    stop = asyncio.Event()
    task = asyncio.create_task(ag.run(stop))
    async with asyncio.timeout(5):
        await ag.wake.wait()
    out = ag.outgoing()
    assert [t for t, _, _ in out] == [f"{BASE}/bids/{SITE}"]
    bid = json.loads(out[0][1])
    assert bid["buy"] == [[0.08, 0.1]] and bid["sell"] == [[0.3, 0.4]]
    assert bid["bid_id"] == f"{doc['interval_id']}-{bid['seq']}"
    stop.set()
    await task
    assert rows and rows[-1]["bid_id"] == bid["bid_id"]
    # The operator's refusal is counted and stored.
    ag.on_message(f"{BASE}/bid_result/{SITE}", json.dumps(
        {"v": 1, "community": C, "site": SITE, "kind": "bid", "interval_id": doc["interval_id"],
         "bid_id": bid["bid_id"], "status": "rejected", "code": "gate_closed",
         "reason": "late", "ts": T0}).encode(), T0)
    assert ag.stats.bids_refused == {"gate_closed": 1}
    assert ag.row(doc["interval_id"])["bid_code"] == "gate_closed"


async def test_no_plan_means_no_bid_and_says_so() -> None:
    async def bidder(a: Announce) -> str:
        return "no plan yet"

    ag = agent(bidder=bidder)
    ag.on_message(f"{BASE}/announce", json.dumps(announce()).encode(), T0)
    stop = asyncio.Event()
    task = asyncio.create_task(ag.run(stop))
    await wait_until(lambda: ag.stats.no_plan > 0, 5, "the no-plan count")
    stop.set()
    await task
    assert ag.outgoing() == [] and ag.stats.bids_sent == 0


def test_bad_input_is_counted_never_raised() -> None:
    ag = agent()
    doc = announce()
    iv = doc["interval_id"]
    award = {"v": 1, "community": C, "interval_id": iv, "site": SITE, "side": "sell",
             "kwh": 0.5, "price": 0.2, "amount": 0.1}
    cases: list[tuple[str, bytes, str]] = [
        ("announce", b"\xff\xfe", "malformed"),
        ("announce", b"[1]", "schema"),
        ("announce", json.dumps({**doc, "community": "other"}).encode(), "wrong_community"),
        ("announce", json.dumps({**doc, "delivery_start": 1e999}).encode()
         .replace(b"Infinity", b"1e999"), "non_finite"),
        ("announce", json.dumps({**doc, "gate_closure": doc["delivery_end"]}).encode(),
         "schema"),
        ("announce", json.dumps({**doc, "members": ["s2"]}).encode(), "not_member"),
        (f"award/{SITE}", json.dumps(award).encode(), "unknown_interval"),
    ]
    for kind, raw, code in cases:
        before = dict(ag.stats.rejected)
        ag.on_message(f"{BASE}/{kind}", raw, T0)
        assert ag.stats.rejected.get(code, 0) == before.get(code, 0) + 1, (kind, code)
    ag.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)
    ag.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)  # retained again
    assert ag.stats.duplicates == 1 and len(ag.intervals) == 1
    ag.on_message(f"{BASE}/announce", json.dumps({**doc, "price_cap": 0.5}).encode(), T0)
    assert ag.stats.rejected["conflict"] == 1
    for bad in ({**award, "site": "s2"}, {**award, "side": "maybe"}, {**award, "kwh": -1},
                {**award, "side": "none"}):
        ag.on_message(f"{BASE}/award/{SITE}", json.dumps(bad).encode(), T0)
    assert ag.stats.rejected["wrong_site"] == 1 and ag.stats.rejected["schema"] == 5
    ag.on_message(f"{BASE}/award/{SITE}", json.dumps(award).encode(), T0)
    ag.on_message(f"{BASE}/award/{SITE}", json.dumps(award).encode(), T0)
    ag.on_message(f"{BASE}/award/{SITE}", json.dumps({**award, "kwh": 0.9}).encode(), T0)
    assert ag.stats.awards == 1 and ag.stats.duplicates == 2
    assert ag.stats.rejected["conflict"] == 2
    held = ag.intervals[iv].award
    assert held is not None and held.export_kwh == 0.5
    ag.on_message("some/other/topic", b"x", T0)  # not ours: ignored, not counted
    assert ag.stats.messages == len(cases) + 3 + 4 + 3


async def test_metered_energy_is_interpolated_at_the_boundaries_and_reported() -> None:
    ag = agent()
    doc = announce()
    ag.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)
    iv = doc["interval_id"]
    st = ag.intervals[iv]
    st.bid_id = "b"  # as if it had bid
    # 600 W net export, cycles every 7 s, integrated counters only (meter without counters).
    t = T0 + 500.0
    exp = 0.0
    while t < doc["delivery_end"] + 30:
        ag.observe(t, None, 0.0, exp)
        t += 7.0
        exp += 600.0 * 7.0 / 3600.0
    got = ag.metered_kwh(iv)
    assert got is not None and got[1] == "integrated"
    assert got[0] == pytest.approx(600.0 * 300 / 3600 / 1000, rel=1e-9)
    sent = await ag._tend(iv, st, doc["delivery_end"] + 10)
    assert sent > doc["delivery_end"]
    (topic, raw, _), = ag.outgoing()
    assert topic == f"{BASE}/meter/{SITE}"
    assert json.loads(raw)["net_export_kwh"] == pytest.approx(0.05)


def test_restore_brings_back_awards_as_commitments() -> None:
    ag = agent()
    doc = announce()
    ag.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)
    ag.on_message(f"{BASE}/award/{SITE}", json.dumps(
        {"v": 1, "community": C, "interval_id": doc["interval_id"], "site": SITE,
         "side": "buy", "kwh": 0.25, "price": 0.2, "amount": 0.05}).encode(), T0)
    row = ag.row(doc["interval_id"])
    fresh = agent()
    assert fresh.restore([row], T0) == 1
    w = fresh.awards_for(T0 + 600, 2, 300.0)
    assert w == pytest.approx([-3000.0, 0.0])  # 0.25 kWh bought over 300 s
    # The retained announce after the restart is a duplicate, not a conflict.
    fresh.on_message(f"{BASE}/announce", json.dumps(doc).encode(), T0)
    assert fresh.stats.duplicates == 1 and not fresh.stats.rejected
