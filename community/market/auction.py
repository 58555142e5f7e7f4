"""From the stored bids of one auction to its published result and per-site awards. Pure.

The steps of every bid go to :func:`community.clearing.clear` in acceptance order: bid ``order``
(the order in which the ledger accepted the sites' current bids) then step index, buy steps before
sell steps. That order is the ``seq`` tie-breaker of the clearing's pro-rata rule, so leftover Wh
at the marginal price go to the earlier bid, and the outcome depends only on what was stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from community.clearing import BUY, SELL, WH_PER_KWH, BidSteps, Clearing, clear
from community.market.messages import VERSION, energy, money
from community.market.schedule import Auction


@dataclass(frozen=True)
class StoredBid:
    """A site's current bid for an auction, as the ledger holds it."""

    site: str
    bid_id: str
    order: int
    buy: tuple[tuple[float, float], ...]
    sell: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SiteAward:
    """A site's net award. ``net_wh``: + bought / - sold; ``net_amount``: + paid / - received."""

    site: str
    net_wh: int
    net_amount: float

    @property
    def side(self) -> str:
        return "buy" if self.net_wh > 0 else "sell" if self.net_wh < 0 else "none"

    @property
    def kwh(self) -> float:
        return abs(self.net_wh) / WH_PER_KWH

    @property
    def amount(self) -> float:
        return abs(self.net_amount)

    @property
    def price(self) -> float | None:
        return self.amount / self.kwh if self.net_wh else None

    @property
    def export_kwh(self) -> float:
        """+ sold / - bought (the settlement's sign)."""
        return -self.net_wh / WH_PER_KWH

    @property
    def credit(self) -> float:
        """+ received / - paid (the settlement's sign)."""
        return -self.net_amount


@dataclass(frozen=True)
class Outcome:
    """What clearing one auction produced: payloads to publish and awards to store."""

    result: dict[str, Any]
    awards: dict[str, SiteAward]
    clearing: Clearing | None

    def award_payload(self, auction: Auction, site: str) -> dict[str, Any]:
        """Payload of ``award/<site>``."""
        a = self.awards[site]
        price = a.price
        return {"v": VERSION, "community": auction.community, "interval_id": auction.interval_id,
                "site": site, "side": a.side, "kwh": energy(a.kwh),
                "price": None if price is None else money(price), "amount": money(a.amount)}


def to_steps(bids: Sequence[StoredBid]) -> BidSteps | None:
    """The clearing input of ``bids`` (None when there is no step at all)."""
    site: list[str] = []
    bid: list[str] = []
    side: list[int] = []
    price: list[float] = []
    qty: list[float] = []
    for b in sorted(bids, key=lambda b: (b.order, b.site)):
        for s, curve in ((BUY, b.buy), (SELL, b.sell)):
            for p, q in curve:
                site.append(b.site)
                bid.append(b.bid_id)
                side.append(s)
                price.append(p)
                qty.append(q)
    if not side:
        return None
    return BidSteps.from_kwh(site=np.array(site), bid=np.array(bid), side=side, price=price,
                             quantity_kwh=qty, seq=np.arange(len(side)))


def clear_auction(auction: Auction, bids: Sequence[StoredBid], cleared_at: float,
                  k: float = 0.5) -> Outcome:
    """Clear ``auction`` over ``bids`` (already validated against its bounds)."""
    steps = to_steps(bids)
    awards: dict[str, SiteAward] = {}
    c: Clearing | None = None
    if steps is not None:
        c = clear(steps, floor=auction.price_floor, cap=auction.price_cap,
                  mechanism=auction.mechanism, k=k)
        for s, wh, amt in zip(c.sites.tolist(), c.site_net_wh.tolist(),
                              c.site_net_amount.tolist(), strict=True):
            awards[str(s)] = SiteAward(site=str(s), net_wh=int(wh), net_amount=float(amt))
    buyers = c.buyers_pay if c else 0.0
    sellers = c.sellers_receive if c else 0.0
    result = {
        "v": VERSION, "community": auction.community, "interval_id": auction.interval_id,
        "mechanism": auction.mechanism,
        "clearing_price": None if c is None or c.price is None else c.price,
        "price_low": None if c is None or c.price_low is None else c.price_low,
        "price_high": None if c is None or c.price_high is None else c.price_high,
        "volume_kwh": energy(c.volume_kwh if c else 0.0),
        "bids": len(awards),
        "trades": sum(1 for a in awards.values() if a.net_wh),
        "buyers_pay": money(buyers), "sellers_receive": money(sellers),
        "operator_surplus": money(buyers - sellers), "cleared_at": round(cleared_at, 3),
    }
    return Outcome(result=result, awards=awards, clearing=c)


def void_auction(auction: Auction, bids: Sequence[StoredBid], cleared_at: float) -> Outcome:
    """``auction`` cancelled: nothing trades and every site that bid gets a ``none`` award.

    For an auction cleared too late to be delivered (the operator was down at its gate and came
    back after its delivery began): an award a site learns of after the fact could not be
    planned, yet its deviation would be settled at the retail price. With no trade, every site
    settles its metered energy with the retailer alone, as exchanges cancel an auction whose
    results cannot be published before delivery.
    """
    out = clear_auction(auction, (), cleared_at)
    awards = {b.site: SiteAward(site=b.site, net_wh=0, net_amount=0.0) for b in bids}
    return Outcome(result={**out.result, "bids": len(awards)}, awards=awards, clearing=None)
