"""The market operator over a real Mosquitto and a real SQLite ledger.

Sites are test clients publishing on the contract's topics; one observer records everything the
operator publishes. Most tests drive domain time with a manual clock (the test decides when a gate
closes, so nothing depends on how fast this machine is); the end-to-end test runs on a SimClock.
Waits are bounded in real seconds and only guard against hangs, never assert speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from community.clearing import BUY, SELL, BidSteps, clear
from community.market import MarketOperator
from community.market.ledger import Ledger
from community.market.messages import MAX_PAYLOAD_BYTES, MarketTopics, validate
from community.market.settlement import Award, Tariff, settle_site
from drivers.clock import SimClock

C = "c1"
FLOOR, CAP = 0.08, 0.30
T0 = 1_782_036_000.0  # 2026-06-21T10:00:00Z
WAIT_S = 15.0  # real seconds: a hang guard, not a speed claim
TOPICS = MarketTopics(C)

SCHEMA_OF = {"announce": "market_announce", "result": "market_result", "award": "market_award",
             "bid_result": "market_bid_result", "settlement": "market_settlement"}


class ManualClock:
    """Domain time that moves only when the test says so."""

    speed = 1.0

    def __init__(self, t: float) -> None:
        self.t = t
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        while self.t < t:
            ev = self._moved
            await ev.wait()

    async def sleep(self, dt: float) -> None:
        await self.sleep_until(self.t + dt)

    def set(self, t: float) -> None:
        self.t = t
        ev, self._moved = self._moved, asyncio.Event()
        ev.set()


@dataclass
class Msg:
    topic: str
    kind: str
    site: str | None
    body: dict[str, Any]
    retain: bool


@dataclass
class Wire:
    """One test client: publishes for any site, records everything under the community root."""

    client: aiomqtt.Client
    msgs: list[Msg] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self) -> None:
        async for m in self.client.messages:
            rest = m.topic.value[len(TOPICS.base) + 1:].split("/")
            kind, site = rest[0], (rest[1] if len(rest) > 1 else None)
            if kind in ("bids", "meter", "sentinel"):
                body: dict[str, Any] = {"raw": m.payload}
            else:
                assert isinstance(m.payload, bytes)
                body = json.loads(m.payload)
                # Everything the operator publishes matches its schema.
                assert validate(SCHEMA_OF[kind], body) == [], (kind, body)
            self.msgs.append(Msg(m.topic.value, kind, site, body, bool(m.retain)))
            self.arrived.set()

    async def wait(self, pred: Callable[[Msg], bool], n: int = 1) -> list[Msg]:
        """The first ``n`` recorded messages matching ``pred`` (waits for them)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                found = [m for m in self.msgs if pred(m)]
                if len(found) >= n:
                    return found[:n]
                self.arrived.clear()
                await self.arrived.wait()

    async def got(self, kind: str, interval: str | None = None, n: int = 1) -> list[Msg]:
        """Wait for ``n`` messages of ``kind`` (about ``interval``)."""
        return await self.wait(lambda m: m.kind == kind and (
            interval is None or m.body.get("interval_id") == interval), n)

    def of(self, kind: str, site: str | None = None, interval: str | None = None,
           live: bool | None = None) -> list[Msg]:
        return [m for m in self.msgs if m.kind == kind and (site is None or m.site == site)
                and (interval is None or m.body.get("interval_id") == interval)
                and (live is None or m.retain != live)]

    async def answer(self, site: str, n: int = 1) -> list[dict[str, Any]]:
        """Wait for ``n`` bid_result messages of ``site`` in all; return them in order."""
        got = await self.wait(lambda m: m.kind == "bid_result" and m.site == site, n)
        return [m.body for m in got]

    async def send(self, kind: str, site: str, payload: bytes | dict[str, Any]) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(f"{TOPICS.base}/{kind}/{site}", raw, qos=1)

    async def flush(self) -> None:
        """Everything the broker acknowledged before this call has been recorded after it."""
        token = uuid.uuid4().hex.encode()
        await self.client.publish(f"{TOPICS.base}/sentinel", token, qos=1)
        await self.wait(lambda m: m.kind == "sentinel" and m.body["raw"] == token)


@contextlib.asynccontextmanager
async def wire(broker: Any) -> AsyncIterator[Wire]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}",
                              max_queued_incoming_messages=0) as client:
        w = Wire(client)
        await client.subscribe(f"{TOPICS.base}/#", qos=1)
        task = asyncio.create_task(w.pump())
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class Running:
    op: MarketOperator
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def halt(self, how: str = "stop") -> None:
        """Stop cleanly, or cancel the task as a crash-like kill would."""
        if how == "stop":
            self.stop.set()
        else:
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, WAIT_S)


async def start(broker: Any, clock: Any, db: Path, *, members: Any = ("s1", "s2", "s3", "s4"),
                **kw: Any) -> Running:
    kw.setdefault("interval_s", 900)
    kw.setdefault("gate_lead_s", 300.0)
    op = MarketOperator(broker.url, C, members, clock, db, floor=FLOOR, cap=CAP, **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(op.run(stop))
    async with asyncio.timeout(WAIT_S):
        await op.connected.wait()
    return Running(op, stop, task)


def bid(site: str, interval: str, buy: Any = (), sell: Any = (), bid_id: str | None = None,
        **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"v": 1, "community": C, "interval_id": interval, "site": site,
                         "bid_id": bid_id or f"{site}-{interval}", "buy": [list(s) for s in buy],
                         "sell": [list(s) for s in sell]}
    b.update(over)
    return b


def reclear(ledger: Ledger, interval: str, mechanism: str = "uniform") -> Any:
    """community.clearing.clear on the bids the ledger holds, in the operator's seq order."""
    rows = []
    for b in ledger.bids(C, interval):
        rows += [(b.site, BUY, p, q) for p, q in b.buy] + [(b.site, SELL, p, q) for p, q in b.sell]
    steps = BidSteps.from_kwh(site=np.array([r[0] for r in rows]), bid=[0] * len(rows),
                              side=[r[1] for r in rows], price=[r[2] for r in rows],
                              quantity_kwh=[r[3] for r in rows], seq=np.arange(len(rows)))
    return clear(steps, floor=FLOOR, cap=CAP, mechanism=mechanism)  # type: ignore[arg-type]


async def check_outcome(w: Wire, ledger: Ledger, interval: str,
                        mechanism: str = "uniform") -> None:
    """Published result and awards agree with clear() on the stored bids (waits for them)."""
    c = reclear(ledger, interval, mechanism)
    await w.wait(lambda m: m.kind == "result" and m.body["interval_id"] == interval)
    await w.wait(lambda m: m.kind == "award" and m.body["interval_id"] == interval,
                 n=len(c.sites))
    [res] = [m.body for m in w.of("result", interval=interval, live=True)]
    assert res["volume_kwh"] == pytest.approx(c.volume_kwh)
    assert res["clearing_price"] == pytest.approx(c.price)
    assert res["buyers_pay"] == pytest.approx(c.buyers_pay, abs=1e-6)
    for site, wh, amt in zip(c.sites.tolist(), c.site_net_wh.tolist(),
                             c.site_net_amount.tolist(), strict=True):
        [aw] = [m.body for m in w.of("award", site=site, interval=interval, live=True)]
        assert aw["side"] == ("buy" if wh > 0 else "sell" if wh < 0 else "none")
        assert aw["kwh"] == pytest.approx(abs(wh) / 1000)
        assert aw["amount"] == pytest.approx(abs(amt), abs=1e-6)
    assert {m.site for m in w.of("award", interval=interval, live=True)} == set(c.sites.tolist())


# --------------------------------------------------------------------------------------------


async def test_bad_input_is_rejected_counted_and_the_auction_goes_on(
        mosquitto: Any, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    async with wire(mosquitto) as w:
        run = await start(mosquitto, clock, tmp_path / "ledger.db")
        [ann] = await w.wait(lambda m: m.kind == "announce")
        iv = ann.body["interval_id"]
        assert iv == "20260621T101500Z" and ann.retain is False
        assert ann.body["members"] == ["s1", "s2", "s3", "s4"]

        good = bid("s1", iv, buy=[(0.25, 2.0)])
        bad: list[tuple[str, str, bytes | dict[str, Any]]] = [
            ("oversize", "s2", b" " * (MAX_PAYLOAD_BYTES + 1)),
            ("malformed", "s2", b"{nope"),
            ("non_finite", "s2", json.dumps(good).replace("2.0]", "1e999]").encode()),
            ("schema", "s2", {**bid("s2", iv, sell=[(0.1, 1)]), "v": 2}),
            ("site_mismatch", "s2", bid("s3", iv, sell=[(0.1, 1)])),
            ("wrong_community", "s2", {**bid("s2", iv, sell=[(0.1, 1)]), "community": "c2"}),
            ("not_member", "mallory", bid("mallory", iv, sell=[(0.1, 1)])),
            ("unknown_interval", "s2", bid("s2", "20260621T120000Z", sell=[(0.1, 1)])),
            ("bad_step", "s2", bid("s2", iv, sell=[(0.1,)])),
            ("negative_quantity", "s2", bid("s2", iv, sell=[(0.1, -1)])),
            ("price_out_of_bounds", "s2", bid("s2", iv, sell=[(0.01, 1)])),
            ("non_monotone", "s2", bid("s2", iv, sell=[(0.2, 1), (0.1, 1)])),
            ("crossing", "s2", bid("s2", iv, buy=[(0.2, 1)], sell=[(0.1, 1)])),
            ("quantity_too_large", "s2", bid("s2", iv, sell=[(0.1, 1e6)])),
        ]
        await w.send("bids", "s1", good)
        for _, site, payload in bad:
            await w.send("bids", site, payload)
        await w.send("bids", "s3", bid("s3", iv, sell=[(0.10, 1.5)], seq=5))
        await w.send("bids", "s3", bid("s3", iv, sell=[(0.12, 9.0)], seq=4))  # stale

        answers = await w.answer("s2", 13)
        answers += await w.answer("s3", 2)
        [mallory] = await w.answer("mallory")
        got = [a["code"] for a in answers] + [mallory["code"]]
        want = [c for c, site, _ in bad if site == "s2"] + ["ok", "stale_seq", "not_member"]
        assert sorted(got) == sorted(want)
        for a in answers:
            if a["status"] == "rejected":
                assert a["reason"], a
        [ok1] = await w.answer("s1")
        assert (ok1["status"], ok1["code"], ok1["bid_id"]) == ("accepted", "ok", f"s1-{iv}")

        # Counted, in memory and in the ledger (which survives restarts).
        rej = run.op.stats.rejected
        assert {c: rej[c] for c, _, _ in bad} == {c: 1 for c, _, _ in bad}
        assert rej["stale_seq"] == 1 and run.op.stats.accepted == 2
        counts = run.op.ledger.input_counts(C)
        assert counts["ok"] == 2 and counts["stale_seq"] == 1
        assert all(counts[c] == 1 for c, _, _ in bad)

        # The auction goes on for the good bids: the gate closes, s1 buys s3's 1.5 kWh.
        clock.set(ann.body["gate_closure"])
        [res] = await w.wait(lambda m: m.kind == "result" and m.body["interval_id"] == iv)
        assert res.body["volume_kwh"] == 1.5 and res.body["bids"] == 2
        # s1's step is cut, so the uniform price is its bid (clearing rule 4).
        assert res.body["clearing_price"] == pytest.approx(0.25)
        await w.wait(lambda m: m.kind == "award" and m.site == "s3")
        await check_outcome(w, run.op.ledger, iv)

        # After the gate: refused, whatever the bid.
        await w.send("bids", "s4", bid("s4", iv, buy=[(0.3, 1)]))
        [late] = await w.answer("s4")
        assert late["code"] == "gate_closed"

        # Meter readings: too early, then settled once, then idempotent, then refused.
        meter = {"v": 1, "community": C, "interval_id": iv, "site": "s1", "net_export_kwh": -2.0}
        await w.send("meter", "s1", meter)
        assert (await w.answer("s1", 2))[1]["code"] == "too_early"
        clock.set(ann.body["delivery_end"])
        await w.send("meter", "s1", meter)
        await w.send("meter", "s1", meter)
        await w.send("meter", "s1", {**meter, "net_export_kwh": -1.0})
        await w.send("meter", "s4", {**meter, "site": "s4", "interval_id": "20260101T000000Z"})
        codes = [a["code"] for a in await w.answer("s1", 5)][1:]
        assert codes == ["too_early", "ok", "ok", "already_settled"]
        assert [a["kind"] for a in await w.answer("s1", 5)][1:] == ["meter"] * 4
        assert (await w.answer("s4", 2))[1]["code"] == "unknown_interval"
        [st] = await w.wait(lambda m: m.kind == "settlement" and m.site == "s1")
        # Bought 1.5 at 0.25, imported 2.0: 0.5 kWh more at retail.
        want_st = settle_site("s1", Award(-1.5, -1.5 * 0.25), -2.0, Tariff(FLOOR, CAP))
        assert want_st.total == pytest.approx(-0.375 - 0.15)
        assert st.body["total"] == pytest.approx(want_st.total, abs=1e-6)
        assert st.body["deviation_kwh"] == pytest.approx(-0.5)
        assert st.body["deviation_amount"] == pytest.approx(-0.5 * CAP)
        await w.flush()
        assert len(w.of("settlement", site="s1")) == 1  # the repeat did not publish again
        await run.halt()


async def test_resubmission_replaces_and_last_bid_wins(mosquitto: Any, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    async with wire(mosquitto) as w:
        run = await start(mosquitto, clock, tmp_path / "ledger.db", members=None)
        [ann] = await w.wait(lambda m: m.kind == "announce")
        iv = ann.body["interval_id"]
        await w.send("bids", "s9", bid("s9", iv, buy=[(0.30, 3.0)], bid_id="x"))
        first = bid("s1", iv, sell=[(0.10, 2.0)], bid_id="a")
        await w.send("bids", "s1", first)
        await w.send("bids", "s1", first)  # a duplicate (e.g. a QoS-1 redelivery)
        await w.send("bids", "s1", bid("s1", iv, sell=[(0.10, 1.0)], bid_id="a"))
        await w.send("bids", "s1", bid("s1", iv, sell=[(0.20, 0.5)], bid_id="b"))
        answers = await w.answer("s1", 4)
        assert [a["code"] for a in answers] == ["ok", "replaced", "replaced", "replaced"]
        assert [a["bid_id"] for a in answers] == ["a", "a", "a", "b"]
        stored = run.op.ledger.bid_row(C, iv, "s1")
        assert stored is not None and stored["bid_id"] == "b"
        assert len(run.op.ledger.bids(C, iv)) == 2  # one current bid per site
        assert run.op.ledger.input_counts(C) == {"ok": 2, "replaced": 3}  # all, as received

        clock.set(ann.body["gate_closure"])
        [aw] = await w.wait(lambda m: m.kind == "award" and m.site == "s1")
        assert (aw.body["interval_id"], aw.body["side"], aw.body["kwh"]) == (iv, "sell", 0.5)
        assert aw.body["price"] == pytest.approx(0.30)  # s9's cut step sets the price
        await check_outcome(w, run.op.ledger, iv)
        await run.halt()


async def test_restart_loses_nothing_and_never_clears_twice(mosquitto: Any,
                                                            tmp_path: Path) -> None:
    clock = ManualClock(T0)
    db = tmp_path / "ledger.db"
    async with wire(mosquitto) as w:
        run = await start(mosquitto, clock, db)
        [ann] = await w.wait(lambda m: m.kind == "announce")
        iv, gate = ann.body["interval_id"], ann.body["gate_closure"]
        await w.send("bids", "s1", bid("s1", iv, buy=[(0.28, 2.0), (0.15, 1.0)]))
        await w.send("bids", "s2", bid("s2", iv, sell=[(0.09, 1.0), (0.20, 1.0)]))
        await w.answer("s1")
        await w.answer("s2")

        # Killed mid-interval; a bid sent while it is down waits in its broker session.
        await run.halt("cancel")
        await w.send("bids", "s3", bid("s3", iv, sell=[(0.12, 0.8)]))
        run = await start(mosquitto, clock, db)
        [a3] = await w.answer("s3")
        assert a3["code"] == "ok" and run.op.stats.received == 1
        assert {b.site for b in run.op.ledger.bids(C, iv)} == {"s1", "s2", "s3"}

        clock.set(gate)
        await w.wait(lambda m: m.kind == "result" and m.body["interval_id"] == iv)
        await w.wait(lambda m: m.kind == "award" and m.body["interval_id"] == iv, n=3)
        await check_outcome(w, run.op.ledger, iv)
        assert run.op.stats.cleared == 1

        # Killed after clearing; a new instance finds the interval cleared and leaves it.
        await run.halt("cancel")
        run = await start(mosquitto, clock, db)
        [ann2] = await w.wait(lambda m: m.kind == "announce" and m.body["interval_id"] != iv)
        iv2 = ann2.body["interval_id"]
        assert run.op.stats.cleared == 0

        # A crash between the ledger commit and the publication: the next interval is cleared
        # in the ledger (what the operator commits) but nothing is published...
        await w.send("bids", "s4", bid("s4", iv2, buy=[(0.3, 1.0)]))
        await w.send("bids", "s2", bid("s2", iv2, sell=[(0.1, 2.0)]))
        await w.answer("s4")
        await w.answer("s2", 2)
        await run.halt("cancel")
        from community.market.auction import clear_auction

        side = Ledger(db)
        a2 = side.auction(C, iv2)
        assert a2 is not None
        assert side.clear_once(a2, lambda b: clear_auction(a2, b, gate), gate, "op0")
        assert side.clear_once(a2, lambda b: clear_auction(a2, b, gate), gate, "op0") is None
        side.close()
        # ...and the restarted instance publishes what its predecessor committed.
        clock.set(ann2.body["gate_closure"])
        run = await start(mosquitto, clock, db)
        await w.wait(lambda m: m.kind == "result" and m.body["interval_id"] == iv2)
        await w.wait(lambda m: m.kind == "award" and m.body["interval_id"] == iv2, n=2)
        assert run.op.stats.cleared == 0
        await run.halt()
        await w.flush()

        ledger = Ledger(db)
        try:
            assert [r["interval_id"] for r in ledger.results(C)] == [iv, iv2]
            await check_outcome(w, ledger, iv)
            await check_outcome(w, ledger, iv2)
            for i in (iv, iv2):  # each result and award published exactly once
                assert len(w.of("result", interval=i, live=True)) == 1
                sites = [m.site for m in w.of("award", interval=i, live=True)]
                assert len(sites) == len(set(sites)) == len(ledger.bids(C, i))
            assert ledger.input_counts(C) == {"ok": 5}
        finally:
            ledger.close()


async def test_two_instances_behind_a_shared_subscription(mosquitto: Any,
                                                          tmp_path: Path) -> None:
    clock = ManualClock(T0)
    db = tmp_path / "ledger.db"
    sites = [f"s{i}" for i in range(1, 7)]
    async with wire(mosquitto) as w:
        runs = [await start(mosquitto, clock, db, members=sites, share_group="ops",
                            instance=name) for name in ("opA", "opB")]
        sent = 0
        intervals = []
        for round_ in range(3):
            [ann] = await w.wait(lambda m: m.kind == "announce" and
                                 m.body["interval_id"] not in intervals)
            iv = ann.body["interval_id"]
            intervals.append(iv)
            for rep in range(3):  # each site revises its bid twice: 18 messages per interval
                for i, s in enumerate(sites):
                    price = 0.10 + 0.03 * i + 0.01 * rep
                    b = (bid(s, iv, sell=[(price, 1.0 + rep)]) if i % 2 else
                         bid(s, iv, buy=[(0.35 - price, 1.5)]))
                    await w.send("bids", s, {**b, "seq": rep})
                    sent += 1
            for s in sites:
                await w.answer(s, 3 * (round_ + 1))
            clock.set(ann.body["gate_closure"])
            await w.got("result", iv)
            await w.got("award", iv, n=len(sites))
        for r in runs:
            await r.halt()
        await w.flush()

        stats = [r.op.stats for r in runs]
        # The broker shared the bids out; together the instances took every one.
        assert all(s.received > 0 for s in stats)
        assert sum(s.received for s in stats) == sent
        assert sum(s.accepted for s in stats) == sent
        assert sum(s.cleared for s in stats) == len(intervals)
        ledger = Ledger(db)
        try:
            assert sum(ledger.input_counts(C).values()) == sent
            assert [r["interval_id"] for r in ledger.results(C)] == intervals
            rows = list(ledger.db.query("SELECT DISTINCT instance FROM inputs"))
            assert {r["instance"] for r in rows} == {"opA", "opB"}
            for iv in intervals:
                assert {b.site for b in ledger.bids(C, iv)} == set(sites)
                await check_outcome(w, ledger, iv)  # exactly one result and one award per site
                assert sorted(str(m.site) for m in w.of("award", interval=iv, live=True)) == sites
        finally:
            ledger.close()


async def test_end_to_end_on_an_accelerated_clock(mosquitto: Any, tmp_path: Path) -> None:
    """Sites react to each announcement, as a gateway agent would, over several intervals."""
    # 60 s intervals at 60x: one real second each, of which the sites need a few ms.
    clock = SimClock(start=T0 - 55.0, speed=60.0)
    async with wire(mosquitto) as w:
        run = await start(mosquitto, clock, tmp_path / "ledger.db", interval_s=60,
                          gate_lead_s=10.0, mechanism="pay_as_bid")
        seen: list[str] = []
        sellers = {"s1": 0.09, "s2": 0.15}
        buyers = {"s3": 0.29, "s4": 0.18}
        while len(seen) < 3:
            [ann] = await w.wait(lambda m: m.kind == "announce" and
                                 m.body["interval_id"] not in seen)
            iv = ann.body["interval_id"]
            seen.append(iv)
            n = len(seen)
            for s, p in sellers.items():
                await w.send("bids", s, bid(s, iv, sell=[(p, 0.5 * n), (p + 0.05, 1.0)]))
            for s, p in buyers.items():
                await w.send("bids", s, bid(s, iv, buy=[(p, 1.0), (p - 0.05, 0.5 * n)]))
        for iv in seen:
            await w.got("result", iv)
        [a1] = [m.body for m in w.of("announce") if m.body["interval_id"] == seen[0]]
        await clock.sleep_until(a1["delivery_end"])
        await w.send("meter", "s1", {"v": 1, "community": C, "interval_id": seen[0],
                                     "site": "s1", "net_export_kwh": 0.2})
        [st] = await w.wait(lambda m: m.kind == "settlement")
        await run.halt()
        await w.flush()

        ledger = Ledger(tmp_path / "ledger.db")
        try:
            traded = 0.0
            for iv in seen:
                late = [a for a in ledger.db.query(
                    "SELECT code FROM inputs WHERE interval_id = ?", [iv])]
                if any(a["code"] != "ok" for a in late):
                    pytest.fail(f"a bid of {iv} was refused: {late} (machine too slow?)")
                assert len(ledger.bids(C, iv)) == 4
                await check_outcome(w, ledger, iv, "pay_as_bid")
                [res] = [m.body for m in w.of("result", interval=iv, live=True)]
                assert res["mechanism"] == "pay_as_bid"
                assert res["operator_surplus"] >= 0
                traded += res["volume_kwh"]
            assert traded > 0
            [aw] = [m.body for m in w.of("award", site="s1", interval=seen[0], live=True)]
            awarded = aw["kwh"] if aw["side"] == "sell" else -aw["kwh"]
            want = settle_site("s1", Award(awarded, aw["amount"]), 0.2, Tariff(FLOOR, CAP))
            assert st.body["total"] == pytest.approx(want.total, abs=1e-5)
            assert st.body["awarded_export_kwh"] == pytest.approx(awarded)
        finally:
            ledger.close()


async def test_a_failure_inside_the_operator_is_answered_and_the_loop_goes_on(
        mosquitto: Any, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    async with wire(mosquitto) as w:
        run = await start(mosquitto, clock, tmp_path / "ledger.db")
        [ann] = await w.got("announce")
        iv = ann.body["interval_id"]
        real = run.op.ledger.store_bid
        calls = 0

        def flaky(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("disk on fire")
            return real(*a, **kw)

        run.op.ledger.store_bid = flaky  # type: ignore[method-assign]
        await w.send("bids", "s1", bid("s1", iv, sell=[(0.1, 1.0)]))
        await w.send("bids", "s2", bid("s2", iv, buy=[(0.2, 1.0)]))
        [a1] = await w.answer("s1")
        [a2] = await w.answer("s2")
        assert (a1["status"], a1["code"]) == ("rejected", "internal")
        assert a2["code"] == "ok" and run.op.stats.rejected["internal"] == 1
        await run.halt()


async def test_the_operator_rides_out_a_broker_restart(mosquitto: Any, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    run = await start(mosquitto, clock, tmp_path / "ledger.db")
    async with wire(mosquitto) as w:
        [ann] = await w.got("announce")
        iv = ann.body["interval_id"]
        await w.send("bids", "s1", bid("s1", iv, sell=[(0.1, 1.0)]))
        await w.answer("s1")
    mosquitto.stop()
    mosquitto.start()
    async with wire(mosquitto) as w:
        [again] = await w.got("announce")  # retained, kept by the broker
        assert again.body["interval_id"] == iv
        # Sent whether or not the operator is back yet: its broker session keeps it.
        await w.send("bids", "s2", bid("s2", iv, buy=[(0.2, 1.0)]))
        [a2] = await w.answer("s2")
        assert a2["code"] == "ok"
        clock.set(ann.body["gate_closure"])
        [res] = await w.got("result", iv)
        assert res.body["volume_kwh"] == 1.0 and res.body["bids"] == 2
        await run.halt()
    assert run.op.stats.disconnects >= 1 and run.op.stats.connects >= 2


async def test_run_market_serves_until_stopped(mosquitto: Any, tmp_path: Path) -> None:
    from community.market import run_market

    stop = asyncio.Event()
    async with wire(mosquitto) as w:
        task = asyncio.create_task(run_market(
            broker_url=mosquitto.url, community=C, db=tmp_path / "m.db", members=None,
            interval_s=300, gate_lead_s=60, speed=10.0, stop=stop))
        [ann] = await w.got("announce")
        assert ann.body["delivery_end"] - ann.body["delivery_start"] == 300
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
