"""The gateway's side of the community market: bid from the plan, take awards back, settle.

One :class:`MarketAgent` per gateway (``[market]`` in the config), speaking the contract of
``docs/mqtt-market.md`` under ``<root>/market/<community>/``. Like the envelope agent it has no
socket of its own: the MQTT session hands it every message on its subscriptions
(:meth:`MarketAgent.on_message`, synchronous, never raises on bad input) and publishes what it
queues (:meth:`MarketAgent.outgoing`, QoS 1). Its own task (:meth:`MarketAgent.run`) does the
slow work on domain time:

1. **Bid.** For each ``announce`` of its community (the auction now open) it asks the *bidder*
   for the site's curve of net export (Wh) over the delivery interval at ``prices`` points
   spread evenly over ``[price_floor, price_cap]``. The daemon's bidder (:func:`plan_bidder`)
   re-solves the slow loop's last plan inputs with :func:`gateway.optimize.bidcurve.bid_curve`
   on the planning thread, and bounds the curve by the envelope for that interval (the
   plan's own limits and the envelope as held now, whichever is tighter). The curve becomes
   the contract's step lists (:func:`curve_to_steps`: monotone, never self-crossing, magnitudes
   rounded *down* to the Wh so rounding never adds export) and is published on ``bids/<site>``
   with ``bid_id = <interval_id>-<seq>`` (``seq`` = domain milliseconds at build time, so a
   retry after a restart supersedes, and a QoS-1 redelivery is idempotent). Without a plan the
   agent bids nothing (counted, and said once per interval) and retries until shortly before
   the gate.
2. **Awards** (``award/<site>``, retained) are validated, stored and held as commitments: the
   planner asks :meth:`MarketAgent.awards_for` for ``award_w`` per planning step (the awarded
   energy spread evenly over the delivery interval, mapped onto the steps it overlaps).
3. **Meter and settlement.** The daemon reports each cycle's cumulative energy counters
   (:meth:`observe`); the agent interpolates them at the delivery interval's boundaries and,
   once the interval has ended, sends the metered net export on ``meter/<site>`` (the meter's
   own counters when it has them at both ends, else the gateway's integrated import/export).
   ``too_early``/``not_cleared`` answers and silence are retried every ``retry_s``, at most
   ``meter_tries`` times (then given up: counted in ``meters_unanswered``, said once; reports
   queued in the operator's broker session are still answered when it is back). The
   operator's ``settlement/<site>`` is
   recorded as it is. Intervals the agent bid in but for which no statement arrives keep a
   provisional amount computed locally (award at its price, deviations at the announce's floor
   and cap, or the configured fallbacks).

Every step lands in the store's ``market`` table (one row per community and interval: bid,
answer, award, metered energy, settlement), written through the ``persist`` callback; a restart
restores awards and pending meter reports from it (:meth:`restore`).

Bad input (malformed, foreign community or site, non-finite, duplicates, conflicting awards,
rejected bids) is counted in :class:`MarketStats` by code and logged once per message; nothing
stops the loops. The gateway never imports ``community``: the few payloads it reads are checked
here, field by field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import reprlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from drivers.clock import Clock
from drivers.natures import MeterReading
from gateway import messages

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from gateway.daemon import Gateway
    from gateway.optimize.fallback import Solver
    from gateway.optimize.inputs import PlanInputs

log = logging.getLogger(__name__)

VERSION = 1
MAX_BYTES = 16 * 1024
MAX_STEPS = 64
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_INTERVAL = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
_MAX_OUT = 1000  # queued publications while the broker is away; the oldest go first
_KEEP_S = 2 * 86400.0  # intervals kept in memory after their delivery ended
_MAX_INTERVALS = 5000  # held at once: 2 days of 1-minute auctions and more; beyond: refused
_MAX_AWARD_KWH = 100_000.0  # per interval: the contract's per-site side limit (MAX_SIDE_KWH)
_CODE = re.compile(r"^[a-z_]{1,32}$")  # an operator's answer code (a counter key)
_MAX_CODES = 32  # distinct codes counted by name; beyond: counted as "other"

EventSink = Callable[[str, str, str, "dict[str, Any] | None"], None]
Persist = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class MarketSettings:
    """What the agent needs from the ``[market]`` config table (see ``gateway.config``)."""

    community: str
    prices: int = 8  # price points of the bid curve, floor and cap included
    price_floor: float = 0.08  # fallback feed-in tariff for provisional settlement
    price_cap: float = 0.30  # fallback retail price for provisional settlement
    gate_margin_s: float = 10.0  # domain s: no bid is sent later than this before the gate
    retry_s: float = 15.0  # domain s between attempts (no plan yet, meter not settled yet)
    meter_delay_s: float = 5.0  # domain s after delivery end before the meter is reported
    meter_tries: int = 20
    time_limit_s: float = 2.0  # real s per solve of the bid curve
    # Domain s: the bid is built this site's share of ``bid_spread_s`` after the announce (a
    # stable fraction from the site id), so a community's gateways do not all solve, publish
    # and hit the operator in the same second. Capped at a quarter of the bidding window.
    bid_spread_s: float = 0.0


@dataclass(frozen=True)
class Announce:
    """A validated ``announce``: the auction now open."""

    community: str
    interval_id: str
    delivery_start: float
    delivery_end: float
    gate_closure: float
    price_floor: float
    price_cap: float
    mechanism: str
    members: tuple[str, ...] | None

    def price_grid(self, n: int) -> list[float]:
        """``n`` prices evenly spread over ``[floor, cap]`` (both included), ascending."""
        lo, hi = self.price_floor, self.price_cap
        if n <= 1 or hi <= lo:
            return [lo]
        out = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
        # 6 decimals on the wire, never outside the bounds the operator checks.
        return sorted({min(max(round(p, 6), lo), hi) for p in out})


@dataclass(frozen=True)
class Award:
    """A validated award, signed from the site's side: ``export_kwh`` + sold / - bought."""

    interval_id: str
    export_kwh: float
    price: float | None
    amount: float  # + received / - paid

    @property
    def side(self) -> str:
        return "sell" if self.export_kwh > 0 else "buy" if self.export_kwh < 0 else "none"


@dataclass(frozen=True)
class Curve:
    """What the site would trade in one delivery interval: net export (Wh) at each price."""

    prices: tuple[float, ...]  # ascending
    net_export_wh: tuple[float, ...]  # non-decreasing; + sell / - buy
    note: str = ""


Bidder = Callable[[Announce], Awaitable["Curve | str"]]  # a curve, or why there is none


@dataclass
class MarketStats:
    """Counters of this process (also in the daemon's stats)."""

    messages: int = 0
    announces: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # bad input by code
    bids_built: int = 0
    bids_sent: int = 0
    bids_empty: int = 0  # curves with nothing to trade (sent as a withdrawal)
    no_plan: int = 0  # intervals not bid for lack of a plan (or a failed curve)
    bids_accepted: int = 0
    bids_refused: dict[str, int] = field(default_factory=dict)  # operator's codes
    awards: int = 0
    meters_sent: int = 0
    meters_refused: dict[str, int] = field(default_factory=dict)
    meters_unanswered: int = 0  # intervals whose meter reports all went unanswered (given up)
    settlements: int = 0
    persist_errors: int = 0
    out_dropped: int = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    @staticmethod
    def count(counter: dict[str, int], code: str) -> None:
        """Count an operator's answer ``code``; a bounded number of distinct keys."""
        if code not in counter and len(counter) >= _MAX_CODES:
            code = "other"
        counter[code] = counter.get(code, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Pure helpers


def site_fraction(site: str) -> float:
    """A stable number in [0, 1) from the site id (spreads a fleet's periodic work)."""
    import zlib

    return (zlib.crc32(site.encode()) % 10_000) / 10_000.0


def curve_to_steps(prices: Sequence[float], net_export_wh: Sequence[float]
                   ) -> tuple[list[list[float]], list[list[float]]]:
    """The contract's ``(buy, sell)`` step lists for a net-export curve.

    ``prices`` ascending, ``net_export_wh`` the site's net export at each price (+ sell, - buy),
    made non-decreasing here (running maximum) should it not be. Selling: at price ``p_i`` the
    site sells ``max(e_i, 0)`` in all, so the sell step at ``p_i`` is the increase over
    ``p_{i-1}``. Buying: at ``p_i`` it buys ``max(-e_i, 0)``, non-increasing in price, so the buy
    step at ``p_i`` (listed from the highest price down) is the decrease to ``p_{i+1}``. Sold
    and bought quantities are rounded down to the Wh (never more than the curve, hence never
    more than the envelope it was clipped to). Zero steps are left out; as ``e`` is monotone,
    every buy price lies below every sell price (no self-crossing).
    """
    if len(prices) != len(net_export_wh):
        raise ValueError("prices and net_export_wh differ in length")
    e: list[float] = []
    for v in net_export_wh:
        if not math.isfinite(v):
            raise ValueError(f"net_export_wh: {v} is not finite")
        e.append(v if not e else max(v, e[-1]))

    def wh_down(x: float) -> int:
        return math.floor(max(x, 0.0) + 1e-9)

    sold = [wh_down(v) for v in e]
    bought = [wh_down(-v) for v in e]
    sell: list[list[float]] = []
    prev = 0
    for p, s in zip(prices, sold, strict=True):
        if s > prev:
            sell.append([float(p), (s - prev) / 1000.0])
        prev = max(prev, s)
    buy: list[list[float]] = []
    nxt = 0
    for p, b in zip(reversed(prices), reversed(bought), strict=True):
        if b > nxt:
            buy.append([float(p), (b - nxt) / 1000.0])
        nxt = max(nxt, b)
    return buy, sell


def overlaps(start: float, n: int, step_s: float, t0: float, t1: float
             ) -> list[tuple[int, float]]:
    """``(k, seconds)`` of each planning step ``[start + k*step_s, +step_s)`` that overlaps
    ``[t0, t1)``, with the length of the overlap."""
    out: list[tuple[int, float]] = []
    if t1 <= t0 or step_s <= 0:
        return out
    k0 = max(0, math.floor((t0 - start) / step_s))
    k1 = min(n, math.ceil((t1 - start) / step_s))
    for k in range(k0, k1):
        a = start + k * step_s
        ov = min(a + step_s, t1) - max(a, t0)
        if ov > 0:
            out.append((k, ov))
    return out


def award_profile(awards: Sequence[tuple[float, float, float]], start: float, n: int,
                  step_s: float) -> list[float]:
    """``award_w`` per planning step for awards ``(delivery_start, delivery_end, export_kwh)``:
    each award's energy spread evenly over its interval (W average; + sold, - bought)."""
    out = [0.0] * n
    for t0, t1, kwh in awards:
        if t1 <= t0 or kwh == 0:
            continue
        for k, ov in overlaps(start, n, step_s, t0, t1):
            out[k] += kwh * 1000.0 * (ov / (t1 - t0)) * 3600.0 / step_s
    return out


def provisional_total(export_kwh: float, amount: float, metered_kwh: float, feed_in: float,
                      retail: float) -> tuple[float, float, float]:
    """``(deviation_kwh, deviation_amount, total)`` as the contract settles them: a surplus over
    the award at ``feed_in``, a shortfall at ``retail`` (site's side: + credited)."""
    dev = metered_kwh - export_kwh
    dev_amount = dev * feed_in if dev > 0 else dev * retail
    return dev, dev_amount, amount + dev_amount


def interval_curve(inputs: PlanInputs, plan_start: float, t0: float, t1: float,
                   prices: Sequence[float], time_limit_s: float | None = None,
                   solver: Solver | None = None) -> Curve:
    """The plan's net-export curve over ``[t0, t1)`` (blocking: run on the planning thread).

    Each planning step the interval overlaps gets :func:`bid_curve` (that step traded at the
    price), scaled by the share of the step inside the interval, and the steps' curves are
    summed (each is monotone, so the sum is; for an interval of one step or less this is
    exactly :func:`bid_curve`). ``bid_curve`` clips each step to the plan's envelope. Raises
    ``ValueError`` if the interval is outside the plan's horizon, ``SolveFailed`` if a solve
    fails.
    """
    import numpy as np

    from gateway.optimize.bidcurve import bid_curve
    from gateway.optimize.problem import solve_plan

    parts = overlaps(plan_start, inputs.steps, inputs.step_s, t0, t1)
    covered = sum(ov for _, ov in parts)
    if not parts or covered < (t1 - t0) - 1e-6:
        raise ValueError(f"interval [{t0:.0f}, {t1:.0f}) is not inside the plan's horizon "
                         f"(start {plan_start:.0f}, {inputs.steps} steps of {inputs.step_s:g} s)")
    p = np.asarray(sorted(prices), dtype=np.float64)
    total = np.zeros(p.size)
    for k, ov in parts:
        c = bid_curve(inputs, k, p, time_limit_s, solver=solver or solve_plan)
        total += c.net_export_wh * (ov / inputs.step_s)
    return Curve(tuple(float(x) for x in p), tuple(float(x) for x in total))


def clip_curve(curve: Curve, export_wh: float, import_wh: float) -> Curve:
    """``curve`` bounded by an energy envelope: at most ``export_wh`` out, ``import_wh`` in."""
    return Curve(curve.prices, tuple(min(max(v, -import_wh), export_wh)
                                     for v in curve.net_export_wh), curve.note)


# --------------------------------------------------------------------------------------------
# Decoding what the operator sends


class _Bad(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _doc(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BYTES:
        raise _Bad("oversize", f"payload is {len(raw)} bytes, the limit is {MAX_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: math.nan)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Bad("malformed", f"not UTF-8 JSON: {str(e)[:200]}") from e
    if not isinstance(doc, dict):
        raise _Bad("schema", f"payload must be a JSON object, got {type(doc).__name__}")
    if doc.get("v") != VERSION:
        raise _Bad("schema", f"field 'v': must be {VERSION}, got {doc.get('v')!r}")
    return doc


def _str(doc: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
        raise _Bad("schema", f"field '{key}': expected a valid string, got {reprlib.repr(v)}")
    return v


def _num(doc: dict[str, Any], key: str, nullable: bool = False) -> float:
    v = doc.get(key)
    if v is None and nullable:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad("schema", f"field '{key}': expected a number, got {reprlib.repr(v)}")
    try:
        f = float(v)  # an integer beyond float range raises OverflowError
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise _Bad("non_finite", f"field '{key}': must be a finite number")
    return f


# --------------------------------------------------------------------------------------------
# The agent


@dataclass
class _Interval:
    """What the agent knows of one delivery interval (mirrors a row of the ``market`` table)."""

    a: Announce
    bid_id: str | None = None
    seq: int | None = None
    bid: dict[str, Any] | None = None
    bid_code: str | None = None
    award: Award | None = None
    meter_kwh: float | None = None
    meter_code: str | None = None
    meter_tries: int = 0
    meter_next: float = 0.0
    settlement: dict[str, Any] | None = None
    bid_next: float = 0.0
    no_plan_said: bool = False
    meter_given_up: bool = False
    start_mark: dict[str, float] = field(default_factory=dict)  # source -> net export counter
    end_mark: dict[str, float] = field(default_factory=dict)


class MarketAgent:
    """Bids the site into its community's auctions and keeps the resulting commitments."""

    def __init__(self, site: str, settings: MarketSettings, clock: Clock, *,
                 root: str = "hems/v1", bidder: Bidder | None = None,
                 persist: Persist | None = None, on_event: EventSink | None = None,
                 on_award: Callable[[], None] | None = None) -> None:
        self.site = site
        self.settings = settings
        self.community = settings.community
        self.clock = clock
        self.bidder = bidder
        self.persist = persist
        self._on_event = on_event
        self._award_hook = on_award  # the daemon re-plans at once: a new commitment
        self.base = f"{root}/market/{settings.community}"
        self.topic_announce = f"{self.base}/announce"
        self.topic_award = f"{self.base}/award/{site}"
        self.topic_bid_result = f"{self.base}/bid_result/{site}"
        self.topic_settlement = f"{self.base}/settlement/{site}"
        self.topic_bids = f"{self.base}/bids/{site}"
        self.topic_meter = f"{self.base}/meter/{site}"
        self.stats = MarketStats()
        self.intervals: dict[str, _Interval] = {}
        self.wake = asyncio.Event()  # set when outgoing() has something
        self._work = asyncio.Event()  # set when run() has something new to look at
        self._out: list[tuple[str, bytes, bool]] = []
        self._last: tuple[float, float | None, float | None, float, float] | None = None
        self._dirty: set[str] = set()  # intervals whose ledger row is not written yet

    # ------------------------------------------------------------------ session side

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return (self.topic_announce, self.topic_award, self.topic_bid_result,
                self.topic_settlement)

    def wants(self, topic: str) -> bool:
        return topic in self.subscriptions

    def on_connect(self) -> None:
        self._work.set()

    def resubscribe_due(self) -> bool:
        return False

    def outgoing(self) -> list[tuple[str, bytes, bool]]:
        out, self._out = self._out, []
        return out

    def requeue(self, items: list[tuple[str, bytes, bool]]) -> None:
        self._out[:0] = items

    def _send(self, topic: str, body: dict[str, Any]) -> None:
        self._out.append((topic, messages.dumps(body), False))
        if len(self._out) > _MAX_OUT:
            del self._out[0]
            self.stats.out_dropped += 1
        self.wake.set()

    def _event(self, level: str, msg: str) -> None:
        if self._on_event is not None:
            self._on_event(level, "market", msg[:500], None)

    def _bad(self, topic: str, code: str, reason: str) -> None:
        self.stats.reject(code)
        log.warning("market: %s refused: %s: %s", topic, code, reason)

    def on_message(self, topic: str, payload: bytes, now: float) -> None:
        """Handle one received message. Never raises on bad input."""
        if not self.wants(topic):
            return
        self.stats.messages += 1
        if not payload:
            return  # a retained message being deleted
        try:
            doc = _doc(payload)
            if topic == self.topic_announce:
                self._on_announce(doc, now)
            elif topic == self.topic_award:
                self._on_award(doc, now)
            elif topic == self.topic_bid_result:
                self._on_bid_result(doc, now)
            else:
                self._on_settlement(doc)
        except _Bad as e:
            self._bad(topic, e.code, e.reason)
        except Exception as e:  # a bug must not take the session down
            log.exception("market: failed to handle %s", topic)
            self._bad(topic, "internal", repr(e))

    def _check_community(self, doc: dict[str, Any]) -> None:
        c = _str(doc, "community")
        if c != self.community:
            raise _Bad("wrong_community", f"field 'community': {c!r} is not {self.community!r}")

    def _check_site(self, doc: dict[str, Any]) -> None:
        s = _str(doc, "site")
        if s != self.site:
            raise _Bad("wrong_site", f"field 'site': {s!r} is not this site {self.site!r}")

    def _on_announce(self, doc: dict[str, Any], now: float) -> None:
        self._check_community(doc)
        iv = _str(doc, "interval_id", _INTERVAL)
        ds, de, gate = (_num(doc, "delivery_start"), _num(doc, "delivery_end"),
                        _num(doc, "gate_closure"))
        lo, hi = _num(doc, "price_floor"), _num(doc, "price_cap")
        mech = _str(doc, "mechanism")
        if not ds < de or gate > ds:
            raise _Bad("schema", f"times: need gate_closure <= delivery_start < delivery_end, "
                                 f"got {gate}, {ds}, {de}")
        if not lo <= hi:
            raise _Bad("schema", f"prices: price_floor {lo} above price_cap {hi}")
        # Bounded in time, so every interval held is forgotten within days (memory).
        if de < now - _KEEP_S or gate > now + _KEEP_S or ds - gate > _KEEP_S \
                or de - ds > _KEEP_S:
            raise _Bad("out_of_range", f"times {gate}, {ds}, {de}: an auction must end after "
                                       f"{now - _KEEP_S:.0f}, close by {now + _KEEP_S:.0f} and "
                                       f"span at most {_KEEP_S:.0f} s from gate to delivery")
        members_raw = doc.get("members")
        members: tuple[str, ...] | None = None
        if members_raw is not None:
            if not isinstance(members_raw, list) or not all(isinstance(m, str)
                                                            for m in members_raw):
                raise _Bad("schema", "field 'members': must be an array of site ids")
            members = tuple(members_raw)
        a = Announce(self.community, iv, ds, de, gate, lo, hi, mech, members)
        self.stats.announces += 1
        known = self.intervals.get(iv)
        if known is not None:
            k = known.a
            if (k.delivery_start, k.delivery_end, k.gate_closure, k.price_floor,
                    k.price_cap) != (ds, de, gate, lo, hi):
                raise _Bad("conflict", f"announce of {iv} differs from the one received before")
            self.stats.duplicates += 1  # the retained copy again (reconnect)
            return
        if members is not None and self.site not in members:
            raise _Bad("not_member", f"this site is not a member of {self.community!r}")
        if len(self.intervals) >= _MAX_INTERVALS:
            self._forget(now)
            if len(self.intervals) >= _MAX_INTERVALS:
                raise _Bad("too_many", f"{len(self.intervals)} auctions held already")
        spread = min(self.settings.bid_spread_s,
                     max(0.0, (gate - self.settings.gate_margin_s - now) / 4.0))
        self.intervals[iv] = _Interval(a, bid_next=now + site_fraction(self.site) * spread)
        self._save(iv)
        log.info("market: auction %s open until %.0f (%.3f..%.3f)", iv, gate, lo, hi)
        self._work.set()

    def _on_award(self, doc: dict[str, Any], now: float) -> None:
        self._check_community(doc)
        self._check_site(doc)
        iv = _str(doc, "interval_id", _INTERVAL)
        side = _str(doc, "side")
        kwh, amount = _num(doc, "kwh"), _num(doc, "amount")
        price = _num(doc, "price", nullable=True)
        if side not in ("buy", "sell", "none") or kwh < 0 or amount < 0:
            raise _Bad("schema", f"award: side {side!r}, kwh {kwh}, amount {amount}: need "
                                 f"buy/sell/none and magnitudes >= 0")
        if side == "none" and kwh != 0:
            raise _Bad("schema", f"award: side none with {kwh} kWh")
        if kwh > _MAX_AWARD_KWH:
            # Held as a commitment, it would reach the planner as award_w (W): a finite but
            # absurd figure there overflows to inf and fails every plan for days.
            raise _Bad("out_of_range", f"award: {kwh} kWh above {_MAX_AWARD_KWH:.0f} kWh")
        sign = 1.0 if side == "sell" else -1.0 if side == "buy" else 0.0
        award = Award(iv, sign * kwh, None if math.isnan(price) else price, sign * amount)
        st = self.intervals.get(iv)
        if st is None:
            # Without the announce (lost with the database, or never received) the interval's
            # end is unknown, so the award can be neither planned nor metered: say so.
            self._bad(self.topic_award, "unknown_interval",
                      f"award for {iv}, an auction this gateway has no record of")
            return
        if st.award is not None:
            if st.award != award:
                raise _Bad("conflict", f"award of {iv} differs from the one received before "
                                       f"({st.award.export_kwh} kWh); keeping the first")
            self.stats.duplicates += 1
            return
        st.award = award
        self.stats.awards += 1
        log.info("market: award %s: %s %.3f kWh at %s", iv, award.side, abs(award.export_kwh),
                 award.price)
        self._save(iv)
        if self._award_hook is not None and st.a.delivery_end > now:
            self._award_hook()

    def _on_bid_result(self, doc: dict[str, Any], now: float) -> None:
        self._check_community(doc)
        self._check_site(doc)
        kind, status, code = _str(doc, "kind"), _str(doc, "status"), _str(doc, "code", _CODE)
        iv = doc.get("interval_id")
        reason = doc.get("reason")
        # Only shown (log, event): bounded, whatever the operator put there.
        reason = reprlib.repr(reason) if not isinstance(reason, str) else reason[:500]
        st = self.intervals.get(iv) if isinstance(iv, str) else None
        if not isinstance(iv, str):
            iv = reprlib.repr(iv)
        if kind == "bid":
            if st is not None and doc.get("bid_id") not in (None, st.bid_id):
                self.stats.duplicates += 1  # the answer to an older revision
                return
            if status == "accepted":
                self.stats.bids_accepted += 1
            else:
                self.stats.count(self.stats.bids_refused, code)
                log.warning("market: bid %s for %s refused: %s: %s",
                            reprlib.repr(doc.get("bid_id")), iv,
                            code, reason)
                self._event("warning", f"bid for {iv} refused: {code}: {reason}")
            if st is not None:
                st.bid_code = code
                self._save(st.a.interval_id)
        elif kind == "meter":
            if status != "accepted":
                self.stats.count(self.stats.meters_refused, code)
                log.info("market: meter for %s refused: %s: %s", iv, code, reason)
            if st is not None:
                st.meter_code = code
                if code in ("too_early", "not_cleared"):
                    st.meter_next = now + self.settings.retry_s
                    self._work.set()
                self._save(st.a.interval_id)
        else:
            raise _Bad("schema", f"field 'kind': {reprlib.repr(kind)}")

    def _on_settlement(self, doc: dict[str, Any]) -> None:
        self._check_community(doc)
        self._check_site(doc)
        iv = _str(doc, "interval_id", _INTERVAL)
        keys = ("feed_in", "retail", "awarded_export_kwh", "award_amount", "metered_export_kwh",
                "deviation_kwh", "deviation_amount", "total", "retailer_only", "settled_at")
        body: dict[str, float | None] = {k: _num(doc, k) for k in keys}
        price = _num(doc, "award_price", nullable=True)
        body["award_price"] = None if math.isnan(price) else price
        st = self.intervals.get(iv)
        if st is None:
            self._bad(self.topic_settlement, "unknown_interval",
                      f"settlement for {iv}, an interval this gateway has no record of")
            return
        if st.settlement == body:
            self.stats.duplicates += 1
            return
        st.settlement = body
        self.stats.settlements += 1
        log.info("market: settled %s: metered %.3f kWh, total %.4f", iv,
                 body["metered_export_kwh"], body["total"])
        self._save(iv)

    # ------------------------------------------------------------------ planner side

    def awards_for(self, start: float, n: int, step_s: float) -> list[float]:
        """``award_w`` for ``n`` planning steps from ``start`` (W average, + sold, - bought)."""
        held = [(s.a.delivery_start, s.a.delivery_end, s.award.export_kwh)
                for s in self.intervals.values() if s.award is not None]
        return award_profile(held, start, n, step_s)

    # ------------------------------------------------------------------ metering

    def observe(self, t: float, meter: MeterReading | None, integrated_import_wh: float,
                integrated_export_wh: float) -> None:
        """One control cycle's cumulative energy (called by the fast loop, cheap).

        Marks the net export counters (meter and integrated) at each delivery boundary by
        linear interpolation between the cycles around it.
        """
        m_imp = meter.import_wh if meter is not None else None
        m_exp = meter.export_wh if meter is not None else None
        cur = (t, m_imp, m_exp, integrated_import_wh, integrated_export_wh)
        prev, self._last = self._last, cur
        if prev is None or t <= prev[0]:
            return
        for st in self.intervals.values():
            for when, mark in ((st.a.delivery_start, st.start_mark),
                               (st.a.delivery_end, st.end_mark)):
                if not mark and prev[0] <= when <= t:
                    f = (when - prev[0]) / (t - prev[0])
                    if None not in (prev[1], prev[2], m_imp, m_exp):
                        a = prev[2] - prev[1]  # type: ignore[operator]
                        b = m_exp - m_imp  # type: ignore[operator]
                        mark["meter"] = a + f * (b - a)
                    a = prev[4] - prev[3]
                    b = integrated_export_wh - integrated_import_wh
                    mark["integrated"] = a + f * (b - a)
                    if mark is st.end_mark:
                        self._work.set()

    def metered_kwh(self, iv: str) -> tuple[float, str] | None:
        """Net export (kWh) over the interval and its source, once both ends are marked."""
        st = self.intervals.get(iv)
        if st is None:
            return None
        for src in ("meter", "integrated"):
            if src in st.start_mark and src in st.end_mark:
                return (st.end_mark[src] - st.start_mark[src]) / 1000.0, src
        return None

    # ------------------------------------------------------------------ the agent's task

    async def run(self, stop: asyncio.Event) -> None:
        """Bid, report meters and forget old intervals until ``stop`` is set."""
        while not stop.is_set():
            self._work.clear()
            now = self.clock.now()
            due = math.inf
            for iv, st in sorted(self.intervals.items()):
                due = min(due, await self._tend(iv, st, now))
            self._forget(now)
            await self.flush()
            timeout = None if math.isinf(due) else max(due - self.clock.now(), 0.0)
            await self._wait(stop, timeout)
        await self.flush()

    async def _wait(self, stop: asyncio.Event, domain_s: float | None) -> None:
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._work.wait()),
                                            asyncio.ensure_future(stop.wait())]
        if domain_s is not None:
            waits.append(asyncio.ensure_future(self.clock.sleep(domain_s)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _tend(self, iv: str, st: _Interval, now: float) -> float:
        """Do what is due for one interval; return when it next needs attention."""
        s = self.settings
        a = st.a
        last_bid = a.gate_closure - s.gate_margin_s
        if st.bid_id is None and now < last_bid:
            if now < st.bid_next:
                return st.bid_next
            await self._bid(iv, st)
            if st.bid_id is None:
                st.bid_next = self.clock.now() + s.retry_s
                return min(st.bid_next, last_bid)
        if st.award is None and st.bid_id is None:
            return math.inf  # no bid, nothing to settle with the market
        if st.settlement is not None or st.meter_code not in (None, "too_early",
                                                               "not_cleared"):
            return math.inf  # settled, or the operator's answer is final
        meter_at = a.delivery_end + s.meter_delay_s
        if now < max(meter_at, st.meter_next):
            return max(meter_at, st.meter_next)
        if st.meter_tries >= s.meter_tries:
            if st.meter_kwh is not None and not st.meter_given_up:
                # The operator is down (or never clears): stop sending, say so once. Reports
                # already queued in its broker session are still answered when it is back.
                st.meter_given_up = True
                self.stats.meters_unanswered += 1
                log.warning("market: %d meter reports for %s unanswered; not sent again (the "
                            "row keeps its provisional amount)", st.meter_tries, iv)
                self._event("warning", f"meter report for {iv} unanswered after "
                                       f"{st.meter_tries} tries; not sent again")
            return math.inf
        if st.meter_kwh is None:
            got = self.metered_kwh(iv)
            if got is None:
                if st.end_mark or now > a.delivery_end + 10 * s.retry_s:
                    # A boundary passed while the gateway was down or the meter silent.
                    log.warning("market: no metered energy for %s (gateway down or no "
                                "readings at a boundary); not reported", iv)
                    self._event("warning", f"no metered energy for {iv}")
                    st.meter_tries = s.meter_tries
                    return math.inf
                return now + s.retry_s
            st.meter_kwh = round(got[0], 3)
            log.info("market: metered %s: %.3f kWh net export (%s)", iv, st.meter_kwh, got[1])
        # (Re)send the same reading: the operator settles once and answers a repeat "ok".
        st.meter_code = None
        st.meter_tries += 1
        st.meter_next = now + s.retry_s
        self._send(self.topic_meter, {"v": VERSION, "community": self.community,
                                      "interval_id": iv, "site": self.site,
                                      "net_export_kwh": st.meter_kwh})
        self.stats.meters_sent += 1
        await self._persist(iv, st)
        return st.meter_next

    async def _bid(self, iv: str, st: _Interval) -> None:
        a = st.a
        if self.bidder is None:
            got: Curve | str = "no planner: nothing to bid from"
        else:
            try:
                got = await self.bidder(a)
            except Exception as e:  # a failed solve or a bug: no bid, said once
                log.debug("market: bidder failed", exc_info=True)
                got = f"bid curve failed: {e!r}"
        now = self.clock.now()
        if isinstance(got, str):
            self.stats.no_plan += 1
            if not st.no_plan_said:
                st.no_plan_said = True
                log.warning("market: no bid for %s yet: %s", iv, got)
                self._event("warning", f"no bid for {iv} yet: {got}")
            return
        if now >= a.gate_closure - self.settings.gate_margin_s:
            self.stats.no_plan += 1
            log.warning("market: bid for %s ready too close to the gate; not sent", iv)
            st.bid_id = ""  # do not try again
            return
        buy, sell = curve_to_steps(got.prices, got.net_export_wh)
        seq = int(now * 1000)
        st.seq = seq
        st.bid_id = f"{iv}-{seq}"
        st.bid = {"v": VERSION, "community": self.community, "interval_id": iv,
                  "site": self.site, "bid_id": st.bid_id, "seq": seq, "buy": buy, "sell": sell}
        self.stats.bids_built += 1
        if not buy and not sell:
            self.stats.bids_empty += 1
        self._send(self.topic_bids, st.bid)
        self.stats.bids_sent += 1
        log.info("market: bid %s: buy %s sell %s %s", st.bid_id, buy, sell, got.note)
        await self._persist(iv, st)

    def _forget(self, now: float) -> None:
        for iv in [iv for iv, st in self.intervals.items()
                   if st.a.delivery_end < now - _KEEP_S]:
            del self.intervals[iv]

    # ------------------------------------------------------------------ ledger

    def row(self, iv: str) -> dict[str, Any]:
        """The ``market`` table row of interval ``iv`` (everything known so far)."""
        st = self.intervals[iv]
        a = st.a
        r: dict[str, Any] = {
            "community": self.community, "interval_id": iv, "site": self.site,
            "delivery_start": a.delivery_start, "delivery_end": a.delivery_end,
            "gate_closure": a.gate_closure, "price_floor": a.price_floor,
            "price_cap": a.price_cap, "bid_id": st.bid_id or None, "bid_seq": st.seq,
            "bid": None if st.bid is None else json.dumps(st.bid, separators=(",", ":")),
            "bid_code": st.bid_code,
            "award_export_kwh": None if st.award is None else st.award.export_kwh,
            "award_price": None if st.award is None else st.award.price,
            "award_amount": None if st.award is None else st.award.amount,
            "metered_export_kwh": st.meter_kwh, "meter_code": st.meter_code,
            "settlement": None if st.settlement is None else json.dumps(st.settlement),
            "total": None, "deviation_kwh": None, "deviation_amount": None, "provisional": None,
            "updated_ts": round(self.clock.now(), 3),
        }
        if st.settlement is not None:
            r["total"] = st.settlement["total"]
            r["deviation_kwh"] = st.settlement["deviation_kwh"]
            r["deviation_amount"] = st.settlement["deviation_amount"]
            r["provisional"] = 0
        elif st.award is not None and st.meter_kwh is not None:
            dev, dev_amount, total = provisional_total(
                st.award.export_kwh, st.award.amount, st.meter_kwh, a.price_floor, a.price_cap)
            r.update(total=total, deviation_kwh=dev, deviation_amount=dev_amount, provisional=1)
        return r

    def _save(self, iv: str) -> None:
        # From the (synchronous) message handler: the write happens on the agent's task.
        self._dirty.add(iv)
        self._work.set()

    async def _persist(self, iv: str, st: _Interval) -> None:
        self._dirty.add(iv)
        await self.flush()

    async def flush(self) -> None:
        """Write every changed interval to the store (errors counted; retried next time)."""
        if self.persist is None:
            self._dirty.clear()
            return
        for iv in sorted(self._dirty):
            # Unmarked before the write: a message arriving during it marks the row again.
            self._dirty.discard(iv)
            if iv not in self.intervals:
                continue
            try:
                await self.persist(self.row(iv))
            except Exception as e:
                self._dirty.add(iv)
                self.stats.persist_errors += 1
                log.error("market: ledger row %s not written: %s", iv, e)
                return

    def restore(self, rows: Sequence[dict[str, Any]], now: float) -> int:
        """Resume from stored ``market`` rows of this community: awards (commitments), bids
        already sent, meter reports still due. Returns the number of intervals restored."""
        n = 0
        for r in rows:
            try:
                if r.get("community") != self.community:
                    continue
                a = Announce(self.community, str(r["interval_id"]), float(r["delivery_start"]),
                             float(r["delivery_end"]), float(r["gate_closure"]),
                             float(r["price_floor"]), float(r["price_cap"]), "uniform", None)
                if a.delivery_end < now - _KEEP_S:
                    continue
                st = _Interval(a)
                st.bid_id = r.get("bid_id")
                st.seq = r.get("bid_seq")
                st.bid = json.loads(r["bid"]) if r.get("bid") else None
                st.bid_code = r.get("bid_code")
                if r.get("award_export_kwh") is not None:
                    st.award = Award(a.interval_id, float(r["award_export_kwh"]),
                                     r.get("award_price"), float(r["award_amount"] or 0.0))
                st.meter_kwh = r.get("metered_export_kwh")
                st.meter_code = r.get("meter_code")
                st.settlement = json.loads(r["settlement"]) if r.get("settlement") else None
            except (KeyError, TypeError, ValueError) as e:
                log.error("market: stored row %r unusable: %s", r.get("interval_id"), e)
                continue
            self.intervals[a.interval_id] = st
            n += 1
        if n:
            log.info("market: restored %d interval(s) from the ledger", n)
            self._work.set()
        return n


# --------------------------------------------------------------------------------------------
# The daemon's bidder: the planner's last inputs, on the planning thread, within the envelope


def plan_bidder(gw: Gateway, settings: MarketSettings) -> Bidder:
    """A :data:`Bidder` over the slow loop's last plan inputs (see the module docstring)."""

    async def bid(a: Announce) -> Curve | str:
        from gateway.planner import Planner, in_plan_thread

        planner = gw.planner
        if not isinstance(planner, Planner) or planner.last is None:
            return "no plan yet"
        res = planner.last
        start = res.start
        if not math.isfinite(start):
            return "the plan has no start time"
        prices = a.price_grid(settings.prices)
        curve = await in_plan_thread(interval_curve, res.inputs, start, a.delivery_start,
                                     a.delivery_end, prices, settings.time_limit_s,
                                     planner.solver)
        # The envelope as held now may be tighter than when the plan was made.
        span = a.delivery_end - a.delivery_start
        lim = gw.limits_for_horizon(a.delivery_start, 1, span)
        if lim is not None:
            h = span / 3600.0
            curve = clip_curve(curve, float(lim.export_w[0]) * h, float(lim.import_w[0]) * h)
        return Curve(curve.prices, curve.net_export_wh,
                     f"(plan {res.plan.source} from {start:.0f})")

    return bid


def awards_array(agent: MarketAgent, start: float, n: int, step_s: float
                 ) -> npt.NDArray[np.float64]:
    """:meth:`MarketAgent.awards_for` as a numpy array (for ``PlanInputs.award_w``)."""
    import numpy as np

    return np.asarray(agent.awards_for(start, n, step_s), dtype=np.float64)


def settings_from(cfg: Any) -> MarketSettings:
    """:class:`MarketSettings` from a :class:`gateway.config.MarketConfig`."""
    return MarketSettings(community=cfg.community, prices=cfg.prices,
                          price_floor=cfg.price_floor, price_cap=cfg.price_cap,
                          gate_margin_s=cfg.gate_margin_s, retry_s=cfg.retry_s,
                          meter_delay_s=cfg.meter_delay_s, time_limit_s=cfg.time_limit_s,
                          bid_spread_s=cfg.bid_spread_s)


def make_agent(gw: Gateway) -> MarketAgent:
    """The daemon's agent: bids from the planner, ledger rows through the store's thread."""
    settings = settings_from(gw.cfg.market)

    async def persist(row: dict[str, Any]) -> None:
        if gw.store is not None:
            await gw._in_db(gw.store.market_upsert, row)

    return MarketAgent(gw.cfg.site_id, settings, gw.clock, root=gw.cfg.mqtt.topic_root,
                       bidder=plan_bidder(gw, settings), persist=persist, on_event=gw.event,
                       on_award=gw.replan.set)
