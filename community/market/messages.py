"""The market's MQTT contract: topics, payload builders, and validation of what sites send.

Schemas live in ``community/schemas/market_*.json`` and are checked by the small validator of
:mod:`gateway.messages` (which refuses any schema keyword it does not implement). What a schema
cannot say (step pairs, monotone curves, price bounds of *this* auction, membership, gate
closure) is checked here and in the operator, each failure with its own :data:`REJECTION_CODES`
code, so that a site (and a counter) can tell what was wrong.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from community.market.schedule import Auction
from gateway.messages import _check_keywords, _validate, dumps

VERSION = 1
ROOT = "hems/v1/market"
MAX_PAYLOAD_BYTES = 16 * 1024
MAX_STEPS = 64
MAX_SIDE_KWH = 100_000.0  # per site, per side, per interval: far above any home, far below
#                           the clearing's 2**31 Wh side limit even for thousands of sites.

SCHEMA_NAMES = ("market_announce", "market_bid", "market_bid_result", "market_result",
                "market_award", "market_meter", "market_settlement")

# code -> meaning (the contract doc lists the same table).
REJECTION_CODES: dict[str, str] = {
    "oversize": "payload larger than the operator's limit",
    "malformed": "not UTF-8 JSON",
    "non_finite": "a number is NaN or infinite",
    "schema": "missing/extra field, wrong type or version",
    "site_mismatch": "payload site differs from the topic's site",
    "wrong_community": "payload community is not this market's",
    "not_member": "site is not a member of the community",
    "unknown_interval": "interval_id is not an announced auction",
    "gate_closed": "received at or after gate closure (or the interval is already cleared)",
    "bad_step": "a step is not a [price, kWh] pair of numbers, or too many steps",
    "negative_quantity": "a step quantity is below 0",
    "quantity_too_large": "a side's total quantity exceeds the operator's limit",
    "price_out_of_bounds": "a price is outside [price_floor, price_cap]",
    "non_monotone": "buy prices rise or sell prices fall along the curve",
    "crossing": "the site's own highest buy price is above its lowest sell price",
    "stale_seq": "a bid with a higher seq is already stored",
    "not_cleared": "meter for an interval that is not cleared yet",
    "too_early": "meter sent before the delivery interval ended",
    "already_settled": "a different meter value was already settled for this interval",
    "internal": "the operator failed to process the message (logged)",
}


@dataclass(frozen=True)
class MarketTopics:
    """Topic tree of one community: ``hems/v1/market/<community>/...``."""

    community: str
    root: str = ROOT

    @property
    def base(self) -> str:
        return f"{self.root}/{self.community}"

    @property
    def announce(self) -> str:
        return f"{self.base}/announce"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    def bids(self, site: str = "+") -> str:
        return f"{self.base}/bids/{site}"

    def bid_result(self, site: str) -> str:
        return f"{self.base}/bid_result/{site}"

    def award(self, site: str) -> str:
        return f"{self.base}/award/{site}"

    def meter(self, site: str = "+") -> str:
        return f"{self.base}/meter/{site}"

    def settlement(self, site: str) -> str:
        return f"{self.base}/settlement/{site}"

    def site_of(self, topic: str, kind: str) -> str | None:
        """``s1`` for ``<base>/<kind>/s1``; None if ``topic`` is not a ``kind`` topic."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            return None
        site = topic[len(prefix):]
        return site if site and "/" not in site else None


# --------------------------------------------------------------------------------------------
# Schemas


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """The parsed schema ``community/schemas/<name>.json`` (checked for unsupported keywords)."""
    text = resources.files("community").joinpath("schemas", f"{name}.json").read_text("utf-8")
    s: dict[str, Any] = json.loads(text)
    _check_keywords(s, name)
    return s


def validate(name: str, value: Any) -> list[str]:
    """Problems of ``value`` against schema ``name``; empty when valid."""
    errors: list[str] = []
    _validate(schema(name), value, "", errors)
    return errors


# --------------------------------------------------------------------------------------------
# Decoding what sites send


@dataclass(frozen=True)
class Rejection:
    """Why an input was refused: a counter-friendly ``code`` and a sentence naming the field."""

    code: str
    reason: str

    def __post_init__(self) -> None:
        assert self.code in REJECTION_CODES, self.code


@dataclass(frozen=True)
class Bid:
    """A structurally valid bid (curves not yet checked against an auction)."""

    community: str
    interval_id: str
    site: str
    bid_id: str
    seq: int | None
    buy: tuple[tuple[float, float], ...]
    sell: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Meter:
    """A structurally valid meter reading."""

    community: str
    interval_id: str
    site: str
    net_export_kwh: float


_FLOAT_MAX = 1.7976931348623157e308


def _non_finite(v: Any, path: str = "") -> Iterator[str]:
    if isinstance(v, float) and not math.isfinite(v):
        yield path or "payload"
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > _FLOAT_MAX:
        yield path or "payload"  # a JSON integer no float can hold (float() would raise)
    elif isinstance(v, dict):
        for k, item in v.items():
            yield from _non_finite(item, f"{path}.{k}" if path else str(k))
    elif isinstance(v, list):
        for i, item in enumerate(v):
            yield from _non_finite(item, f"{path}[{i}]")


def decode(raw: bytes, schema_name: str, max_bytes: int = MAX_PAYLOAD_BYTES
           ) -> dict[str, Any] | Rejection:
    """Size, UTF-8 JSON, finiteness and schema checks, in that order (first failure wins)."""
    if len(raw) > max_bytes:
        return Rejection("oversize", f"payload is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return Rejection("malformed", f"payload is not UTF-8 JSON: {str(e)[:200]}")
    bad = next(_non_finite(doc), None)
    if bad is not None:
        return Rejection("non_finite", f"field '{bad}': must be a finite number")
    errors = validate(schema_name, doc)
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return Rejection("schema", f"{errors[0]}{more}")
    assert isinstance(doc, dict)  # the schema says object
    return doc


def _steps(raw: Sequence[Any], side: str) -> tuple[tuple[float, float], ...] | Rejection:
    if len(raw) > MAX_STEPS:
        return Rejection("bad_step", f"field '{side}': {len(raw)} steps, at most {MAX_STEPS}")
    out = []
    for i, step in enumerate(raw):
        if len(step) != 2:
            return Rejection("bad_step", f"field '{side}[{i}]': must be [price, kWh], "
                                         f"got {len(step)} numbers")
        out.append((float(step[0]), float(step[1])))
    return tuple(out)


def parse_bid(raw: bytes, topic_site: str, max_bytes: int = MAX_PAYLOAD_BYTES) -> Bid | Rejection:
    """Decode a ``bids/<site>`` payload; the topic's site must match the payload's."""
    doc = decode(raw, "market_bid", max_bytes)
    if isinstance(doc, Rejection):
        return doc
    if doc["site"] != topic_site:
        return Rejection("site_mismatch", f"field 'site': {doc['site']!r} differs from the "
                                          f"topic's site {topic_site!r}")
    buy = _steps(doc.get("buy", []), "buy")
    if isinstance(buy, Rejection):
        return buy
    sell = _steps(doc.get("sell", []), "sell")
    if isinstance(sell, Rejection):
        return sell
    seq = doc.get("seq")
    return Bid(community=doc["community"], interval_id=doc["interval_id"], site=doc["site"],
               bid_id=doc["bid_id"], seq=None if seq is None else int(seq), buy=buy, sell=sell)


def parse_meter(raw: bytes, topic_site: str, max_bytes: int = MAX_PAYLOAD_BYTES
                ) -> Meter | Rejection:
    """Decode a ``meter/<site>`` payload; the topic's site must match the payload's."""
    doc = decode(raw, "market_meter", max_bytes)
    if isinstance(doc, Rejection):
        return doc
    if doc["site"] != topic_site:
        return Rejection("site_mismatch", f"field 'site': {doc['site']!r} differs from the "
                                          f"topic's site {topic_site!r}")
    return Meter(community=doc["community"], interval_id=doc["interval_id"], site=doc["site"],
                 net_export_kwh=float(doc["net_export_kwh"]))


def check_curves(bid: Bid, floor: float, cap: float,
                 max_side_kwh: float = MAX_SIDE_KWH) -> Rejection | None:
    """Quantities, price bounds, monotonicity and self-crossing of a bid's two curves."""
    for side, steps in (("buy", bid.buy), ("sell", bid.sell)):
        total = 0.0
        for i, (price, kwh) in enumerate(steps):
            where = f"field '{side}[{i}]'"
            if kwh < 0:
                return Rejection("negative_quantity", f"{where}: quantity {kwh} kWh is below 0")
            if not floor <= price <= cap:
                return Rejection("price_out_of_bounds", f"{where}: price {price} is outside "
                                                        f"[{floor}, {cap}]")
            if i:
                prev = steps[i - 1][0]
                if (side == "buy" and price > prev) or (side == "sell" and price < prev):
                    trend = "non-increasing" if side == "buy" else "non-decreasing"
                    return Rejection("non_monotone", f"{where}: price {price} after {prev}; "
                                                     f"{side} prices must be {trend}")
            total += kwh
        if total > max_side_kwh:
            return Rejection("quantity_too_large", f"field '{side}': {total} kWh in all, the "
                                                   f"limit is {max_side_kwh} kWh")
    buys = [p for p, q in bid.buy if q > 0]
    sells = [p for p, q in bid.sell if q > 0]
    if buys and sells and max(buys) > min(sells):
        return Rejection("crossing", f"highest buy price {max(buys)} is above the lowest sell "
                                     f"price {min(sells)}")
    return None


# --------------------------------------------------------------------------------------------
# Builders (the operator's side of the wire)


def money(x: float) -> float:
    """Money on the wire: 6 decimals (the ledger keeps the exact float)."""
    return round(float(x), 6)


def energy(kwh: float) -> float:
    """Energy on the wire: Wh resolution."""
    return round(float(kwh), 3)


def announce_payload(a: Auction) -> dict[str, Any]:
    """Payload of ``announce``."""
    p: dict[str, Any] = {
        "v": VERSION, "community": a.community, "interval_id": a.interval_id,
        "delivery_start": a.delivery_start, "delivery_end": a.delivery_end,
        "gate_closure": a.gate_closure, "price_floor": a.price_floor,
        "price_cap": a.price_cap, "mechanism": a.mechanism,
    }
    if a.members is not None:
        p["members"] = list(a.members)
    return p


def bid_result_payload(community: str, site: str, kind: str, interval_id: str | None,
                       bid_id: str | None, code: str, reason: str | None,
                       ts: float) -> dict[str, Any]:
    """Payload of ``bid_result/<site>``: ``code`` ok/replaced (accepted) or a rejection code."""
    status = "accepted" if code in ("ok", "replaced") else "rejected"
    return {"v": VERSION, "community": community[:64], "site": site[:64], "kind": kind,
            "interval_id": None if interval_id is None else str(interval_id)[:64],
            "bid_id": None if bid_id is None else str(bid_id)[:64], "status": status,
            "code": code, "reason": None if reason is None else reason[:500],
            "ts": round(ts, 3)}


def encode(obj: Any) -> bytes:
    """Compact JSON bytes (the wire format)."""
    return dumps(obj)
