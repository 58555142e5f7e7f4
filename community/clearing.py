"""Double-auction clearing of one delivery interval: a pure function over arrays of bid steps.

No I/O, no clock, no MQTT: the market operator validates and collects the steps of every bid and
offer, then calls :func:`clear` once per delivery interval.

Input
-----
A :class:`BidSteps` holds one row per price-quantity *step* (a bid or offer curve is several
steps): ``site`` (member id, any sortable dtype), ``bid`` (the caller's bid id, carried through and
never used for clearing), ``side`` (:data:`BUY` = +1, :data:`SELL` = -1, matching the site sign
convention "+ import"), ``price`` (currency per kWh), ``quantity_wh`` (int Wh; see
:meth:`BidSteps.from_kwh`) and ``seq`` (submission sequence number, unique per step: the
deterministic tie-breaker). Result arrays are aligned with the input rows.

Quantities are integers in Wh so that cleared supply equals cleared demand *exactly*;
:meth:`BidSteps.from_kwh` rounds kWh to the nearest Wh (half to even), so resolution below 1 Wh is
lost and a step of less than 0.5 Wh becomes a zero-quantity step (never filled).

Rules (the documented contract)
-------------------------------
1. **Bounds.** Every price must lie in ``[floor, cap]`` (floor = feed-in tariff, cap = retail
   import price). The operator rejects out-of-range steps before clearing; :func:`clear` raises
   ``ValueError`` naming the first offending step if it is given any. Prices are compared exactly
   (no rounding): two steps tie only if their prices are equal floats.
2. **Merit order.** Buy steps are sorted by price descending, sell steps by price ascending
   (``seq`` ascending within equal prices, which only matters for rule 5). Zero-quantity steps
   take no part.
3. **Volume.** The cleared volume ``Q`` is the largest volume at which the demand curve's price is
   still >= the supply curve's price (Wh resolution). This is the efficient (surplus-maximising)
   volume; there is no trade when the best buy price is below the best sell price.
4. **Uniform price** (pay-as-clear). Every price in the interval ``[lo, hi]`` with
   ``lo = max(marginal accepted sell price, best rejected buy price)`` and
   ``hi = min(marginal accepted buy price, best rejected sell price)`` clears the market at ``Q``
   (every accepted step is willing to trade at it, no rejected step strictly wants to). The
   clearing price is the k-double-auction point ``p = lo + k * (hi - lo)``, ``k`` in [0, 1],
   default 0.5 (midpoint); ``k = 1`` favours sellers, ``k = 0`` buyers. ("Marginal accepted" is
   the step holding the last cleared Wh; a missing rejected side contributes nothing.) All fills
   trade at ``p``. Consequence: a step is partially filled only if its price equals ``p``.
5. **Ties and partial fills.** Steps priced strictly better than the marginal price are filled in
   full. The steps *at* the marginal price (all of them, whatever their ``seq``) share what is
   left, ``R`` Wh, pro-rata to their quantities by the largest-remainder method in integer Wh:
   each gets ``floor(R * q_i / T)`` (``T`` = their total quantity); the few Wh left over go one
   each to the largest remainders ``(R * q_i) mod T``, ties broken by the lowest ``seq``. The same
   rule applies on each side independently. No dict or hash order is involved anywhere: the
   result depends only on the multiset of steps, not on their row order (totals are summed in
   ``seq`` order / exactly, so even float totals are reproducible).
6. **Pay-as-bid** (option). Same volume and fills as rule 3-5; each filled buy step pays its own
   bid price and each filled sell step receives its own offer price. The operator keeps the
   difference (``Clearing.surplus`` >= 0, reported). ``Clearing.price`` still reports the
   uniform reference price of rule 4, for publication.

Limits: each side's total quantity must stay below 2**31 Wh (~2.1 GWh per interval) so that the
integer pro-rata arithmetic cannot overflow int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

BUY = 1
SELL = -1
WH_PER_KWH = 1000
MAX_SIDE_WH = 2**31 - 1

Mechanism = Literal["uniform", "pay_as_bid"]
MECHANISMS: tuple[str, ...] = get_args(Mechanism)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _bad(mask: npt.NDArray[np.bool_], what: str, values: npt.NDArray[Any] | None = None) -> None:
    """Raise one ValueError naming the first step where ``mask`` holds (and how many do)."""
    bad = np.flatnonzero(mask)
    if bad.size:
        i = int(bad[0])
        shown = f" ({values[i].item()!r})" if values is not None else ""
        more = f"; {bad.size} steps in all" if bad.size > 1 else ""
        raise ValueError(f"step {i}: {what}{shown}{more}")


def _as_int(name: str, a: npt.ArrayLike) -> IntArray:
    arr = np.asarray(a)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" or arr.size == 0:
        f = arr.astype(np.float64)
        _bad(~np.isfinite(f), f"{name} is not finite", f)
        _bad(f != np.round(f), f"{name} is not an integer", f)
        return f.astype(np.int64)
    raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")


@dataclass(frozen=True, eq=False)
class BidSteps:
    """The price-quantity steps of one delivery interval, one row per step (see module doc).

    Construction checks the structure (equal 1-D lengths, side in {BUY, SELL}, finite prices,
    integer quantities >= 0, unique ``seq``, side totals < 2**31 Wh) and raises ``ValueError``
    naming the first bad step. The price bounds are checked by :func:`clear`.
    """

    site: npt.NDArray[Any]
    bid: npt.NDArray[Any]
    side: IntArray
    price: FloatArray
    quantity_wh: IntArray
    seq: IntArray

    def __post_init__(self) -> None:
        arrays = {
            "site": np.asarray(self.site),
            "bid": np.asarray(self.bid),
            "side": _as_int("side", self.side),
            "price": np.asarray(self.price, dtype=np.float64),
            "quantity_wh": _as_int("quantity_wh", self.quantity_wh),
            "seq": _as_int("seq", self.seq),
        }
        n = arrays["side"].shape[0] if arrays["side"].ndim == 1 else -1
        for name, arr in arrays.items():
            if arr.ndim != 1 or arr.shape[0] != n:
                raise ValueError(
                    f"{name}: expected a 1-D array of {n} steps, got shape {arr.shape}"
                )
            object.__setattr__(self, name, arr)
        side, price, qty, seq = self.side, self.price, self.quantity_wh, self.seq
        _bad((side != BUY) & (side != SELL), "side must be BUY (+1) or SELL (-1)", side)
        _bad(~np.isfinite(price), "price is not finite", price)
        _bad(qty < 0, "quantity is negative", qty)
        for s, label in ((BUY, "buy"), (SELL, "sell")):
            total = int(qty[side == s].sum(dtype=np.int64)) if n else 0
            if total > MAX_SIDE_WH:
                raise ValueError(
                    f"total {label} quantity {total} Wh exceeds the limit of {MAX_SIDE_WH} Wh"
                )
        if n > 1:
            order = np.argsort(seq, kind="stable")
            dup = np.zeros(n, dtype=bool)
            dup[order[1:]] = seq[order[1:]] == seq[order[:-1]]
            _bad(dup, "seq is not unique", seq)

    def __len__(self) -> int:
        return int(self.side.shape[0])

    @classmethod
    def from_kwh(
        cls,
        *,
        site: npt.ArrayLike,
        bid: npt.ArrayLike,
        side: npt.ArrayLike,
        price: npt.ArrayLike,
        quantity_kwh: npt.ArrayLike,
        seq: npt.ArrayLike,
    ) -> BidSteps:
        """Build from quantities in kWh, rounded to the nearest Wh (half to even)."""
        q = np.asarray(quantity_kwh, dtype=np.float64)
        _bad(~np.isfinite(q), "quantity is not finite", q)
        _bad(q < 0, "quantity is negative", q)
        _bad(q * WH_PER_KWH > MAX_SIDE_WH, "quantity is too large", q)
        qty = np.rint(q * WH_PER_KWH).astype(np.int64)
        return cls(
            site=np.asarray(site),
            bid=np.asarray(bid),
            side=np.asarray(side),
            price=np.asarray(price, dtype=np.float64),
            quantity_wh=qty,
            seq=np.asarray(seq),
        )


@dataclass(frozen=True, eq=False)
class Clearing:
    """Outcome of one auction. Per-step arrays are aligned with the input rows.

    ``price``/``price_low``/``price_high`` are None when nothing trades. ``step_price`` is the
    price a filled step pays (buy) or receives (sell), NaN for unfilled steps; ``amount`` is that
    money (>= 0 on both sides, 0 if unfilled). Per-site arrays follow ``sites`` (sorted unique
    ids of every submitting site): ``site_net_wh`` is + bought / - sold, ``site_net_amount``
    + paid / - received.
    """

    mechanism: Mechanism
    price: float | None
    price_low: float | None
    price_high: float | None
    volume_wh: int
    fill_wh: IntArray
    step_price: FloatArray
    amount: FloatArray
    sites: npt.NDArray[Any]
    site_net_wh: IntArray
    site_net_amount: FloatArray
    buyers_pay: float
    sellers_receive: float

    @property
    def volume_kwh(self) -> float:
        """Cleared volume in kWh."""
        return self.volume_wh / WH_PER_KWH

    @property
    def fill_kwh(self) -> FloatArray:
        """Per-step filled quantity in kWh."""
        return self.fill_wh / WH_PER_KWH

    @property
    def site_net_kwh(self) -> FloatArray:
        """Per-site net award in kWh (+ bought, - sold)."""
        return self.site_net_wh / WH_PER_KWH

    @property
    def surplus(self) -> float:
        """Operator surplus: what buyers pay minus what sellers receive (0 under uniform price,
        up to float rounding; >= 0 under pay-as-bid)."""
        return self.buyers_pay - self.sellers_receive


def _allocate(qty: IntArray, cum: IntArray, a: int, e: int, volume: int, seq: IntArray) -> IntArray:
    """Fill sorted steps up to ``volume``: [0, a) in full, tie block [a, e) pro-rata (rule 5)."""
    fill = np.zeros_like(qty)
    fill[:a] = qty[:a]
    rest = volume - (int(cum[a - 1]) if a else 0)
    group = qty[a:e]
    total = int(cum[e - 1]) - (int(cum[a - 1]) if a else 0)
    if rest >= total:
        fill[a:e] = group
        return fill
    num = rest * group  # < 2**62: rest, group < 2**31
    share = num // total
    remainder = num % total
    left = rest - int(share.sum())
    if left:
        # Largest remainder first, then lowest seq: a total, order-independent ranking.
        winners = np.lexsort((seq[a:e], -remainder))[:left]
        share[winners] += 1
    fill[a:e] = share
    return fill


def clear(
    steps: BidSteps,
    *,
    floor: float,
    cap: float,
    mechanism: Mechanism = "uniform",
    k: float = 0.5,
) -> Clearing:
    """Clear one delivery interval by a double auction (rules 1-6 of the module docstring).

    ``floor``/``cap``: the price bounds (feed-in tariff, retail import price), currency per kWh.
    ``mechanism``: "uniform" (pay-as-clear) or "pay_as_bid". ``k``: position of the uniform price
    in the clearing interval [lo, hi]. Raises ValueError on bad arguments or an out-of-range price,
    naming the first offending step.
    """
    if not (math.isfinite(floor) and math.isfinite(cap)) or floor > cap:
        raise ValueError(f"price bounds must be finite with floor <= cap, got [{floor}, {cap}]")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not (0.0 <= k <= 1.0):
        raise ValueError(f"k must be in [0, 1], got {k}")
    side, price, qty, seq = steps.side, steps.price, steps.quantity_wh, steps.seq
    _bad(price < floor, f"price is below the floor {floor}", price)
    _bad(price > cap, f"price is above the cap {cap}", price)

    n = len(steps)
    live = qty > 0
    buy_rows = np.flatnonzero((side == BUY) & live)
    sell_rows = np.flatnonzero((side == SELL) & live)
    b = buy_rows[np.lexsort((seq[buy_rows], -price[buy_rows]))]
    s = sell_rows[np.lexsort((seq[sell_rows], price[sell_rows]))]
    pb, ps = price[b], price[s]
    qb, qs = qty[b], qty[s]
    demand, supply = np.cumsum(qb), np.cumsum(qs)

    volume = 0
    if b.size and s.size:
        # Largest x with demand price >= supply price: on buy step i the supply priced <= pb[i]
        # bounds the volume, so Q = max_i min(D_i, S(<= pb_i)) (both curves are monotone).
        supply_le = np.concatenate(([0], supply))[np.searchsorted(ps, pb, side="right")]
        volume = int(np.minimum(demand, supply_le).max())

    fill = np.zeros(n, dtype=np.int64)
    clearing_price: float | None = None
    lo: float | None = None
    hi: float | None = None
    if volume > 0:
        ib = int(np.searchsorted(demand, volume, side="left"))
        is_ = int(np.searchsorted(supply, volume, side="left"))
        buy_margin, sell_margin = float(pb[ib]), float(ps[is_])
        jb = int(np.searchsorted(demand, volume, side="right"))
        js = int(np.searchsorted(supply, volume, side="right"))
        next_buy = float(pb[jb]) if jb < pb.size else -math.inf
        next_sell = float(ps[js]) if js < ps.size else math.inf
        lo = max(sell_margin, next_buy)
        hi = min(buy_margin, next_sell)
        # Clamp: lo + 1.0 * (hi - lo) may round one ulp past hi.
        clearing_price = min(max(lo + k * (hi - lo), lo), hi)

        neg = -pb
        ab = int(np.searchsorted(neg, -buy_margin, side="left"))
        eb = int(np.searchsorted(neg, -buy_margin, side="right"))
        as_ = int(np.searchsorted(ps, sell_margin, side="left"))
        es = int(np.searchsorted(ps, sell_margin, side="right"))
        fill[b] = _allocate(qb, demand, ab, eb, volume, seq[b])
        fill[s] = _allocate(qs, supply, as_, es, volume, seq[s])

    filled = fill > 0
    if mechanism == "uniform" and clearing_price is not None:
        step_price = np.where(filled, clearing_price, np.nan)
    else:
        step_price = np.where(filled, price, np.nan)
    amount = np.where(filled, fill * np.where(filled, step_price, 0.0) / WH_PER_KWH, 0.0)

    # Per-site sums accumulate in seq order so float results do not depend on row order.
    canon = np.argsort(seq, kind="stable")
    sites, inverse = np.unique(steps.site, return_inverse=True)
    inv = inverse.reshape(-1)[canon]
    net_wh = np.bincount(inv, weights=(side * fill)[canon], minlength=sites.size)
    net_amount = np.bincount(inv, weights=(side * amount)[canon], minlength=sites.size)
    return Clearing(
        mechanism=mechanism,
        price=clearing_price,
        price_low=lo,
        price_high=hi,
        volume_wh=volume,
        fill_wh=fill,
        step_price=step_price,
        amount=amount,
        sites=sites,
        site_net_wh=np.rint(net_wh).astype(np.int64),  # exact: |sums| < 2**31
        site_net_amount=net_amount.astype(np.float64),
        buyers_pay=math.fsum(amount[side == BUY].tolist()),
        sellers_receive=math.fsum(amount[side == SELL].tolist()),
    )
