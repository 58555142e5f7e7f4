"""The auction calendar: one auction per delivery interval, gate closure a lead time before it.

Pure: no clock, no I/O. Delivery intervals are aligned to multiples of ``interval_s`` since the
Unix epoch (so every operator instance, and every restart, computes the same calendar), and are
named by their UTC start, e.g. ``20260621T101500Z``.

Exactly one auction is open at any time: the earliest interval whose gate closure is still in the
future. It opens when its predecessor's gate closes, so its bidding window is ``interval_s`` long.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from community.clearing import MECHANISMS, Mechanism


@dataclass(frozen=True)
class Auction:
    """One auction: the delivery interval it trades, its gate closure and its price bounds.

    ``price_floor`` is the feed-in tariff and ``price_cap`` the retail import price (currency per
    kWh); both also price deviations at settlement. ``members`` is None for an open community.
    Times are Unix seconds of domain time.
    """

    community: str
    interval_id: str
    delivery_start: float
    delivery_end: float
    gate_closure: float
    price_floor: float
    price_cap: float
    mechanism: Mechanism
    members: tuple[str, ...] | None = None


def interval_id(start: float) -> str:
    """The id of the delivery interval starting at ``start`` (UTC, second resolution)."""
    return datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class Calendar:
    """The fixed parameters of a community's auctions (validated on construction)."""

    community: str
    interval_s: int
    gate_lead_s: float
    price_floor: float
    price_cap: float
    mechanism: Mechanism = "uniform"
    members: Collection[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.interval_s, int) or self.interval_s < 1:
            raise ValueError(f"interval_s must be a whole number of seconds >= 1, "
                             f"got {self.interval_s!r}")
        if not (math.isfinite(self.gate_lead_s) and self.gate_lead_s >= 0):
            raise ValueError(f"gate_lead_s must be finite and >= 0, got {self.gate_lead_s!r}")
        if not (math.isfinite(self.price_floor) and math.isfinite(self.price_cap)
                and self.price_floor <= self.price_cap):
            raise ValueError(f"prices must be finite with floor <= cap, got "
                             f"[{self.price_floor}, {self.price_cap}]")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not self.community or "/" in self.community or "+" in self.community \
                or "#" in self.community:
            raise ValueError(f"community must be a non-empty MQTT topic level, "
                             f"got {self.community!r}")
        if self.members is not None:
            object.__setattr__(self, "members", tuple(sorted(set(self.members))))

    def auction(self, start: float) -> Auction:
        """The auction of the delivery interval starting at ``start``."""
        members = None if self.members is None else tuple(self.members)
        return Auction(
            community=self.community, interval_id=interval_id(start),
            delivery_start=float(start), delivery_end=float(start + self.interval_s),
            gate_closure=float(start - self.gate_lead_s), price_floor=self.price_floor,
            price_cap=self.price_cap, mechanism=self.mechanism, members=members)

    def open_auction(self, now: float) -> Auction:
        """The auction open at ``now``: the first interval whose gate closure is after ``now``."""
        k = math.floor((now + self.gate_lead_s) / self.interval_s) + 1
        return self.auction(k * self.interval_s)
